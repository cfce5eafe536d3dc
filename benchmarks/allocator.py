"""Training speed and memory growth of the default preset under each memory allocator (CPU).

Each allocator runs in its own subprocess: the real trainer on the built-in set (``make data``), warm-up steps,
then timed steps; the resident memory before and after the timed steps gives its growth per step. An allocator
that keeps growing will, over a training run, end in the kernel's out-of-memory kill.

    python benchmarks/allocator.py [--steps 10] [--warmup 3] [--precision fp32] [--out benchmarks/results/allocator]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREVIOUS_CONF = "oversize_threshold:1,background_thread:false,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def configs() -> list[tuple[str, dict]]:
    from edmsound.core.runtime import MALLOC_CONF, find_jemalloc
    lib = find_jemalloc()
    out = [("glibc malloc (no preload)", {})]
    if lib:
        out += [("jemalloc, library defaults", {"LD_PRELOAD": lib, "MALLOC_CONF": ""}),
                ("jemalloc, shipped MALLOC_CONF", {"LD_PRELOAD": lib, "MALLOC_CONF": MALLOC_CONF}),
                ("jemalloc, previous MALLOC_CONF (oversize_threshold:1)", {"LD_PRELOAD": lib,
                                                                           "MALLOC_CONF": PREVIOUS_CONF})]
    return out


def worker(data: str, steps: int, warmup: int, precision: str) -> dict:
    from edmsound.core.presets import get_preset
    from edmsound.training.trainer import Trainer

    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30

    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(get_preset("default"), data, Path(tmp) / "run", steps=warmup + steps, progress=False,
                     precision=precision)
        tr.denoiser.train()
        for _ in range(warmup):
            tr.train_step()
        before, t0 = rss(), time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        dt = (time.perf_counter() - t0) / steps
        after = rss()
    return {"seconds_per_step": dt, "steps_per_hour": 3600 / dt, "rss_before_gib": before, "rss_after_gib": after,
            "growth_gib_per_step": (after - before) / steps, "precision": tr.precision}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "builtin"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "allocator"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.data, a.steps, a.warmup, a.precision)), flush=True)
        return
    if not Path(a.data).is_dir():
        sys.exit(f"error: no training set at {a.data}; run `make data` first")
    from edmsound.training.trainer import cpu_model
    rows = []
    for name, env in configs():
        full = dict(os.environ, EDMSOUND_NO_JEMALLOC="1", **env)
        if not env:
            full.pop("LD_PRELOAD", None)
        full = {k: v for k, v in full.items() if v != ""}
        r = subprocess.run([sys.executable, __file__, "--worker", "--data", a.data, "--steps", str(a.steps),
                            "--warmup", str(a.warmup), "--precision", a.precision],
                           env=full, capture_output=True, text=True, timeout=3600)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            rows.append({"allocator": name, "error": (r.stderr.strip().splitlines() or ["killed"])[-1]})
        else:
            rows.append({"allocator": name, **json.loads(line[0][7:])})
        print(rows[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from edmsound.core.model import bf16_native
    native = "with native bfloat16" if bf16_native("cpu") else "without native bfloat16 (no AVX512-BF16 or AMX)"
    meta = {"machine": f"{cpu_model()} {native}", "cores": os.cpu_count(), "date": datetime.date.today().isoformat(),
            "steps": a.steps, "warmup": a.warmup, "precision": a.precision, "preset": "default"}
    (out / "allocator.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Training under each memory allocator",
             "",
             f"`python benchmarks/allocator.py`: preset `default` (batch 16) on the built-in set, {a.precision}, "
             f"{a.warmup} warm-up and {a.steps} timed steps per allocator, each in its own process, one after "
             f"another in one run. Machine: {meta['machine']}, {meta['cores']} cores; {meta['date']}.",
             "",
             "| allocator | s / step | steps / h | resident memory after warm-up → after the timed steps | growth per step |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['allocator']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['allocator']} | {r['seconds_per_step']:.2f} | {r['steps_per_hour']:.0f} | "
                         f"{r['rss_before_gib']:.2f} → {r['rss_after_gib']:.2f} GiB | "
                         f"{1024 * r['growth_gib_per_step']:+.0f} MiB |")
    (out / "allocator.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'allocator.md'}")


if __name__ == "__main__":
    main()
