"""Ablations as small preset overlays: train every variant with the same data, steps and seeds (resumable), then
score each with the same evaluation, and write one table, a CSV and a plot.

Variants (combine with ``+``, e.g. ``l1+no-attention``): ``base`` (the preset as it is), ``l1`` (L1 loss),
``no-attention``, ``no-norm`` (no GroupNorm), ``magnitude`` (magnitude-only STFT, Griffin-Lim phase), ``mel``
(log-mel, Griffin-Lim). The scores are those of the seed paper's ablation poster — FAD, classifier top-1 / top-5 /
top-10 accuracy and mAP@10 — beside the FAD ratio (FAD / a training subset's: the noise floor), KID, the level and
band gaps a listener hears, and seconds per clip.

A finished variant is scored once (``OUT/<variant>/scores.json``, keyed by its weights and the evaluation's
settings); a later call reuses the scores. Speeds are measured at the end of every call for every finished variant,
side by side (round-robin, the fastest of three passes).
"""
from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

from ..core.storage import atomic_write_json
from .timing import seconds_per_clip

OVERLAYS = {
    "base": {},
    "l1": {"train": {"loss": "l1"}},
    "no-attention": {"net": {"attention": False}},
    "no-norm": {"net": {"norm": "none"}},
    "magnitude": {"codec": {"representation": "magnitude"}},
    "mel": {"codec": {"representation": "mel"}},
}
COLUMNS = ("variant", "fad", "fad_ratio", "kid", "top1", "top5", "top10", "map_at_10", "level_gap_max_db",
           "band_gap_max_db", "seconds_per_clip", "steps", "train_seconds")


def parse_variants(text: str) -> list[str]:
    """``"base,l1,no-attention+no-norm"`` -> the names, each checked; unknown parts name the valid ones."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ValueError(f"no variants given; valid parts: {', '.join(OVERLAYS)} (combine with '+')")
    for n in names:
        for part in n.split("+"):
            if part not in OVERLAYS:
                raise ValueError(f"unknown variant {part!r}; valid: {', '.join(OVERLAYS)} (combine with '+')")
    if len(set(names)) != len(names):
        raise ValueError(f"a variant is listed twice: {text!r}")
    return names


def variant_preset(preset, name: str):
    """The preset with the variant's overlays applied (left to right)."""
    for part in name.split("+"):
        o = OVERLAYS[part]
        preset = preset.replace_train(**o.get("train", {})).replace_net(**o.get("net", {})) \
            .replace_codec(**o.get("codec", {}))
    return preset


def _summary(results: dict) -> dict:
    rows = [r for r in results["rows"] if r["kind"] == "generated"]
    ov = next(r for r in rows if r["class"] == "overall")
    per = [r for r in rows if r["class"] != "overall"]
    out = {"fad": ov.get("fad"), "fad_ratio": ov.get("fad_vs_baseline"), "kid": ov.get("kid"),
           "top1": ov.get("accuracy"), "top5": ov.get("top5_accuracy"), "top10": ov.get("top10_accuracy"),
           "map_at_10": ov.get("map_at_10")}
    out["level_gap_max_db"] = max((abs(r["level_gap_db"]) for r in per if r.get("level_gap_db") is not None),
                                  default=None)
    out["band_gap_max_db"] = max((abs(r["band_gap_worst_db"]) for r in per if r.get("band_gap_worst_db") is not None),
                                 default=None)
    return out


