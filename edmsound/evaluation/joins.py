"""How audible a join is: the spectral and level change across a position in a wave, against the same change at
random positions inside real clips.

This module owns the join metric used for clips made window by window (continuations, long clips), for the wrap
point of loops, and for any naive splice they are compared with. For each position ``p`` (a sample index) it
compares the ``side_s`` seconds (default 40 ms) just before ``p`` with the ``side_s`` seconds just after it:

* **spectral flux** (dB): the mean power spectrum of each side (Hann frames of ``n_fft`` samples, hop ``hop``,
  every frame lying wholly on its side, powers averaged), pooled into ``n_mels`` mel bands
  (:func:`edmsound.evaluation.classifier.mel_filterbank`, each band the average of its bins' power), in dB; the
  flux is the mean over bands of the absolute difference between the two sides. Band levels are white-noise
  equivalent dBFS (white noise of RMS ``r`` dBFS reads ``r`` dB in every band) and are floored at
  ``max(floor_db, loudest band of the two sides - top_db)``: differences far below the sound itself, or below
  a quiet noise floor, are not heard and do not count.
* **level step** (dB): ``|RMS dBFS before - RMS dBFS after|`` over the same two spans, each level floored at
  ``floor_db``.

A continuous stationary sound scores about 0 on both at any position; a splice between two different sounds
scores high on the flux, a gain jump on the level step. What counts as "high" depends on the material: an
onset inside a real footstep clip is a large change too. :func:`reference_scores` measures the same two numbers
at random positions inside real clips (away from their edges), and :func:`within` gives the fraction of a set of
join scores at or below the reference's ``q``-th percentile: joins a listener cannot tell from the ordinary
changes of real material score about ``q`` %.
"""
from __future__ import annotations

import numpy as np

from .classifier import mel_filterbank

__all__ = ["SIDE_S", "N_FFT", "HOP", "N_MELS", "FLOOR_DB", "TOP_DB", "MEASURES", "join_scores", "reference_scores",
           "within", "summarize"]

SIDE_S = 0.04          # seconds compared on each side of a position
N_FFT = 512
HOP = 128
N_MELS = 40
F_MIN = 30.0
FLOOR_DB = -70.0       # dBFS (white-noise equivalent for the bands): quieter than this counts as this
TOP_DB = 60.0          # bands more than this below the loudest band of the two sides count as that level
MEASURES = ("flux_db", "level_step_db")

_FILTERS: dict[tuple, np.ndarray] = {}


