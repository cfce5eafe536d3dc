"""Discriminator guidance (Kim, Kim, Kang, Moon 2023, "Refining Generative Process with Discriminator Guidance in
Score-based Diffusion Models"): a small network told the model's own samples from real clips, noised to the same
level, corrects the model's score by the log density ratio it has learned.

At noise level sigma a discriminator d(x, sigma, c) (the probability that x is a noised real clip of class c rather
than a noised sample of the model) estimates p_real / p_model = d / (1 - d), whose log is d's logit. The corrected
score is the model's plus the gradient of that logit; in the denoiser's terms (score = (D - x) / sigma^2):

    D'(x, sigma, c) = D(x, sigma, c) + w sigma^2 grad_x logit d(x, sigma, c)

w = 1 is the correction the paper derives; only levels in the class's interval are corrected. Where the model makes a
kind of sound too often (a share of its clips with a trait real clips rarely have), the correction steers the
high-noise steps, where that choice is made, away from it. No output is rescaled: the sampler's path is.

The network (:class:`NoisyDiscriminator`) is small: the noised state scaled as the diffusion network's input
(c_in), a few strided convolutions conditioned on the noise level and the class, pooled over time only (the traits
it looks for sit at particular frequencies), then linear. It lives beside the model in ``discriminator.safetensors``
and its settings in ``config.json`` under ``discriminator``.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from .storage import load_safetensors

__all__ = ["NoisyDiscriminator", "DiscriminatorGuidedDenoiser", "DiscriminatorSpec", "load_discriminator",
           "CONFIG_KEY", "WEIGHTS_FILE"]

CONFIG_KEY = "discriminator"
WEIGHTS_FILE = "discriminator.safetensors"


class NoisyDiscriminator(nn.Module):
    """logit(x, sigma, labels): how much more likely ``x`` is a real clip of its class noised to ``sigma`` than a
    noised sample of the model. Input (B, C, F, T), F divisible by 2^len(widths)."""

    def __init__(self, in_channels: int, num_bins: int, num_classes: int, widths=(16, 32, 32, 64),
                 sigma_data: float = 0.2, emb_dim: int = 64):
        super().__init__()
        self.sigma_data = float(sigma_data)
        self.widths = tuple(int(w) for w in widths)
        self.emb_sigma = nn.Sequential(nn.Linear(16, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.emb_class = nn.Embedding(num_classes, emb_dim)
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(64), 8)), persistent=False)
        convs, films = [], []
        c = in_channels
        for w in self.widths:
            convs.append(nn.Conv2d(c, w, 3, stride=2, padding=1))
            films.append(nn.Linear(emb_dim, 2 * w))
            c = w
        self.convs, self.films = nn.ModuleList(convs), nn.ModuleList(films)
        f_out = num_bins // 2 ** len(self.widths)
        if f_out < 1 or num_bins % 2 ** len(self.widths):
            raise ValueError(f"{num_bins} frequency bins cannot be halved {len(self.widths)} times")
        self.head = nn.Linear(c * f_out, 1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        c_in = 1.0 / torch.sqrt(sigma ** 2 + self.sigma_data ** 2)
        h = x.float() * c_in.reshape(-1, 1, 1, 1)
        ls = (torch.log(sigma) / 4)[:, None] * self.freqs[None]
        emb = self.emb_sigma(torch.cat([torch.sin(ls), torch.cos(ls)], dim=1)) + self.emb_class(labels.long())
        for conv, film in zip(self.convs, self.films):
            h = conv(h)
            scale, shift = film(emb).chunk(2, dim=1)
            h = torch.nn.functional.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        return self.head(h.mean(dim=-1).flatten(1)).squeeze(1)          # pooled over time, per frequency


@dataclasses.dataclass(frozen=True)
class DiscriminatorSpec:
    """Which classes are corrected, how strongly (``scales``) and at which noise levels (``intervals``: (lo, hi],
    the class's own), and the network's widths."""
    scales: dict
    intervals: dict
    widths: tuple = (16, 32, 32, 64)

    @classmethod
    def from_dict(cls, d: dict | None, classes) -> "DiscriminatorSpec | None":
        if not d:
            return None
        unknown = [c for c in d.get("scales", {}) if c not in classes]
        if unknown:
            raise ValueError(f"the discriminator names classes the model does not have: {unknown}")
        return cls(scales={k: float(v) for k, v in d["scales"].items()},
                   intervals={k: (float(v[0]), float(v[1])) for k, v in d["intervals"].items()},
                   widths=tuple(int(w) for w in d.get("widths", cls.widths)))

    def to_dict(self) -> dict:
        return {"scales": dict(self.scales), "intervals": {k: list(v) for k, v in self.intervals.items()},
                "widths": list(self.widths)}


def load_discriminator(model_dir, spec: DiscriminatorSpec | None, codec_shape, num_classes: int, sigma_data: float,
                       device="cpu") -> NoisyDiscriminator | None:
    """The model directory's discriminator in eval mode, or None where its config names none."""
    if spec is None:
        return None
    path = Path(model_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} names a discriminator but has no {WEIGHTS_FILE}")
    net = NoisyDiscriminator(codec_shape[0], codec_shape[1], num_classes, spec.widths, sigma_data)
    net.load_state_dict(load_safetensors(path))
    return net.to(device).eval().requires_grad_(False)


class DiscriminatorGuidedDenoiser:
    """D'(x, sigma) = D(x, sigma) + scale sigma^2 grad_x logit(x, sigma, labels) for sigma in (lo, hi]; D elsewhere.
    ``denoiser`` is a plain D(x, sigma) (labels bound, e.g. a :class:`~edmsound.core.guidance.GuidedDenoiser`)."""

    def __init__(self, denoiser, discriminator: NoisyDiscriminator, class_labels: torch.Tensor, scale: float,
                 interval: tuple[float, float]):
        self.denoiser = denoiser
        self.disc = discriminator
        self.labels = torch.as_tensor(class_labels).long().reshape(-1)
        self.scale = float(scale)
        self.interval = (float(interval[0]), float(interval[1]))
        self.corrected_calls = 0

    def correction(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """sigma^2 grad_x logit(x, sigma) (float32, x's shape)."""
        with torch.enable_grad():
            xi = x.detach().float().requires_grad_(True)
            logit = self.disc(xi, sigma.float(), self.labels.to(x.device))
            (grad,) = torch.autograd.grad(logit.sum(), xi)
        return grad * (sigma.float() ** 2).reshape(-1, *([1] * (x.dim() - 1)))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = self.denoiser(x, sigma)
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        lo, hi = self.interval
        mask = (s > lo) & (s <= hi)
        if self.scale == 0.0 or not bool(mask.any()):
            return out
        self.corrected_calls += 1
        corr = self.scale * self.correction(x, s) * mask.reshape(-1, *([1] * (x.dim() - 1)))
        return out + corr.to(out.dtype)
