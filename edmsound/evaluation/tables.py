"""An evaluation's outputs: ``results.csv``, ``results.md`` (overall, per class, and the encoder-free fidelity
tables with their floors), ``results.json`` and ``plots/*.png`` — all written atomically."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from ..core.storage import atomic_write_bytes, atomic_write_json
from . import fidelity as F
from .points import CLASS_GUIDANCE
from .quality import BAND_GAP_MAX_DB, FAD_RATIO_MAX

__all__ = ["write_outputs", "METRIC_COLUMNS"]

METRIC_COLUMNS = ["fad", "fad_vs_baseline", "kid", "kid_std", "accuracy", "map_at_10", "inception_score",
                  "diversity", "diversity_real", "diversity_ratio", *F.FIDELITY_COLUMNS, "copy_share", "copy_top1_mean"]


def _columns(rows) -> list[str]:
    base = ["kind", "sampler", "requested_nfe", "nfe", "guidance", "guidance_interval", "class", "n"]
    if any("guidance_per_class" in r for r in rows):
        base.insert(6, "guidance_per_class")
    extra = []
    for r in rows:
        for k in r:
            if k not in base and k not in extra:
                extra.append(k)
    order = {k: i for i, k in enumerate(["fad", "fad_vs_baseline", "kid", "kid_std", "accuracy"])}
    extra.sort(key=lambda k: (order.get(k, 5 if k.startswith("top") else 10 + (METRIC_COLUMNS.index(k)
                                                                              if k in METRIC_COLUMNS else 50))))
    return base + extra


def _csv(rows) -> str:
    cols = _columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, list):
                v = ";".join(f"{x:.4g}" for x in v)
            vals.append("" if (isinstance(v, float) and not math.isfinite(v)) else
                        (f"{v:.6g}" if isinstance(v, float) else v))
        w.writerow(vals)
    return buf.getvalue()


def _f(v, fmt="{:.3f}"):
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


# (column title, key, formatter) of the markdown tables
def _md_metrics(rows):
    tops = sorted({k for r in rows for k in r if k.startswith("top") and k.endswith("_accuracy")},
                  key=lambda k: int(k[3:-9]))
    cols = [("FAD", "fad", "{:.4f}"), ("FAD / baseline", "fad_vs_baseline", "{:.2f}"),
            ("KID ×10³", "kid", None), ("accuracy", "accuracy", "{:.3f}")]
    cols += [(f"top-{k[3:-9]}", k, "{:.3f}") for k in tops]
    cols += [("mAP@10", "map_at_10", "{:.3f}"), ("IS", "inception_score", "{:.2f}"),
             ("diversity ratio", "diversity_ratio", "{:.2f}"), ("level gap dB", "level_gap_db", "{:+.1f}"),
             ("LUFS gap", "lufs_gap", "{:+.1f}"), ("worst band dB", "band_gap_worst_db", "{:+.1f}"),
             ("copy %", "copy_share", None)]
    return cols


def _cell(r, key, fmt):
    if key == "kid":
        v, s = r.get("kid"), r.get("kid_std")
        return "–" if v is None or not math.isfinite(v) else f"{1e3 * v:.2f} ± {1e3 * (s or 0):.2f}"
    if key == "copy_share":
        v = r.get(key)
        return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"
    return _f(r.get(key), fmt)


def _label(r):
    if r["kind"] == "generated":
        g = "per class" if r["guidance"] == CLASS_GUIDANCE else f"{r['guidance']:g}"
        return [r["sampler"], str(r["nfe"]) + ("" if r["nfe"] == r["requested_nfe"] else f" (asked {r['requested_nfe']})"),
                g + _interval_label(r)]
    return [f"*{r['kind']}*", "", ""]


def _interval_label(r) -> str:
    """`` σ∈(lo, hi]`` for a row with a guidance interval, else ``""``."""
    iv = r.get("guidance_interval") or ""
    if not iv:
        return ""
    lo, hi = iv.split(":")
    return f" (σ∈({lo}, {hi}])"


def _series(r) -> str:
    """Plot series of a generated row: the sampler, with its guidance interval if any."""
    return r["sampler"] + _interval_label(r)


def _markdown(result) -> str:
    s, rows = result["settings"], result["rows"]
    cols = _md_metrics(rows)
    L = ["# EDMSound evaluation", ""]
    L += [f"- checkpoint: `{s['checkpoint']}` (ema sha256 {s['ema_sha256'][:12]}"
          + (f", network in {s['precision']})" if s.get("precision") else ")"),
          f"- reference (held-out real clips): {s['reference']}",
          *([f"- level, loudness and band gaps against: {s['fidelity_reference']}"]
            if s.get("fidelity_reference") not in (None, s["reference"]) else []),
          f"- baseline training subset: {s['training_subset']}",
          f"- encoder for FAD, KID and diversity: **{s['encoder']['name']}** (weights {s['encoder']['weights_hash'][:12]}, "
          f"{s['encoder']['level'][:-1]}-level embeddings). FAD and KID values are only comparable with the same encoder.",
          f"- classifier: {s['classifier']}", f"- copy-detection index: {s['index']}",
          f"- {s['n_per_class']} clips per class and configuration; clip i of class c starts from noise seed "
          f"{s['noise_seed']} with seed = {s['seed']}, identical for every configuration",
          f"- KID: IMQ kernel, γ² = {s['kid']['gamma2']:g}, mean ± std over {s['kid']['subsets']} subsets"]
    for n in s["notes"]:
        L.append(f"- note: {n}")
    L += ["", "Lower is better for FAD, FAD / baseline (target: ≤ 2.5) and KID; higher is better for accuracy, "
          "top-k and mAP@10; IS is at most the number of classes; a diversity ratio near 1 means as diverse as "
          "real clips; the level gap is the mean RMS level (dBFS) of the clips minus the real clips' (0 = as loud); "
          "copy % is the share above the training set's own 95th percentile (≈ 5 % for real "
          "held-out clips). See docs/evaluation.md.", "", "## Overall", ""]
    head = ["sampler", "NFE", "w"] + [c[0] for c in cols] + ["s / clip"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["class"] != "overall":
            continue
        L.append("| " + " | ".join(_label(r) + [_cell(r, k, f) for _, k, f in cols]
                                   + [_f(r.get("seconds_per_clip"), "{:.2f}")]) + " |")
    classes = s["classes"]
    for title, key, fmt in cols:
        if not any(key in r and not (isinstance(r[key], float) and not math.isfinite(r[key])) for r in rows):
            continue
        L += ["", f"## Per class: {title}", ""]
        head = ["sampler", "NFE", "w"] + classes + ["overall"]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in _groups(rows):
            first = next(iter(g.values()))
            L.append("| " + " | ".join(_label(first) + [_cell(g[c], key, fmt) if c in g else "–"
                                                        for c in classes + ["overall"]]) + " |")
    L += _md_fidelity(result)
    return "\n".join(L) + "\n"


def _groups(rows) -> list[dict]:
    """Rows grouped by configuration (kind, sampler, NFE, guidance, interval): ``{class: row}`` each, in order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["kind"], r["sampler"], r["nfe"], r["guidance"], r.get("guidance_interval", "")),
                          {})[r["class"]] = r
    return list(groups.values())


