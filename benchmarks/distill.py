"""Few-step students against their teacher, side by side in one run: quality, signal measures and speed.

For each student — a model directory exported by ``edmsound distill`` (sampled with ``euler`` at its own M steps)
or by ``edmsound consistency-tune`` (sampled with ``consistency`` at 1, 2 and 4 steps, up to its largest budget) —
and for the teacher at its shipped settings and at the students' budgets with the training-free samplers:

* ``edmsound evaluate`` on the same reference, seeds and clip count: FAD / the training-subset baseline (the noise
  floor), KID, category fit (classifier top-1), diversity ratio, level gap and worst band gap per class;
* seconds per clip (8 clips per call after a warm-up; the median of rounds that call every configuration in turn,
  on this machine in this run; ``--speed-only`` writes this table alone, to ``speed.md``);
* trajectory error: the RMS distance (compressed complex spectrogram) from the teacher's own fine solution of the
  same noise (Heun on the teacher's 2M-level grid, what the student was trained to match), beside the teacher's
  Euler and DPM-Solver++(2M) at the student's budget on the same noise (a consistency model: its deterministic
  one-step jump, against the teacher's Heun solution on a 16-level grid).

    python benchmarks/distill.py --students runs/student8 --n-per-class 64
    python benchmarks/distill.py --students runs/student8,runs/student4 --n-per-class 16 --out /tmp/distill
    python benchmarks/distill.py --students models/new --teacher-rows shipped --out /tmp/new   # the shipped row only

Writes ``distill.md``, ``distill.json`` and ``distill.png`` (quality against seconds per clip) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edmsound import EDMSoundPipeline, evaluate_sweep, karras_sigmas, parse_points  # noqa: E402
from edmsound.evaluation import fidelity as F  # noqa: E402
from edmsound.evaluation.sweep import FIDELITY_REFERENCE_PER_CLASS, fidelity_reference_size  # noqa: E402
from edmsound.evaluation.quality import BAND_GAP_MAX_DB  # noqa: E402
from edmsound.evaluation.timing import seconds_per_clip  # noqa: E402
from edmsound.training.distill import solver_step, teacher_grid  # noqa: E402

TRAINING_FREE = ("dpmpp_2m", "deis", "unipc")


def _overall(results: dict) -> dict[tuple, dict]:
    """(sampler, nfe) -> the summary of the generated rows: overall FAD ratio and KID, worst class of the rest."""
    out = {}
    rows = [r for r in results["rows"] if r["kind"] == "generated"]
    for key in sorted({(r["sampler"], int(r["nfe"])) for r in rows}):
        per = [r for r in rows if (r["sampler"], int(r["nfe"])) == key and r["class"] != "overall"]
        ov = next((r for r in rows if (r["sampler"], int(r["nfe"])) == key and r["class"] == "overall"), {})
        out[key] = {"fad_ratio": ov.get("fad_vs_baseline"), "kid": ov.get("kid"),
                    "fit_min": min(r["accuracy"] for r in per), "fit_mean": float(np.mean([r["accuracy"] for r in per])),
                    "diversity_min": min(r["diversity_ratio"] for r in per),
                    "level_gap_max": max(abs(r["level_gap_db"]) for r in per),
                    "band_gap_max": max(abs(r["band_gap_worst_db"]) for r in per),
                    "bands": F.band_misses(per, BAND_GAP_MAX_DB),
                    "copy_share": ov.get("copy_share")}
    return out


def student_points(pipe) -> list[int]:
    """The budgets a student is measured at: a distilled one's only budget; a consistency model's 1, 2, 4 up to
    its largest."""
    if pipe.student_sampler == "consistency":
        return [b for b in (1, 2, 4) if b <= pipe.student_nfe]
    return [int(pipe.student_nfe)]


def student_guidance(pipe) -> str:
    """The guidance a student is measured at: its per-class scales where it has them ('class'), else none (1)."""
    return "class" if pipe.preset.default_class_guidance else "1"


def guided_classes(pipe) -> list[str]:
    """The classes a model guides by default (each costs a double-batch evaluation where guided)."""
    return [c for c in pipe.classes if pipe.preset.guidance_for(c) != 1.0]


@torch.no_grad()
def trajectory_errors(teacher, students: dict, n: int = 16, seed: int = 5) -> dict:
    """RMS distance from the teacher's Heun solution on each student's 2M-level grid, for the student and for
    the teacher's Euler / DPM-Solver++(2M) at M evaluations, on the same noise (float64 states)."""
    e = teacher.preset.edm
    out = {}
    for name, spipe in students.items():
        consistency = spipe.student_sampler == "consistency"
        M = int(spipe.student_nfe)
        if consistency:
            M = 8                           # the reference: Heun on a 16-level grid; the student: one jump
        grid = teacher_grid(e.sigma_min, e.sigma_max, e.rho, M)
        cls = teacher.classes
        labels = torch.tensor([i % len(cls) for i in range(n)])
        noise, _ = teacher.noise(list(range(seed, seed + n)))
        x0 = noise.double() * float(grid[0])

        def D(model):
            return lambda x, s: model(x, s, labels).double()
        x = x0.clone()
        for i in range(len(grid) - 1):                                       # teacher's fine solution
            x = solver_step(D(teacher.model), x, grid[i].expand(n), grid[i + 1].expand(n), "heun")
        ref = x
        res = {}
        from edmsound import get_sampler
        if consistency:
            out[name] = {"student consistency:1": float((D(spipe.model)(x0, grid[0].expand(n)) - ref).pow(2).mean()
                                                        .sqrt()) / float(ref.pow(2).mean().sqrt())}
            continue
        sgrid = karras_sigmas(M, spipe.preset.edm.sigma_min, e.sigma_max, e.rho)
        res[f"student euler:{M}"] = get_sampler("euler")(D(spipe.model), x0.clone(), sgrid)
        res[f"teacher euler:{M}"] = get_sampler("euler")(D(teacher.model), x0.clone(), sgrid)
        tgrid = karras_sigmas(M, e.sigma_min, e.sigma_max, e.rho)
        res[f"teacher dpmpp_2m:{M}"] = get_sampler("dpmpp_2m")(D(teacher.model), x0.clone(), tgrid)
        scale = float(ref.pow(2).mean().sqrt())
        out[name] = {k: float((v - ref).pow(2).mean().sqrt()) / scale for k, v in res.items()}
    return out


