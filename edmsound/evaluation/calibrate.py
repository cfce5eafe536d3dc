"""Per-class default guidance: the scale (and noise-level interval) at which a class's clips are recognisable
without losing their variety.

Classifier-free guidance trades variety for class fit, and classes differ in how much of it they need: on the
built-in set a conditional model (w = 1) already makes recognisable keyboards or rain, and guiding them only
pulls every seed towards the same few sounds, while a sneeze needs w = 4 to stop sounding like a bark. One
global scale is therefore either too weak for some classes or too strong for others. Where guidance acts matters
too (Kynkäänniemi et al. 2024): for an engine, guidance at mid noise levels collapses every seed onto one drone,
while guidance at the highest level only (the first solver step) fixes the category and leaves the rest free.

``calibrate_class_guidance`` generates ``n_per_class`` clips per class for each (scale, interval) of a grid with
the checkpoint's shipped sampler and NFE, scores them with the classifier (category fit: the fraction labelled
as the intended class) and the encoder (diversity relative to real clips), and picks per class (see
:func:`choose`): among settings with fit >= ``min_fit`` and diversity >= ``min_diversity`` the cheapest (fewest
guided evaluations), then the most diverse; if there are none, the setting with the best worst margin to the
two targets. With ``max_level_gap`` the clips' mean RMS level must also be within that many dB of the real
clips' (guidance changes how loud a class comes out — a few-step model that averages a class's loud events away is
brought back to its level by guiding its first jump, and a class that comes out too loud by a scale below 1);
where no setting meets all three, the cheapest of those meeting fit and diversity whose level is as close as the closest
one's (within that one's standard error) is taken: a costlier setting must be measurably closer. Calibration uses its own noise seeds (``seed``, 1 by default) so that an evaluation on seed 0
(``edmsound evaluate``) measures the chosen settings on clips they were not chosen on.

    edmsound calibrate-guidance --checkpoint checkpoints/default --scales 1,1.5,2,3,4,6,8 \
        --intervals default,2:10 --min-fit 0.9 --min-diversity 0.7 --n-per-class 16 --out eval/calibration [--write]

``--write`` stores the scales in the checkpoint's config.json (``preset.default_class_guidance``) and, for the
classes whose chosen interval is not the preset's, the interval (``preset.default_class_guidance_interval``);
the pipeline, CLI and app then use each class's settings when no guidance is given.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..core.storage import atomic_write_bytes, atomic_write_json
from ..core.guidance import check_guidance, check_guidance_interval, format_guidance_interval, interval_list
from ..core.presets import class_guidance_pairs

DEFAULT_SCALES = (1.0, 1.5, 2.0, 3.0)
DEFAULT_MIN_FIT = 0.9
DEFAULT_MIN_DIVERSITY = 0.7


def _measured(r: dict, key: str) -> float | None:
    """A candidate's ``key`` (diversity ratio, level gap, ...), None where it was not measured."""
    v = r.get(key, float("nan"))
    return float(v) if isinstance(v, (int, float)) and np.isfinite(v) else None


def _diversity(r: dict) -> float | None:
    return _measured(r, "diversity_ratio")


def _level(r: dict) -> float | None:
    return _measured(r, "level_gap_db")


def _feasible(r: dict, min_fit: float, min_diversity: float | None, max_level_gap: float | None = None) -> bool:
    d, g = _diversity(r), _level(r)
    return (r["fit"] >= min_fit and (min_diversity is None or d is None or d >= min_diversity)
            and (max_level_gap is None or g is None or abs(g) <= max_level_gap))


