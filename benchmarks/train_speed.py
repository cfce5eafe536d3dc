"""Training speed and peak memory per preset (CPU).

Each configuration runs in its own subprocess (so peak RSS is its own) on random data of the preset's
shape: a few warm-up steps, then timed steps of the full training step (encode-free: forward, EDM loss,
backward, AdamW). Also the latency of one network evaluation for one clip (what sampling pays per NFE).

    python benchmarks/train_speed.py [--presets default,tiny] [--steps 8] [--out benchmarks/results/train_speed.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (preset, batch size, bf16, jemalloc, channels_last)
CONFIGS = [
    ("tiny", None, True, True, False),
    ("default", None, True, True, False),
    ("default", None, True, True, True),
    ("default", None, True, False, False),
    ("default", None, False, False, False),
    ("default", None, False, True, True),
    ("paper-sc09", 4, True, True, False),
    ("paper-dcase", 2, True, True, False),
]


def worker(preset_name: str, batch: int | None, bf16: bool, channels_last: bool, steps: int) -> dict:
    import dataclasses
    import resource

    import torch

    from edmsound.core.edm import edm_loss
    from edmsound.core.model import build_denoiser
    from edmsound.core.presets import get_preset
    from edmsound.core.unet import count_parameters

    p = get_preset(preset_name)
    p = dataclasses.replace(p, net=dataclasses.replace(p.net, channels_last=channels_last))
    B = batch or p.train.batch_size
    den = build_denoiser(p, 7, bf16=bf16)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    den.net.to(memory_format=fmt)
    opt = torch.optim.AdamW(den.net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    shape = (B, 2, p.codec.num_bins, p.codec.num_frames)
    y = (torch.randn(shape, generator=g) * p.edm.sigma_data).contiguous(memory_format=fmt)
    labels = torch.randint(0, 7, (B,), generator=g)
    warm = 2
    for i in range(warm + steps):
        if i == warm:
            t0 = time.perf_counter()
        loss = edm_loss(den, y, labels, p.edm, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dt = (time.perf_counter() - t0) / steps
    den.eval()
    with torch.no_grad():
        x = torch.randn(1, *shape[1:]).contiguous(memory_format=fmt)
        times = []
        for i in range(7):
            t = time.perf_counter()
            den(x, torch.tensor([0.5]), torch.tensor([1]))
            times.append(time.perf_counter() - t)
    return {"preset": preset_name, "params_M": round(count_parameters(den.net) / 1e6, 2), "batch": B,
            "input": "x".join(map(str, shape[1:])), "bf16": bf16, "channels_last": channels_last,
            "sec_per_step": round(dt, 3), "steps_per_hour": round(3600 / dt),
            "eval_ms_1clip": round(1000 * sorted(times[2:])[len(times[2:]) // 2], 1),
            "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default=None, help="comma-separated subset")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--precision", choices=("both", "bf16", "fp32"), default="both",
                    help="only the bf16-autocast or only the fp32 rows (emulated bf16, on CPUs without it, is slow)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_speed.md"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(**json.loads(a.worker))))
        return
    from edmsound.core.runtime import find_jemalloc, jemalloc_env
    wanted = set(a.presets.split(",")) if a.presets else None
    rows = []
    for preset, batch, bf16, jem, cl in CONFIGS:
        if (wanted and preset not in wanted) or (a.precision != "both" and bf16 != (a.precision == "bf16")):
            continue
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("LD_PRELOAD", None)
        if jem:
            env = jemalloc_env(env)
        steps = a.steps if preset in ("tiny", "default") else max(2, a.steps // 4)
        spec = json.dumps({"preset_name": preset, "batch": batch, "bf16": bf16, "channels_last": cl,
                           "steps": steps})
        r = subprocess.run([sys.executable, __file__, "--worker", spec], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["jemalloc"] = bool(jem and find_jemalloc())
        rows.append(row)
        print(row, flush=True)
    cols = ["preset", "params_M", "input", "batch", "bf16", "jemalloc", "channels_last", "steps_per_hour",
            "sec_per_step", "eval_ms_1clip", "peak_rss_GiB"]
    from edmsound.core.model import bf16_native
    from edmsound.training.trainer import cpu_model
    lines = [f"Training speed on {platform.machine()} {cpu_model()} ({os.cpu_count()} cores; bfloat16 "
             f"{'native' if bf16_native('cpu') else 'emulated'}), torch "
             f"{__import__('torch').__version__}, {time.strftime('%Y-%m-%d')}. Steps/hour at the given batch; "
             "eval = one network evaluation for one clip (median).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