def run(a) -> dict:
    torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = EDMSoundPipeline(a.teacher, device="cpu")
    students = load_students(a.students)
    budgets = sorted({b for p in students.values() for b in student_points(p)})
    shipped = (teacher.preset.default_sampler, teacher.preset.default_nfe)
    # the teacher as users hear it (its per-class guidance) at its shipped settings, and every training-free
    # sampler at the students' budgets; at one evaluation they all reduce to the denoiser's single jump (euler)
    tpoints = [f"{shipped[0]}:{shipped[1]}:class"]
    for m in (budgets if a.teacher_rows == "all" else []):
        names = ("euler",) if m == 1 else TRAINING_FREE + ("euler",)
        tpoints += [f"{s}:{m}:class" for s in names if (s, m) != shipped]
    common = dict(samplers=[], nfes=[], guidances=[], n_per_class=a.n_per_class, reference_per_class=a.reference,
                  fidelity_reference_per_class=a.fidelity_reference, precision=a.precision, seed=a.seed,
                  progress=not a.no_progress, index="none" if a.no_copies else "default")
    res = {"teacher": _overall(evaluate_sweep(a.teacher, out / "teacher", points=parse_points(",".join(tpoints)),
                                              **common))}
    for name, p in students.items():
        pts = ",".join(f"{p.student_sampler}:{b}:{student_guidance(p)}" for b in student_points(p))
        res[name] = _overall(evaluate_sweep(p.model_dir, out / name, points=parse_points(pts), **common))
    cls = teacher.classes[0]
    speed = seconds_per_clip(speed_settings(teacher, students, res["teacher"], cls), rounds=a.rounds,
                             statistic="median")
    traj = trajectory_errors(teacher, students)
    rows = []
    for who, table in res.items():
        for (sampler, nfe), q in table.items():
            rows.append({"model": who, "sampler": sampler, "nfe": nfe, **q,
                         "seconds_per_clip": speed.get((who, sampler, nfe))})
    return {"rows": rows, "trajectory": traj, "shipped": list(shipped),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                        "load_before": os.getloadavg()[0], "date": date.today().isoformat()},
            "n_per_class": a.n_per_class, "precision": a.precision, "reference_per_class": a.reference,
            "fidelity_reference_per_class": fidelity_reference_size(a.fidelity_reference, a.reference)}


