"""Measuring a model's matching EQ (:mod:`edmsound.core.spectral_eq`): per class, the band gains that bring its clips'
mean spectral envelope to real clips'.

The clips are made at the model's shipped settings (its sampler, budget and per-class guidance) on calibration noise
seeds (seed 1 by default; the evaluation uses 0), and the real clips are the evaluation's reference, so the
evaluation then measures the EQ on clips it was not fitted on. The gaps are those of
:mod:`edmsound.evaluation.fidelity` (mean power in log-spaced bands, dB); the curve between band centres is applied
exactly as generation applies it and the gains refined a few times, as one band's gain reaches into its neighbours.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np

from ..core.spectral_eq import BY_NFE_KEY, CONFIG_KEY, MAX_GAIN_DB, ClassEQ, apply_to_spec, bin_freqs, curve_db
from . import fidelity as Fd
from .metrics import rms_dbfs

__all__ = ["fit_gains", "calibrate_class_eq", "write_class_eq", "write_eq_report", "eq_markdown", "eq_plot"]


SMOOTHNESS = 0.5     # weight of the curve's second differences (dB) against the band gaps (dB) in the fit


def fit_gains(codec, specs, reference: np.ndarray, *, n_bands: int = Fd.DEFAULT_BANDS, f_lo: float = Fd.DEFAULT_F_LO,
              iterations: int = 4, max_gain_db: float = MAX_GAIN_DB, smoothness: float = SMOOTHNESS,
              match_level: bool = True, length: int | None = None) -> dict:
    """Gains (dB at the measure's band centres) that bring the mean band power of ``specs`` (one class's clips as the
    codec's spectrograms, (B, 2, F, T)) to that of ``reference`` (real clips of the class, (clips, samples) at the
    codec's rate).

    Regularised least squares, solved by Gauss-Newton: the band gaps after the curve is applied as generation
    applies it (the Jacobian by finite differences), plus ``smoothness`` times the curve's second differences, so
    that bands the STFT cannot set apart (the lowest, narrower than a few bins) do not get gains that fight each
    other. ``match_level``: then one gain more on every band brings the clips' mean RMS level (dBFS, the level
    measure: a mean of decibels, where the bands compare mean powers, which the loudest clips dominate) to the real
    clips'. Returns ``{"centres_hz", "gains_db", "gap_before_db", "gap_se_db", "gap_after_db", "level_before_db",
    "level_after_db"}``; ``gap_se_db`` is the standard error of the gap before (both sets' spreads,
    :func:`edmsound.evaluation.fidelity.band_gap_se_db`): how far the gains could be off from sampling alone."""
    import torch
    if not 0 < float(max_gain_db) <= MAX_GAIN_DB:
        raise ValueError(f"max_gain_db must be in (0, {MAX_GAIN_DB:g}] dB, got {max_gain_db}")
    sr = codec.config.sample_rate
    edges = Fd.band_edges(sr, n_bands, f_lo)
    centres = np.sqrt(edges[:-1] * edges[1:])
    ref_clips = Fd.clip_band_power(reference, sr, n_bands, f_lo)
    ref = ref_clips.mean(axis=0)
    if np.any(ref <= Fd.POWER_FLOOR):
        raise ValueError("the real clips hold no power in some band; no EQ can be measured")
    specs = torch.as_tensor(specs).double()
    bins = bin_freqs(codec)

    ref_level = float(rms_dbfs(reference).mean())

    def waves(gains):
        return codec.decode(apply_to_spec(codec, specs, curve_db(centres, gains, bins)), length=length).numpy()

    def gaps(gains, w=None, clip_powers=None):
        if clip_powers is None:
            clip_powers = Fd.clip_band_power(waves(gains) if w is None else w, sr, n_bands, f_lo)
        return 10.0 * np.log10(np.maximum(clip_powers.mean(axis=0), Fd.POWER_FLOOR) / ref)

    def level(w):
        return float(rms_dbfs(w).mean()) - ref_level

    D = np.diff(np.eye(n_bands), n=2, axis=0) * float(smoothness)       # second differences
    gains = np.zeros(n_bands)
    w0 = waves(gains)
    p0 = Fd.clip_band_power(w0, sr, n_bands, f_lo)         # the gap before and its standard error from one pass
    before, level_before = gaps(gains, clip_powers=p0), level(w0)
    se = Fd.band_gap_se_db(p0, ref_clips)
    r = before
    delta = 0.5
    for _ in range(max(1, int(iterations))):
        J = np.stack([(gaps(gains + delta * e) - r) / delta for e in np.eye(n_bands)], axis=1)
        A = np.vstack([J, D])
        b = -np.concatenate([r, D @ gains])
        step = np.linalg.lstsq(A, b, rcond=None)[0]
        gains = np.clip(gains + step, -max_gain_db, max_gain_db)
        r = gaps(gains)
    if match_level:                          # a constant gain moves every clip's RMS level by itself
        for _ in range(2):                   # twice: the limit may hold some bands back
            gains = np.clip(gains - level(waves(gains)), -max_gain_db, max_gain_db)
    w = waves(gains)
    return {"centres_hz": centres, "gains_db": gains, "gap_before_db": before, "gap_se_db": se,
            "gap_after_db": gaps(gains, w),
            "level_before_db": level_before, "level_after_db": level(w)}


def calibrate_class_eq(checkpoint, *, n_per_class: int = 256, seed: int = 1, reference="builtin",
                       reference_per_class: int | None = None, classes=None, max_gain_db: float = MAX_GAIN_DB,
                       batch_size: int = 8, nfe: int | None = None, progress: bool = True, log=print) -> dict:
    """Returns ``{"eq": ClassEQ, "rows": [{class, gap_before, gap_after, gains_db}], "settings": {...}}``.
    ``reference_per_class``: held-out clips per class the band gaps are fitted to (default: the evaluation's
    fidelity reference, :data:`edmsound.evaluation.sweep.FIDELITY_REFERENCE_PER_CLASS`). ``nfe``: the budget to
    measure at (default: the model's own); the EQ records it, and :func:`write_class_eq` stores it for that budget."""
    import torch

    from . import sweep as E
    from ..core.pipeline import EDMSoundPipeline, check_nfe
    n_per_class = int(n_per_class)
    if not 2 <= n_per_class <= 10_000:
        raise ValueError(f"n_per_class must be in [2, 10000], got {n_per_class}")
    t0 = time.perf_counter()
    pipe = EDMSoundPipeline(checkpoint, device="cpu")
    if pipe.preset.codec.representation != "complex":
        raise ValueError(f"a matching EQ needs the complex spectrogram representation; {pipe.model_dir.name} uses "
                         f"{pipe.preset.codec.representation}")
    classes = list(pipe.classes if classes is None else classes)
    for c in classes:
        pipe.class_index(c)
    p = pipe.preset
    nfe = int(p.default_nfe) if nfe is None else nfe
    pipe.check_student(p.default_sampler, check_nfe(p.default_sampler, nfe))     # a budget the model can sample at
    if reference_per_class is None:
        reference_per_class = E.FIDELITY_REFERENCE_PER_CLASS
    ref, ref_desc = E.load_reference(reference, classes, pipe.sample_rate, pipe.codec.num_samples,
                                     reference_per_class, E.REFERENCE_SEED, progress)
    gains, rows, centres = {}, [], None
    for c in classes:
        gens = E.generate_in_calls(pipe, c, n_per_class, E.noise_seed(seed, pipe.class_index(c), 0),
                                   batch_size=batch_size, nfe=nfe, eq=False)
        specs = torch.cat([g.specs for g in gens])
        real = ref.waves[ref.labels == ref.classes.index(c)]
        fit = fit_gains(pipe.codec, specs, real, max_gain_db=max_gain_db)
        centres, gdb, before, after = fit["centres_hz"], fit["gains_db"], fit["gap_before_db"], fit["gap_after_db"]
        gains[c] = tuple(float(x) for x in gdb)
        rows.append({"class": c, "gap_before_db": [round(float(x), 2) for x in before],
                     "gap_se_db": [round(float(x), 2) for x in fit["gap_se_db"]],
                     "gap_after_db": [round(float(x), 2) for x in after],
                     "gains_db": [round(float(x), 2) for x in gdb],
                     "level_before_db": round(fit["level_before_db"], 2),
                     "level_after_db": round(fit["level_after_db"], 2)})
        log(f"{c:>22s}  worst band gap {before[np.argmax(np.abs(before))]:+.1f} dB -> "
            f"{after[np.argmax(np.abs(after))]:+.1f} dB, level {fit['level_before_db']:+.1f} -> "
            f"{fit['level_after_db']:+.1f} dB  (gains {gdb.min():+.1f} … {gdb.max():+.1f} dB)")
    settings = {"checkpoint": str(checkpoint), "n_per_class": n_per_class, "seed": int(seed),
                "smoothness": SMOOTHNESS,
                "noise_seed": "seed * 1_000_000 + class_index * 100_000 + i", "sampler": p.default_sampler,
                "nfe": int(nfe), "guidance": {c: p.guidance_for(c) for c in classes},
                "reference": ref_desc, "bands": Fd.DEFAULT_BANDS, "f_lo_hz": Fd.DEFAULT_F_LO,
                "max_gain_db": float(max_gain_db), "wall_seconds": round(time.perf_counter() - t0, 1)}
    info = {k: settings[k] for k in ("n_per_class", "seed", "sampler", "nfe", "reference", "max_gain_db")}
    eq = ClassEQ(tuple(float(x) for x in centres), gains, info)
    return {"eq": eq, "rows": rows, "settings": settings}


def write_class_eq(checkpoint, eq: ClassEQ | None, nfe: int | None = None) -> Path:
    """Store a model directory's matching EQ in its config.json, atomically, for the budget it was measured at
    (``eq.info["nfe"]``; none recorded: the model's default budget). With ``eq`` None, remove the EQ of budget
    ``nfe``, or with ``nfe`` None too, every one the model has."""
    from ..core.storage import atomic_write_json, resolve_model_dir
    path = resolve_model_dir(checkpoint) / "config.json"
    cfg = json.loads(path.read_text())
    default = int(cfg["preset"]["default_nfe"])
    by_nfe = dict(cfg.get(BY_NFE_KEY) or {})
    if eq is None:
        if nfe is None:
            cfg.pop(CONFIG_KEY, None)
            by_nfe = {}
        elif int(nfe) == default:
            cfg.pop(CONFIG_KEY, None)
        else:
            by_nfe.pop(str(int(nfe)), None)
    else:
        ClassEQ.from_dict(eq.to_dict(), cfg["classes"])               # names only the model's classes
        budget = int((eq.info or {}).get("nfe", default))
        if nfe is not None and int(nfe) != budget:
            raise ValueError(f"this EQ was measured at {budget} evaluations, not {nfe}")
        if budget == default:
            cfg[CONFIG_KEY] = eq.to_dict()
        else:
            by_nfe[str(budget)] = eq.to_dict()
    if by_nfe:
        cfg[BY_NFE_KEY] = {k: by_nfe[k] for k in sorted(by_nfe, key=int)}
    else:
        cfg.pop(BY_NFE_KEY, None)
    atomic_write_json(path, cfg)
    return path


def write_eq_report(result: dict, out_dir) -> Path:
    """``matching_eq.md`` (the table), ``matching_eq.json`` and ``matching_eq.png`` in ``out_dir``."""
    from ..core.storage import atomic_write_bytes, atomic_write_json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "matching_eq.md", eq_markdown(result).encode())
    atomic_write_json(out / "matching_eq.json", {"eq": result["eq"].to_dict(), "rows": result["rows"],
                                                 "settings": result["settings"]})
    atomic_write_bytes(out / "matching_eq.png", eq_plot(result))
    return out / "matching_eq.md"


