"""Shippable model directories from a run: the newest checkpoint's weights with the shipped sampling settings."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..core.guidance import check_guidance, check_guidance_interval
from ..core.samplers import get_sampler, steps_for_nfe
from ..core.storage import load_safetensors, read_config, resolve_model_dir, write_model_dir


def with_sampling_defaults(preset, sampler=None, nfe=None, guidance=None, guidance_interval=None, *,
                           sigma_min=None, sigma_max=None, rho=None):
    """The preset with the shipped sampling settings replaced (validated like the app's inputs).
    ``guidance_interval``: None keeps the preset's, "none" clears it, "LO,HI" / (lo, hi) sets it.
    ``sigma_min`` / ``sigma_max`` / ``rho``: the Karras schedule the sampler walks (None keeps the preset's)."""
    preset = preset.replace_sampling(sigma_max=sigma_max, rho=rho, sigma_min=sigma_min)
    sampler = preset.default_sampler if sampler is None else sampler
    nfe = preset.default_nfe if nfe is None else int(nfe)
    guidance = preset.default_guidance if guidance is None else check_guidance(guidance)
    get_sampler(sampler)              # unknown names -> ValueError listing the registry
    steps_for_nfe(sampler, nfe)       # impossible budgets -> ValueError naming the nearest valid ones
    interval = (preset.default_guidance_interval if guidance_interval is None
                else check_guidance_interval(guidance_interval))
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
    write_model_dir(out, preset, classes, load_safetensors(src / "ema.safetensors"), None if ema_only else model, info)
    return src