def load_students(spec: str) -> dict:
    """Student model directories (comma-separated) -> {name: pipeline}; a diffusion model is refused."""
    students = {}
    for s in [t for t in spec.split(",") if t.strip()]:
        p = EDMSoundPipeline(s, device="cpu")
        if not p.student_nfe:
            raise SystemExit(f"error: {s} is not a few-step student (made by 'edmsound distill' or "
                             "'edmsound consistency-tune')")
        students[Path(s).name] = p
    return students


def speed_settings(teacher, students: dict, teacher_points, cls: str) -> dict:
    """``(model, sampler, nfe) -> (pipe, cls, options)`` for the teacher's points and every student budget, each
    at its default guidance. A student that guides some classes by default is timed in an unguided class under its
    own name and in its first guided class under "name, class guided" (its guided evaluations cost time)."""
    out = {("teacher", s, m): (teacher, cls, {"sampler": s, "nfe": m}) for s, m in teacher_points}
    for name, p in students.items():
        guided = guided_classes(p)
        plain = next((c for c in p.classes if c not in guided), cls)
        for b in student_points(p):
            out[(name, p.student_sampler, b)] = (p, plain if guided else cls, {"sampler": p.student_sampler, "nfe": b})
            if guided:
                out[(f"{name}, {guided[0]} guided", p.student_sampler, b)] = (p, guided[0],
                                                                           {"sampler": p.student_sampler, "nfe": b})
    return out


def speed_only(a) -> str:
    """The timing table alone: the teacher at its shipped settings and every student budget, interleaved."""
    if a.threads:
        torch.set_num_threads(a.threads)
    teacher = EDMSoundPipeline(a.teacher, device="cpu")
    shipped = (teacher.preset.default_sampler, teacher.preset.default_nfe)
    sp = seconds_per_clip(speed_settings(teacher, load_students(a.students), [shipped], teacher.classes[0]),
                          rounds=a.rounds, statistic="median")
    base = sp[("teacher",) + shipped]
    L = ["# Few-step students: seconds per clip", "",
         f"`benchmarks/distill.py --speed-only`, {date.today().isoformat()}, {platform.platform()}, "
         f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads (load {os.getloadavg()[0]:.1f} before); "
         f"class {teacher.classes[0]} (a student with per-class guidance: an unguided class, and its guided class in "
         f"its own row), each model at its default guidance, 8 clips per call, median of {a.rounds} rounds that call "
         "every setting in turn.", "", "| model | sampler | NFE | s / clip | speed-up vs shipped |", "|---|---|---|---|---|"]
    for (who, sampler, nfe), v in sp.items():
        L.append(f"| {who} | {sampler} | {nfe} | {v:.3f} | {base / v:.2f}x |")
    return "\n".join(L) + "\n"


def _f(v, nd=3):
    return "–" if v is None else f"{v:.{nd}f}"


def _misses(m: dict | None) -> str:
    if not m:
        return "–"
    return f"{m['beyond']} of {m['total']}" + (f" ({m['clear']})" if m["clear"] is not None else "")


