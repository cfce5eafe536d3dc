"""Sampling with part of the spectrogram known and beyond the model's window: the mask, the denoiser that holds
the known part, and the tiling of model-sized windows that makes any number of frames (region regeneration,
longer clips, continuations, loops).

Known values are held by the replacement method (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", App. I.2; the per-step replacement of RePaint, Lugmayr et al. 2022, without
its resampling jumps): wherever the mask keeps the source, the denoised estimate handed to the solver is the
source itself. Every solver here is exact for a constant denoised value, so the kept part of the state stays
on the source's own noising trajectory ``known + sigma * noise`` at every step (the network sees it at the
right noise level as context for the rest), and the final step returns the source there bit for bit. The
solvers, their exact NFE budget and classifier-free guidance are unchanged: the wrapper adds no evaluations.

A time-frequency mask works on the complex spectrogram: a time span, a frequency band, or both. Outside the
border where the inverse STFT overlaps a regenerated frame (``n_fft`` samples on each side of the span), the
output waveform is the source's.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class KnownRegionDenoiser:
    """``D'(x, sigma) = keep * known + (1 - keep) * D(x, sigma)``; ``known`` (B or 1, C, F, T), ``keep``
    broadcastable to it, 1 where the source is kept."""

    def __init__(self, denoiser, known: torch.Tensor, keep: torch.Tensor):
        self.denoiser = denoiser
        self.known = known
        self.keep = keep

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = self.denoiser(x, sigma)
        keep = self.keep.to(device=out.device, dtype=out.dtype)
        return keep * self.known.to(device=out.device, dtype=out.dtype) + (1 - keep) * out


# --- masks --------------------------------------------------------------------------------------------

def frame_span(start_s: float, end_s: float, sample_rate: int, hop: int, n_fft: int, num_frames: int
               ) -> tuple[int, int]:
    """Frames [a, b) whose analysis windows touch the time span [start_s, end_s) seconds."""
    lo = start_s * sample_rate - n_fft / 2
    hi = end_s * sample_rate + n_fft / 2
    a = max(0, math.floor(lo / hop) + 1)
    b = min(num_frames, math.ceil(hi / hop))
    return a, max(a, b)


def bin_span(low_hz: float | None, high_hz: float | None, sample_rate: int, num_bins: int) -> tuple[int, int]:
    """Bins [a, b) of the band [low_hz, high_hz] (None: from 0 / up to Nyquist)."""
    nyq = sample_rate / 2
    lo = 0.0 if low_hz is None else float(low_hz)
    hi = nyq if high_hz is None else float(high_hz)
    step = nyq / (num_bins - 1)
    a = max(0, math.floor(lo / step))
    b = min(num_bins, math.ceil(hi / step) + 1)
    return a, max(a, b)


def check_span(start, end, duration: float, what: str = "span") -> tuple[float, float]:
    try:
        a, b = float(start), float(end)
    except (TypeError, ValueError):
        raise ValueError(f"the {what} must be two times in seconds (start < end), got {start!r}, {end!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and 0.0 <= a < b <= duration + 1e-9):
        raise ValueError(f"the {what} {a:g}-{b:g} s is not inside the clip: need 0 <= start < end <= {duration:.3f} s")
    return a, b


def check_band(low, high, sample_rate: int) -> tuple[float | None, float | None]:
    nyq = sample_rate / 2
    lo = None if low in (None, "") else float(low)
    hi = None if high in (None, "") else float(high)
    if (lo is not None and not 0.0 <= lo < nyq) or (hi is not None and not 0.0 < hi <= nyq) or \
            (lo is not None and hi is not None and lo >= hi):
        raise ValueError(f"the band {lo}-{hi} Hz is invalid: need 0 <= low < high <= {nyq:g} Hz (Nyquist)")
    return lo, hi


# --- tiles: any number of frames from model-sized windows -----------------------------------------------

def tile_starts(todo: np.ndarray, width: int, stride: int, circular: bool = False) -> list[int]:
    """First frames of the windows that cover every True entry of ``todo`` (F, N): every ``stride`` frames (the
    last one clamped to the end), or around a ring when ``circular``; windows with nothing to make are left out."""
    todo = np.asarray(todo, dtype=bool)
    N = todo.shape[-1]
    if N < width:
        raise ValueError(f"{N} frames is shorter than the model's window of {width}")
    if not 0 < stride <= width:
        raise ValueError(f"the window stride must be in [1, {width}], got {stride}")
    if circular:
        starts = list(range(0, N, stride))
    else:
        starts = list(range(0, N - width + 1, stride))
        if starts[-1] + width < N:
            starts.append(N - width)
    cols = todo.any(axis=0)
    return [s0 for s0 in starts if cols[(s0 + np.arange(width)) % N].any()]


class TiledDenoiser:
    """MultiDiffusion (Bar-Tal et al. 2023, "MultiDiffusion: Fusing Diffusion Paths for Controlled Image
    Generation"): the denoiser of a spectrogram longer than the model's window is the weighted average, frame by
    frame, of the model's denoised estimates of overlapping windows, all evaluated at every step (in chunks of
    ``chunk`` windows). Every frame is thus a consensus of the windows that see it, at every noise level, so no
    frame is a hard boundary between two independent generations. ``circular``: windows wrap around (a loop).
    Each window is weighted by a raised-cosine profile that favours its centre; frames covered by no window
    (nothing to make there) pass the input through. It wraps the network (``model(x, sigma, labels)``, so
    guidance counts one call per step) or any ``denoiser(x, sigma)``."""

    def __init__(self, denoiser, starts: list[int], width: int, num_frames: int, circular: bool = False,
                 chunk: int = 16):
        self.denoiser = denoiser
        self.width, self.N, self.chunk = int(width), int(num_frames), max(1, int(chunk))
        self.index = torch.from_numpy((np.asarray(starts)[:, None] + np.arange(width)) % num_frames)   # (K, W)
        if not circular and int(self.index.max()) >= num_frames:
            raise ValueError("a window reaches past the last frame")
        self.profile = torch.sin(torch.pi * (torch.arange(width, dtype=torch.float64) + 0.5) / width) ** 2 + 1e-3

    @property
    def windows(self) -> int:
        return self.index.shape[0]

    @property
    def null_class(self) -> int:
        return self.denoiser.null_class

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C, F, N), ``sigma`` (B,); ``labels`` (B,) when the wrapped model takes class labels."""
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(B)
        K, W = self.index.shape
        acc = torch.zeros_like(x)
        wsum = torch.zeros(self.N, dtype=x.dtype, device=x.device)
        prof = self.profile.to(device=x.device, dtype=x.dtype)
        for k0 in range(0, K, self.chunk):
            idx = self.index[k0:k0 + self.chunk].to(x.device)                      # (k, W)
            k = idx.shape[0]
            tiles = x[..., idx]                                                      # (B, C, F, k, W)
            tiles = tiles.permute(3, 0, 1, 2, 4).reshape(k * B, *x.shape[1:-1], W)  # window-major
            extra = () if labels is None else (labels.repeat(k),)
            out = self.denoiser(tiles, sigma.repeat(k), *extra).to(x.dtype)
            out = out.reshape(k, B, *x.shape[1:-1], W).permute(1, 2, 3, 0, 4)       # (B, C, F, k, W)
            acc.index_add_(-1, idx.reshape(-1), (out * prof).reshape(*x.shape[:-1], k * W))
            wsum.index_add_(0, idx.reshape(-1), prof.repeat(k))
        covered = wsum > 0
        return torch.where(covered, acc / wsum.clamp_min(1e-12), x)
