"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022).

    D_w(x, sigma, c) = D(x, sigma, null) + w * (D(x, sigma, c) - D(x, sigma, null))

Both halves count as one network evaluation (NFE): the number of sequential solver steps does not grow, the work
per step does (one double batch on an accelerator; two calls on a CPU, where that is cheaper).
w = 1 is plain conditional sampling and makes no unconditional call at all; w = 0 is unconditional.

Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves
sample and distribution quality in diffusion models"): with ``interval=(lo, hi)`` the guided combination is
used only for noise levels lo < sigma <= hi; elsewhere the denoiser is the plain conditional D(x, sigma, c).
Guidance at high noise levels pulls every trajectory of a class towards the same few modes (less diversity);
at low noise levels it hardly changes the result. Outside the interval the network runs a single batch, so
a sampler that spends k of its evaluations outside the interval does k fewer half-batches of work.

Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): with a
``reference`` denoiser — a weaker version of the same network, e.g. an earlier checkpoint — the second half is
that model's *conditional* estimate instead of the null class's,

    D_w(x, sigma, c) = D_ref(x, sigma, c) + w * (D(x, sigma, c) - D_ref(x, sigma, c)),

which pushes each step away from the errors the weaker model makes more of (for this project's default: clips
quieter and duller than the real ones) rather than towards the class. Scales, intervals and cost are the same.
"""
from __future__ import annotations

import math

import torch

GUIDANCE_RANGE = (0.0, 20.0)
# What guidance pushes away from: the model's own null class (classifier-free) or the checkpoint's guide model
# (autoguidance); "default": the checkpoint's choice (its guide model where it has one).
REFERENCES = ("default", "null", "guide")


def check_reference(reference) -> str:
    text = "default" if reference is None else str(reference).strip().lower()
    if text not in REFERENCES:
        raise ValueError(f"guidance reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    return text


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


def check_guidance_interval(interval) -> tuple[float, float] | None:
    """``None`` (guidance at every noise level) or ``(lo, hi)`` with 0 <= lo < hi; also parses "LO,HI" / "none"."""
    if interval is None:
        return None
    if isinstance(interval, str):
        text = interval.strip().lower()
        if text in ("", "none", "all"):
            return None
        parts = [t for t in text.replace(",", " ").split() if t]
        try:
            interval = tuple(float(t) for t in parts)
        except ValueError:
            raise ValueError(f"guidance interval must be 'LO,HI' (noise levels, 0 <= LO < HI) or 'none', "
                             f"got {text!r}") from None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval must be two noise levels (lo, hi) with 0 <= lo < hi, got {interval!r}") from None
    if not (math.isfinite(lo) and 0.0 <= lo < hi):
        raise ValueError(f"guidance interval ({lo:g}, {hi:g}) is invalid: need 0 <= lo < hi (noise levels sigma; "
                         "hi may be inf)")
    return (lo, hi)


def guided_combination(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """D_u + w (D_c - D_u): ``scale`` a number, or a 1-D tensor with one scale per sample."""
    if torch.is_tensor(scale) and scale.dim() == 1:
        scale = scale.reshape((-1,) + (1,) * (cond.dim() - 1)).to(cond.dtype)
    return uncond + scale * (cond - uncond)


def format_guidance_interval(interval) -> str:
    """For people: "all σ" or "σ ∈ (lo, hi]"."""
    return "all σ" if interval is None else f"σ ∈ ({interval[0]:g}, {interval[1]:g}]"


def interval_list(interval) -> list[float] | None:
    """For JSON (settings, configs, records): None or [lo, hi]."""
    return None if interval is None else [float(interval[0]), float(interval[1])]


def interval_text(interval) -> str:
    """For tables and the ``--points`` syntax: "" (every σ) or "LO:HI"."""
    return "" if interval is None else f"{float(interval[0]):g}:{float(interval[1]):g}"


class GuidedDenoiser:
    """Binds class labels, a guidance scale and optionally a guidance interval to an ``EDMPrecond``: the
    result is a plain D(x, sigma). ``guided_calls`` / ``plain_calls`` count the guided (conditional and
    unconditional: two network passes) and plain evaluations made (for cost accounting). On a CPU the two passes
    are two calls (1.6-1.9 x one call on the 2-core EPYC, against 2.2-2.3 x for one double batch); elsewhere one
    double batch. ``reference``: a weaker denoiser of the same classes whose conditional estimate replaces the
    unconditional one (autoguidance; always two calls)."""

    def __init__(self, model, class_labels: torch.Tensor, scale: float = 1.0, interval=None, reference=None):
        self.model = model
        self.reference = reference          # autoguidance: a weaker model's conditional estimate (None: null class)
        self.labels = torch.as_tensor(class_labels).long().reshape(-1)
        self.scale = check_guidance(scale)
        self.interval = check_guidance_interval(interval)
        self.guided_calls = 0
        self.plain_calls = 0

    def in_interval(self, sigma: torch.Tensor) -> torch.Tensor:
        """Boolean mask: where the guided combination applies (everywhere without an interval)."""
        if self.interval is None:
            return torch.ones(sigma.shape, dtype=torch.bool, device=sigma.device)
        lo, hi = self.interval
        return (sigma > lo) & (sigma <= hi)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        labels = self.labels.to(x.device)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        if self.scale == 1.0:
            self.plain_calls += 1
            return self.model(x, sigma, labels)
        mask = self.in_interval(sigma)
        if not bool(mask.any()):                       # outside the interval: conditional only, one batch
            self.plain_calls += 1
            return self.model(x, sigma, labels)
        null = torch.full_like(labels, self.model.null_class)
        cond = None
        if self.reference is not None:                 # autoguidance: the weaker model, same labels
            if self.scale == 0.0:
                self.plain_calls += 1
                out = self.reference(x, sigma, labels)
            else:
                self.guided_calls += 1
                cond, ref = self.model(x, sigma, labels), self.reference(x, sigma, labels)
                out = guided_combination(cond, ref, self.scale)
        elif self.scale == 0.0:
            self.plain_calls += 1
            out = self.model(x, sigma, null)
        else:
            self.guided_calls += 1
            if x.device.type == "cpu":                 # two calls: cheaper than one double batch on a CPU
                cond, uncond = self.model(x, sigma, labels), self.model(x, sigma, null)
            else:
                cond, uncond = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                          torch.cat([labels, null])).chunk(2)
            out = guided_combination(cond, uncond, self.scale)
        if not bool(mask.all()):                       # mixed noise levels in one batch (not from our samplers)
            if cond is None:
                cond = self.model(x, sigma, labels)
            out = torch.where(mask.reshape(-1, *([1] * (x.dim() - 1))), out, cond)
        return out
