"""Coverage: which of its training clips a model rarely makes, and draw weights that make it see them more.

A few-step model can lose a class's rare shapes (the largest dogs' low barks) while its mean spectrum still looks
close. This module compares, per class, where the training clips lie and where the model's clips lie in a plain
signal space — the share of each clip's power in the fidelity bands (dB) and its RMS level, standardised by the
training clips' spread and projected on their leading principal components (three by default: a nearest-neighbour
density needs few dimensions at a few hundred clips; in all 13 nearly every training clip is far from every generated
one) — and estimates for every training clip the ratio of the two densities around it with k nearest neighbours: among the ``k`` clips nearest to a
training clip, counted in the pooled set of the other training clips and the generated ones, ``g`` generated and
``k - g`` real give

    ratio = ((k - g + 1/2) / (n_real - 1)) / ((g + 1/2) / n_gen)

(1 where the model makes that kind of clip as often as the data holds it, above 1 where it makes it rarely). The
ratios, clipped to [1/cap, cap] and scaled to mean 1 per class, are the clip weights that training can draw by
(``edmsound consistency-tune --clip-weights``): importance weights towards the shapes the model under-covers.

The weights file itself (read by training) belongs to :mod:`edmsound.data.weights`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .fidelity import clip_band_power

__all__ = ["coverage_features", "density_ratio", "coverage_weights", "measure_coverage", "write_coverage_report",
           "DEFAULT_K", "DEFAULT_CAP", "DEFAULT_COMPONENTS", "RARE_RATIO"]

DEFAULT_K = 40
DEFAULT_COMPONENTS = 3
DEFAULT_CAP = 8.0
SHARE_FLOOR_DB = -40.0       # a band under this share of the clip's power counts as this (its exact level is noise)


def coverage_features(waves, sample_rate: int) -> np.ndarray:
    """Per clip: the share of its power in each fidelity band (dB, floored at -40) and its RMS level (dB); shape
    (clips, bands + 1)."""
    bp = clip_band_power(waves, sample_rate)
    total = np.maximum(bp.sum(axis=1, keepdims=True), 1e-20)
    share = np.maximum(10 * np.log10(np.maximum(bp / total, 1e-20)), SHARE_FLOOR_DB)
    return np.concatenate([share, 10 * np.log10(total)], axis=1)


def _principal(real: np.ndarray, others: np.ndarray, components: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``real`` and ``others`` standardised by the real rows' spread and projected on the real rows' leading
    ``components`` principal axes (None: standardised only)."""
    scale = real.std(axis=0)
    scale[scale < 1e-9] = 1.0
    mu = real.mean(axis=0)
    a, b = (real - mu) / scale, (others - mu) / scale
    if components is None:
        return a, b
    c = int(components)
    if not 1 <= c <= a.shape[1]:
        raise ValueError(f"components must be in [1, {a.shape[1]}], got {components!r}")
    axes = np.linalg.svd(a, full_matrices=False)[2][:c].T
    return a @ axes, b @ axes


def _capped_weights(ratio: np.ndarray, cap: float) -> np.ndarray:
    """Ratios clipped to [1/cap, cap] and scaled to mean 1."""
    if not (math.isfinite(cap) and cap >= 1):
        raise ValueError(f"the cap must be a finite number >= 1, got {cap!r}")
    w = np.clip(ratio, 1 / cap, cap)
    return w / w.mean()


def density_ratio(real: np.ndarray, gen: np.ndarray, k: int = DEFAULT_K,
                  components: int | None = DEFAULT_COMPONENTS) -> np.ndarray:
    """For every row of ``real``: the k-nearest-neighbour estimate of p_real / p_gen at that point (see the module
    docstring), in the space of the columns standardised by the real rows' spread and projected on the real rows'
    leading ``components`` principal axes (None: all columns). Exact (brute-force) search."""
    real = np.asarray(real, np.float64)
    gen = np.asarray(gen, np.float64)
    n_r, n_g = len(real), len(gen)
    if n_r < 2 or n_g < 1:
        raise ValueError(f"a density ratio needs at least 2 real and 1 generated clip, got {n_r} and {n_g}")
    k = int(k)
    if not 1 <= k <= n_r - 1 + n_g:
        raise ValueError(f"k must be in [1, {n_r - 1 + n_g}] for {n_r} real and {n_g} generated clips, got {k}")
    a, b = _principal(real, gen, components)
    pool = np.concatenate([a, b])
    d = ((a ** 2).sum(1)[:, None] + (pool ** 2).sum(1)[None, :] - 2 * a @ pool.T)
    d[np.arange(n_r), np.arange(n_r)] = np.inf              # a clip is not its own neighbour
    nearest = np.argpartition(d, k - 1, axis=1)[:, :k]
    g = (nearest >= n_r).sum(axis=1).astype(np.float64)
    return ((k - g + 0.5) / (n_r - 1)) / ((g + 0.5) / n_g)


