"""Sound-building blocks of the built-in foley synthesizer (numpy / scipy): RBJ biquads, modal impacts,
band-limited harmonic sources, grain clouds, coloured noise, envelopes, a synthetic room and event timing. Every
random choice comes from the caller's ``numpy.random.Generator``."""
from __future__ import annotations

import math

import numpy as np
from scipy.signal import fftconvolve, sosfilt

TWO_PI = 2.0 * np.pi


def time_axis(m: int, sr: int) -> np.ndarray:
    return np.arange(m) / sr


def to_samples(seconds: float, sr: int) -> int:
    return max(1, int(round(seconds * sr)))


def clampf(f: float, sr: int) -> float:
    return float(min(max(f, 10.0), 0.45 * sr))


def biquad_sos(kind: str, f: float, sr: int, q: float = 0.7071) -> np.ndarray:
    """RBJ cookbook biquad as one SOS row (band-pass has 0 dB peak gain)."""
    w0 = TWO_PI * clampf(f, sr) / sr
    cw, sw = math.cos(w0), math.sin(w0)
    alpha = sw / (2.0 * max(q, 1e-3))
    if kind == "lp":
        b = ((1 - cw) / 2, 1 - cw, (1 - cw) / 2)
    elif kind == "hp":
        b = ((1 + cw) / 2, -(1 + cw), (1 + cw) / 2)
    elif kind == "bp":
        b = (alpha, 0.0, -alpha)
    else:  # pragma: no cover - internal misuse
        raise ValueError(kind)
    a0 = 1 + alpha
    return np.array([b[0] / a0, b[1] / a0, b[2] / a0, 1.0, -2 * cw / a0, (1 - alpha) / a0])


def filt(x: np.ndarray, kind: str, f: float, sr: int, q: float = 0.7071, order: int = 1) -> np.ndarray:
    sos = np.tile(biquad_sos(kind, f, sr, q), (order, 1))
    return sosfilt(sos, x)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)) + 1e-20))


def unit(x: np.ndarray) -> np.ndarray:
    return x / rms(x)


def place(buf: np.ndarray, ev: np.ndarray, start: float) -> None:
    """Add ``ev`` into ``buf`` at sample ``start`` (truncating at both ends)."""
    s = int(start)
    if s >= len(buf) or len(ev) == 0:
        return
    if s < 0:
        ev = ev[-s:]
        s = 0
    m = min(len(ev), len(buf) - s)
    buf[s : s + m] += ev[:m]


def smooth_noise(rng: np.random.Generator, m: int, points: int) -> np.ndarray:
    """Cheap smooth random curve (linear interpolation of ``points`` normals)."""
    points = max(2, int(points))
    return np.interp(np.arange(m), np.linspace(0, max(m - 1, 1), points), rng.standard_normal(points))


def colored_noise(rng: np.random.Generator, m: int, exponent: float) -> np.ndarray:
    """Unit-RMS noise with power spectrum ~ 1/f**exponent (1 pink, 2 brown)."""
    spec = np.fft.rfft(rng.standard_normal(m))
    f = np.arange(len(spec), dtype=float)
    f[0] = 1.0
    spec *= f ** (-exponent / 2.0)
    spec[0] = 0.0
    y = np.fft.irfft(spec, m)
    return unit(y)


def ar_env(m: int, sr: int, attack: float, tau: float, hold: float = 0.0) -> np.ndarray:
    t = time_axis(m, sr)
    return np.minimum(t / max(attack, 1.0 / sr), 1.0) * np.exp(-np.maximum(t - attack - hold, 0.0) / tau)


def fade_tail(x: np.ndarray, sr: int, seconds: float = 0.005) -> np.ndarray:
    k = min(len(x), max(1, int(seconds * sr)))
    x[len(x) - k :] *= np.linspace(1.0, 0.0, k)
    return x


def modal(m: int, sr: int, freqs, taus, amps, phases=None) -> np.ndarray:
    """Sum of exponentially decaying sinusoids; modes above 0.45*sr are dropped."""
    freqs = np.atleast_1d(np.asarray(freqs, float))
    taus = np.broadcast_to(np.asarray(taus, float), freqs.shape)
    amps = np.broadcast_to(np.asarray(amps, float), freqs.shape)
    keep = freqs < 0.45 * sr
    if not np.any(keep):
        keep = freqs == freqs.min()
        freqs = np.minimum(freqs, 0.45 * sr)
    t = time_axis(m, sr)[:, None]
    ph = 0.0 if phases is None else np.broadcast_to(np.asarray(phases, float), freqs.shape)[keep]
    return (amps[keep] * np.exp(-t / taus[keep]) * np.sin(TWO_PI * freqs[keep] * t + ph)).sum(axis=1)


def harmonic(f0: np.ndarray, sr: int, tilt: float = 1.0, max_h: int = 40) -> np.ndarray:
    """Band-limited additive source following the per-sample pitch ``f0``.

    Harmonic k has amplitude k**-tilt and fades out as k*f0 approaches 0.45*sr.
    """
    fmax = 0.45 * sr
    phase = TWO_PI * np.cumsum(f0) / sr
    h = int(min(max_h, max(1, fmax // max(float(f0.min()), 1.0))))
    k = np.arange(1, h + 1, dtype=float)
    gain = np.clip((fmax - f0[:, None] * k) / (0.15 * fmax), 0.0, 1.0) * k ** (-tilt)
    return (np.sin(phase[:, None] * k) * gain).sum(axis=1)


def grain_cloud(rng: np.random.Generator, sr: int, times: np.ndarray, amps: np.ndarray,
                 length: float, grain_tau: float) -> np.ndarray:
    """Impulse train at ``times`` (s) with ``amps`` convolved with a tiny noise grain."""
    m = to_samples(length, sr)
    train = np.zeros(m)
    idx = np.clip((times * sr).astype(int), 0, m - 1)
    np.add.at(train, idx, amps)
    g = max(4, int(5 * grain_tau * sr))
    grain = rng.standard_normal(g) * np.exp(-time_axis(g, sr) / grain_tau)
    return fftconvolve(train, grain)[:m]


def reverb(x: np.ndarray, rng: np.random.Generator, sr: int, rt60: float, wet: float,
            damp: float | None = None, predelay: float = 0.0) -> np.ndarray:
    """Cheap room: decaying low-passed noise IR + early reflections, wet/dry mix."""
    n = len(x)
    pre = int(predelay * sr)
    length = max(8, min(int(rt60 * sr), n))
    t = time_axis(length, sr)
    noise = rng.standard_normal(length)
    damp = rng.uniform(2500.0, 7000.0) if damp is None else damp
    ir = filt(noise, "lp", damp, sr) * np.exp(-6.91 * t / rt60)
    ir += 0.35 * noise * np.exp(-6.91 * t / (0.25 * rt60))  # bright part decays faster
    n_er = int(rng.integers(3, 9))
    pos = rng.integers(0, max(2, min(length, int(0.045 * sr))), n_er)
    ir[pos] += rng.uniform(-1.0, 1.0, n_er) * rng.uniform(2.0, 6.0)
    ir /= np.sqrt(np.sum(ir * ir)) + 1e-12
    if pre:
        ir = np.concatenate([np.zeros(pre), ir])
    y = fftconvolve(x, ir[: max(n, 1)])[:n]
    return (1.0 - wet) * x + wet * y
