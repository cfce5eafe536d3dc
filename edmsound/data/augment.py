"""Waveform augmentations for copy detection (EDMSound, Zhu et al. 2023, "Copy detection").

Two recipes share the same building blocks:

* :class:`CopyAugment` is the paper's recipe for the copy-detection head: an augmented *copy* of a
  training clip (random crop, Gaussian noise at SNR 80-100 dB, gain 0.25-1.25, time shift up to
  0.2 s). A model that reproduces a training clip up to these changes should be caught.
* :class:`ContrastiveAugment` makes the two views used to train the embedded default encoder
  contrastively (crop/shift, gain, noise at high SNR, mild EQ).

Every function takes a 1-D float32 array and a ``numpy.random.Generator`` where it is random, and
returns a new float32 array of the same length (time shifts and crops zero-fill), so the content
offset is known exactly: it is returned by the recipes to align windows of a copy with the original.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["add_noise_snr", "apply_gain", "time_shift", "random_crop", "mild_eq", "CopyAugment",
           "ContrastiveAugment"]


def _as_wave(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {x.shape}")
    return x


def add_noise_snr(x, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add white Gaussian noise ``snr_db`` below the clip's mean power."""
    x = _as_wave(x)
    power = float(np.mean(x.astype(np.float64) ** 2))
    if power <= 0.0:
        return x.copy()
    sigma = np.sqrt(power / (10.0 ** (snr_db / 10.0)))
    return (x + sigma * rng.standard_normal(len(x))).astype(np.float32)


def apply_gain(x, gain: float) -> np.ndarray:
    """Multiply by a linear gain."""
    return (_as_wave(x) * np.float32(gain)).astype(np.float32)


def time_shift(x, shift: int) -> np.ndarray:
    """Delay (``shift > 0``) or advance (``shift < 0``) by ``shift`` samples, zero-filling; same length."""
    x = _as_wave(x)
    shift = int(shift)
    out = np.zeros_like(x)
    if shift >= 0:
        if shift < len(x):
            out[shift:] = x[: len(x) - shift]
    elif -shift < len(x):
        out[: len(x) + shift] = x[-shift:]
    return out


def random_crop(x, rng: np.random.Generator, min_keep: float = 0.8) -> tuple[np.ndarray, int]:
    """Keep a random contiguous segment of at least ``min_keep`` of the clip, moved to the start and
    zero-padded back to the original length. Returns (cropped, start) where ``start`` is the number of
    samples cut at the beginning (the content moves ``start`` samples earlier)."""
    x = _as_wave(x)
    n = len(x)
    keep = int(round(n * rng.uniform(min_keep, 1.0)))
    keep = min(max(keep, 1), n)
    start = int(rng.integers(0, n - keep + 1))
    out = np.zeros_like(x)
    out[:keep] = x[start:start + keep]
    return out, start


def mild_eq(x, rng: np.random.Generator, max_db: float = 3.0, bumps: int = 3) -> np.ndarray:
    """Random smooth EQ: a sum of ``bumps`` random cosines over log-frequency, at most ``max_db`` dB."""
    x = _as_wave(x)
    n = len(x)
    spec = np.fft.rfft(x.astype(np.float64))
    f = np.arange(len(spec), dtype=np.float64) / max(len(spec) - 1, 1)   # 0..1 of Nyquist
    logf = np.log2(np.maximum(f, 1e-3)) / np.log2(1e-3)                   # 1 (low) .. 0 (Nyquist)
    curve = np.zeros_like(f)
    for _ in range(bumps):
        curve += np.cos(2 * np.pi * (rng.uniform(0.3, 2.0) * logf + rng.uniform()))
    curve *= max_db / max(bumps, 1)
    return np.fft.irfft(spec * 10.0 ** (curve / 20.0), n).astype(np.float32)


@dataclass(frozen=True)
class CopyAugment:
    """The paper's augmented copy: random crop, noise at SNR 80-100 dB, gain 0.25-1.25, shift <= 0.2 s.

    ``__call__(wave, sample_rate, rng)`` returns ``(copy, offset)`` where ``offset`` (samples) is where
    the original's sample 0 lands in the copy: content at time t of the original is at t + offset.
    """
    snr_db: tuple[float, float] = (80.0, 100.0)
    gain: tuple[float, float] = (0.25, 1.25)
    max_shift_seconds: float = 0.2
    crop_min_keep: float = 0.8

    def __call__(self, wave, sample_rate: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        x, start = random_crop(wave, rng, self.crop_min_keep)
        m = int(round(self.max_shift_seconds * sample_rate))
        shift = int(rng.integers(-m, m + 1)) if m > 0 else 0
        x = time_shift(x, shift)
        x = apply_gain(x, rng.uniform(*self.gain))
        x = add_noise_snr(x, rng.uniform(*self.snr_db), rng)
        return x, shift - start


@dataclass(frozen=True)
class ContrastiveAugment:
    """One view for contrastive training of the default encoder: gain, noise at high SNR, mild EQ.

    Crops/shifts are done by the caller when it cuts windows (two views of a clip are cut at
    offsets up to ``max_offset_seconds`` apart); this class perturbs level and spectrum only."""
    snr_db: tuple[float, float] = (25.0, 100.0)
    gain: tuple[float, float] = (0.1, 1.5)
    eq_db: float = 3.0
    p_eq: float = 0.7
    max_offset_seconds: float = 0.15

    def __call__(self, wave, rng: np.random.Generator) -> np.ndarray:
        x = _as_wave(wave)
        if rng.uniform() < self.p_eq:
            x = mild_eq(x, rng, self.eq_db)
        x = apply_gain(x, np.exp(rng.uniform(np.log(self.gain[0]), np.log(self.gain[1]))))
        return add_noise_snr(x, rng.uniform(*self.snr_db), rng)


@dataclass(frozen=True)
class LeadInCopy:
    """A plain copy of a whole clip as a user might make one: gain 0.3-1.2, a lead-in of silence of up to
    50 ms, noise at SNR 80-100 dB. ``__call__(wave, sample_rate, rng)`` returns ``(copy, lead_in_samples)``."""
    gain: tuple[float, float] = (0.3, 1.2)
    max_lead_in_seconds: float = 0.05
    snr_db: tuple[float, float] = (80.0, 100.0)

    def __call__(self, wave, sample_rate: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        x = _as_wave(wave)
        lead = int(rng.integers(0, int(round(self.max_lead_in_seconds * sample_rate)) + 1))
        x = np.concatenate([np.zeros(lead, x.dtype), apply_gain(x, rng.uniform(*self.gain))])
        return add_noise_snr(x, rng.uniform(*self.snr_db), rng), lead