def coverage_weights(real_features: np.ndarray, real_labels: np.ndarray, gen_features: np.ndarray,
                     gen_labels: np.ndarray, k: int = DEFAULT_K, cap: float = DEFAULT_CAP,
                     components: int | None = DEFAULT_COMPONENTS) -> np.ndarray:
    """Draw weight of every real clip: its class's density ratio, clipped to [1/cap, cap], scaled to mean 1 within
    the class (a class's share of the draws is unchanged). Classes without generated clips keep weight 1."""
    _capped_weights(np.ones(1), cap)                       # checks the cap before any work
    real_labels, gen_labels = np.asarray(real_labels), np.asarray(gen_labels)
    w = np.ones(len(real_labels))
    for c in np.unique(real_labels):
        sel, gsel = real_labels == c, gen_labels == c
        if not gsel.any() or sel.sum() < 2:
            continue
        w[sel] = _capped_weights(density_ratio(real_features[sel], gen_features[gsel], k, components), cap)
    return w


RARE_RATIO = 2.0             # a training clip the model makes at under half the data's density counts as rarely made


def measure_coverage(checkpoint, data, *, n_per_class: int = 512, seed: int = 5_000_000, classes=None,
                     nfe: int | None = None, k: int = DEFAULT_K, components: int | None = DEFAULT_COMPONENTS,
                     cap: float = DEFAULT_CAP, batch_size: int = 8, precision: str = "auto",
                     progress: bool = True) -> dict:
    """Make ``n_per_class`` clips of every class (or of ``classes``) with the model as it plays by default (its
    sampler, budget or ``nfe``, guidance and matching EQ; noise seeds ``seed + i``), load the training clips of the
    class-per-folder tree ``data`` and compare them (module docstring). Returns ``{"settings", "classes": {class:
    summary}, "keys", "labels", "weights", "ratios", "real_points", "gen_points"}`` (``*_points``: every clip's first
    two principal coordinates within its class, for the plot)."""
    from tqdm.auto import tqdm
    from ..core.pipeline import EDMSoundPipeline
    from ..data.folder import load_folder
    from ..data.weights import clip_keys
    from .sweep import generate_in_calls
    n_per_class = int(n_per_class)
    if n_per_class < 2:
        raise ValueError(f"the model's clips per class must be at least 2, got {n_per_class}")
    _capped_weights(np.ones(1), cap)                       # checks the cap before the model loads
    pipe = EDMSoundPipeline(checkpoint, bf16=precision)
    sr, ns = pipe.preset.codec.sample_rate, pipe.preset.codec.num_samples
    chosen = list(pipe.classes) if classes is None else list(classes)
    unknown = [c for c in chosen if c not in pipe.classes]
    if unknown:
        raise ValueError(f"class {unknown[0]!r} is not one of the model's: {', '.join(pipe.classes)}")
    real = load_folder(data, sr, ns, classes=list(pipe.classes), progress=progress)
    keys = clip_keys(real.sources, data)
    real_f = coverage_features(real.waves, sr)
    weights = np.ones(len(real))
    ratios = np.ones(len(real))
    points_r = np.zeros((len(real), 2))
    gen_l, points_g = [], []
    per_class: dict[str, dict] = {}
    options = {} if nfe is None else {"nfe": int(nfe)}
    bar = tqdm(chosen, desc="coverage", unit="class", disable=not progress)
    settings = None
    for c in bar:
        ci = pipe.classes.index(c)
        sel = real.labels == ci
        if sel.sum() < 2:
            raise ValueError(f"{data}: class {c!r} has {int(sel.sum())} training clip(s); at least 2 are needed")
        gens = generate_in_calls(pipe, c, n_per_class, seed, batch_size=batch_size, **options)
        settings = settings or dict(gens[0].settings)
        g = coverage_features(np.concatenate([x.waves for x in gens]), sr)
        kk = min(int(k), int(sel.sum()) - 1 + len(g))
        r = density_ratio(real_f[sel], g, kk, components)
        weights[sel] = _capped_weights(r, cap)
        ratios[sel] = r
        # the plane of the class's two leading principal axes (the ratio's space, first two coordinates)
        points_r[sel], pg = _principal(real_f[sel], g, 2)
        gen_l.append(np.full(len(g), ci))
        points_g.append(pg)
        order = np.argsort(-r)
        ks = [keys[i] for i in np.flatnonzero(sel)]
        per_class[c] = {"training_clips": int(sel.sum()), "generated_clips": len(g), "k": kk,
                        "rarely_made_share": round(float((r >= RARE_RATIO).mean()), 4),
                        "ratio_p10_p50_p90": [round(float(v), 3) for v in np.percentile(r, [10, 50, 90])],
                        "weight_min_max": [round(float(weights[sel].min()), 4), round(float(weights[sel].max()), 4)],
                        "rarest": [{"clip": ks[i], "ratio": round(float(r[i]), 2)} for i in order[:5]]}
    done = np.isin(real.labels, [pipe.classes.index(c) for c in chosen])
    return {"settings": {"checkpoint": str(checkpoint), "data": str(data), "n_per_class": n_per_class, "seed": int(seed),
                         "k": int(k), "components": components, "cap": float(cap), "rare_ratio": RARE_RATIO,
                         "sampler": settings.get("sampler"), "nfe": settings.get("nfe"),
                         "precision": pipe.precision},
            "classes": per_class, "keys": keys, "labels": real.labels, "class_names": list(pipe.classes),
            "measured": done, "weights": weights, "ratios": ratios, "real_points": points_r,
            "gen_points": np.concatenate(points_g), "gen_labels": np.concatenate(gen_l)}


