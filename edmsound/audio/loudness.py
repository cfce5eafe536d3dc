"""A clip's level as a listener and a mixing desk read it, and the opt-in normalisation policy.

* **Integrated loudness** (ITU-R BS.1770-4, LUFS): K-weighting, 400 ms blocks with 75 % overlap, the absolute
  (-70 LUFS) and relative (-10 LU) gates, computed by ``pyloudnorm``. Clips shorter than one block are measured
  as one block over their whole length; a silent clip reads ``SILENCE_LUFS``.
* **True peak** (BS.1770-4 Annex 2, dBTP): the peak of the signal oversampled to at least 192 kHz (4x at 48 kHz,
  12x at 16 kHz) with a polyphase low-pass interpolator. It catches the inter-sample peaks a DAC reconstructs,
  which the sample peak misses by up to ~3 dB.
* **Sample peak and RMS** in dBFS (a full-scale sine has RMS -3.01 dBFS).

Policy (what :func:`normalize` does): nothing is changed unless asked. A peak target (dBFS, sample peak) or an
integrated-loudness target (LUFS) gives one gain for the whole clip; a loudness target never pushes the true peak
above ``ceiling_dbtp`` (default -1 dBTP): when it would, the gain stops there and the report says so
(``limited_by = "true_peak"``). The report records the target, the gain and the levels before and after, so a
sidecar can state exactly what was done.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["SILENCE_LUFS", "SILENCE_DB", "integrated_lufs", "true_peak_dbtp", "sample_peak_dbfs", "rms_dbfs",
           "ClipLevel", "measure", "NormalizeReport", "normalize", "check_target", "describe"]

SILENCE_LUFS = -120.0   # what a silent clip (or one entirely below the absolute gate) reads
SILENCE_DB = -120.0
TRUE_PEAK_RATE = 192_000
BLOCK_SECONDS = 0.4


def _mono(wave) -> np.ndarray:
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected one mono clip (1-D samples), got shape {x.shape}")
    if x.size == 0:
        raise ValueError("the clip is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError("the clip contains NaN or Inf samples")
    return x


def _db(v: float, floor: float = SILENCE_DB) -> float:
    return max(20.0 * math.log10(v), floor) if v > 0 else floor


def integrated_lufs(wave, sample_rate: int) -> float:
    """BS.1770-4 integrated loudness of one mono clip in LUFS (``SILENCE_LUFS`` when nothing passes the gates)."""
    import pyloudnorm
    x = _mono(wave)
    block = BLOCK_SECONDS
    if len(x) < int(round(block * sample_rate)):     # shorter than one gating block: one block over the clip
        block = len(x) / sample_rate
    meter = pyloudnorm.Meter(int(sample_rate), block_size=block)
    import warnings
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        v = float(meter.integrated_loudness(x))
    return v if math.isfinite(v) and v > SILENCE_LUFS else SILENCE_LUFS


def oversampling_factor(sample_rate: int) -> int:
    """The smallest integer factor that takes ``sample_rate`` to at least 192 kHz (at least 4, as in Annex 2)."""
    return max(4, math.ceil(TRUE_PEAK_RATE / int(sample_rate)))


def true_peak_dbtp(wave, sample_rate: int) -> float:
    """BS.1770-4 Annex 2 true peak in dBTP: the peak of the clip oversampled to >= 192 kHz."""
    from scipy.signal import resample_poly
    x = _mono(wave)
    up = oversampling_factor(sample_rate)
    # pad so the interpolator sees the edges settle (the clip starts and ends in silence, not in mid-wave)
    pad = 32
    y = resample_poly(np.pad(x, pad), up, 1)
    return _db(max(float(np.max(np.abs(y))), float(np.max(np.abs(x)))))


def sample_peak_dbfs(wave) -> float:
    return _db(float(np.max(np.abs(_mono(wave)))))


def rms_dbfs(wave) -> float:
    x = _mono(wave)
    return _db(float(np.sqrt(np.mean(x * x))))


@dataclass(frozen=True)
class ClipLevel:
    """The four level readings of one clip."""
    lufs: float
    true_peak_dbtp: float
    sample_peak_dbfs: float
    rms_dbfs: float

    def to_dict(self) -> dict:
        return {k: round(v, 2) for k, v in asdict(self).items()}



def measure(wave, sample_rate: int) -> ClipLevel:
    x = _mono(wave)
    return ClipLevel(lufs=integrated_lufs(x, sample_rate), true_peak_dbtp=true_peak_dbtp(x, sample_rate),
                     sample_peak_dbfs=sample_peak_dbfs(x), rms_dbfs=rms_dbfs(x))


# ------------------------------------------------------------------------------------------ normalise
PEAK_RANGE = (-60.0, 0.0)        # allowed peak targets, dBFS
LUFS_RANGE = (-60.0, -5.0)       # allowed loudness targets, LUFS
DEFAULT_CEILING_DBTP = -1.0


def check_target(mode: str | None, target) -> tuple[str | None, float | None]:
    """Validate a normalisation request: mode None/"off", "peak" (dBFS) or "lufs"; returns (mode, target)."""
    if mode is None or str(mode).strip().lower() in ("", "off", "none"):
        return None, None
    mode = str(mode).strip().lower()
    if mode not in ("peak", "lufs"):
        raise ValueError(f"normalisation must be 'off', 'peak' or 'lufs', got {mode!r}")
    lo, hi = PEAK_RANGE if mode == "peak" else LUFS_RANGE
    unit = "dBFS" if mode == "peak" else "LUFS"
    try:
        t = float(target)
    except (TypeError, ValueError):
        raise ValueError(f"{mode} target must be a number in [{lo:g}, {hi:g}] {unit}, got {target!r}") from None
    if not (math.isfinite(t) and lo <= t <= hi):
        raise ValueError(f"{mode} target must be in [{lo:g}, {hi:g}] {unit}, got {target!r}")
    return mode, t


@dataclass(frozen=True)
class NormalizeReport:
    mode: str                 # "peak" or "lufs"
    target: float             # dBFS (peak) or LUFS
    gain_db: float
    limited_by: str | None    # "true_peak" when a loudness target was held back by the ceiling
    ceiling_dbtp: float | None
    before: ClipLevel
    after: ClipLevel

    def to_dict(self) -> dict:
        return {"mode": self.mode, "target": self.target, "gain_db": round(self.gain_db, 2),
                "limited_by": self.limited_by, "ceiling_dbtp": self.ceiling_dbtp,
                "before": self.before.to_dict(), "after": self.after.to_dict()}


def normalize(wave, sample_rate: int, mode: str, target: float,
              ceiling_dbtp: float = DEFAULT_CEILING_DBTP) -> tuple[np.ndarray, NormalizeReport]:
    """One gain for the whole clip so that its sample peak reads ``target`` dBFS (``mode="peak"``) or its
    integrated loudness reads ``target`` LUFS (``mode="lufs"``, true peak held at or below ``ceiling_dbtp``).
    A silent clip is returned unchanged (gain 0 dB). Returns (new wave, report)."""
    mode, target = check_target(mode, target)
    if mode is None:
        raise ValueError("normalize needs mode 'peak' or 'lufs'")
    x = _mono(wave)
    before = measure(x, sample_rate)
    limited, ceiling = None, None
    if mode == "peak":
        gain_db = 0.0 if before.sample_peak_dbfs <= SILENCE_DB else target - before.sample_peak_dbfs
    else:
        ceiling = float(ceiling_dbtp)
        gain_db = 0.0 if before.lufs <= SILENCE_LUFS else target - before.lufs
        if before.lufs > SILENCE_LUFS and before.true_peak_dbtp + gain_db > ceiling:
            gain_db, limited = ceiling - before.true_peak_dbtp, "true_peak"
    dtype = np.asarray(wave).dtype
    out = (x * 10.0 ** (gain_db / 20.0)).astype(dtype if dtype.kind == "f" else np.float32)
    return out, NormalizeReport(mode, target, gain_db, limited, ceiling, before, measure(out, sample_rate))


def describe(level: dict, normalization: dict | None = None, keeps_overs: bool = False) -> str:
    """One line for a user, from the ``to_dict()`` forms: ``-18.2 LUFS · true peak -3.1 dBTP`` and, when the clip
    was normalised, ``· normalised +6.0 dB to -14 LUFS`` (``(held at the true-peak ceiling)`` when it stopped there).
    A clip whose samples go beyond full scale says so: clipped in a fixed-point file, or, with ``keeps_overs`` (a
    32-bit float file), kept as it is."""
    text = ("silent" if level["lufs"] <= SILENCE_LUFS else f"{level['lufs']:.1f} LUFS") + \
        f" · true peak {level['true_peak_dbtp']:.1f} dBTP"
    over = level.get("sample_peak_dbfs")
    if over is not None and over > 0.0:
        text += (f" · {over:+.1f} dB over full scale: kept in the 32-bit float file (turn it down before a "
                 "16- or 24-bit export)" if keeps_overs else
                 f" · {over:+.1f} dB over full scale: clipped in a 16- or 24-bit file (a peak or LUFS level target, "
                 "or 32-bit float WAV, avoids it)")
    if normalization:
        unit = "dBFS peak" if normalization["mode"] == "peak" else "LUFS"
        text += f" · normalised {normalization['gain_db']:+.1f} dB to {normalization['target']:g} {unit}"
        if normalization.get("limited_by"):
            text += " (held at the true-peak ceiling)"
    return text
