"""Encoder-free fidelity: how two sets of clips differ in level, loudness and spectral envelope.

A learned embedding trained with gain augmentation cannot hear that a clip is 10 dB too quiet or missing its
top octave; these plain signal measures can. Each compares a set of clips (generated) with a reference set (real
clips of the same class) and is meant to be printed beside its noise floor: the same measure between two disjoint
sets of real clips of the same sizes.

* **level gap**: mean RMS level (dBFS) of the set minus the reference's (:func:`edmsound.metrics.level_gap_db`),
  with its standard error from both sets' spreads, sqrt(s_a² / n_a + s_b² / n_b): clips of one class spread by
  3–7 dB, so at 64 clips a mean is known to about 0.4–0.9 dB, and a gap is read against that too.
* **loudness**: BS.1770 integrated loudness (LUFS) and true peak (dBTP) of every clip (:mod:`edmsound.loudness`);
  the gap of their medians and their 10th / 90th percentiles (the distributions a sound designer reads).
* **spectral envelope**: mean power in ``n_bands`` log-spaced bands (from ``f_lo`` to Nyquist) over all clips of a
  set, from each clip's full-length periodogram (rectangular window, so Parseval holds and a filter's gain in a
  band shows exactly); the band gap is ``10 log10(P_set / P_ref)`` per band, and the worst band is the largest
  absolute gap.
"""
from __future__ import annotations

import numpy as np

from ..audio import loudness as L
from .metrics import level_gap_db, rms_dbfs

__all__ = ["band_edges", "band_power", "band_gap_db", "level_gap_db", "level_gap_se_db", "clip_levels", "compare",
           "FIDELITY_COLUMNS"]

DEFAULT_BANDS = 12
DEFAULT_F_LO = 50.0
POWER_FLOOR = 1e-20

FIDELITY_COLUMNS = ["level_gap_db", "level_gap_se_db", "lufs_median", "lufs_p10", "lufs_p90", "lufs_gap",
                    "true_peak_median", "true_peak_p90", "true_peak_gap", "band_gap_worst_db", "band_gap_worst_band"]


def _waves(waves, name="waves") -> np.ndarray:
    w = np.asarray(waves, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (clips, samples), got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} contain NaN or Inf")
    return w


def band_edges(sample_rate: int, n_bands: int = DEFAULT_BANDS, f_lo: float = DEFAULT_F_LO) -> np.ndarray:
    """``n_bands + 1`` log-spaced edges (Hz) from ``f_lo`` to Nyquist."""
    nyq = sample_rate / 2
    if not (n_bands >= 1 and 0 < f_lo < nyq):
        raise ValueError(f"need n_bands >= 1 and 0 < f_lo < {nyq:g} Hz, got {n_bands}, {f_lo}")
    return np.geomspace(f_lo, nyq, n_bands + 1)


def band_power(waves, sample_rate: int, n_bands: int = DEFAULT_BANDS, f_lo: float = DEFAULT_F_LO) -> np.ndarray:
    """Mean power per band over all clips of the set (linear, per sample; summed over the band's bins)."""
    w = _waves(waves)
    n = w.shape[1]
    spec = np.abs(np.fft.rfft(w, axis=1)) ** 2 / n ** 2          # per-bin power; Parseval up to the 2x fold
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    edges = band_edges(sample_rate, n_bands, f_lo)
    mean = spec.mean(axis=0)
    out = np.empty(n_bands)
    for b in range(n_bands):
        hi_ok = freqs <= edges[b + 1] if b == n_bands - 1 else freqs < edges[b + 1]
        sel = (freqs >= edges[b]) & hi_ok
        if not sel.any():
            raise ValueError(f"band {edges[b]:.0f}-{edges[b + 1]:.0f} Hz holds no frequency bin at {n} samples; "
                             "use fewer bands or a higher f_lo")
        out[b] = mean[sel].sum()
    return out


def band_gap_db(waves, reference, sample_rate: int, n_bands: int = DEFAULT_BANDS,
                f_lo: float = DEFAULT_F_LO) -> np.ndarray:
    """Per band: 10 log10(mean power of ``waves`` / mean power of ``reference``) in dB."""
    a = band_power(waves, sample_rate, n_bands, f_lo)
    b = band_power(reference, sample_rate, n_bands, f_lo)
    return 10.0 * np.log10(np.maximum(a, POWER_FLOOR) / np.maximum(b, POWER_FLOOR))


def clip_levels(waves, sample_rate: int) -> dict[str, np.ndarray]:
    """Per clip: integrated LUFS, true peak dBTP and RMS dBFS."""
    w = _waves(waves)
    return {"lufs": np.array([L.integrated_lufs(x, sample_rate) for x in w]),
            "true_peak": np.array([L.true_peak_dbtp(x, sample_rate) for x in w]), "rms": rms_dbfs(w)}


def level_gap_se_db(rms, ref_rms) -> float:
    """Standard error (dB) of the level gap: sqrt(s_a² / n_a + s_b² / n_b) of the two sets' per-clip RMS levels
    (sample standard deviations; NaN when a set has fewer than two clips)."""
    a, b = np.asarray(rms, np.float64), np.asarray(ref_rms, np.float64)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def compare(levels: dict, ref_levels: dict, bands: np.ndarray, ref_bands: np.ndarray) -> dict:
    """The fidelity row of one set against a reference, from precomputed :func:`clip_levels` and
    :func:`band_power` of both (so a reference is measured once for many sets)."""
    gaps = 10.0 * np.log10(np.maximum(bands, POWER_FLOOR) / np.maximum(ref_bands, POWER_FLOOR))
    worst = int(np.argmax(np.abs(gaps)))
    lufs, tp = levels["lufs"], levels["true_peak"]
    return {
        "level_gap_db": float(np.mean(levels["rms"]) - np.mean(ref_levels["rms"])),
        "level_gap_se_db": level_gap_se_db(levels["rms"], ref_levels["rms"]),
        "lufs_median": float(np.median(lufs)), "lufs_p10": float(np.percentile(lufs, 10)),
        "lufs_p90": float(np.percentile(lufs, 90)),
        "lufs_gap": float(np.median(lufs) - np.median(ref_levels["lufs"])),
        "true_peak_median": float(np.median(tp)), "true_peak_p90": float(np.percentile(tp, 90)),
        "true_peak_gap": float(np.median(tp) - np.median(ref_levels["true_peak"])),
        "band_gap_worst_db": float(gaps[worst]), "band_gap_worst_band": worst,
        "band_gap_db": [float(g) for g in gaps],
    }
