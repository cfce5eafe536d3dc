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
* **over full scale**: the share of clips whose sample peak reaches full scale (:data:`FULL_SCALE`, the largest
  16-bit sample, or beyond) — the clips a fixed-point file clips, which a listener hears as distortion. Clips read
  back from 16-bit files (the evaluation's cache) count by the samples their file clipped to full scale. Real clips
  are mastered below full scale, so the floor is normally 0.
* **spectral envelope**: mean power in ``n_bands`` log-spaced bands (from ``f_lo`` to Nyquist) over all clips of a
  set, from each clip's full-length periodogram (rectangular window, so Parseval holds and a filter's gain in a
  band shows exactly); the band gap is ``10 log10(P_set / P_ref)`` per band, and the worst band is the largest
  absolute gap.
"""
from __future__ import annotations

import numpy as np

from ..audio import loudness as L
from ..audio.io import PCM16_MAX
from .metrics import level_gap_db, rms_dbfs

__all__ = ["band_edges", "clip_band_power", "band_power", "band_gap_db", "band_gap_se_db", "level_gap_db",
           "level_gap_se_db", "clip_levels", "over_full_scale_share", "spectral_centroid_hz", "compare",
           "band_misses", "misses_text", "FIDELITY_COLUMNS", "CENTROID_QUANTILES", "FULL_SCALE"]

DEFAULT_BANDS = 12
DEFAULT_F_LO = 50.0
POWER_FLOOR = 1e-20
FULL_SCALE = PCM16_MAX            # the largest 16-bit sample: a 16-bit file clips anything beyond it to this

FIDELITY_COLUMNS = ["level_gap_db", "level_gap_se_db", "lufs_median", "lufs_p10", "lufs_p90", "lufs_gap",
                    "true_peak_median", "true_peak_p90", "true_peak_gap", "band_gap_worst_db", "band_gap_worst_se_db",
                    "band_gap_worst_band", "centroid_p10", "centroid_median", "centroid_p90", "centroid_gap_p10",
                    "centroid_gap_median", "centroid_gap_p90", "over_full_scale"]
CENTROID_QUANTILES = tuple(range(5, 100, 5))        # percentiles kept per set (results.json, the brightness plot)


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


def clip_band_power(waves, sample_rate: int, n_bands: int = DEFAULT_BANDS, f_lo: float = DEFAULT_F_LO) -> np.ndarray:
    """Power per band of every clip, shape (clips, n_bands) (linear, per sample; summed over the band's bins)."""
    w = _waves(waves)
    n = w.shape[1]
    spec = np.abs(np.fft.rfft(w, axis=1)) ** 2 / n ** 2          # per-bin power; Parseval up to the 2x fold
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    edges = band_edges(sample_rate, n_bands, f_lo)
    out = np.empty((w.shape[0], n_bands))
    for b in range(n_bands):
        hi_ok = freqs <= edges[b + 1] if b == n_bands - 1 else freqs < edges[b + 1]
        sel = (freqs >= edges[b]) & hi_ok
        if not sel.any():
            raise ValueError(f"band {edges[b]:.0f}-{edges[b + 1]:.0f} Hz holds no frequency bin at {n} samples; "
                             "use fewer bands or a higher f_lo")
        out[:, b] = spec[:, sel].sum(axis=1)
    return out


def spectral_centroid_hz(waves, sample_rate: int) -> np.ndarray:
    """Per clip: the power-weighted mean frequency (Hz) of its full-length periodogram, DC to Nyquist; NaN for a
    silent clip. A sine of f Hz on whole cycles reads f; a gain does not change it."""
    w = _waves(waves)
    power = np.abs(np.fft.rfft(w, axis=1)) ** 2
    freqs = np.fft.rfftfreq(w.shape[1], 1.0 / sample_rate)
    total = power.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, (power * freqs).sum(axis=1) / total, np.nan)


def band_power(waves, sample_rate: int, n_bands: int = DEFAULT_BANDS, f_lo: float = DEFAULT_F_LO) -> np.ndarray:
    """Mean power per band over all clips of the set (the mean of :func:`clip_band_power`)."""
    return clip_band_power(waves, sample_rate, n_bands, f_lo).mean(axis=0)


def band_gap_db(waves, reference, sample_rate: int, n_bands: int = DEFAULT_BANDS,
                f_lo: float = DEFAULT_F_LO) -> np.ndarray:
    """Per band: 10 log10(mean power of ``waves`` / mean power of ``reference``) in dB."""
    a = band_power(waves, sample_rate, n_bands, f_lo)
    b = band_power(reference, sample_rate, n_bands, f_lo)
    return 10.0 * np.log10(np.maximum(a, POWER_FLOOR) / np.maximum(b, POWER_FLOOR))


def clip_levels(waves, sample_rate: int) -> dict[str, np.ndarray]:
    """Per clip: integrated LUFS, true peak dBTP, sample peak (linear, 1.0 = full scale), RMS dBFS and spectral
    centroid (Hz)."""
    w = _waves(waves)
    return {"lufs": np.array([L.integrated_lufs(x, sample_rate) for x in w]),
            "true_peak": np.array([L.true_peak_dbtp(x, sample_rate) for x in w]), "rms": rms_dbfs(w),
            "peak": np.abs(w).max(axis=1), "centroid": spectral_centroid_hz(w, sample_rate)}


