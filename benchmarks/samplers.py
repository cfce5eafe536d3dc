"""Samplers x NFE on a trained checkpoint (plus the analytic problem, via samplers_analytic.py).

For each sampler and NFE budget in {4, 6, 8, 10, 15, 20, 35, 50} (Heun-type samplers use the nearest valid
budget <= the request; the NFE actually spent is in the table):
  * error: RMS difference of the generated complex spectrogram from a high-accuracy reference solution of the
    same probability-flow ODE from the same noise (Heun at NFE 199), relative to the reference's RMS;
  * wall time per clip (batch 1, median of --repeats), with classifier-free guidance at the given scale;
  * the sampler's own overhead: wall time minus NFE x the median time of one bare guided network call.
It also times the shipped default (the checkpoint's sampler/NFE/guidance), median of 10 single-clip calls after a
warm-up call, into samplers_shipped.md (`--shipped-only`: just that, about a minute).

    python benchmarks/samplers.py [--checkpoint checkpoints/default] [--skip-analytic] [--shipped-only]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edmsound.core.runtime import jemalloc_loaded  # noqa: E402
from edmsound.core.guidance import GuidedDenoiser, format_guidance_interval, interval_list  # noqa: E402
from edmsound.core.pipeline import EDMSoundPipeline  # noqa: E402
from edmsound.core.presets import format_class_guidance  # noqa: E402
from edmsound.core.samplers import SAMPLERS, get_sampler, steps_for_nfe, valid_nfes  # noqa: E402
from edmsound.core.schedules import karras_sigmas  # noqa: E402
from edmsound.core.storage import file_sha256  # noqa: E402
from edmsound.training.trainer import cpu_model  # noqa: E402

NFES = (4, 6, 8, 10, 15, 20, 35, 50)
RESULTS = ROOT / "benchmarks" / "results"
DETERMINISTIC = [s for s in SAMPLERS if s != "edm_stochastic"]


def budget(name, nfe):
    return max(valid_nfes(name, nfe))


def run_sampler(pipe, name, nfe, noise, labels, guidance):
    e = pipe.preset.edm
    sigmas = karras_sigmas(steps_for_nfe(name, nfe), e.sigma_min, e.sigma_max, e.rho)
    den = GuidedDenoiser(pipe.model, labels, guidance)
    with torch.no_grad():
        return get_sampler(name)(den, noise * float(sigmas[0]), sigmas)


def median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def slowest_class(pipe) -> str:
    """With per-class defaults, the class whose shipped settings run the most guided (double-batch) network
    evaluations (ties: the larger scale, then the first class): the one the speed bar must hold for."""
    p = pipe.preset
    if not p.default_class_guidance and not p.default_class_guidance_interval:
        return pipe.classes[0]

    def cost(c):
        guided = pipe.generate(c, n=1, seed=0).settings["guided_nfe"]   # counted, not estimated
        return (guided, p.guidance_for(c), -pipe.classes.index(c))
    return max(pipe.classes, key=cost)


def shipped_timing(pipe, repeats=10, class_name=None):
    """The speed target: one clip at the checkpoint's shipped sampler/NFE/guidance, full ``generate`` call
    (noise, sampling, iSTFT), median of ``repeats`` single-clip calls after one warm-up call."""
    p = pipe.preset
    cls = class_name or slowest_class(pipe)
    gen = pipe.generate(cls, n=1, seed=0)                             # warm-up (allocations, kernels)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        pipe.generate(cls, n=1, seed=i)
        times.append(time.perf_counter() - t)
    per_class = format_class_guidance(p.class_scales(pipe.classes), p.class_intervals(pipe.classes)) or None
    return {"sampler": p.default_sampler, "nfe": p.default_nfe, "guidance": p.guidance_for(cls),
            "class_guidance": per_class,
            "guidance_interval": gen.settings["guidance_interval"], "guided_nfe": gen.settings["guided_nfe"],
            "base_guidance_interval": interval_list(p.default_guidance_interval),
            "median_sec_per_clip": statistics.median(times), "min": min(times), "max": max(times),
            "repeats": repeats, "class": cls, "audio_seconds": pipe.codec.num_samples / pipe.sample_rate,
            "threads": torch.get_num_threads(), "jemalloc": jemalloc_loaded(), "precision": pipe.precision,
            "ema_sha256": file_sha256(pipe.model_dir / "ema.safetensors")}


def write_shipped(shipped, checkpoint, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"Shipped settings of `{checkpoint}`, {time.strftime('%Y-%m-%d')}, {cpu_model()} "
             f"({os.cpu_count()} cores, {shipped['threads']} threads, "
             f"{'jemalloc' if shipped.get('jemalloc') else 'default allocator'}, network in "
             f"{shipped.get('precision', 'bf16')}), torch {torch.__version__}. One clip per call "
             "(noise, sampling with classifier-free guidance, iSTFT), after one warm-up call.", "",
             "| sampler | NFE | guidance | guided σ interval | guided evaluations | clip length (s) | median s / clip "
             "| min | max | calls | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {shipped['sampler']} | {shipped['nfe']} | {shipped['guidance']:g}"
             f"{' (' + shipped['class'] + ', per-class scales)' if shipped.get('class_guidance') else ''} | "
             f"{format_guidance_interval(shipped['guidance_interval'])} | "
             f"{shipped['guided_nfe']} | {shipped['audio_seconds']:.3f} | "
             f"**{shipped['median_sec_per_clip']:.3f}** | {shipped['min']:.3f} | {shipped['max']:.3f} | "
             f"{shipped['repeats']} | {'met' if shipped['median_sec_per_clip'] <= 1.0 else 'NOT met'} (<= 1 s) |"]
    (out_dir / "samplers_shipped.md").write_text("\n".join(lines) + "\n")
    record = dict(shipped, checkpoint=checkpoint, date=time.strftime("%Y-%m-%d"), cpu=cpu_model(),
                  cores=os.cpu_count(), torch=torch.__version__, bar_seconds=1.0,
                  met=shipped["median_sec_per_clip"] <= 1.0)
    (out_dir / "samplers_shipped.json").write_text(json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))


def compare_shipped(checkpoints, labels, repeats, out_dir):
    """Several checkpoints at their own shipped settings, timed in one run and interleaved (round r times every
    class of every checkpoint once), so machine load affects all alike: the median seconds per clip over all
    classes, the slowest class's median, and each against the first checkpoint."""
    pipes = [EDMSoundPipeline(c, device="cpu") for c in checkpoints]
    for p in pipes:
        for c in p.classes:
            p.generate(c, n=1, seed=0)                                     # warm-up
    times = [{c: [] for c in p.classes} for p in pipes]
    guided = [{c: p.generate(c, n=1, seed=0).settings["guided_nfe"] for c in p.classes} for p in pipes]
    for r in range(repeats):
        for p, t in zip(pipes, times):
            for c in p.classes:
                t0 = time.perf_counter()
                p.generate(c, n=1, seed=1 + r)
                t[c].append(time.perf_counter() - t0)
    rows = []
    for lab, ck, p, t, g in zip(labels, checkpoints, pipes, times, guided):
        med = {c: statistics.median(v) for c, v in t.items()}
        slow = max(med, key=med.get)
        pr = p.preset
        rows.append({"label": lab, "checkpoint": ck, "ema_sha256": file_sha256(p.model_dir / "ema.safetensors"),
                     "sampler": pr.default_sampler, "nfe": pr.default_nfe, "guidance": pr.default_guidance,
                     "class_guidance": format_class_guidance(pr.class_scales(p.classes),
                                                             pr.class_intervals(p.classes)) or None,
                     "guidance_interval": interval_list(pr.default_guidance_interval),
                     "sigma_max": pr.edm.sigma_max, "guided_nfe": g,
                     "median_all_classes": statistics.median([x for v in t.values() for x in v]),
                     "slowest_class": slow, "slowest_median": med[slow], "per_class_median": med})
    base = rows[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"Shipped settings of each checkpoint, timed side by side in one run on {time.strftime('%Y-%m-%d')}, "
             f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads, "
             f"{'jemalloc' if jemalloc_loaded() else 'default allocator'}, network in "
             f"{'/'.join(sorted({p.precision for p in pipes}))}), torch {torch.__version__}. One clip per "
             f"`generate` call (noise, sampling, iSTFT, level measurement), {repeats} rounds × every class, interleaved.",
             "", "| model | sampler | NFE | σ_max | guided evaluations per class | median s / clip (all classes) | "
             "× first | slowest class: median s | × first |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gtxt = ", ".join(f"{c} {n}" for c, n in r["guided_nfe"].items() if n) or "none"
        lines.append(f"| {r['label']} | {r['sampler']} | {r['nfe']} | {r['sigma_max']:g} | {gtxt} | "
                     f"**{r['median_all_classes']:.3f}** | {r['median_all_classes'] / base['median_all_classes']:.2f} | "
                     f"{r['slowest_median']:.3f} ({r['slowest_class']}) | "
                     f"{r['slowest_median'] / base['slowest_median']:.2f} |")
    (out_dir / "samplers_shipped_compare.md").write_text("\n".join(lines) + "\n")
    (out_dir / "samplers_shipped_compare.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(), "repeats": repeats,
         "precision": sorted({p.precision for p in pipes}), "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


def checkpoint_table(checkpoint, guidance, clips, repeats, class_name=None):
    pipe = EDMSoundPipeline(checkpoint, device="cpu")
    cls = class_name or pipe.classes[0]
    labels1 = torch.tensor([pipe.class_index(cls)])
    noise, _ = pipe.noise(list(range(1000, 1000 + clips)))
    labels = labels1.expand(clips)
    ref = run_sampler(pipe, "heun", 199, noise, labels, guidance)
    ref_rms = ref.pow(2).mean().sqrt()
    x1 = noise[:1] * 0.5
    den1 = GuidedDenoiser(pipe.model, labels1, guidance)
    with torch.no_grad():
        t_eval = median_time(lambda: den1(x1, torch.tensor([0.5])), max(5, repeats))
    rows = []
    for name in DETERMINISTIC:
        for req in NFES:
            nfe = budget(name, req)
            out = run_sampler(pipe, name, nfe, noise, labels, guidance)
            err = float((out - ref).pow(2).mean().sqrt() / ref_rms)
            wall = median_time(lambda: run_sampler(pipe, name, nfe, noise[:1], labels1, guidance), repeats)
            rows.append({"sampler": name, "nfe_requested": req, "nfe": nfe, "rel_error": err,
                         "sec_per_clip": wall, "overhead_pct": 100 * (wall - nfe * t_eval) / wall})
            print(rows[-1], flush=True)
    return rows, {**shipped_timing(pipe, class_name=cls), "eval_ms": 1000 * t_eval}


def write_outputs(rows, shipped, checkpoint, guidance, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"Checkpoint `{checkpoint}`, guidance {guidance:g} at every σ (the shipped guidance interval, if any, "
             "applies to the shipped timing below only), CPU ({os.cpu_count()} cores), "
             f"{time.strftime('%Y-%m-%d')}. Error = RMS distance to a Heun NFE-199 solution from the same noise, "
             "relative to its RMS. Time = one clip, batch 1 (median). Overhead = time beyond NFE x one bare "
             f"guided network call ({shipped['eval_ms']:.1f} ms).", "",
             "| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---|" + "---|" * len(NFES)]
    for name in DETERMINISTIC:
        cells = []
        for r in (r for r in rows if r["sampler"] == name):
            used = "" if r["nfe"] == r["nfe_requested"] else f" (@{r['nfe']})"
            cells.append(f"{r['rel_error']:.3g}{used}<br>{r['sec_per_clip']:.2f}s, {r['overhead_pct']:.0f}%")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Shipped default: {shipped['sampler']} at NFE {shipped['nfe']}, guidance {shipped['guidance']:g} "
              f"({format_guidance_interval(shipped['guidance_interval'])}, {shipped['guided_nfe']} guided evaluations): "
              f"**{shipped['median_sec_per_clip']:.3f} s per {shipped['audio_seconds']:.2f}-s clip** "
              "(median of 10, full `generate` call incl. iSTFT)."]
    (out_dir / "samplers_checkpoint.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name in DETERMINISTIC:
        rs = [r for r in rows if r["sampler"] == name]
        ax.loglog([r["nfe"] for r in rs], [r["rel_error"] for r in rs], "o-", label=name, ms=3)
    ax.set_xlabel("NFE")
    ax.set_ylabel("relative error vs reference")
    ax.set_title("trained checkpoint: error vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out_dir / "samplers_checkpoint.png", dpi=110)
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "default"))
    ap.add_argument("--guidance", type=float, default=None, help="default: the preset's")
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-analytic", action="store_true")
    ap.add_argument("--shipped-only", action="store_true",
                    help="only the speed of the shipped settings (median of 10 clips) -> samplers_shipped.md")
    ap.add_argument("--versus", action="append", default=None, metavar="CHECKPOINT",
                    help="time --checkpoint and these side by side at their shipped settings, interleaved "
                         "-> samplers_shipped_compare.md (repeatable)")
    ap.add_argument("--rounds", type=int, default=10, help="with --versus: rounds of every class of every model")
    ap.add_argument("--labels", default=None, help="comma-separated names for --checkpoint and the --versus ones")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-jemalloc", action="store_true",
                    help="time with the default allocator (by default it re-executes under jemalloc, as the app does)")
    a = ap.parse_args()
    if not a.no_jemalloc:
        from edmsound.core.runtime import reexec_with_jemalloc
        reexec_with_jemalloc(sys.argv[1:], script=__file__)
    if a.threads:
        torch.set_num_threads(a.threads)
    rel = os.path.relpath(a.checkpoint, ROOT)
    if a.versus:
        cks = [a.checkpoint] + a.versus
        labels = a.labels.split(",") if a.labels else [os.path.relpath(c, ROOT) for c in cks]
        if len(labels) != len(cks):
            ap.error(f"--labels names {len(labels)} models, there are {len(cks)}")
        compare_shipped(cks, labels, a.rounds, Path(a.out))
        return
    if a.shipped_only:
        write_shipped(shipped_timing(EDMSoundPipeline(a.checkpoint, device="cpu")), rel, Path(a.out))
        return
    if not a.skip_analytic:
        import samplers_analytic
        samplers_analytic.main(["--out", a.out])
    from edmsound.core.storage import read_config, resolve_model_dir
    preset, _ = read_config(resolve_model_dir(a.checkpoint))
    guidance = preset.default_guidance if a.guidance is None else a.guidance
    rows, shipped = checkpoint_table(a.checkpoint, guidance, a.clips, a.repeats)
    write_outputs(rows, shipped, rel, guidance, Path(a.out))
    write_shipped(shipped, rel, Path(a.out))         # the same median-of-10 timing, no second run


if __name__ == "__main__":
    main()
