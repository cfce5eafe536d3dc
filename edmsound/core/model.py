"""Build the preconditioned denoiser for a preset, and load one from a checkpoint directory; the numeric precision
it runs at (bfloat16 autocast only where the hardware computes in bfloat16)."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from .storage import GUIDE_FILE, load_safetensors, load_weights, read_config, read_config_json, resolve_model_dir
from .edm import EDMPrecond
from .presets import PRECISIONS, Preset
from .unet import EfficientUNet


def _arm_cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("Features") and flag in line.split(":", 1)[1].split() for line in f)
    except OSError:
        return False


def bf16_native(device="cpu") -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware: a CUDA GPU that supports it, an x86 CPU
    with AVX512-BF16 or AMX, an ARM CPU with the ``bf16`` feature. Elsewhere (e.g. an AVX2-only CPU) bfloat16 is
    emulated, and an autocast network runs several times slower than in float32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        f = getattr(torch.cpu, probe, None)
        if f is not None and f():
            return True
    return platform.machine().lower() in ("aarch64", "arm64") and _arm_cpu_flag("bf16")


def resolve_bf16(preset: Preset, device="cpu", bf16: bool | str | None = None) -> bool:
    """Whether the network runs under bfloat16 autocast. ``bf16``: True / ``"bf16"`` or False / ``"fp32"`` decide;
    None / ``"auto"``: as the preset trained (``preset.train.bf16``) where the device computes bfloat16 natively
    (:func:`bf16_native`), float32 otherwise. Either precision samples the same weights; they differ by rounding."""
    if isinstance(bf16, str):
        if bf16 not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {bf16!r}")
        bf16 = None if bf16 == "auto" else bf16 == "bf16"
    if bf16 is None:
        return bool(preset.train.bf16) and bf16_native(device)
    return bool(bf16)


def precision_name(den: EDMPrecond) -> str:
    """``"bf16"`` (the network under bfloat16 autocast) or ``"fp32"``."""
    return "bf16" if den.autocast_dtype == torch.bfloat16 else "fp32"


def build_denoiser(preset: Preset, num_classes: int, bf16: bool | str | None = None,
                   device="cpu") -> EDMPrecond:
    """The preconditioned network for ``preset`` (untrained); ``bf16`` / ``device``: see :func:`resolve_bf16`."""
    net = EfficientUNet(preset.net, num_classes=num_classes, in_channels=preset.codec.channels)
    use_bf16 = resolve_bf16(preset, device, bf16)
    fmt = torch.channels_last if preset.net.channels_last else torch.contiguous_format
    net.to(memory_format=fmt)
    return EDMPrecond(net, num_classes, preset.edm.sigma_data,
                      autocast_dtype=torch.bfloat16 if use_bf16 else None, memory_format=fmt)


def load_denoiser(path, device="cpu", weights: str = "ema", bf16: bool | str | None = None
                  ) -> tuple[EDMPrecond, Preset, list[str], Path]:
    """Load ``weights`` ('ema' or 'model') from a model or run directory; returns the denoiser in eval mode
    (``bf16``: its precision, see :func:`resolve_bf16`)."""
    return load_model_dir(path, device, weights, bf16)[:4]


def load_model_dir(path, device="cpu", weights: str = "ema", bf16: bool | str | None = None
                   ) -> tuple[EDMPrecond, Preset, list[str], Path, dict]:
    """:func:`load_denoiser`, with the directory's config.json (read once) as a fifth item."""
    model_dir = resolve_model_dir(path)
    cfg = read_config_json(model_dir)
    preset, classes = read_config(model_dir, cfg)
    den = build_denoiser(preset, len(classes), bf16=bf16, device=device)
    sd = load_safetensors(model_dir / f"{weights}.safetensors")
    load_weights(den.net, sd, model_dir / f"{weights}.safetensors")
    den = den.to(device).eval().requires_grad_(False)
    return den, preset, classes, model_dir, cfg


def load_guide(model_dir, preset: Preset, num_classes: int, device="cpu", bf16: bool | str | None = None
               ) -> EDMPrecond | None:
    """The model directory's guide model (autoguidance, :attr:`Preset.guide`) in eval mode, or None when the
    checkpoint guides with its null class. The guide shares the network and runs at the main model's precision."""
    if preset.guide is None:
        return None
    path = Path(model_dir) / GUIDE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} names a guide model ({preset.guide}) but has no {GUIDE_FILE}")
    den = build_denoiser(preset, num_classes, bf16=bf16, device=device)
    load_weights(den.net, load_safetensors(path), path)        # float16 on disk, cast to the network's dtype
    return den.to(device).eval().requires_grad_(False)
