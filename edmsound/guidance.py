"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022).

    D_w(x, sigma, c) = D(x, sigma, null) + w * (D(x, sigma, c) - D(x, sigma, null))

Both halves run in ONE batched network call, which counts as one network evaluation (NFE) — the
batch is twice as large, so wall time grows, but the number of sequential solver steps does not.
w = 1 is plain conditional sampling and makes no unconditional call at all; w = 0 is unconditional.
"""
from __future__ import annotations

import torch

GUIDANCE_RANGE = (0.0, 20.0)


def check_guidance(scale: float) -> float:
    lo, hi = GUIDANCE_RANGE
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"guidance scale must be a number in [{lo:g}, {hi:g}], got {scale!r}") from None
    if not lo <= scale <= hi:
        raise ValueError(f"guidance scale {scale:g} is out of range: allowed [{lo:g}, {hi:g}] "
                         "(1 = conditional, 0 = unconditional)")
    return scale


class GuidedDenoiser:
    """Binds class labels and a guidance scale to an ``EDMPrecond``: the result is a plain D(x, sigma)."""

    def __init__(self, model, class_labels: torch.Tensor, scale: float = 1.0):
        self.model = model
        self.labels = torch.as_tensor(class_labels).long().reshape(-1)
        self.scale = check_guidance(scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        labels = self.labels.to(x.device)
        if self.scale == 1.0:
            return self.model(x, sigma, labels)
        null = torch.full_like(labels, self.model.null_class)
        if self.scale == 0.0:
            return self.model(x, sigma, null)
        d = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
        cond, uncond = d.chunk(2)
        return uncond + self.scale * (cond - uncond)