def choose(results: list[dict], min_fit: float, min_diversity: float | None = None,
           max_level_gap: float | None = None) -> dict:
    """The chosen row of one class's candidates (dicts with ``guidance``, ``fit``, optional ``diversity_ratio``
    and ``guidance_interval``; listed in grid order).

    A candidate is *feasible* when fit >= ``min_fit`` and (if ``min_diversity`` is given and the row's diversity
    was measured) diversity >= ``min_diversity``. Among feasible candidates: the cheapest (fewest guided, i.e.
    two-pass, network evaluations ``guided_nfe``), then the most diverse, then the smallest scale. If none
    is: the best worst margin, max(min(fit - min_fit, diversity - min_diversity)), i.e. the best fit when
    diversity is not a target (ties: the smaller scale, then grid order).

    ``max_level_gap`` (dB) adds a third target, |``level_gap_db``| <= it (rows without a measured level pass). If
    no row meets all three but some meet fit and diversity, among those whose |level gap| is within the closest
    one's standard error (``level_gap_se_db``, 0 if absent) of it the cheapest wins, then the closest, then the
    smaller scale — a costlier setting must be measurably closer; otherwise the fit/diversity fallback above."""
    if not results:
        raise ValueError("no candidates to choose from")

    def div_margin(r):
        d = _diversity(r)
        return float("inf") if min_diversity is None or d is None else d - min_diversity

    order = {id(r): i for i, r in enumerate(results)}
    feasible = [r for r in results if _feasible(r, min_fit, min_diversity, max_level_gap)]
    if not feasible and max_level_gap is not None:
        near = [r for r in results if _feasible(r, min_fit, min_diversity) and _level(r) is not None]
        if near:
            closest = min(near, key=lambda r: (abs(_level(r)), r.get("guided_nfe", 0), r["guidance"], order[id(r)]))
            se = _measured(closest, "level_gap_se_db") or 0.0
            near = [r for r in near if abs(_level(r)) <= abs(_level(closest)) + se]
            return min(near, key=lambda r: (r.get("guided_nfe", 0), abs(_level(r)), r["guidance"], order[id(r)]))
    if feasible:
        return min(feasible, key=lambda r: (r.get("guided_nfe", 0), -(_diversity(r) or 0.0),
                                            r["guidance"], order[id(r)]))
    return min(results, key=lambda r: (-min(r["fit"] - min_fit, div_margin(r)), r["guidance"], order[id(r)]))


def choose_scale(results: list[dict], min_fit: float) -> float:
    """The scale :func:`choose` picks with fit as the only target (one interval): the smallest scale whose ``fit``
    >= ``min_fit``; if none, the best fit (ties: the smaller scale)."""
    rows = [{k: v for k, v in r.items() if k != "diversity_ratio"} for r in results]
    return choose(rows, min_fit)["guidance"]


def _parse_intervals(intervals, default):
    """A list of guidance intervals ((lo, hi) / "LO:HI" / "none" / "default") -> unique checked intervals."""
    if intervals is None:
        return [default]
    out = []
    for iv in intervals:
        if isinstance(iv, str):
            iv = default if iv.strip().lower() == "default" else check_guidance_interval(iv.replace(":", ","))
        else:
            iv = check_guidance_interval(iv)
        if iv not in out:
            out.append(iv)
    if not out:
        raise ValueError("need at least one guidance interval")
    return out


