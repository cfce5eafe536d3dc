"""Replication analysis: does a generative model copy its training data? (EDMSound, Zhu et al. 2023)

The paper's method: embed every generated clip and every training clip (sliding windows, copy-detection
head), keep for each generated clip its top-1 cosine similarity among the training clips *of the same
class* (max over window pairs), and compare that distribution with the training set against itself
(each training clip's top-1 among the *other* training clips; stored in the index). Per class it
reports both 95th percentiles and their difference, the share of generated clips above the training
95th percentile, density histograms on a log x axis (0.45-1), pairs binned by similarity
(>= 0.95 / 0.90 / 0.85 / 0.80) for listening, and the closest pairs side by side.

Window-level matching exposes the paper's "stitching copies": a generated clip whose windows match
different training clips, or different, non-aligned parts of one, rather than one clip end to end.

Output directory: ``report.md``, ``scores.csv`` (every generated clip), ``classes.csv``,
``histograms.png``, ``pairs/NN_generated.wav``, ``pairs/NN_training.wav``, ``pairs/NN.png``.
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.storage import atomic_write_bytes, atomic_write_json
from ..audio.io import AUDIO_EXTENSIONS, AudioLoadWarning, load_audio

__all__ = ["GeneratedClip", "load_generated", "stitching_analysis", "analyse_copies", "SIMILARITY_BINS"]

SIMILARITY_BINS = (0.95, 0.90, 0.85, 0.80)
HIST_RANGE = (0.45, 1.0)


@dataclass
class GeneratedClip:
    path: str
    class_name: str
    wave: np.ndarray


@dataclass
class ClipScore:
    file: str
    class_name: str
    similarity: float
    percentile: float
    above_p95: bool
    source: str
    source_class: str
    query_offset: float
    train_offset: float
    stitching: bool
    stitch_reason: str
    windows: list = field(default_factory=list)
    clip: int = -1
    signal_similarity: float = float("nan")
    evidence: tuple = ()             # tiers above their class's training 95th percentile


# ------------------------------------------------------------------------------------------ loading
def _audio_files(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)


def load_generated(gen_dir, sample_rate: int, classes: list[str]) -> list[GeneratedClip]:
    """Generated clips with their classes: a class-per-folder tree (class = folder name) or a flat folder
    whose clips have JSON sidecars (``clip.wav`` + ``clip.json`` with ``{"class": ...}``). Clips of unknown
    classes, without a class, or unreadable are warned about and skipped."""
    root = Path(gen_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"generated folder {root} does not exist")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items: list[tuple[Path, str | None]] = []
    for d in subdirs:
        items += [(f, d.name) for f in sorted(d.rglob("*")) if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS]
    for f in _audio_files(root):
        side = f.with_suffix(".json")
        cls = None
        if side.is_file():
            try:
                cls = json.loads(side.read_text()).get("class")
            except Exception as e:
                warnings.warn(f"skipping {f}: unreadable sidecar {side.name} ({e})", AudioLoadWarning)
                continue
        if cls is None:
            warnings.warn(f"skipping {f}: no class (put it in a <class>/ folder or add {side.name} with "
                          '{"class": ...})', AudioLoadWarning)
            continue
        items.append((f, str(cls)))
    if not items:
        raise FileNotFoundError(f"no audio files ({'/'.join(AUDIO_EXTENSIONS)}) in {root}: expected "
                                "<class>/<clip>.wav folders or clips with JSON sidecars carrying \"class\"")
    out = []
    for f, c in items:
        if c not in classes:
            warnings.warn(f"skipping {f}: class {c!r} is not in the index ({', '.join(classes)})", AudioLoadWarning)
            continue
        try:
            wave = load_audio(f, sample_rate)
        except Exception as e:
            warnings.warn(f"skipping {f}: unreadable ({type(e).__name__}: {e})", AudioLoadWarning)
            continue
        out.append(GeneratedClip(str(f), c, wave))
    if not out:
        raise ValueError(f"no usable generated clips in {root}")
    return out


# ------------------------------------------------------------------------------------------ stitching
def stitching_analysis(result, threshold: float, hop_seconds: float) -> dict:
    """Per-window provenance of one query clip (a :class:`edmsound.index.QueryResult`).

    Only query windows on the grid of the best window pair are compared (offsets a multiple of the indexed
    hop ``hop_seconds`` away from the best pair's query window): they sit as well aligned with the
    indexed windows as the best pair does, so an unaltered or shifted copy maps all of them to its source
    at one constant time lag, while the in-between query windows, half a hop off, could drift to a
    similar-sounding part of another clip or of the same one. Among them, windows whose best training
    window reaches ``threshold`` count as matched. The clip is flagged as a *stitching* copy when matched
    windows come from different training clips, or from one clip at time lags (training offset minus
    query offset) more than one hop apart. Returns ``{"stitching", "reason", "sources", "windows"}``."""
    anchor = result[0].query_offset if len(result) else None
    wins = []
    for w in result.windows:
        on_grid = anchor is not None and hop_seconds > 0 and \
            abs((w.query_offset - anchor) / hop_seconds - round((w.query_offset - anchor) / hop_seconds)) < 1e-3
        wins.append({"query_offset": w.query_offset, "source": w.source, "train_offset": w.train_offset,
                     "similarity": w.similarity, "clip": w.clip, "on_grid": bool(on_grid),
                     "matched": bool(on_grid and w.similarity >= threshold)})
    matched = [w for w in wins if w["matched"]]
    sources = sorted({w["source"] for w in matched})
    reason = ""
    if len(matched) >= 2:
        if len(sources) > 1:
            reason = f"windows match {len(sources)} different training clips"
        else:
            lags = np.array([w["train_offset"] - w["query_offset"] for w in matched])
            if lags.max() - lags.min() > hop_seconds + 1e-6:
                reason = "windows match non-aligned parts of one training clip"
    return {"stitching": bool(reason), "reason": reason, "sources": sources, "windows": wins}


# ------------------------------------------------------------------------------------------ figures
def _spectrogram(wave: np.ndarray, sr: int, n_fft: int = 512, hop: int = 128):
    from scipy.signal import stft
    f, t, z = stft(wave, fs=sr, nperseg=n_fft, noverlap=n_fft - hop, boundary="even")
    return f, t, 20 * np.log10(np.abs(z) + 1e-6)


def _plot_histograms(index, scores: list[ClipScore], all_classes: bool, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    classes = [c for c in index.classes if any(s.class_name == c for s in scores)]
    n = len(classes) + 1
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    bins = np.geomspace(HIST_RANGE[0], HIST_RANGE[1], 36)
    for ax, c in zip(axes.flat, classes + [None]):
        train = index.reference(c, all_classes)
        gen = np.array([s.similarity for s in scores if c is None or s.class_name == c])
        for values, color, label in ((train, "tab:blue", "training vs training"),
                                     (gen, "tab:orange", "generated vs training")):
            v = np.asarray(values, np.float64)
            v = np.clip(v[np.isfinite(v)], bins[0] * (1 + 1e-9), bins[-1] * (1 - 1e-9))   # outside: at the edges
            if len(v):
                ax.hist(v, bins=bins, density=True, alpha=0.5, color=color, label=f"{label} ({len(v)})")
        if len(train):
            ax.axvline(np.percentile(train, 95), color="tab:blue", ls="--", lw=1.2, label="training 95th pct")
        if len(gen):
            ax.axvline(np.percentile(gen, 95), color="tab:orange", ls=":", lw=1.2, label="generated 95th pct")
        ax.set_xscale("log")
        ax.set_xlim(*HIST_RANGE)
        ticks = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:.1f}" for t in ticks])
        ax.minorticks_off()
        ax.set_title(c or "all classes", fontsize=10)
        ax.set_xlabel("top-1 similarity (log)")
        ax.set_ylabel("density")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Top-1 similarity to training clips" + (" (all classes)" if all_classes else " (same class)"))
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def _save_fig(fig, path: Path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def _plot_pair(gen_wave, train_wave, sr, score: ClipScore, window_seconds: float, title: str, path: Path,
               gen_name: str):
    """Both spectrograms; matching windows as numbered bars (same number = matched pair), the best pair
    shaded and in red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 1, figsize=(9, 6.4), sharex=False)
    for ax, wave, name in ((axes[0], gen_wave, f"generated: {gen_name}"), (axes[1], train_wave, f"training: {score.source}")):
        f, t, s = _spectrogram(wave, sr)
        ax.pcolormesh(t, f / 1000, s, shading="auto", cmap="magma", vmin=s.max() - 80, vmax=s.max())
        ax.set_ylabel("kHz")
        ax.set_title(name, fontsize=9)
    axes[1].set_xlabel("seconds")
    fmax = sr / 2000
    colors = ["#22d3ee", "#a3e635", "#f472b6", "#facc15", "#60a5fa", "#fb923c"]
    pairs = [w for w in score.windows if w["source"] == score.source and w["matched"]]
    for k, w in enumerate(pairs):
        best = abs(w["query_offset"] - score.query_offset) < 1e-6 and abs(w["train_offset"] - score.train_offset) < 1e-6
        col = "red" if best else colors[k % len(colors)]
        y = fmax * (0.95 - 0.06 * (k % 8))
        for ax, x0 in ((axes[0], w["query_offset"]), (axes[1], w["train_offset"])):
            ax.plot([x0, x0 + window_seconds], [y, y], color=col, lw=3.5 if best else 2.5, solid_capstyle="butt")
            ax.text(x0 + 0.005, y - 0.035 * fmax, f"w{k + 1} {w['similarity']:.2f}", color=col, fontsize=7,
                    va="top", fontweight="bold")
    for ax, x0 in ((axes[0], score.query_offset), (axes[1], score.train_offset)):
        ax.axvspan(x0, x0 + window_seconds, color="white", alpha=0.12, lw=0)
        ax.axvline(x0, color="red", lw=1, ls="--")
        ax.axvline(x0 + window_seconds, color="red", lw=1, ls="--")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def _wav_bytes(wave: np.ndarray, sr: int) -> bytes:
    import soundfile as sf
    buf = io.BytesIO()
    peak = float(np.max(np.abs(wave))) if len(wave) else 0.0
    x = wave / peak * 0.99 if peak > 1.0 else wave
    sf.write(buf, np.asarray(x, np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ analysis
def _fmt(x, nd=3):
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def analyse_copies(index, generated_dir, out_dir, *, all_classes: bool = False, top_pairs: int = 8,
                   progress: bool = True) -> dict:
    """Run the paper's replication analysis of ``generated_dir`` against ``index`` and write the report.

    Returns the summary dict (also written as ``summary.json``)."""
    out = Path(out_dir)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    sr = int(index.audio.get("sample_rate") or index.encoder.sample_rate)
    clips = load_generated(generated_dir, sr, index.classes)
    same = None if all_classes else [c.class_name for c in clips]
    results = index.search([c.wave for c in clips], k=1, same_class=same, sample_rate=sr, progress=progress)
    hop = float(index.encoder_info.get("hop_seconds", 0.0))
    win_s = float(index.encoder_info.get("window_seconds", 0.0))
    p95 = {c: (index.threshold(95, c, all_classes) if len(index.reference(c, all_classes)) else float("nan"))
           for c in index.classes}

    scores: list[ClipScore] = []
    for c, res in zip(clips, results):
        thr = p95[c.class_name]
        st = stitching_analysis(res, thr, hop)
        if not res:
            scores.append(ClipScore(c.path, c.class_name, float("nan"), float("nan"), False, "", "", 0, 0, False, "",
                                    st["windows"]))
            continue
        m = res[0]
        pct = index.percentile(m.similarity, c.class_name, all_classes)
        scores.append(ClipScore(c.path, c.class_name, m.similarity, pct, bool(m.similarity > thr), m.source,
                                m.class_name, m.query_offset, m.train_offset, st["stitching"], st["reason"],
                                st["windows"], m.clip,
                                float("nan") if m.signal_similarity is None else m.signal_similarity, m.evidence))

    # ---- per-class table
    per_class = {}
    for cname in index.classes + ["all"]:
        ss = [s for s in scores if (cname == "all" or s.class_name == cname) and np.isfinite(s.similarity)]
        if not ss:
            continue
        sims = np.array([s.similarity for s in ss])
        ref = index.reference(None if cname == "all" else cname, all_classes)
        tp95 = float(np.percentile(ref, 95)) if len(ref) else float("nan")
        gp95 = float(np.percentile(sims, 95))
        per_class[cname] = {
            "generated": len(ss), "train_clips": int(len(ref)), "train_p95": tp95, "generated_p95": gp95,
            "p95_difference": gp95 - tp95, "share_above_train_p95": float(np.mean([s.above_p95 for s in ss])),
            "share_copies_either_tier": float(np.mean([bool(s.evidence) for s in ss])),
            "signal_median": float(np.nanmedian([s.signal_similarity for s in ss]))
            if any(np.isfinite(s.signal_similarity) for s in ss) else float("nan"),
            "bins": {f">={b:.2f}": int((sims >= b).sum()) for b in SIMILARITY_BINS},
            "stitching": int(sum(s.stitching for s in ss)), "max_similarity": float(sims.max()),
        }

    # ---- CSVs
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "class", "top1_similarity", "top1_percentile", "above_train_p95", "top1_source",
                "top1_class", "query_offset_s", "train_offset_s", "stitching", "stitching_reason", "window_matches",
                "signal_similarity", "copy_evidence"])
    for s in scores:
        wm = "; ".join(f"{x['query_offset']:.2f}s->{x['source']}@{x['train_offset']:.2f}s:{x['similarity']:.3f}"
                       + ("*" if x["matched"] else "") for x in s.windows)
        w.writerow([s.file, s.class_name, _fmt(s.similarity, 5), _fmt(s.percentile, 2), int(s.above_p95), s.source,
                    s.source_class, f"{s.query_offset:.3f}", f"{s.train_offset:.3f}", int(s.stitching),
                    s.stitch_reason, wm, _fmt(s.signal_similarity, 5), "+".join(s.evidence)])
    atomic_write_bytes(out / "scores.csv", buf.getvalue().encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["class", "generated", "train_p95", "generated_p95", "p95_difference", "share_above_train_p95"]
               + [f"n_ge_{b:.2f}" for b in SIMILARITY_BINS] + ["stitching"])
    for cname, r in per_class.items():
        w.writerow([cname, r["generated"], _fmt(r["train_p95"], 5), _fmt(r["generated_p95"], 5),
                    _fmt(r["p95_difference"], 5), _fmt(r["share_above_train_p95"], 4)]
                   + list(r["bins"].values()) + [r["stitching"]])
    atomic_write_bytes(out / "classes.csv", buf.getvalue().encode())

    # ---- figures
    _plot_histograms(index, scores, all_classes, out / "histograms.png")
    ranked = sorted((s for s in scores if np.isfinite(s.similarity)), key=lambda s: -s.similarity)[:top_pairs]
    pairs = []
    for i, s in enumerate(ranked, start=1):
        gen_wave = next(c.wave for c in clips if c.path == s.file)
        entry = {"rank": i, "file": s.file, "source": s.source, "similarity": s.similarity, "percentile": s.percentile}
        try:
            train_wave, _ = index.fetch_audio(s.clip, sr)
        except Exception as e:
            warnings.warn(f"cannot fetch training clip {s.source}: {e}")
            entry["error"] = str(e)
            pairs.append(entry)
            continue
        stem = f"{i:02d}"
        atomic_write_bytes(out / "pairs" / f"{stem}_generated.wav", _wav_bytes(gen_wave, sr))
        atomic_write_bytes(out / "pairs" / f"{stem}_training.wav", _wav_bytes(train_wave, sr))
        title = (f"#{i}  similarity {s.similarity:.3f} (training percentile {s.percentile:.1f})"
                 + ("  STITCHING" if s.stitching else ""))
        others = [w for w in s.windows if w["matched"] and w["source"] != s.source]
        if others:
            title += "\nother matched windows: " + "; ".join(
                f"{w['query_offset']:.2f}s -> {w['source']} @ {w['train_offset']:.2f}s ({w['similarity']:.2f})"
                for w in others[:3])
        _plot_pair(gen_wave, train_wave, sr, s, win_s, title, out / "pairs" / f"{stem}.png", _relname(s.file, generated_dir))
        entry.update(generated_wav=f"pairs/{stem}_generated.wav", training_wav=f"pairs/{stem}_training.wav",
                     figure=f"pairs/{stem}.png")
        pairs.append(entry)

    summary = {"index": str(index.root) if index.root else None, "encoder": index.encoder_info.get("name"),
               "encoder_hash": index.encoder_info.get("weights_hash"), "generated_dir": str(generated_dir),
               "generated_clips": len(scores), "mode": "all classes" if all_classes else "same class",
               "per_class": per_class, "top_pairs": pairs,
               "stitching": [{"file": s.file, "reason": s.stitch_reason,
                              "sources": sorted({x["source"] for x in s.windows if x["matched"]})}
                             for s in scores if s.stitching]}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_bytes(out / "report.md", _report_md(index, summary, scores, all_classes).encode())
    return summary


