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


def guided_classes(preset, classes) -> dict[str, float]:
    """The classes ``preset`` samples with guidance other than 1 by default, with their scales."""
    return {c: preset.guidance_for(c) for c in classes if preset.guidance_for(c) != 1.0}


def missing_guide_note(model_dir) -> str | None:
    """One line for a model whose default guidance was set with a guide model it does not hold, else None.

    A consistency-tuned model tuned further keeps the per-class guidance calibrated for it, but a run carries no guide
    model: exported, it would push those classes away from the null class (classifier-free guidance) instead of from
    the guide the scales were chosen with, and sound unlike the model it continues. Its record names that guide and
    the scales (``guidance_guide``); the note goes away once a guide is attached or the scales are cleared or set
    again."""
    model_dir = resolve_model_dir(model_dir)
    preset, classes = read_config(model_dir)
    if preset.guide is not None:
        return None
    info = json.loads((model_dir / "info.json").read_text()) if (model_dir / "info.json").is_file() else {}
    set_with = info.get("consistency", {}).get("guidance_guide")      # recorded by a continued consistency tuning
    if not set_with:
        return None
    recorded = set_with.get("scales", {})
    guided = {c: w for c, w in guided_classes(preset, classes).items() if recorded.get(c) == w}
    if not guided:
        return None
    scales = ", ".join(f"{c} {w:g}" for c, w in guided.items())
    return (f"{model_dir}: its default guidance ({scales}) was set with a guide model ({set_with['guide']}) that it "
            "does not "
            "hold, so those classes would be guided away from the null class instead; give it the guide again "
            f"(edmsound attach-guide --checkpoint {model_dir} --guide MODEL) or clear the scales "
            f"(edmsound calibrate-guidance --checkpoint {model_dir} --clear)")


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


def blend_models(start, end, out, *, weight: float) -> Path:
    """Write at ``out`` a model whose EMA weights are ``(1 - weight) · start + weight · end``: two models of the same
    network, classes and representation — typically a model and the same model tuned further — interpolated in
    weight space (as WiSE-FT does for fine-tuned models, Wortsman et al. 2022), to keep part of what the tuning changed
    at less of what it cost. The blend takes ``end``'s config (its sampling settings; a matching EQ measured for
    ``end`` is dropped, as it does not fit the blend) and its info.json with ``blend`` added (both models, their EMA
    sha256 and the weight). Returns ``out``. ValueError for a weight outside [0, 1] or models that differ."""
    import hashlib
    from .trainer import same_model
    if not (isinstance(weight, (int, float)) and 0.0 <= weight <= 1.0):
        raise ValueError(f"the blend weight must be between 0 and 1, got {weight!r}")
    a_dir, b_dir = resolve_model_dir(start), resolve_model_dir(end)
    (a_preset, a_classes), (b_preset, b_classes) = read_config(a_dir), read_config(b_dir)
    if list(a_classes) != list(b_classes):
        raise ValueError(f"{a_dir} and {b_dir} have other classes: a blend needs the same model tuned two ways")
    if not same_model(a_preset, b_preset):
        raise ValueError(f"{a_dir} and {b_dir} are other networks or representations (network, codec, per-bin and "
                         "per-class gains must match)")
    out = Path(out)
    if out.resolve() in (a_dir.resolve(), b_dir.resolve()):
        raise ValueError(f"write the blend to a new directory, not over {out}")
    paths = [d / "ema.safetensors" for d in (a_dir, b_dir)]
    wa, wb = (load_safetensors(p) for p in paths)
    if wa.keys() != wb.keys() or any(wa[k].shape != wb[k].shape for k in wa):
        raise ValueError(f"the weights of {a_dir} and {b_dir} do not match tensor for tensor")
    blended = {k: (1.0 - weight) * wa[k].double() + weight * wb[k].double() for k in wb}
    info = json.loads((b_dir / "info.json").read_text()) if (b_dir / "info.json").is_file() else {}
    info["blend"] = {"start": a_dir.name, "end": b_dir.name, "weight": float(weight),
                     "start_sha256": hashlib.sha256(paths[0].read_bytes()).hexdigest(),
                     "end_sha256": hashlib.sha256(paths[1].read_bytes()).hexdigest()}
    write_model_dir(out, b_preset, list(b_classes), {k: v.float() for k, v in blended.items()}, info=info)
    if b_preset.guide is not None:                   # the guide model goes with the config that names it
        import shutil
        shutil.copy2(b_dir / GUIDE_FILE, out / GUIDE_FILE)
    return out
