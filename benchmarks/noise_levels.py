"""Where along the noise levels does a model lose the data distribution?

Held-out real clips (built-in synth, a base seed of their own) are noised to a start level sigma_s and run
down the probability-flow ODE with the model (conditional, w = 1, the same sampler and step count for every
sigma_s: an SDEdit-style round trip). Their FAD against the held-out reference then says how much of the
distance between generated and real clips the model adds *below* sigma_s:

  * FAD at small sigma_s ~ the real clips' own FAD: the model's fine detail (phase, texture) is right;
  * the sigma_s where FAD starts to climb is where the model's errors begin;
  * the last row starts from pure noise at the preset's sigma_max, i.e. ordinary generation.

Also reported: the level gap (mean RMS dBFS minus the reference's; the default encoder is gain-invariant).

    python benchmarks/noise_levels.py                                     # the shipped model
    python benchmarks/noise_levels.py --checkpoint checkpoints/default --checkpoint runs/x/export --label old,new

Writes ``<out>/noise_levels.md`` (table), ``noise_levels.json`` and ``noise_levels.png`` (FAD against sigma_s).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edmsound import metrics as M  # noqa: E402
from edmsound.evaluate import _pcm16, synth_audioset  # noqa: E402
from edmsound.guidance import GuidedDenoiser  # noqa: E402
from edmsound.pipeline import EDMSoundPipeline  # noqa: E402
from edmsound.samplers import get_sampler  # noqa: E402
from edmsound.schedules import karras_sigmas  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "noise_levels"
NOISE = "noise"        # the row that starts from pure noise at the preset's sigma_max


def _embed(enc, waves, sr):
    e, _, _ = enc.embed_windows(waves, sr, progress=False)
    return e


def round_trip(pipe, waves: np.ndarray, label: int, sigma_s: float | None, sampler: str, steps: int,
               seed: int, batch: int = 16) -> np.ndarray:
    """Noise ``waves`` to ``sigma_s`` (None: pure noise at sigma_max, the real clips unused) and denoise them."""
    e = pipe.preset.edm
    g = torch.Generator().manual_seed(int(seed))
    n = torch.randn((len(waves),) + tuple(pipe.codec.shape), generator=g)
    top = e.sigma_max if sigma_s is None else float(sigma_s)
    x = top * n if sigma_s is None else pipe.codec.encode(torch.from_numpy(waves)).float() + top * n
    sig = karras_sigmas(steps, e.sigma_min, top, e.rho)
    fn = get_sampler(sampler)
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        den = GuidedDenoiser(pipe.model, torch.full((len(xb),), label, dtype=torch.long), 1.0, None)
        out.append(fn(den, xb, sig))
    return _pcm16(pipe.codec.decode(torch.cat(out).float()).numpy())


def run(checkpoints, labels, sigmas, n_per_class, sampler, steps, start_seed, ref_seed, ref_per_class):
    from edmsound.encoders import load_encoder
    enc = load_encoder(ROOT / "checkpoints" / "encoder")
    first = EDMSoundPipeline(checkpoints[0], device="cpu")
    classes, sr, ns = first.classes, first.sample_rate, first.codec.num_samples
    ref = {c: synth_audioset([c], ref_per_class, ref_seed, sr, ns).waves for c in classes}
    start = {c: synth_audioset([c], n_per_class, start_seed, sr, ns).waves for c in classes}
    ref_e = {c: _embed(enc, ref[c], sr) for c in classes}
    all_ref = np.concatenate([ref_e[c] for c in classes])

    def score(sets):
        emb = {c: _embed(enc, sets[c], sr) for c in classes}
        row = {"fad": M.fad(np.concatenate([emb[c] for c in classes]), all_ref),
               "per_class": {c: M.fad(emb[c], ref_e[c]) for c in classes},
               "level_gap_db": {c: M.level_gap_db(sets[c], ref[c]) for c in classes}}
        row["level_gap_db"]["overall"] = float(np.mean(list(row["level_gap_db"].values())))
        return row

    rows = [{"model": "real clips", "sigma_s": 0.0, **score(start)}]
    for ck, lab in zip(checkpoints, labels):
        pipe = first if ck == checkpoints[0] else EDMSoundPipeline(ck, device="cpu")
        for s in tqdm(list(sigmas) + [None], desc=lab, unit="level"):
            t0 = time.perf_counter()
            sets = {c: round_trip(pipe, start[c], i, s, sampler, steps, seed=1000 * (s is None) + i)
                    for i, c in enumerate(classes)}
            rows.append({"model": lab, "sigma_s": NOISE if s is None else float(s),
                         "sigma_max": pipe.preset.edm.sigma_max, "seconds": round(time.perf_counter() - t0, 1),
                         **score(sets)})
    return {"settings": {"checkpoints": [str(c) for c in checkpoints], "labels": labels, "classes": classes,
                         "sampler": sampler, "steps": steps, "n_per_class": n_per_class, "start_seed": start_seed,
                         "reference": f"built-in synth, base seed {ref_seed}, {ref_per_class} clips/class",
                         "encoder": enc.name}, "rows": rows}


def markdown(res) -> str:
    s, rows = res["settings"], res["rows"]
    cls = s["classes"]
    L = ["# Where the distance to real clips is made: FAD after a round trip from noise level σ_s", "",
         f"- {s['n_per_class']} held-out real clips per class (built-in synth, base seed {s['start_seed']}) noised "
         f"to σ_s and denoised with {s['sampler']}, {s['steps']} Karras steps (ρ of the preset) from σ_s, "
         "conditional (w = 1); the last row of each model starts from pure noise at its σ_max (ordinary generation)",
         f"- FAD against the held-out reference ({s['reference']}); encoder {s['encoder']}",
         "- `real clips`: the undisturbed starting clips — the floor at this sample size", "",
         "| model | σ_s | FAD (all classes) | " + " | ".join(cls) + " | level gap dB |",
         "|" + "---|" * (len(cls) + 4)]
    for r in rows:
        sig = ("pure noise at σ_max " + f"{r['sigma_max']:g}") if r["sigma_s"] == NOISE else f"{r['sigma_s']:g}"
        L.append(f"| {r['model']} | {sig} | {r['fad']:.4f} | "
                 + " | ".join(f"{r['per_class'][c]:.3f}" for c in cls) + f" | {r['level_gap_db']['overall']:+.1f} |")
    return "\n".join(L) + "\n"


def plot(res, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    real = res["rows"][0]["fad"]
    ax.axhline(real, color="k", ls=":", label="real clips (floor)")
    for lab in res["settings"]["labels"]:
        rs = [r for r in res["rows"] if r["model"] == lab]
        pts = [(r["sigma_s"], r["fad"]) for r in rs if r["sigma_s"] != NOISE]
        line, = ax.plot(*zip(*pts), marker="o", label=f"{lab}: round trip from σ_s")
        for r in rs:
            if r["sigma_s"] == NOISE:
                ax.scatter([r["sigma_max"]], [r["fad"]], marker="*", s=140, color=line.get_color(), zorder=5,
                           label=f"{lab}: from pure noise (σ_max {r['sigma_max']:g})")
    ax.set_xscale("log")
    ax.set_xlabel("start noise level σ_s")
    ax.set_ylabel("FAD vs held-out real (all classes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=None, help="repeat to compare models")
    ap.add_argument("--label", default=None, help="comma-separated names for the checkpoints")
    ap.add_argument("--sigmas", default="0.1,0.3,0.6,1.2,3")
    ap.add_argument("--n-per-class", type=int, default=32)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--start-seed", type=int, default=9, help="built-in base seed of the clips that are noised")
    ap.add_argument("--reference-seed", type=int, default=7)
    ap.add_argument("--reference-per-class", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cks = a.checkpoint or [str(ROOT / "checkpoints" / "default")]
    labels = a.label.split(",") if a.label else [Path(c).name for c in cks]
    if len(labels) != len(cks):
        ap.error(f"--label names {len(labels)} models, --checkpoint gives {len(cks)}")
    try:
        sigmas = [float(v) for v in a.sigmas.split(",")]
    except ValueError:
        ap.error(f"--sigmas must be comma-separated numbers, got {a.sigmas!r}")
    if not sigmas or any(not (s > 0) for s in sigmas):
        ap.error(f"--sigmas must be noise levels > 0, got {a.sigmas!r}")
    if a.start_seed in (0, a.reference_seed):
        ap.error("--start-seed must differ from the training set's base seed 0 and from --reference-seed")
    res = run(cks, labels, sorted(sigmas), a.n_per_class, a.sampler, a.steps, a.start_seed, a.reference_seed,
              a.reference_per_class)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise_levels.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "noise_levels.md").write_text(markdown(res))
    plot(res, out / "noise_levels.png")
    print(markdown(res))
    print(f"wrote {out}/noise_levels.md, .json, .png")


if __name__ == "__main__":
    main()
