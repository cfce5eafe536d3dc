"""Matching EQ: a static, per-class correction of the spectral envelope a model's clips come out with.

A few-step model can lose part of its classes' spectral envelope in its jumps (a top octave, the low mids) while the
shape of each sound is right. A matching EQ measures, per class, the mean power of the model's clips in log-spaced
bands against real clips of the class (the spectral-envelope measure of :mod:`edmsound.evaluation.fidelity`) and
stores the gain (dB) that closes each band's gap, at the bands' centres. At generation time the gain curve (dB
interpolated linearly in log frequency between the centres, flat beyond the first and last) multiplies every STFT
bin of the frames the model made, before the inverse STFT: on the codec's compressed spectrogram that is a factor
``g ** beta`` per bin, so the decoded clip is the model's clip filtered by the curve (zero phase; a region or
extension keeps its source's frames untouched). It is part of a model directory (``config.json``, key
``class_eq``), measured for that model's own weights and settings, and can be switched off per request.

A few-step model sounds different at each step count it offers, so it may carry one EQ per budget: ``class_eq`` is
the one measured at the model's default budget and ``class_eq_by_nfe`` maps other budgets (``"4"``) to their own.
A request gets the EQ measured at its budget, or the default budget's where that one was not measured
(:func:`eq_for_nfe`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ClassEQ", "curve_db", "spec_factor", "apply_to_spec", "bin_freqs", "load_class_eqs", "eq_budget", "eq_for_nfe",
           "MAX_GAIN_DB", "CONFIG_KEY", "BY_NFE_KEY"]

CONFIG_KEY = "class_eq"
BY_NFE_KEY = "class_eq_by_nfe"      # {"<budget>": EQ} for budgets other than the default one
MAX_GAIN_DB = 12.0              # no band is lifted or cut by more than this


def curve_db(centres_hz, gains_db, freqs_hz) -> np.ndarray:
    """The gain (dB) at each of ``freqs_hz``: linear in log frequency between the centres, flat beyond them (and at
    0 Hz, which takes the first centre's gain)."""
    c = np.asarray(centres_hz, np.float64)
    g = np.asarray(gains_db, np.float64)
    f = np.asarray(freqs_hz, np.float64)
    if c.ndim != 1 or c.size == 0 or c.shape != g.shape:
        raise ValueError(f"need one gain per centre frequency, got {c.size} centres and {g.size} gains")
    if np.any(c <= 0) or np.any(np.diff(c) <= 0):
        raise ValueError("centre frequencies must be positive and increasing")
    if not np.all(np.isfinite(g)):
        raise ValueError("EQ gains must be finite")
    logf = np.log(np.maximum(f, c[0]))
    return np.interp(logf, np.log(c), g)


@dataclass(frozen=True)
class ClassEQ:
    """Per-class gains (dB) at ``centres_hz``; classes left out are not changed."""
    centres_hz: tuple[float, ...]
    gains_db: dict[str, tuple[float, ...]]
    info: dict | None = None        # how it was measured (seed, clips, settings, the gaps before and after)

    def __post_init__(self):
        for cls, g in self.gains_db.items():
            curve_db(self.centres_hz, g, [1.0])               # validates the lengths and values
            if max(abs(x) for x in g) > MAX_GAIN_DB + 1e-9:
                raise ValueError(f"EQ gains for {cls} go beyond ±{MAX_GAIN_DB:g} dB")

    def to_dict(self) -> dict:
        d = {"centres_hz": [round(float(x), 3) for x in self.centres_hz],
             "gains_db": {c: [round(float(x), 3) for x in g] for c, g in self.gains_db.items()}}
        if self.info is not None:
            d["info"] = self.info
        return d

    @classmethod
    def from_dict(cls, d: dict | None, classes=None) -> "ClassEQ | None":
        if d is None:
            return None
        try:
            eq = cls(tuple(float(x) for x in d["centres_hz"]),
                     {str(c): tuple(float(x) for x in g) for c, g in d["gains_db"].items()}, d.get("info"))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{CONFIG_KEY} needs centres_hz and gains_db per class ({e})") from None
        if classes is not None:
            unknown = sorted(set(eq.gains_db) - set(classes))
            if unknown:
                raise ValueError(f"{CONFIG_KEY} names classes the model does not have: {', '.join(unknown)}")
        return eq

    def curve(self, class_name: str, freqs_hz) -> np.ndarray | None:
        """The class's gain (dB) at ``freqs_hz``, or None if the class is not equalised."""
        g = self.gains_db.get(class_name)
        return None if g is None else curve_db(self.centres_hz, g, freqs_hz)


def load_class_eqs(cfg: dict, classes, default_nfe: int) -> dict[int, ClassEQ]:
    """A model config's matching EQs by the budget (NFE) each was measured at: ``class_eq`` at ``default_nfe``,
    ``class_eq_by_nfe`` at its keys. Empty when the model has none."""
    eqs: dict[int, ClassEQ] = {}
    default = ClassEQ.from_dict(cfg.get(CONFIG_KEY), classes)
    if default is not None:
        eqs[int(default_nfe)] = default
    by_nfe = cfg.get(BY_NFE_KEY) or {}
    if not isinstance(by_nfe, dict):
        raise ValueError(f"{BY_NFE_KEY} must map budgets to EQs, got {type(by_nfe).__name__}")
    for key, d in by_nfe.items():
        try:
            nfe = int(key)
        except (TypeError, ValueError):
            nfe = 0
        if nfe < 1 or str(nfe) != str(key):
            raise ValueError(f"{BY_NFE_KEY}: {key!r} is not a budget (a whole number of evaluations >= 1)")
        if nfe == int(default_nfe):
            raise ValueError(f"{BY_NFE_KEY}: budget {nfe} is the model's default; its EQ is {CONFIG_KEY}")
        eqs[nfe] = ClassEQ.from_dict(d, classes)
    return eqs


def eq_budget(eqs: dict[int, ClassEQ], nfe: int, default_nfe: int) -> int:
    """The budget whose EQ a request at ``nfe`` evaluations gets: ``nfe`` where one was measured there, else the
    default budget."""
    return int(nfe) if int(nfe) in eqs else int(default_nfe)


def eq_for_nfe(eqs: dict[int, ClassEQ], nfe: int, default_nfe: int) -> ClassEQ | None:
    """The EQ a request at ``nfe`` evaluations gets (:func:`eq_budget`; None when that budget has none)."""
    return eqs.get(eq_budget(eqs, nfe, default_nfe))


def bin_freqs(codec) -> np.ndarray:
    """The centre frequency (Hz) of every STFT bin of ``codec``."""
    c = codec.config
    return np.arange(c.num_bins) * c.sample_rate / c.n_fft


def spec_factor(codec, gains_db_per_bin) -> torch.Tensor:
    """The (F, 1) factor on the codec's compressed spectrogram that multiplies the STFT by the given gains."""
    g = 10.0 ** (np.asarray(gains_db_per_bin, np.float64) / 20.0)
    return torch.from_numpy(g ** codec.config.beta)[:, None]


def apply_to_spec(codec, spec: torch.Tensor, gains_db_per_bin, frames=None) -> torch.Tensor:
    """``spec`` (B, 2, F, T) with the gains applied to every bin of ``frames`` (a boolean (F, T) mask of the bins
    to change, or None: all); a new tensor. Exact: decoding it gives the STFT multiplied by the gains there."""
    if codec.config.representation != "complex":
        raise ValueError("a matching EQ applies to the complex spectrogram representation only")
    fac = spec_factor(codec, gains_db_per_bin).to(spec.device, spec.dtype)
    if frames is None:
        return spec * fac
    mask = torch.as_tensor(np.asarray(frames, bool), device=spec.device)
    return torch.where(mask, spec * fac, spec)