def over_full_scale_share(peaks) -> float:
    """The share (0–1) of clips whose sample peak (linear, 1.0 = 0 dBFS) reaches :data:`FULL_SCALE` or goes
    beyond: the clips a fixed-point file clips (in a clip read back from a 16-bit file, the samples it clipped)."""
    p = np.asarray(peaks, np.float64)
    if p.size == 0:
        raise ValueError("no clips")
    return float(np.mean(p >= FULL_SCALE))


def _centroid_row(levels: dict, ref_levels: dict) -> dict:
    """Centroid quantiles of a set (Hz) and their gaps to the reference's (%, set / reference - 1)."""
    a, b = levels.get("centroid"), ref_levels.get("centroid")
    if a is None or b is None or not np.isfinite(a).any() or not np.isfinite(b).any():
        return {}
    qa, qb = np.nanpercentile(a, CENTROID_QUANTILES), np.nanpercentile(b, CENTROID_QUANTILES)
    out = {"centroid_quantiles_hz": [float(x) for x in qa]}
    for name, q in (("p10", 10), ("median", 50), ("p90", 90)):
        k = CENTROID_QUANTILES.index(q)
        out[f"centroid_{name}"] = float(qa[k])
        out[f"centroid_gap_{name}"] = float(100.0 * (qa[k] / qb[k] - 1.0)) if qb[k] > 0 else float("nan")
    return out


def level_gap_se_db(rms, ref_rms) -> float:
    """Standard error (dB) of the level gap: sqrt(s_a² / n_a + s_b² / n_b) of the two sets' per-clip RMS levels
    (sample standard deviations; NaN when a set has fewer than two clips)."""
    a, b = np.asarray(rms, np.float64), np.asarray(ref_rms, np.float64)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def band_gap_se_db(clip_bands, ref_clip_bands) -> np.ndarray:
    """Standard error (dB) of each band gap from both sets' per-clip band powers (:func:`clip_band_power`).

    The gap is ``10 log10(m_a / m_b)`` of two independent sample means; by the delta method the standard error of
    ``10 log10 m`` is ``(10 / ln 10) s / (m sqrt(n))`` (s: the per-clip sample standard deviation), and the two
    sets' errors add in quadrature. NaN where a set has fewer than two clips or no power in the band."""
    out = []
    for p in (clip_bands, ref_clip_bands):
        p = np.asarray(p, np.float64)
        if p.ndim != 2:
            raise ValueError(f"per-clip band powers must be 2-D (clips, bands), got shape {p.shape}")
        if len(p) < 2:
            out.append(np.full(p.shape[1], np.nan))
            continue
        m = p.mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(m > POWER_FLOOR, p.std(axis=0, ddof=1) / (m * np.sqrt(len(p))), np.nan)
        out.append(10.0 / np.log(10.0) * rel)
    a, b = out
    if a.shape != b.shape:
        raise ValueError(f"the two sets have different band counts: {a.shape[0]} and {b.shape[0]}")
    return np.sqrt(a ** 2 + b ** 2)


def compare(levels: dict, ref_levels: dict, bands: np.ndarray, ref_bands: np.ndarray) -> dict:
    """The fidelity row of one set against a reference, from precomputed :func:`clip_levels` and
    :func:`clip_band_power` of both (so a reference is measured once for many sets); each band gap comes with its
    standard error."""
    se = band_gap_se_db(bands, ref_bands)                  # checks that both are per-clip (2-D)
    mean_a, mean_b = np.asarray(bands, np.float64).mean(axis=0), np.asarray(ref_bands, np.float64).mean(axis=0)
    gaps = 10.0 * np.log10(np.maximum(mean_a, POWER_FLOOR) / np.maximum(mean_b, POWER_FLOOR))
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
        "band_gap_worst_se_db": float(se[worst]), "band_gap_se_db": [float(x) for x in se],
        **_centroid_row(levels, ref_levels),
        **({"over_full_scale": over_full_scale_share(levels["peak"])} if "peak" in levels else {}),
    }


def band_misses(rows, limit: float, k: float = 2.0) -> dict:
    """How many class-bands of ``rows`` (:func:`compare` rows, one per class) are beyond ``±limit`` dB, and how many
    of those by more than ``k`` of their standard errors (``clear``; None when a missing band has no standard
    error). Returns ``{"limit", "k", "total", "beyond", "clear"}``."""
    total = beyond = 0
    clear: int | None = 0
    for r in rows:
        gaps = r.get("band_gap_db") or []
        ses = r.get("band_gap_se_db")
        total += len(gaps)
        for i, x in enumerate(gaps):
            if abs(x) <= limit:
                continue
            beyond += 1
            if ses is None or not np.isfinite(ses[i]):
                clear = None
            elif clear is not None and abs(x) - limit > k * ses[i]:
                clear += 1
    return {"limit": float(limit), "k": float(k), "total": total, "beyond": beyond, "clear": clear}


def misses_text(m: dict) -> str:
    """:func:`band_misses` in words: "8 of 84 class-bands beyond ±4 dB, 3 of them by more than 2 standard errors"."""
    t = f"{m['beyond']} of {m['total']} class-bands beyond ±{m['limit']:g} dB"
    if m["clear"] is not None and m["beyond"]:
        t += f", {m['clear']} of them by more than {m['k']:g} standard errors"
    return t