def _bands(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) mel filters, each column summing to 1 (a band = the average power of its bins)."""
    key = (int(sample_rate), int(n_fft), int(n_mels))
    if key not in _FILTERS:
        fb = mel_filterbank(int(sample_rate), int(n_fft), int(n_mels), F_MIN).astype(np.float64)
        s = fb.sum(axis=0)
        if np.any(s <= 0):
            raise ValueError(f"{n_mels} mel bands are too many for a {n_fft}-point FFT at {sample_rate} Hz "
                             "(some bands hold no bin)")
        _FILTERS[key] = fb / s
    return _FILTERS[key]


def _positions(positions, n: int, side: int) -> np.ndarray:
    p = np.atleast_1d(np.asarray(positions))
    if p.ndim != 1 or (p.size and not np.all(np.isfinite(p.astype(np.float64)))):
        raise ValueError("positions must be a 1-D list of sample indices")
    p = np.round(p.astype(np.float64)).astype(np.int64)
    bad = p[(p < side) | (p > n - side)]
    if bad.size:
        raise ValueError(f"position(s) {bad[:4].tolist()} lie within {side} samples of the wave's edges "
                         f"(0 and {n}): the metric needs {side} samples on each side")
    return p


def _db(power: np.ndarray) -> np.ndarray:
    return 10.0 * np.log10(np.maximum(power, 1e-30))


def join_scores(wave, sample_rate: int, positions, side_s: float = SIDE_S, n_fft: int = N_FFT, hop: int = HOP,
                n_mels: int = N_MELS, floor_db: float = FLOOR_DB, top_db: float = TOP_DB) -> dict[str, np.ndarray]:
    """Spectral flux and level step across each position (sample index) of one mono ``wave``.

    Returns ``{"flux_db": (P,), "level_step_db": (P,)}`` (see the module docstring)."""
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("the wave must be a non-empty 1-D array of finite samples")
    if int(sample_rate) <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate!r}")
    side = int(round(side_s * sample_rate))
    if side < n_fft:
        raise ValueError(f"each side ({side} samples) must hold at least one {n_fft}-sample frame")
    p = _positions(positions, len(x), side)
    if p.size == 0:
        return {m: np.zeros(0) for m in MEASURES}
    # level step
    idx = np.arange(side)
    before = x[p[:, None] - side + idx[None]]                  # (P, side)
    after = x[p[:, None] + idx[None]]
    lv_b = np.maximum(_db(np.mean(before ** 2, axis=1)), floor_db)
    lv_a = np.maximum(_db(np.mean(after ** 2, axis=1)), floor_db)
    # spectral flux: frames wholly inside each side
    offs = np.arange(0, side - n_fft + 1, hop)                 # frame starts relative to the side's start
    win = np.hanning(n_fft + 1)[:-1]                          # periodic Hann
    norm = np.sum(win ** 2)
    fb = _bands(sample_rate, n_fft, n_mels)

    def side_bands(seg: np.ndarray) -> np.ndarray:           # (P, side) -> (P, n_mels) dB
        frames = seg[:, offs[:, None] + np.arange(n_fft)[None]]            # (P, K, n_fft)
        power = np.abs(np.fft.rfft(frames * win, axis=-1)) ** 2 / norm      # white noise var s2 -> s2 per bin
        return _db(power.mean(axis=1) @ fb)

    mb, ma = side_bands(before), side_bands(after)
    floor = np.maximum(floor_db, np.maximum(mb.max(axis=1), ma.max(axis=1)) - top_db)[:, None]
    flux = np.mean(np.abs(np.maximum(mb, floor) - np.maximum(ma, floor)), axis=1)
    return {"flux_db": flux, "level_step_db": np.abs(lv_b - lv_a)}


def reference_scores(waves, sample_rate: int, per_clip: int = 8, seed: int = 0, margin_s: float = 0.05,
                     **kwargs) -> dict[str, np.ndarray]:
    """:func:`join_scores` at ``per_clip`` random positions inside each real clip (rows of ``waves`` or a list
    of 1-D clips), drawn uniformly at least ``side_s + margin_s`` seconds from either edge. Clips too short for
    that are skipped; all scores pooled."""
    side_s = kwargs.get("side_s", SIDE_S)
    if per_clip < 1:
        raise ValueError(f"per_clip must be >= 1, got {per_clip}")
    rng = np.random.default_rng(seed)
    lo = int(round((side_s + margin_s) * sample_rate))
    out: dict[str, list] = {m: [] for m in MEASURES}
    if isinstance(waves, np.ndarray) and waves.ndim == 1:
        waves = waves[None]
    for w in waves:
        w = np.asarray(w)
        hi = len(w) - lo
        if hi <= lo:
            continue
        s = join_scores(w, sample_rate, rng.integers(lo, hi + 1, size=per_clip), **kwargs)
        for m in MEASURES:
            out[m].append(s[m])
    if not out[MEASURES[0]]:
        raise ValueError(f"no clip is long enough for positions {side_s + margin_s:g} s from both edges")
    return {m: np.concatenate(v) for m, v in out.items()}


def within(scores: dict, reference: dict, q: float = 95) -> dict:
    """Per measure of ``scores`` also in ``reference``: the reference's ``q``-th percentile (``p<q>``) and the
    fraction of ``scores`` at or below it (``fraction``), with the count ``n``."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    out = {}
    for m, v in scores.items():
        if m not in reference:
            continue
        ref = np.asarray(reference[m], dtype=np.float64)
        if ref.size == 0:
            raise ValueError(f"the reference holds no {m} scores")
        v = np.asarray(v, dtype=np.float64)
        thr = float(np.percentile(ref, q))
        out[m] = {f"p{q:g}": thr, "fraction": float(np.mean(v <= thr)) if v.size else float("nan"),
                  "n": int(v.size)}
    return out


def summarize(scores: dict) -> dict:
    """Median, 95th percentile and count of each measure."""
    out = {}
    for m, v in scores.items():
        v = np.asarray(v, dtype=np.float64)
        out[m] = {"median": float(np.median(v)) if v.size else float("nan"),
                  "p95": float(np.percentile(v, 95)) if v.size else float("nan"), "n": int(v.size)}
    return out
