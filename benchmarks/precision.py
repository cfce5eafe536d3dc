"""bf16 autocast against fp32, side by side on this machine: seconds per clip and what changes in the clips.

The shipped presets trained under bfloat16 autocast, which is 2.4-2.6x faster than fp32 on CPUs that compute
bfloat16 in hardware (AVX512-BF16, AMX). On a CPU without it (AVX2 only) the same autocast is emulated. This script
times both precisions at each checkpoint's shipped settings in one run, interleaved (round r: every checkpoint and
precision generates the same seeds of class r mod 7), and compares the two precisions' clips of the same seeds:
relative waveform difference, level difference (RMS dBFS) and the largest band difference (12 log bands).

    python benchmarks/precision.py                                    # checkpoints/default and checkpoints/fast
    python benchmarks/precision.py --checkpoint checkpoints/default --rounds 14 --clips 4

Writes ``<out>/precision.md`` and ``precision.json`` (default out: benchmarks/results/precision/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edmsound.core.model import bf16_native  # noqa: E402
from edmsound.core.pipeline import EDMSoundPipeline  # noqa: E402
from edmsound.core.runtime import jemalloc_loaded  # noqa: E402
from edmsound.evaluation import fidelity as F  # noqa: E402
from edmsound.training.trainer import cpu_model  # noqa: E402

PRECISIONS = ("bf16", "fp32")


def run(checkpoints, rounds: int, clips: int, progress: bool = True) -> dict:
    pipes = {(ck, p): EDMSoundPipeline(ck, device="cpu", bf16=p) for ck in checkpoints for p in PRECISIONS}
    classes = list(pipes[(checkpoints[0], PRECISIONS[0])].classes)
    times = {k: [] for k in pipes}
    waves = {k: [] for k in pipes}
    for k, pipe in pipes.items():                               # warm-up: first calls allocate and pick kernels
        pipe.generate(classes[0], n=1, seed=10**6)
    jobs = [(r, k) for r in range(rounds) for k in pipes]
    for r, k in tqdm(jobs, desc="rounds", unit="call", disable=not progress):
        c = classes[r % len(classes)]
        t0 = time.perf_counter()
        g = pipes[k].generate(c, n=clips, seed=1000 * r)
        times[k].append((time.perf_counter() - t0) / clips)
        waves[k].append(g.waves)
    rows = []
    for ck in checkpoints:
        pipe = pipes[(ck, "fp32")]
        a = np.concatenate(waves[(ck, "bf16")])
        b = np.concatenate(waves[(ck, "fp32")])
        rel = np.sqrt(np.mean((a - b) ** 2, axis=1) / np.maximum(np.mean(b ** 2, axis=1), 1e-20))
        lvl = F.rms_dbfs(a) - F.rms_dbfs(b)
        bands = 10 * np.log10(np.maximum(F.band_power(a, pipe.sample_rate), 1e-20)
                              / np.maximum(F.band_power(b, pipe.sample_rate), 1e-20))
        s = {p: statistics.median(times[(ck, p)]) for p in PRECISIONS}
        rows.append({"checkpoint": ck, "sampler": pipe.preset.default_sampler if not pipe.student_nfe
                     else pipe.student_sampler, "nfe": pipe.preset.default_nfe,
                     "seconds_per_clip": s, "fp32_speedup": s["bf16"] / s["fp32"],
                     "clips": int(len(a)), "rel_diff_median": float(np.median(rel)),
                     "rel_diff_max": float(np.max(rel)), "level_diff_db_mean": float(np.mean(lvl)),
                     "level_diff_db_max_abs": float(np.max(np.abs(lvl))),
                     "band_diff_db_max_abs": float(np.max(np.abs(bands)))})
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "bf16_native": bf16_native("cpu"),
            "jemalloc": jemalloc_loaded(), "rounds": rounds, "clips_per_call": clips, "rows": rows}


def markdown(res: dict) -> str:
    native = "computes bfloat16 in hardware" if res["bf16_native"] else "has no native bfloat16 (it is emulated)"
    L = [f"# bf16 autocast against fp32", "",
         f"{res['date']}, {res['cpu']} ({res['cores']} cores, {res['threads']} threads, torch {res['torch']}, "
         f"{'jemalloc' if res['jemalloc'] else 'default allocator'}); this CPU {native}, so `auto` picks "
         f"**{'bf16' if res['bf16_native'] else 'fp32'}** here. One run, interleaved: {res['rounds']} rounds of "
         f"{res['clips_per_call']} clips per call, every checkpoint and precision on the same seeds and class per "
         "round; seconds per clip are medians over the rounds. The clip columns compare the two precisions' clips of "
         "the same seeds (relative RMS of the waveform difference, level and band-power differences over all clips).",
         "",
         "| checkpoint | sampler, NFE | bf16 s / clip | fp32 s / clip | fp32 speed-up | clips | waveform difference, "
         "median (max) | level difference, mean (max \\|·\\|) | largest band difference |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        s = r["seconds_per_clip"]
        L.append(f"| `{r['checkpoint']}` | {r['sampler']}, {r['nfe']} | {s['bf16']:.3f} | {s['fp32']:.3f} | "
                 f"{r['fp32_speedup']:.2f}× | {r['clips']} | {100 * r['rel_diff_median']:.1f} % "
                 f"({100 * r['rel_diff_max']:.1f} %) | {r['level_diff_db_mean']:+.2f} dB "
                 f"({r['level_diff_db_max_abs']:.2f}) | {r['band_diff_db_max_abs']:.2f} dB |")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", action="append", default=None,
                    help="model directory; repeat for several (default: checkpoints/default and checkpoints/fast)")
    ap.add_argument("--rounds", type=int, default=7, help="calls per checkpoint and precision (one class each)")
    ap.add_argument("--clips", type=int, default=4, help="clips per call")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision"))
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args()
    from edmsound.core.runtime import reexec_with_jemalloc       # as the app and the CLI run (when installed)
    reexec_with_jemalloc(sys.argv[1:], script=__file__)
    cks = a.checkpoint or ["checkpoints/default", "checkpoints/fast"]
    res = run(cks, a.rounds, a.clips, progress=not a.no_progress)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(res, indent=1))
    (out / "precision.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
