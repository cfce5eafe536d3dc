"""Shippable model directories from a run: the newest checkpoint's weights with the shipped sampling settings."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..core.guidance import check_guidance, check_guidance_interval
from ..core.samplers import get_sampler, steps_for_nfe
from ..core.storage import (GUIDE_FILE, atomic_save_safetensors, load_safetensors, read_config, resolve_model_dir,
                             write_config, write_model_dir)


def with_sampling_defaults(preset, sampler=None, nfe=None, guidance=None, guidance_interval=None, *,
                           sigma_min=None, sigma_max=None, rho=None, clear_class_guidance: bool = False):
    """The preset with the shipped sampling settings replaced (validated like the app's inputs).
    ``guidance_interval``: None keeps the preset's, "none" clears it, "LO,HI" / (lo, hi) sets it.
    ``sigma_min`` / ``sigma_max`` / ``rho``: the Karras schedule the sampler walks (None keeps the preset's).
    ``clear_class_guidance``: drop the per-class scales and intervals (every class then samples at ``guidance``)."""
    preset = preset.replace_sampling(sigma_max=sigma_max, rho=rho, sigma_min=sigma_min)
    sampler = preset.default_sampler if sampler is None else sampler
    nfe = preset.default_nfe if nfe is None else int(nfe)
    guidance = preset.default_guidance if guidance is None else check_guidance(guidance)
    get_sampler(sampler)              # unknown names -> ValueError listing the registry
    steps_for_nfe(sampler, nfe)       # impossible budgets -> ValueError naming the nearest valid ones
    interval = (preset.default_guidance_interval if guidance_interval is None
                else check_guidance_interval(guidance_interval))
    if clear_class_guidance:
        preset = dataclasses.replace(preset, default_class_guidance=None, default_class_guidance_interval=None)
    return dataclasses.replace(preset, default_sampler=sampler, default_nfe=nfe, default_guidance=guidance,
                               default_guidance_interval=interval)


def export_model(run, out, *, ema_only: bool = False, sampler=None, nfe=None, guidance=None,
                 guidance_interval=None, sigma_min=None, sigma_max=None, rho=None) -> Path:
    """Write a model directory at ``out`` from ``run`` (a run directory or a model directory) with the shipped
    sampling settings replaced where given; returns the source directory. ValueError for a bad setting."""
    src = resolve_model_dir(run)
    preset, classes = read_config(src)
    preset = with_sampling_defaults(preset, sampler, nfe, guidance, guidance_interval, sigma_min=sigma_min,
                                    sigma_max=sigma_max, rho=rho)
    info = json.loads((src / "info.json").read_text()) if (src / "info.json").is_file() else None
    model = load_safetensors(src / "model.safetensors") if (src / "model.safetensors").is_file() else None
    guide = src / GUIDE_FILE
    if preset.guide is not None and not guide.is_file():
        preset = dataclasses.replace(preset, guide=None)
    write_model_dir(out, preset, classes, load_safetensors(src / "ema.safetensors"), None if ema_only else model, info)
    if preset.guide is not None:                    # the guide model travels with the weights it guides
        atomic_save_safetensors(Path(out) / GUIDE_FILE, load_safetensors(guide))
    return src


def attach_guide(checkpoint, guide, *, weights: str = "ema", note: str | None = None) -> str:
    """Give the model directory ``checkpoint`` a guide model for autoguidance (Karras et al. 2024): ``guide``'s
    ``weights`` (a model or run directory of the same network, classes and representation — an earlier or weaker
    version of it) stored as ``guide.safetensors`` in float16, and ``preset.guide`` set to ``note`` (default: the
    guide's step and source). Guidance with scale w then pushes away from that model instead of the null class
    (pass ``guidance_reference="null"`` for classifier-free guidance). ``guide=None`` removes it. Returns the note.
    ValueError if the two models differ in network, classes or per-bin / per-class gains."""
    from .trainer import same_model
    model_dir = resolve_model_dir(checkpoint)
    preset, classes = read_config(model_dir)
    if guide is None:
        (model_dir / GUIDE_FILE).unlink(missing_ok=True)
        preset, note = dataclasses.replace(preset, guide=None), None
    else:
        if weights not in ("ema", "model"):
            raise ValueError(f"guide weights must be 'ema' or 'model', got {weights!r}")
        src = resolve_model_dir(guide)
        g_preset, g_classes = read_config(src)
        if list(g_classes) != list(classes):
            raise ValueError(f"the guide {src} has other classes ({', '.join(g_classes)}) than {model_dir}")
        if not same_model(g_preset, preset):
            raise ValueError(f"the guide {src} is another network or representation (network, codec, per-bin and "
                             f"per-class gains must match {model_dir})")
        path = src / f"{weights}.safetensors"
        if not path.is_file():
            raise ValueError(f"{src} has no {weights} weights")
        info = json.loads((src / "info.json").read_text()) if (src / "info.json").is_file() else {}
        note = note or (f"step {int(info['steps']):,} ({weights} weights)" if "steps" in info
                        else f"{src.name} ({weights} weights)")
        atomic_save_safetensors(model_dir / GUIDE_FILE, {k: v.half() for k, v in load_safetensors(path).items()})
        preset = dataclasses.replace(preset, guide=note)
    write_config(model_dir, preset, classes)
    return note