def calibrate_class_guidance(checkpoint, *, scales=DEFAULT_SCALES, min_fit: float = DEFAULT_MIN_FIT,
                             min_diversity: float | None = None, max_level_gap: float | None = None, intervals=None,
                             n_per_class: int = 16, seed: int = 1, classifier="default", encoder="default",
                             reference="builtin", reference_per_class: int = 200,
                             fidelity_reference_per_class: int | None = None, classes=None,
                             batch_size: int = 8, stop_at_first: bool = True, progress: bool = True,
                             log=print) -> dict:
    """Returns ``{"class_guidance": {class: w}, "class_guidance_interval": {class: [lo, hi] | None}, "rows": [...],
    "settings": {...}}``; see the module docstring. ``class_guidance_interval`` lists only the classes whose
    chosen interval differs from the checkpoint preset's ``default_guidance_interval``.
    ``intervals``: guidance intervals to cross with ``scales`` (None: the preset's; entries may be (lo, hi),
    "LO:HI", "none" = every noise level, "default"); w = 1 (no guidance) is scored once.
    ``stop_at_first``: stop an interval's scales at the first that reaches ``min_fit`` (under the rule in
    :func:`choose` the larger ones, as costly, fitting better but less diverse, cannot win). ``reference=None`` skips the
    diversity and level columns (then ``min_diversity`` and ``max_level_gap`` are not targets). Scales are tried
    from 1 upwards, then those below 1 (which only a level target can choose: they make a class quieter).
    The diversity column compares with ``reference_per_class`` real clips per class (their embeddings), the level
    with ``fidelity_reference_per_class`` (None: the evaluation's
    :data:`~edmsound.evaluation.sweep.FIDELITY_REFERENCE_PER_CLASS`; 0: the same clips as the diversity)."""
    from . import sweep as E
    from . import metrics as M
    from .fidelity import level_gap_se_db, rms_dbfs
    from ..core.pipeline import EDMSoundPipeline
    scales = sorted({check_guidance(w) for w in scales}, key=lambda w: (w < 1.0, w if w >= 1.0 else -w))
    if not scales:
        raise ValueError("need at least one guidance scale")
    if not 0.0 < float(min_fit) <= 1.0:
        raise ValueError(f"min_fit must be in (0, 1], got {min_fit}")
    if min_diversity is not None and not 0.0 <= float(min_diversity) <= 2.0:
        raise ValueError(f"min_diversity must be in [0, 2] (a diversity ratio) or None, got {min_diversity}")
    if max_level_gap is not None:
        if not (np.isfinite(float(max_level_gap)) and float(max_level_gap) > 0):
            raise ValueError(f"max_level_gap must be a positive number of dB or None, got {max_level_gap}")
        if reference is None:
            raise ValueError("a level target needs real clips to compare with: give a reference")
        max_level_gap = float(max_level_gap)
    n_per_class = int(n_per_class)
    if not 2 <= n_per_class <= 10_000:
        raise ValueError(f"n_per_class must be in [2, 10000], got {n_per_class}")
    level_per_class = E.fidelity_reference_size(fidelity_reference_per_class, reference_per_class)
    t0 = time.perf_counter()
    pipe = EDMSoundPipeline(checkpoint, device="cpu")
    p = pipe.preset
    grid_intervals = _parse_intervals(intervals, p.default_guidance_interval)
    classes = list(pipe.classes if classes is None else classes)
    for c in classes:
        pipe.class_index(c)
    clf, clf_desc = E._load_classifier(classifier, pipe.classes)
    if clf is None:
        raise ValueError(f"calibration needs a classifier that knows the checkpoint's classes ({clf_desc})")
    enc = E._load_encoder(encoder) if reference is not None else None
    ref_div, ref_level = {}, {}
    if enc is not None:
        (ref, _), (level_ref, _) = E.load_references(reference, classes, pipe.sample_rate, pipe.codec.num_samples,
                                                     reference_per_class, level_per_class, E.REFERENCE_SEED,
                                                     progress)
        for i, c in enumerate(ref.classes):
            if c in classes:
                ref_div[c] = M.mean_pairwise_cosine_distance(_clip_embeddings(enc, ref.waves[ref.labels == i],
                                                                              ref.sample_rate))
        for i, c in enumerate(level_ref.classes):
            if c in classes:
                ref_level[c] = rms_dbfs(level_ref.waves[level_ref.labels == i])
    target_div = None if enc is None else min_diversity
    rows, chosen, chosen_iv = [], {}, {}
    for c in classes:
        ci, k = pipe.class_index(c), clf.classes.index(c)
        per, unguided = [], None
        for iv in grid_intervals:
            if stop_at_first and unguided is not None and _feasible(unguided, min_fit, target_div, max_level_gap):
                break                                      # w = 1 meets both targets: nothing is cheaper
            for w in scales:
                if w == 1.0 and unguided is not None:        # no guidance: the interval changes nothing
                    continue
                gens = E.generate_in_calls(pipe, c, n_per_class, E.noise_seed(seed, ci, 0), guidance=w,
                                           guidance_interval=iv, batch_size=batch_size)
                waves = E._pcm16(np.concatenate([g.waves for g in gens]))
                probs = clf.predict_proba(waves, pipe.sample_rate)
                fit = float(np.mean(np.argmax(probs, axis=1) == k))
                div = float("nan")
                if enc is not None and ref_div.get(c, 0) > 0:
                    div = M.mean_pairwise_cosine_distance(_clip_embeddings(enc, waves, pipe.sample_rate)) / ref_div[c]
                gap = se = float("nan")
                if c in ref_level:
                    rms = rms_dbfs(waves)
                    gap, se = float(rms.mean() - ref_level[c].mean()), level_gap_se_db(rms, ref_level[c])
                r = {"class": c, "guidance": w, "guidance_interval": interval_list(iv),
                     "fit": fit, "diversity_ratio": div, "level_gap_db": gap, "level_gap_se_db": se,
                     "guided_nfe": gens[0].settings["guided_nfe"],
                     "seconds": round(sum(g.settings["seconds"] for g in gens), 2)}
                per.append(r)
                if w == 1.0:
                    unguided = r
                log(f"{c:>22s}  w {w:<4g} {format_guidance_interval(iv) if w != 1.0 else 'unguided':<16s} "
                    f"fit {fit:.2f}  diversity {div:.2f}  level {gap:+.1f} dB")
                if stop_at_first and (_feasible(r, min_fit, target_div, max_level_gap) if max_level_gap is not None
                                      else fit >= min_fit):
                    break
        best = choose(per, min_fit, target_div, max_level_gap)
        chosen[c] = best["guidance"]
        iv = check_guidance_interval(best["guidance_interval"])
        if best["guidance"] != 1.0 and iv != p.default_guidance_interval:
            chosen_iv[c] = interval_list(iv)
        for r in per:
            r["chosen"] = r is best
        rows += per
    settings = {"checkpoint": str(checkpoint), "scales": scales, "min_fit": float(min_fit),
                "min_diversity": None if min_diversity is None or enc is None else float(min_diversity),
                "max_level_gap": max_level_gap,
                "n_per_class": n_per_class, "seed": int(seed),
                "noise_seed": "seed * 1_000_000 + class_index * 100_000 + i", "sampler": p.default_sampler,
                "nfe": p.default_nfe, "guidance_interval": interval_list(p.default_guidance_interval),
                "intervals": [interval_list(iv) for iv in grid_intervals],
                "classifier": clf_desc, "encoder": None if enc is None else enc.name,
                "reference": reference, "reference_per_class": reference_per_class,
                "level_reference_per_class": None if enc is None else level_per_class, "stop_at_first": stop_at_first,
                "guidance_reference": pipe.resolve_reference(), "guide": p.guide,
                "wall_seconds": round(time.perf_counter() - t0, 1)}
    return {"class_guidance": chosen, "class_guidance_interval": chosen_iv, "rows": rows, "settings": settings}


