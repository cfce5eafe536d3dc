"""Build the preconditioned denoiser for a preset, and load one from a checkpoint directory."""
from __future__ import annotations

from pathlib import Path

import torch

from .storage import load_safetensors, load_weights, read_config, resolve_model_dir
from .edm import EDMPrecond
from .presets import Preset
from .unet import EfficientUNet


def build_denoiser(preset: Preset, num_classes: int, bf16: bool | None = None) -> EDMPrecond:
    net = EfficientUNet(preset.net, num_classes=num_classes, in_channels=preset.codec.channels)
    use_bf16 = preset.train.bf16 if bf16 is None else bf16
    fmt = torch.channels_last if preset.net.channels_last else torch.contiguous_format
    net.to(memory_format=fmt)
    return EDMPrecond(net, num_classes, preset.edm.sigma_data,
                      autocast_dtype=torch.bfloat16 if use_bf16 else None, memory_format=fmt)


def load_denoiser(path, device="cpu", weights: str = "ema", bf16: bool | None = None
                  ) -> tuple[EDMPrecond, Preset, list[str], Path]:
    """Load ``weights`` ('ema' or 'model') from a model or run directory; returns the denoiser in eval mode."""
    model_dir = resolve_model_dir(path)
    preset, classes = read_config(model_dir)
    den = build_denoiser(preset, len(classes), bf16=bf16)
    sd = load_safetensors(model_dir / f"{weights}.safetensors")
    load_weights(den.net, sd, model_dir / f"{weights}.safetensors")
    den = den.to(device).eval().requires_grad_(False)
    return den, preset, classes, model_dir