def run_ablation(data, out_dir, *, preset="default", variants="base,l1,no-attention,no-norm,magnitude,mel",
                 steps: int = 2000, seed: int = 0, n_per_class: int = 32, reference="builtin",
                 reference_per_class: int = 200, classifier="default", encoder="default", batch_size=None,
                 progress: bool = True, max_minutes: float | None = None, log=print) -> list[dict]:
    """Train (or resume) every variant in ``out_dir/<variant>`` and evaluate it at the preset's shipped sampler
    and NFE (guidance 1); returns the table's rows and writes ``ablation.md``, ``ablation.csv`` and
    ``ablation.png``. ``max_minutes``: the training budget of this call in all (variants stop and resume)."""
    from ..core.presets import get_preset
    from ..core.pipeline import EDMSoundPipeline
    from ..training.trainer import Trainer
    from .sweep import evaluate_sweep
    names = parse_variants(variants)
    base = get_preset(preset) if isinstance(preset, str) else preset
    if batch_size:
        base = base.replace_train(batch_size=int(batch_size))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    rows, unfinished, pipes = [], [], []
    for name in names:
        p = variant_preset(base, name)
        run_dir, model_dir = out / name / "run", out / name / "model"
        left = None if max_minutes is None else max_minutes - (time.time() - t_start) / 60
        if left is not None and left <= 0:
            unfinished.append(name)
            continue
        resume = run_dir.is_dir() and any(run_dir.glob("ckpt-*"))
        tr = Trainer(p, data, run_dir, steps=steps, resume=resume, seed=seed, progress=progress, max_minutes=left)
        if tr.step < steps:
            tr.run()
        if tr.step < steps:
            unfinished.append(name)
            continue
        tr.export(model_dir)
        pipe = EDMSoundPipeline(model_dir, device="cpu")
        point = f"{pipe.preset.default_sampler}:{pipe.preset.default_nfe}:1"
        from .points import parse_points
        sha = hashlib.sha256((model_dir / "ema.safetensors").read_bytes()).hexdigest()
        key = {"ema_sha256": sha, "point": point, "n_per_class": n_per_class, "reference": str(reference),
               "reference_per_class": reference_per_class, "classifier": str(classifier), "encoder": str(encoder),
               "seed": seed}
        cached = out / name / "scores.json"
        scores = json.loads(cached.read_text()) if cached.is_file() else {}
        if scores.get("key") != key:         # a finished variant is scored once; a later call reuses it
            res = evaluate_sweep(model_dir, out / name / "eval", samplers=[], nfes=[], guidances=[],
                                 points=parse_points(point), n_per_class=n_per_class, reference=reference,
                                 reference_per_class=reference_per_class, classifier=classifier, encoder=encoder,
                                 index="none", seed=seed, topk=(1, 5, 10), progress=progress, log=log)
            scores = {"key": key, "summary": _summary(res)}
            atomic_write_json(cached, scores)
        info = json.loads((model_dir / "info.json").read_text())
        rows.append({"variant": name, **scores["summary"], "steps": tr.step,
                     "train_seconds": info.get("train_seconds")})
        pipes.append(pipe)
    times = seconds_per_clip({i: (p, p.classes[0], {}) for i, p in enumerate(pipes)})     # shipped settings
    for row, sec in zip(rows, times.values()):
        row["seconds_per_clip"] = sec
    write_table(rows, out, unfinished, steps, n_per_class)
    return rows


def _machine() -> str:
    import datetime
    import torch
    from ..training.trainer import cpu_model
    return f"{cpu_model()}, {torch.get_num_threads()} threads, {datetime.date.today().isoformat()}"


def _fmt(v, nd=3):
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def write_table(rows: list[dict], out: Path, unfinished: list[str], steps: int, n_per_class: int) -> None:
    with open(out / "ablation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    L = ["# Ablation", "", f"Every variant trained {steps} steps with the same data and seeds, evaluated on "
         f"{n_per_class} clips per class at the preset's shipped sampler and NFE (guidance 1). FAD ratio = FAD / FAD "
         "of a training subset of the same size (the noise floor is 1). Seconds per clip: one clip's generation and "
         f"decoding, side by side in one run, {_machine()}.", "",
         "| variant | FAD | FAD ratio | KID | top-1 | top-5 | top-10 | mAP@10 | max level gap (dB) | max band gap (dB) "
         "| s / clip |", "|---" * 11 + "|"]
    for r in rows:
        L.append("| " + " | ".join([r["variant"]] + [_fmt(r.get(k), 2 if "gap" in k else 3) for k in COLUMNS[1:11]])
                 + " |")
    if unfinished:
        L += ["", f"Not finished in this call (resume with the same command): {', '.join(unfinished)}."]
    (out / "ablation.md").write_text("\n".join(L) + "\n")
    if rows:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        names = [r["variant"] for r in rows]
        for ax, key, title in ((axes[0], "fad_ratio", "FAD / noise floor (lower is better)"),
                               (axes[1], "top1", "classifier top-1 (higher is better)")):
            ax.bar(names, [r.get(key) or 0 for r in rows], color="#4c72b0")
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="x", rotation=30, labelsize=8)
        fig.tight_layout()
        fig.savefig(out / "ablation.png", dpi=110)
        plt.close(fig)