def markdown(r: dict) -> str:
    m = r["machine"]
    ship = next(x for x in r["rows"] if x["model"] == "teacher" and [x["sampler"], x["nfe"]] == r["shipped"])
    L = ["# Few-step students against their teacher", "",
         f"`benchmarks/distill.py`, {m['date']}, {m['platform']}, {m['cpus']} CPUs, {m['threads']} torch threads "
         f"(load {m['load_before']:.1f} before); {r['n_per_class']} clips per class, the same seeds and reference for "
         "every row; FAD ratio = FAD / FAD of a training subset of the same size (the noise floor is 1)." +
         (f" Network arithmetic: {r['precision']}. FAD, KID, fit, diversity and copies against "
          f"{r['reference_per_class']} held-out clips per class; level and band gaps against "
          f"{r['fidelity_reference_per_class']}." if "precision" in r else ""), "",
         "| model | sampler | NFE | FAD ratio | KID | fit (min / mean) | diversity min | max level gap (dB) | "
         f"max band gap (dB) | class-bands beyond ±{BAND_GAP_MAX_DB:g} dB (by > 2 SE) | copies > p95 | s / clip | "
         "speed-up vs shipped |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in sorted(r["rows"], key=lambda x: (x["nfe"], x["model"] != "teacher", x["sampler"])):
        up = (ship["seconds_per_clip"] / x["seconds_per_clip"]) if x["seconds_per_clip"] else None
        L.append(f"| {x['model']} | {x['sampler']} | {x['nfe']} | {_f(x['fad_ratio'], 2)} | {_f(x['kid'], 4)} | "
                 f"{_f(x['fit_min'], 2)} / {_f(x['fit_mean'], 2)} | {_f(x['diversity_min'], 2)} | "
                 f"{_f(x['level_gap_max'], 1)} | {_f(x['band_gap_max'], 1)} | {_misses(x.get('bands'))} | "
                 f"{_f(x.get('copy_share'), 2)} | "
                 f"{_f(x['seconds_per_clip'], 3)} | "
                 f"{_f(up, 2)}x |")
    L += ["", "Trajectory error (RMS distance from the teacher's Heun solution of the same noise on the student's "
          "2M-level grid — 16 levels for a consistency model's one-step jump — relative to its RMS; 16 clips):", "",
          "| student | sampling | relative error |", "|---|---|---|"]
    for name, t in r["trajectory"].items():
        L += [f"| {name} | {k} | {v:.3f} |" for k, v in t.items()]
    return "\n".join(L) + "\n"


def plot(r: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for x in r["rows"]:
        if x["seconds_per_clip"] is None or x["fad_ratio"] is None:
            continue
        mk = "o" if x["model"] == "teacher" else "*"
        ax.scatter(x["seconds_per_clip"], x["fad_ratio"], marker=mk, s=80 if mk == "*" else 30)
        ax.annotate(f"{x['model'] if x['model'] != 'teacher' else ''} {x['sampler']}:{x['nfe']}".strip(),
                    (x["seconds_per_clip"], x["fad_ratio"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")                      # one-step teachers sit an order of magnitude above the rest
    ax.set_xlabel("seconds per clip (this machine)")
    ax.set_ylabel("FAD / training-subset FAD (log)")
    ax.set_title("Quality against speed: teacher samplers (o) and students (*)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="checkpoints/default")
    ap.add_argument("--students", required=True, help="comma-separated student model directories")
    ap.add_argument("--n-per-class", type=int, default=64)
    ap.add_argument("--reference", type=int, default=200, help="built-in reference clips per class")
    ap.add_argument("--fidelity-reference", type=int, default=None,
                    help="held-out clips per class the level and band gaps are measured against (default: "
                         f"{FIDELITY_REFERENCE_PER_CLASS}, as 'edmsound evaluate'; 0: the FAD reference)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="the networks' arithmetic in the quality runs (the timing uses each model's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-copies", action="store_true", help="skip the copy-detection columns (faster)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill"))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--speed-only", action="store_true", help="only the timing table (writes speed.md)")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (median)")
    ap.add_argument("--teacher-rows", choices=["all", "shipped"], default="all",
                    help="the teacher at its shipped settings and every training-free sampler at the students' "
                         "budgets (all), or at its shipped settings only (shipped: a new student against rows that "
                         "do not change between runs; about 17 of 25 minutes less on a 2-core CPU)")
    a = ap.parse_args(argv)
    if a.speed_only:
        text = speed_only(a)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "speed.md").write_text(text)
        print(text)
        return
    r = run(a)
    out = Path(a.out)
    (out / "distill.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    (out / "distill.md").write_text(markdown(r))
    plot(r, out / "distill.png")
    print(markdown(r))


if __name__ == "__main__":
    main()