def write_coverage_report(res: dict, out_dir) -> Path:
    """``clip_weights.csv`` (every training clip; classes not measured: 1), ``coverage.json``, ``coverage.md`` and
    ``coverage.png`` (per class, the training clips in their two leading principal coordinates coloured by how
    rarely the model makes them, the model's clips beside them). Returns the markdown path."""
    import json
    from ..core.plotting import plt, save_figure
    from ..data.weights import write_clip_weights
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_clip_weights(out / "clip_weights.csv", res["keys"], res["weights"])
    (out / "coverage.json").write_text(json.dumps({"settings": res["settings"], "classes": res["classes"]}, indent=1))
    s = res["settings"]
    lines = [f"# Coverage of {s['checkpoint']} against {s['data']}", "",
             f"{s['n_per_class']} clips per class ({s['sampler']}, {s['nfe']} evaluations, {s['precision']}, noise "
             f"seeds {s['seed']}+), against every training clip; density ratio by {s['k']} nearest neighbours in the "
             f"{s['components'] or 'all'} leading principal coordinates of the band shares and level. "
             f"A clip counts as rarely made at ratio >= {s['rare_ratio']:g}; weights clipped to 1/{s['cap']:g} … "
             f"{s['cap']:g} before scaling to mean 1 per class.", "",
             "| class | training clips | rarely made | ratio p10 / p50 / p90 | weight range | rarest |",
             "|---|---|---|---|---|---|"]
    for c, row in res["classes"].items():
        p = row["ratio_p10_p50_p90"]
        lines.append(f"| {c} | {row['training_clips']} | {100 * row['rarely_made_share']:.1f} % | "
                     f"{p[0]:.2f} / {p[1]:.2f} / {p[2]:.2f} | {row['weight_min_max'][0]:.3g} … "
                     f"{row['weight_min_max'][1]:.3g} | {row['rarest'][0]['clip']} ({row['rarest'][0]['ratio']:.1f}) |")
    (out / "coverage.md").write_text("\n".join(lines) + "\n")
    names = list(res["classes"])
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axs = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    for ax, c in zip(axs.flat, names):
        ci = res["class_names"].index(c)
        sel = res["labels"] == ci
        g = res["gen_points"][res["gen_labels"] == ci]
        ax.scatter(g[:, 0], g[:, 1], s=4, c="0.75", label="model")
        sc = ax.scatter(res["real_points"][sel, 0], res["real_points"][sel, 1], s=6,
                        c=np.log2(np.clip(res["ratios"][sel], 1 / 16, 16)), cmap="coolwarm", vmin=-3, vmax=3,
                        label="training")
        ax.set_title(c, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axs.flat)[len(names):]:
        ax.axis("off")
    axs.flat[0].legend(fontsize=7, loc="best")
    fig.colorbar(sc, ax=axs, shrink=0.8, label="log2 density ratio, training / model (red: rarely made)")
    fig.suptitle("Training clips the model rarely makes (two leading principal coordinates)", fontsize=10)
    save_figure(fig, out / "coverage.png")
    return out / "coverage.md"
