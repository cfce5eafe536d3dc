"""Per-class default guidance: the smallest scale at which a class's generated clips are recognisable.

Classifier-free guidance trades variety for class fit, and classes differ in how much of it they need: on the
built-in set a conditional model (w = 1) already makes recognisable engines, keyboards or rain, and guiding them
only pulls every seed towards the same few sounds, while a sneeze needs w = 3 to stop sounding like a bark.
One global scale is therefore either too weak for some classes or too strong for others.

``calibrate_class_guidance`` generates ``n_per_class`` clips per class at each scale of a grid (ascending) with
the checkpoint's shipped sampler, NFE and guidance interval, scores them with the classifier (fraction labelled
as the intended class) and the encoder (diversity relative to real clips), and picks for each class the smallest
scale whose fit reaches ``min_fit``; a class that never does gets the scale with the best fit. Calibration uses
its own noise seeds (``seed``, 1 by default) so that an evaluation on seed 0 (``edmsound evaluate``) measures
the chosen scales on clips they were not chosen on.

    edmsound calibrate-guidance --checkpoint checkpoints/default --scales 1,1.5,2,3 --min-fit 0.9 \\
        --n-per-class 16 --out eval/calibration [--write]

``--write`` stores the scales in the checkpoint's config.json (``preset.default_class_guidance``); the pipeline,
CLI and app then use each class's scale when no guidance is given.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write_bytes, atomic_write_json
from .guidance import check_guidance, format_guidance_interval
from .presets import class_guidance_pairs

DEFAULT_SCALES = (1.0, 1.5, 2.0, 3.0)
DEFAULT_MIN_FIT = 0.9


def choose_scale(results: list[dict], min_fit: float) -> float:
    """The smallest scale whose ``fit`` >= ``min_fit``; if none, the best fit (ties: the smaller scale)."""
    ok = [r["guidance"] for r in results if r["fit"] >= min_fit]
    if ok:
        return min(ok)
    return min(results, key=lambda r: (-r["fit"], r["guidance"]))["guidance"]


def calibrate_class_guidance(checkpoint, *, scales=DEFAULT_SCALES, min_fit: float = DEFAULT_MIN_FIT,
                             n_per_class: int = 16, seed: int = 1, classifier="default", encoder="default",
                             reference="builtin", reference_per_class: int = 200, classes=None,
                             batch_size: int = 8, stop_at_first: bool = True, progress: bool = True,
                             log=print) -> dict:
    """Returns ``{"class_guidance": {class: w}, "rows": [...], "settings": {...}}``; see the module docstring.
    ``stop_at_first``: stop a class's grid at the first scale that reaches ``min_fit`` (the larger ones
    cannot be chosen). ``reference=None`` skips the diversity column."""
    from . import evaluate as E
    from . import metrics as M
    from .pipeline import EDMSoundPipeline
    scales = sorted({check_guidance(w) for w in scales})
    if not scales:
        raise ValueError("need at least one guidance scale")
    if not 0.0 < float(min_fit) <= 1.0:
        raise ValueError(f"min_fit must be in (0, 1], got {min_fit}")
    n_per_class = int(n_per_class)
    if not 2 <= n_per_class <= 10_000:
        raise ValueError(f"n_per_class must be in [2, 10000], got {n_per_class}")
    t0 = time.perf_counter()
    pipe = EDMSoundPipeline(checkpoint, device="cpu")
    classes = list(pipe.classes if classes is None else classes)
    for c in classes:
        pipe.class_index(c)
    clf, clf_desc = E._load_classifier(classifier, pipe.classes)
    if clf is None:
        raise ValueError(f"calibration needs a classifier that knows the checkpoint's classes ({clf_desc})")
    enc = E._load_encoder(encoder) if reference is not None else None
    ref_div = {}
    if enc is not None:
        ref, _ = E.load_reference(reference, classes, pipe.sample_rate, pipe.codec.num_samples,
                                  reference_per_class, E.REFERENCE_SEED, progress)
        for i, c in enumerate(ref.classes):
            if c in classes:
                ref_div[c] = M.mean_pairwise_cosine_distance(_clip_embeddings(enc, ref.waves[ref.labels == i],
                                                                              ref.sample_rate))
    p = pipe.preset
    rows, chosen = [], {}
    for c in classes:
        ci, k = pipe.class_index(c), clf.classes.index(c)
        per = []
        for w in scales:
            g = pipe.generate(c, n=n_per_class, seed=E.noise_seed(seed, ci, 0), guidance=w, batch_size=batch_size)
            waves = E._pcm16(g.waves)
            probs = clf.predict_proba(waves, pipe.sample_rate)
            fit = float(np.mean(np.argmax(probs, axis=1) == k))
            div = float("nan")
            if enc is not None and ref_div.get(c, 0) > 0:
                div = M.mean_pairwise_cosine_distance(_clip_embeddings(enc, waves, pipe.sample_rate)) / ref_div[c]
            per.append({"class": c, "guidance": w, "fit": fit, "diversity_ratio": div,
                        "guided_nfe": g.settings["guided_nfe"], "seconds": round(g.settings["seconds"], 2)})
            log(f"{c:>22s}  w {w:<4g} fit {fit:.2f}  diversity {div:.2f}")
            if stop_at_first and fit >= min_fit:
                break
        chosen[c] = choose_scale(per, min_fit)
        for r in per:
            r["chosen"] = r["guidance"] == chosen[c]
        rows += per
    settings = {"checkpoint": str(checkpoint), "scales": scales, "min_fit": float(min_fit),
                "n_per_class": n_per_class, "seed": int(seed),
                "noise_seed": "seed * 1_000_000 + class_index * 100_000 + i", "sampler": p.default_sampler,
                "nfe": p.default_nfe, "guidance_interval": (None if p.default_guidance_interval is None
                                                            else list(p.default_guidance_interval)),
                "classifier": clf_desc, "encoder": None if enc is None else enc.name,
                "reference": reference, "stop_at_first": stop_at_first,
                "wall_seconds": round(time.perf_counter() - t0, 1)}
    return {"class_guidance": chosen, "rows": rows, "settings": settings}


def _clip_embeddings(encoder, waves: np.ndarray, sr: int) -> np.ndarray:
    """One L2-normalised embedding per clip (the mean of its window embeddings), as the evaluation's diversity."""
    e, ci, _ = encoder.embed_windows(waves, sr, progress=False)
    clips = np.zeros((len(waves), e.shape[1]), np.float64)
    np.add.at(clips, ci, e)
    return clips / np.maximum(np.linalg.norm(clips, axis=1, keepdims=True), 1e-12)


