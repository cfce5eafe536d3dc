"""Mel filterbanks (HTK mel scale, Slaney area normalisation), shared by the classifier's front end, the join
measures and the log-mel representation."""
from __future__ import annotations

import numpy as np


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) triangular filters on the HTK mel scale, each with unit area
    (Slaney normalisation: 2 / (f_hi - f_lo))."""
    f_max = sample_rate / 2 if f_max is None else float(f_max)
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={f_min}, f_max={f_max}, "
                         f"sample_rate={sample_rate}")
    if n_mels < 1:
        raise ValueError(f"n_mels must be >= 1, got {n_mels}")
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    pts = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    lo, mid, hi = pts[:-2], pts[1:-1], pts[2:]
    up = (freqs[:, None] - lo[None]) / (mid - lo)[None]
    down = (hi[None] - freqs[:, None]) / (hi - mid)[None]
    fb = np.maximum(0.0, np.minimum(up, down))
    return (fb * (2.0 / (hi - lo))[None]).astype(np.float32)
