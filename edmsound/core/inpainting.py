"""Sampling with part of the spectrogram known: the mask, the denoiser that holds the known part, and the plan
of model-sized windows that fills any number of frames (region regeneration, longer clips, loops).

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
from dataclasses import dataclass

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


# --- window plans -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    frames: np.ndarray          # the buffer frames this window covers (indices; a seam window wraps around)
    generate: np.ndarray        # (F, W) bool: entries of the window the sampler makes (the rest are known)


def plan_windows(todo: np.ndarray, width: int, context: int) -> list[Window]:
    """Windows of ``width`` frames that together make every True entry of ``todo`` (F, N), each with up to
    ``context`` already-known frames before its first entry to make (its left context; later windows see what
    earlier ones made, and a window clamped at the end sees more). A loop's wrap point is remade afterwards by
    :func:`seam_window`."""
    todo = np.array(todo, dtype=bool)
    F, N = todo.shape
    if N < width:
        raise ValueError(f"a buffer of {N} frames is shorter than the model's window of {width}")
    if not 0 <= context < width:
        raise ValueError(f"context must be in [0, {width}), got {context}")
    windows = []
    while todo.any():
        first = int(np.flatnonzero(todo.any(axis=0))[0])
        start = min(max(first - context, 0), N - width)
        frames = start + np.arange(width)
        windows.append(Window(frames=frames, generate=todo[:, frames].copy()))
        todo[:, frames] = False
    return windows


def seam_window(num_frames: int, width: int, seam: int) -> Window:
    """The window that remakes a loop's wrap point: ``seam`` frames centred on it (half at the end, half at
    the start), the rest of a ``width``-frame window centred on it kept as context from both sides."""
    if not 0 < seam < width <= num_frames:
        raise ValueError(f"need 0 < seam < window <= loop frames, got seam {seam}, window {width}, loop {num_frames}")
    frames = (num_frames - width // 2 + np.arange(width)) % num_frames
    gen = np.zeros(width, dtype=bool)
    gen[width // 2 - seam // 2: width // 2 - seam // 2 + seam] = True
    return Window(frames=frames, generate=np.broadcast_to(gen, (1, width)).copy())


def window_seed(seed: int, window: int) -> int:
    """Seed of window ``window`` of a clip whose seed is ``seed`` (window 0 uses the clip's own seed)."""
    if window == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(window)]).generate_state(1)[0] & 0x7FFFFFFF)