def _md_fidelity(result) -> list[str]:
    """The encoder-free fidelity tables: each gap beside its noise floor (the training subset, real clips of the
    same size, measured against the same reference)."""
    s, rows = result["settings"], result["rows"]
    if not any("band_gap_db" in r for r in rows):
        return []
    classes = s["classes"]
    groups = _groups(rows)
    floor = next((g for g in groups if next(iter(g.values()))["kind"] == "baseline: training subset"), {})
    ref = next((g for g in groups if next(iter(g.values()))["kind"] == "baseline: reference"), {})
    edges = F.band_edges(s["sample_rate"], len(next(r["band_gap_db"] for r in rows if "band_gap_db" in r)))
    L = ["", "## Fidelity without a learned encoder", "",
         "Gaps of the generated clips against the reference, each beside its **floor**: the same gap for the "
         "training subset (real clips, as many per class, disjoint from the reference). Level = mean RMS dBFS "
         "(± its standard error from both sets' per-clip spread); "
         "LUFS = median BS.1770 integrated loudness; TP = median true peak (dBTP); over 0 dBFS = the share of "
         "clips whose sample peak reaches full scale (clipped in a 16- or 24-bit file); worst band = the largest "
         f"|gap| of {len(edges) - 1} log-spaced bands ({edges[0]:.0f} Hz – {edges[-1] / 1000:g} kHz) of mean power. "
         "Reference LUFS / TP: the real clips' medians."]
    head = ["class", "level gap", "floor", "LUFS gap", "floor", "LUFS p10–p90", "TP gap", "floor", "TP p90",
            "over 0 dBFS", "floor", "worst band", "floor", "ref LUFS / TP"]

    def v(g, c, k, fmt="{:+.1f}"):
        return _f(g.get(c, {}).get(k), fmt)

    def over(g, c):
        x = g.get(c, {}).get("over_full_scale")
        return _f(None if x is None else 100.0 * x, "{:.1f} %")

    def level(g, c):
        gap, se = v(g, c, "level_gap_db"), v(g, c, "level_gap_se_db", "{:.1f}")
        return gap if "–" in (gap, se) else f"{gap} ± {se}"

    def band(g, c):
        r = g.get(c, {})
        if "band_gap_worst_db" not in r:
            return "–"
        b = r["band_gap_worst_band"]
        if not isinstance(b, int):
            return "–"
        se = r.get("band_gap_worst_se_db")
        pm = f" ± {se:.1f}" if isinstance(se, float) and math.isfinite(se) else ""
        return f"{r['band_gap_worst_db']:+.1f}{pm} ({edges[b]:.0f}–{edges[b + 1]:.0f} Hz)"

    for g in groups:
        first = next(iter(g.values()))
        if first["kind"] != "generated":
            continue
        L += ["", f"### {' '.join(x for x in _label(first) if x)}", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in classes + ["overall"]:
            spread = (f"{g[c]['lufs_p10']:.1f} … {g[c]['lufs_p90']:.1f}" if c in g and "lufs_p10" in g[c] else "–")
            refl = (f"{ref[c]['lufs_median']:.1f} / {ref[c]['true_peak_median']:.1f}"
                    if c in ref and "lufs_median" in ref[c] else "–")
            L.append("| " + " | ".join([c, level(g, c), level(floor, c), v(g, c, "lufs_gap"),
                                        v(floor, c, "lufs_gap"), spread, v(g, c, "true_peak_gap"),
                                        v(floor, c, "true_peak_gap"), v(g, c, "true_peak_p90", "{:.1f}"),
                                        over(g, c), over(floor, c), band(g, c), band(floor, c), refl]) + " |")
    centres = np.sqrt(edges[:-1] * edges[1:])
    hz = [f"{c:.0f}" if c < 1000 else f"{c / 1000:.1f}k" for c in centres]
    L += ["", "### Band gaps (dB) per class", "",
          "Band centres in Hz; each gap ± its standard error (from both sets' per-clip band powers). *floor*: the "
          "training subset's gaps.", ""]
    head = ["configuration", "class"] + hz
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    counts = []
    for g in groups:
        first = next(iter(g.values()))
        if first["kind"] == "baseline: reference":
            continue
        name = "*floor*" if first["kind"] != "generated" else " ".join(x for x in _label(first) if x)
        for c in classes:
            if c in g and "band_gap_db" in g[c]:
                ses = g[c].get("band_gap_se_db") or [float("nan")] * len(g[c]["band_gap_db"])
                L.append("| " + " | ".join([name, c] + [_gap_pm(x, e) for x, e in zip(g[c]["band_gap_db"], ses)])
                         + " |")
        counts.append((name, F.band_misses([g[c] for c in classes if c in g], BAND_GAP_MAX_DB)))
    L += [""] + [f"- {name}: {F.misses_text(m)}" for name, m in counts]
    L += _brightness_table(groups, classes)
    return L


def _brightness_table(groups, classes) -> list[str]:
    """Per class: the spectral centroid's 10th / 50th / 90th percentile over each set (Hz) and their gaps to the
    reference's (%); the reference's own row, and the training subset's gaps as the floor."""
    rows = []
    for g in groups:
        first = next(iter(g.values()))
        name = {"baseline: reference": "*reference*", "generated": " ".join(x for x in _label(first) if x)}.get(
            first["kind"], "*floor*")
        for c in classes:
            r = g.get(c, {})
            if "centroid_median" not in r:
                continue
            hz = [f"{r[f'centroid_{q}']:.0f}" for q in ("p10", "median", "p90")]
            gaps = (["–"] * 3 if first["kind"] == "baseline: reference" else
                    [_f(r.get(f"centroid_gap_{q}"), "{:+.0f} %") for q in ("p10", "median", "p90")])
            rows.append("| " + " | ".join([name, c] + hz + gaps) + " |")
    if not rows:
        return []
    head = ["configuration", "class", "10th pct. Hz", "median Hz", "90th pct. Hz", "gap at 10th", "gap at median",
            "gap at 90th"]
    return ["", "### Brightness per class (spectral centroid)", "",
            "Each clip's spectral centroid (power-weighted mean frequency); its percentiles over the set and their "
            "gaps to the reference's (set / reference − 1). A set that is duller as a whole is low at every "
            "percentile; one that lacks its brightest clips is low at the 90th only. *floor*: the training subset.",
            "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + rows


def _gap_pm(gap: float, se: float) -> str:
    return f"{gap:+.1f} ± {se:.1f}" if math.isfinite(se) else f"{gap:+.1f}"


PLOT_METRICS = [("fad", "FAD"), ("fad_vs_baseline", "FAD / training baseline"), ("kid", "KID"),
                ("accuracy", "classifier accuracy (category fit)"), ("map_at_10", "mAP@10"),
                ("inception_score", "IS analogue"), ("diversity_ratio", "diversity ratio (generated / real)"),
                ("copy_share", "share above training p95 (copying)")]


OVERVIEW_METRICS = ["fad_vs_baseline", "accuracy", "diversity_ratio", "copy_share"]


def _draw_metric(ax, key, g, gen, base, samplers):
    """One panel: ``key`` vs NFE for every sampler at guidance ``g``, with the baselines and the targets."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    for s in samplers:
        rs = sorted((r for r in gen if _series(r) == s and r["guidance"] == g), key=lambda r: r["nfe"])
        x = [r["nfe"] for r in rs]
        y = [r.get(key, np.nan) for r in rs]
        if key == "kid":
            ax.errorbar(x, y, yerr=[r.get("kid_std", 0) for r in rs], marker="o", capsize=3, label=s)
        else:
            ax.plot(x, y, marker="o", label=s)
    b = base.get("baseline: training subset", {}).get(key, np.nan)
    if key == "fad_vs_baseline":
        ax.axhline(1.0, color="gray", ls="--", lw=1, label="training subset")
        ax.axhline(FAD_RATIO_MAX, color="red", ls=":", lw=1, label=f"{FAD_RATIO_MAX:g} × baseline")
    elif np.isfinite(b):
        ax.axhline(b, color="gray", ls="--", lw=1, label="training subset")
        if key == "fad":
            ax.axhline(FAD_RATIO_MAX * b, color="red", ls=":", lw=1, label=f"{FAD_RATIO_MAX:g} × baseline")
    r = base.get("baseline: reference", {}).get(key, np.nan)
    if key in ("accuracy", "copy_share") and np.isfinite(r):
        ax.axhline(r, color="green", ls="-.", lw=1, label="held-out real")
    ax.set_xscale("log")
    ticks = sorted({r["nfe"] for r in gen})          # every NFE of the sweep (panels may share the x axis)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE")
    ax.grid(alpha=0.3)


def _save_fig(fig, path: Path):
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _plots(result, out: Path) -> list[Path]:
    """``plots/<metric>.png`` (one panel per guidance scale) and ``plots/overview.png`` (the key
    metrics, one row each, one column per guidance scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["class"] == "overall"]
    gen = [r for r in rows if r["kind"] == "generated" and r["guidance"] != CLASS_GUIDANCE]   # per-class: tables only
    base = {r["kind"]: r for r in rows if r["kind"] != "generated"}
    tops = sorted({k for r in rows for k in r if k.startswith("top") and k.endswith("_accuracy")})
    metrics = PLOT_METRICS[:4] + [(k, f"top-{k[3:-9]} accuracy") for k in tops] + PLOT_METRICS[4:]
    titles = dict(metrics)
    guid = sorted({r["guidance"] for r in gen})
    samplers = list(dict.fromkeys(_series(r) for r in gen))
    (out / "plots").mkdir(parents=True, exist_ok=True)
    paths = []
    enc = result["settings"]["encoder"]["name"]

    def ylabel(key):
        return titles[key] + (f"\n[{enc}]" if key in ("fad", "kid", "diversity_ratio") else "")

    def has(key):
        return any(np.isfinite(r.get(key, np.nan)) for r in gen)

    for key, title in metrics:
        if not has(key):
            continue
        fig, axes = plt.subplots(1, len(guid), figsize=(4.2 * len(guid), 3.4), squeeze=False, sharey=True)
        for ax, g in zip(axes[0], guid):
            _draw_metric(ax, key, g, gen, base, samplers)
            ax.set_title(f"guidance w = {g:g}", fontsize=9)
        axes[0][0].set_ylabel(ylabel(key))
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{title} vs NFE", fontsize=10)
        fig.tight_layout()
        _save_fig(fig, out / "plots" / f"{key}.png")
        paths.append(out / "plots" / f"{key}.png")

    bands = _band_plot(result, out / "plots" / "bands.png")
    if bands is not None:
        paths.append(bands)
    bright = _brightness_plot(result, out / "plots" / "brightness.png")
    if bright is not None:
        paths.append(bright)

    keys = [k for k in OVERVIEW_METRICS if has(k)]
    if keys:
        fig, axes = plt.subplots(len(keys), len(guid), figsize=(3.6 * len(guid) + 0.8, 2.6 * len(keys)),
                                 squeeze=False, sharex=True, sharey="row")
        for i, key in enumerate(keys):
            for j, g in enumerate(guid):
                _draw_metric(axes[i][j], key, g, gen, base, samplers)
                if i == 0:
                    axes[i][j].set_title(f"guidance w = {g:g}", fontsize=9)
                if i < len(keys) - 1:
                    axes[i][j].set_xlabel("")
            axes[i][0].set_ylabel(ylabel(key), fontsize=8)
            axes[i][-1].legend(fontsize=6)
        fig.suptitle(f"EDMSound evaluation: {result['settings'].get('checkpoint', '')}", fontsize=10)
        fig.tight_layout()
        _save_fig(fig, out / "plots" / "overview.png")
        paths.append(out / "plots" / "overview.png")
    return paths


def _brightness_plot(result, path: Path) -> Path | None:
    """Per class: the spectral centroid against its percentile over each set — the reference (black), the training
    subset (grey, the floor) and every generated configuration."""
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r.get("centroid_quantiles_hz") and r["class"] != "overall"]
    if not rows:
        return None
    classes = result["settings"]["classes"]
    cols = min(4, len(classes))
    nrow = math.ceil(len(classes) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(3.3 * cols, 2.6 * nrow), squeeze=False, sharex=True)
    for ax, c in zip(axes.flat, classes):
        for r in rows:
            if r["class"] != c:
                continue
            q = F.CENTROID_QUANTILES[:len(r["centroid_quantiles_hz"])]
            if r["kind"] == "baseline: reference":
                ax.plot(q, r["centroid_quantiles_hz"], color="k", lw=1.5, label="reference")
            elif r["kind"] == "generated":
                ax.plot(q, r["centroid_quantiles_hz"], marker=".", label=" ".join(x for x in _label(r) if x))
            else:
                ax.plot(q, r["centroid_quantiles_hz"], color="gray", ls="--", label="training subset (floor)")
        ax.set_yscale("log")
        ax.set_title(c, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("spectral centroid Hz")
    for ax in axes[-1]:
        ax.set_xlabel("percentile of clips")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("Brightness: each clip's spectral centroid, by percentile", fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)
    return path


def _band_plot(result, path: Path) -> Path | None:
    """Per class: the band gaps (dB) of every generated configuration against the reference, with the floor
    (the training subset's gaps) in grey."""
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "band_gap_db" in r and r["class"] != "overall"]
    if not rows:
        return None
    classes = result["settings"]["classes"]
    edges = F.band_edges(result["settings"]["sample_rate"], len(rows[0]["band_gap_db"]))
    centres = np.sqrt(edges[:-1] * edges[1:])
    cols = min(4, len(classes))
    nrow = math.ceil(len(classes) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(3.3 * cols, 2.6 * nrow), squeeze=False, sharex=True, sharey=True)
    for ax, c in zip(axes.flat, classes):
        for r in rows:
            if r["class"] != c or r["kind"] == "baseline: reference":
                continue
            if r["kind"] == "generated":
                line, = ax.plot(centres, r["band_gap_db"], marker=".", label=" ".join(x for x in _label(r) if x))
                if r.get("band_gap_se_db"):
                    g, e = np.asarray(r["band_gap_db"]), 2 * np.asarray(r["band_gap_se_db"])
                    ax.fill_between(centres, g - e, g + e, color=line.get_color(), alpha=0.15, lw=0)
            else:
                ax.plot(centres, r["band_gap_db"], color="gray", ls="--", label="floor (training subset)")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_title(c, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("band gap dB")
    for ax in axes[-1]:
        ax.set_xlabel("Hz")
    axes.flat[0].legend(fontsize=6)
    for ax in axes.flat[:len(classes)]:
        ax.axhspan(-BAND_GAP_MAX_DB, BAND_GAP_MAX_DB, color="green", alpha=0.06, lw=0)
    fig.suptitle(f"mean power per band, generated minus real (dB); shaded: ±2 standard errors, "
                 f"green: ±{BAND_GAP_MAX_DB:g} dB", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, path)
    return path


def write_outputs(result: dict, out_dir) -> dict:
    """``results.csv``, ``results.md``, ``results.json`` and ``plots/*.png`` (all written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.csv", _csv(result["rows"]).encode())
    atomic_write_bytes(out / "results.md", _markdown(result).encode())

    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v
    atomic_write_json(out / "results.json", {"settings": result["settings"],
                                             "rows": [{k: clean(v) for k, v in r.items()} for r in result["rows"]]})
    plots = _plots(result, out)
    return {"csv": out / "results.csv", "markdown": out / "results.md", "plots": plots}