def _relname(f, root) -> str:
    try:
        return str(Path(f).relative_to(Path(root)))
    except ValueError:
        return Path(f).name


def _report_md(index, summary, scores, all_classes) -> str:
    def name(f):
        return _relname(f, summary["generated_dir"])
    L = []
    mode = summary["mode"]
    L.append("# Copy-detection report\n")
    L.append(f"- Generated clips: **{summary['generated_clips']}** from `{summary['generated_dir']}`")
    L.append(f"- Training index: `{summary['index']}` ({index.num_clips} clips, {index.ntotal} windows, {index.kind})")
    L.append(f"- Encoder: `{summary['encoder']}` (weights `{str(summary['encoder_hash'])[:16]}…`), windows "
             f"{index.encoder_info.get('window_seconds')} s, hop {index.encoder_info.get('hop_seconds')} s")
    L.append(f"- Each generated clip keeps its top-1 match among training clips of the **{mode}** "
             "(cosine similarity, max over window pairs); the reference is each training clip's top-1 among the "
             "other training clips (EDMSound, Zhu et al. 2023).\n")
    L.append("## Per class\n")
    head = ("| class | generated | train p95 | generated p95 | Δ p95 (gen − train) | share > train p95 | "
            + " | ".join(f"≥{b:.2f}" for b in SIMILARITY_BINS) + " | stitching | signal median | copies (either tier) |")
    L.append(head)
    L.append("|" + "---|" * (9 + len(SIMILARITY_BINS)))
    for c, r in summary["per_class"].items():
        L.append(f"| {c} | {r['generated']} | {_fmt(r['train_p95'])} | {_fmt(r['generated_p95'])} | "
                 f"{r['p95_difference']:+.3f} | {100 * r['share_above_train_p95']:.1f}% | "
                 + " | ".join(str(v) for v in r["bins"].values()) + f" | {r['stitching']} | "
                 f"{_fmt(r['signal_median'])} | {100 * r['share_copies_either_tier']:.1f}% |")
    L.append("\nA positive Δ p95 or a share well above 5% means generated clips sit closer to training clips than "
             "training clips sit to each other: listen to the pairs below. *Signal median*: the median signal-"
             "fingerprint similarity of each clip's top-1 match (gain- and onset-normalised log-mel); *copies*: "
             "clips above their class's training 95th percentile in either tier (near-duplicates inside the "
             "training set left out of the reference).\n")
    L.append("## Similarity distributions\n")
    L.append("![top-1 similarity histograms](histograms.png)\n")
    L.append("Density of top-1 similarity (log x axis, 0.45–1; values outside are drawn at the edges). Blue: "
             "training vs training; orange: generated vs training; dashed: the training 95th percentile.\n")
    L.append("## Closest pairs\n")
    if summary["top_pairs"]:
        L.append("| # | generated | training clip | similarity | training percentile | listen | figure |")
        L.append("|---|---|---|---|---|---|---|")
        for p in summary["top_pairs"]:
            listen = (f"[generated]({p['generated_wav']}) / [training]({p['training_wav']})" if "generated_wav" in p
                      else f"unavailable ({p.get('error', '')})")
            fig = f"![pair {p['rank']}]({p['figure']})" if "figure" in p else ""
            L.append(f"| {p['rank']} | `{name(p['file'])}` | `{p['source']}` | {p['similarity']:.3f} | "
                     f"{p['percentile']:.1f} | {listen} | {fig} |")
        L.append("\nIn each figure the red bar and dashed lines mark the best window pair; other numbered bars "
                 "(w1, w2, ...; same number in both panels = one matched pair) are windows matching the same training "
                 "clip above its class's training 95th percentile.\n")
    L.append("## Pairs by similarity bin\n")
    for b in SIMILARITY_BINS:
        sel = sorted((s for s in scores if np.isfinite(s.similarity) and s.similarity >= b), key=lambda s: -s.similarity)
        L.append(f"- **≥ {b:.2f}**: {len(sel)} clip(s)" + (": " + ", ".join(
            f"`{name(s.file)}`→`{s.source}` ({s.similarity:.3f})" for s in sel[:10]) + (" …" if len(sel) > 10 else "")
            if sel else ""))
    L.append("\n## Stitching copies\n")
    st = summary["stitching"]
    if st:
        L.append(f"{len(st)} generated clip(s) have windows that match different training clips, or non-aligned "
                 "parts of one (windows at or above their class's training 95th percentile):\n")
        for s in st[:50]:
            L.append(f"- `{name(s['file'])}`: {s['reason']} ({', '.join(f'`{x}`' for x in s['sources'])})")
        if len(st) > 50:
            L.append(f"- … and {len(st) - 50} more (see scores.csv)")
    else:
        L.append("No generated clip has windows matching different training clips above the training 95th percentile.")
    L.append("\n## Files\n")
    L.append("- `scores.csv`: every generated clip: top-1 similarity, percentile, source, offsets, stitching flag, "
             "and per-window matches (`query offset -> source@training offset:similarity`, `*` = above the class's "
             "training 95th percentile).")
    L.append("- `classes.csv`, `summary.json`: the tables above.")
    return "\n".join(L) + "\n"