def _clip_embeddings(encoder, waves: np.ndarray, sr: int) -> np.ndarray:
    """One L2-normalised embedding per clip (the mean of its window embeddings), as the evaluation's diversity."""
    e, ci, _ = encoder.embed_windows(waves, sr, progress=False)
    clips = np.zeros((len(waves), e.shape[1]), np.float64)
    np.add.at(clips, ci, e)
    return clips / np.maximum(np.linalg.norm(clips, axis=1, keepdims=True), 1e-12)


def chosen_text(result: dict) -> str:
    """"dog_bark 2, ..., moving_motor_vehicle 4 (σ ∈ (2, 10])": the chosen scale of each class, with its
    interval where it is the class's own."""
    own = result.get("class_guidance_interval") or {}
    return ", ".join(f"{c} {w:g}" + (f" ({format_guidance_interval(own[c])})" if c in own else "")
                     for c, w in result["class_guidance"].items())


def calibration_markdown(result: dict) -> str:
    s = result["settings"]
    ivs = s.get("intervals") or [s["guidance_interval"]]
    rule = f"category fit ≥ {s['min_fit']:g}"
    if s.get("min_diversity") is not None:
        rule += (f" and diversity ratio ≥ {s['min_diversity']:g}; among those the fewest guided evaluations, "
                 "then the most diverse; if none, the best worst margin to the two")
    else:
        rule = "the fewest guided evaluations (then the smallest scale) with " + rule
    if s.get("max_level_gap") is not None:
        rule += (f"; level within ±{s['max_level_gap']:g} dB of the real clips' (if no setting meets every target, the "
                 "closest in level of those meeting the others)")
    lines = [f"# Per-class guidance calibration: `{s['checkpoint']}`", "",
             f"{s['sampler']}, NFE {s['nfe']}, guidance intervals tried: {', '.join(format_guidance_interval(iv) for iv in ivs)} "
             f"(shipped: {format_guidance_interval(s['guidance_interval'])}); "
             f"{s['n_per_class']} clips per class and setting from noise seed {s['seed']} (not the evaluation's seed 0); "
             f"rule: {rule} (classifier: {s['classifier']}). "
             + (f"Guidance pushes away from the checkpoint's guide model, {s['guide']} (autoguidance). "
                if s.get("guidance_reference") == "guide" else "") +
             f"Diversity = mean pairwise cosine distance of the clips' embeddings ({s['encoder']}) over that of "
             f"real clips of the class" + (f" ({s['reference_per_class']} per class)" if s.get("reference_per_class") else "")
             + (f"; level gap = the clips' mean RMS level (dBFS) minus that of {s['level_reference_per_class']} real "
                f"clips per class" if s.get("level_reference_per_class") else "")
             + f". {s['wall_seconds'] / 60:.1f} min.", "",
             "| class | w | guided for | category fit | diversity ratio | level gap dB | guided evaluations | chosen |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        d = "–" if not np.isfinite(r["diversity_ratio"]) else f"{r['diversity_ratio']:.2f}"
        g = r.get("level_gap_db", float("nan"))
        g = "–" if not np.isfinite(g) else f"{g:+.1f}"
        where = "– (unguided)" if r["guidance"] == 1.0 else format_guidance_interval(r.get("guidance_interval", s["guidance_interval"]))
        lines.append(f"| {r['class']} | {r['guidance']:g} | {where} | {r['fit']:.2f} | {d} | {g} | {r['guided_nfe']} | "
                     f"{'**✔**' if r['chosen'] else ''} |")
    lines += ["", "Chosen: " + chosen_text(result)]
    return "\n".join(lines) + "\n"


def write_calibration(result: dict, out_dir) -> None:
    """calibration.json, calibration.md and calibration.png (the per-class fit / diversity curves)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "calibration.json", result)
    atomic_write_bytes(out / "calibration.md", calibration_markdown(result).encode())
    atomic_write_bytes(out / "calibration.png", calibration_plot(result))


def calibration_plot(result: dict) -> bytes:
    """PNG bytes: one panel per class, category fit and diversity ratio against the guidance scale, the
    ``min_fit`` line and the chosen scale marked (the trade-off the rule resolves)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    classes = list(dict.fromkeys(r["class"] for r in result["rows"]))
    cols = min(4, len(classes))
    nrows = -(-len(classes) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False, sharey=True,
                             constrained_layout=True)
    s = result["settings"]
    ivs = [None if iv is None else tuple(iv) for iv in (s.get("intervals") or [s["guidance_interval"]])]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    own = result.get("class_guidance_interval") or {}
    for ax, c in zip(axes.flat, classes):
        mine = [r for r in result["rows"] if r["class"] == c]
        unguided = [r for r in mine if r["guidance"] == 1.0]
        lax = None
        for j, iv in enumerate(ivs):
            rows = unguided + [r for r in mine if r["guidance"] != 1.0 and
                               (None if r.get("guidance_interval") is None else tuple(r["guidance_interval"])) == iv]
            rows = sorted(rows, key=lambda r: r["guidance"])
            if not rows:
                continue
            w = [r["guidance"] for r in rows]
            tag = "" if len(ivs) == 1 else f", {format_guidance_interval(iv)}"
            col = colors[j % len(colors)]
            ax.plot(w, [r["fit"] for r in rows], "o-", color=col, label="category fit" + tag)
            ax.plot(w, [r["diversity_ratio"] for r in rows], "s--", color=col, alpha=0.7, label="diversity ratio" + tag)
            levels = [r.get("level_gap_db", float("nan")) for r in rows]
            if s.get("max_level_gap") is not None and np.isfinite(levels).any():
                if lax is None:
                    lax = ax.twinx()
                    lim = s["max_level_gap"]
                    lax.axhspan(-lim, lim, color="tab:orange", alpha=0.08)
                    lax.set_ylabel("level gap dB", fontsize=8, color="tab:orange")
                lax.plot(w, levels, "^:", color=col, alpha=0.9, label="level gap dB (right)" + tag)
        ax.axhline(s["min_fit"], color="grey", lw=0.8, ls=":")
        if s.get("min_diversity") is not None:
            ax.axhline(s["min_diversity"], color="grey", lw=0.8, ls="-.")
        best = next((r for r in mine if r.get("chosen")), None)
        chosen = result["class_guidance"].get(c)
        if best is not None:
            ax.plot([best["guidance"]], [best["fit"]], "*", ms=14, color="tab:green", zorder=5)
        title = c if chosen is None else f"{c} (w {chosen:g}" + (f", {format_guidance_interval(own[c])})" if c in own else ")")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("guidance w", fontsize=8)
        ax.set_xlim(min(s["scales"]) - 0.3, max(s["scales"]) + 0.3)     # one w axis for every panel
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(classes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"per-class guidance calibration: {s['sampler']}, NFE {s['nfe']}, seed {s['seed']}; "
                 f"dotted: min fit {s['min_fit']:g}" + ("" if s.get("min_diversity") is None else
                 f", dash-dot: min diversity {s['min_diversity']:g}") + ("" if s.get("max_level_gap") is None else
                 f"; shaded: level within ±{s['max_level_gap']:g} dB") + "; green star: chosen", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_class_guidance(checkpoint, class_guidance: dict | None, class_intervals: dict | None = None) -> Path:
    """Store per-class default scales (and the classes' own guidance intervals, ``{class: (lo, hi) | None}``) in a
    model directory's config.json (atomically); ``class_guidance=None`` clears both."""
    from ..core.storage import resolve_model_dir
    from ..core.presets import class_interval_pairs
    model_dir = resolve_model_dir(checkpoint)
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    if class_guidance is None:
        class_intervals = None
    unknown = sorted((set(class_guidance or {}) | set(class_intervals or {})) - set(cfg["classes"]))
    if unknown:
        raise ValueError(f"classes {unknown} are not in the checkpoint ({', '.join(cfg['classes'])})")
    pairs = class_guidance_pairs({c: check_guidance(w) for c, w in (class_guidance or {}).items()})
    ivs = class_interval_pairs({c: check_guidance_interval(iv) for c, iv in (class_intervals or {}).items()})
    cfg["preset"]["default_class_guidance"] = None if pairs is None else dict(pairs)
    cfg["preset"]["default_class_guidance_interval"] = (None if ivs is None else
                                                        {c: interval_list(iv) for c, iv in ivs})
    atomic_write_json(path, cfg)
    return path