def eq_markdown(result: dict) -> str:
    s, eq = result["settings"], result["eq"]
    bands = eq.centres_hz
    head = " | ".join(f"{c:.0f}" for c in bands)
    lines = [f"# Matching EQ: `{Path(s['checkpoint']).name}`", "",
             f"{s['sampler']} at {s['nfe']} evaluations with the model's per-class guidance; {s['n_per_class']} clips "
             f"per class from noise seed {s['seed']} (the evaluation uses 0) against {s['reference']}; "
             f"{s['bands']} log-spaced bands from {s['f_lo_hz']:g} Hz to Nyquist, gains within ±{s['max_gain_db']:g} "
             f"dB; {s['wall_seconds'] / 60:.1f} min.", "",
             "Band gap (dB) of the model's clips before the EQ with its standard error (± SE: how far a gain could be "
             "off from the clips drawn alone; more clips per class shrink it), the gain stored, and the gap left on "
             "the same clips; the level gap (mean RMS dBFS against the real clips') before and after:", "",
             f"| class | row | {head} | level |", "|---|---|" + "---|" * (len(bands) + 1)]
    for r in result["rows"]:
        for key, name in (("gap_before_db", "gap before"), ("gap_se_db", "± SE"), ("gains_db", "**gain**"),
                          ("gap_after_db", "gap after")):
            if key not in r:                 # reports written before the standard error was kept
                continue
            lv = {"gap_before_db": r["level_before_db"], "gap_after_db": r["level_after_db"]}.get(key)
            lines.append(f"| {r['class']} | {name} | " + " | ".join(f"{x:+.1f}" for x in r[key]) +
                         (" | |" if lv is None else f" | {lv:+.1f} |"))
    lines += ["", "Band centres in Hz. The gains are a least-squares fit with a smoothness term (weight "
              f"{s['smoothness']:g} on the curve's second differences), so the lowest bands, which the STFT barely "
              "sets apart, are not fitted exactly; then one gain on every band sets the mean level to the real clips' "
              "(a mean of decibels, where a band compares mean powers, which the loudest clips dominate: a set "
              "with fewer loud outliers reads lower in the bands at the same level). The gap after is measured on the clips the gains were fitted on; the evaluation "
              "measures it on other seeds."]
    return "\n".join(lines) + "\n"


def eq_plot(result: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    eq, rows = result["eq"], result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in rows:
        axes[0].semilogx(eq.centres_hz, r["gap_before_db"], marker="o", ms=3, label=r["class"])
        f = np.geomspace(eq.centres_hz[0] / 1.2, eq.centres_hz[-1] * 1.1, 200)
        axes[1].semilogx(f, curve_db(eq.centres_hz, r["gains_db"], f), label=r["class"])
    for ax, title in zip(axes, ("band gap before the EQ (dB)", "EQ gain (dB)")):
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("Hz")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].axhspan(-4, 4, color="g", alpha=0.08)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