def calibration_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Per-class guidance calibration: `{s['checkpoint']}`", "",
             f"{s['sampler']}, NFE {s['nfe']}, guidance applied for {format_guidance_interval(s['guidance_interval'])}; "
             f"{s['n_per_class']} clips per class and scale from noise seed {s['seed']} (not the evaluation's seed 0); "
             f"rule: the smallest scale with category fit ≥ {s['min_fit']:g} (classifier: {s['classifier']}). "
             f"Diversity = mean pairwise cosine distance of the clips' embeddings ({s['encoder']}) over that of "
             f"real clips of the class. {s['wall_seconds'] / 60:.1f} min.", "",
             "| class | w | category fit | diversity ratio | guided evaluations | chosen |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        d = "–" if not np.isfinite(r["diversity_ratio"]) else f"{r['diversity_ratio']:.2f}"
        lines.append(f"| {r['class']} | {r['guidance']:g} | {r['fit']:.2f} | {d} | {r['guided_nfe']} | "
                     f"{'**✔**' if r['chosen'] else ''} |")
    lines += ["", "Chosen: " + ", ".join(f"{c} {w:g}" for c, w in result["class_guidance"].items())]
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
    for ax, c in zip(axes.flat, classes):
        rows = sorted((r for r in result["rows"] if r["class"] == c), key=lambda r: r["guidance"])
        w = [r["guidance"] for r in rows]
        ax.plot(w, [r["fit"] for r in rows], "o-", label="category fit")
        ax.plot(w, [r["diversity_ratio"] for r in rows], "s--", label="diversity ratio")
        ax.axhline(s["min_fit"], color="grey", lw=0.8, ls=":")
        chosen = result["class_guidance"].get(c)
        if chosen is not None:
            ax.axvline(chosen, color="tab:green", lw=1.2, alpha=0.6)
        ax.set_title(f"{c} (w {chosen:g})" if chosen is not None else c, fontsize=9)
        ax.set_xlabel("guidance w", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(classes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"per-class guidance calibration: {s['sampler']}, NFE {s['nfe']}, seed {s['seed']}; "
                 f"dotted: min fit {s['min_fit']:g}, green: chosen", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_class_guidance(checkpoint, class_guidance: dict | None) -> Path:
    """Store per-class default scales in a model directory's config.json (atomically); None clears them."""
    from .checkpoint import resolve_model_dir
    model_dir = resolve_model_dir(checkpoint)
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    unknown = sorted(set(class_guidance or {}) - set(cfg["classes"]))
    if unknown:
        raise ValueError(f"classes {unknown} are not in the checkpoint ({', '.join(cfg['classes'])})")
    pairs = class_guidance_pairs({c: check_guidance(w) for c, w in (class_guidance or {}).items()})
    cfg["preset"]["default_class_guidance"] = None if pairs is None else dict(pairs)
    atomic_write_json(path, cfg)
    return path
