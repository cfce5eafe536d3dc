"""Where along the noise levels does a model lose the data distribution?

Held-out real clips (built-in synth, a base seed of their own) are noised to a start level sigma_s and run
down the probability-flow ODE with the model (conditional, w = 1, the same sampler and step count for every
sigma_s: an SDEdit-style round trip). Their FAD against the held-out reference then says how much of the
distance between generated and real clips the model adds *below* sigma_s:

  * FAD at small sigma_s ~ the real clips' own FAD: the model's fine detail (phase, texture) is right;
  * the sigma_s where FAD starts to climb is where the model's errors begin;
  * the last row starts from pure noise at the preset's sigma_max, i.e. ordinary generation.

Also reported, because the default encoder is gain-invariant and cannot hear a quiet or dull clip: the level gap
(mean RMS dBFS minus the reference's) and the spectral-envelope gap in 12 log-spaced bands
(:mod:`edmsound.evaluation.fidelity`), per row — so the table shows *where along sigma and in which bands* energy is lost.
``--sigma-max SIGMA[:RHO[:SIGMA_MIN]],...`` adds pure-noise starts from other schedules than the preset's, and
``--data-scale`` a table of the data's own scale per frequency against the starting noise level.

    python benchmarks/noise_levels.py                                     # the shipped model
    python benchmarks/noise_levels.py --checkpoint checkpoints/default --checkpoint runs/x/export --label old,new
    python benchmarks/noise_levels.py --sigmas 0.3,1.2,3 --sigma-max 3:9,15:2.5:0.002,80:7 --data-scale --out DIR

Writes ``<out>/noise_levels.md`` (table), ``noise_levels.json``, ``noise_levels.png`` (FAD and level gap against
sigma_s) and ``bands.png`` (band gaps per start), plus ``data_scale.md`` / ``data_scale.png`` with
``--data-scale``.
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

from edmsound.evaluation import fidelity as F  # noqa: E402
from edmsound.evaluation import metrics as M  # noqa: E402
from edmsound.evaluation.sweep import _pcm16, synth_audioset  # noqa: E402
from edmsound.core.guidance import GuidedDenoiser  # noqa: E402
from edmsound.core.pipeline import EDMSoundPipeline  # noqa: E402
from edmsound.core.samplers import get_sampler  # noqa: E402
from edmsound.core.schedules import karras_sigmas  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "noise_levels"
NOISE = "noise"        # the row that starts from pure noise at the preset's sigma_max


def _embed(enc, waves, sr):
    e, _, _ = enc.embed_windows(waves, sr, progress=False)
    return e


def round_trip(pipe, waves: np.ndarray, label: int, sigma_s: float | None, sampler: str, steps: int,
               seed: int, batch: int = 16, sigma_max: float | None = None, rho: float | None = None,
               sigma_min: float | None = None) -> np.ndarray:
    """Noise ``waves`` to ``sigma_s`` (None: pure noise at ``sigma_max``, default the preset's; the real clips
    unused) and denoise them."""
    e = pipe.preset.edm
    g = torch.Generator().manual_seed(int(seed))
    n = torch.randn((len(waves),) + tuple(pipe.codec.shape), generator=g)
    top = (sigma_max or e.sigma_max) if sigma_s is None else float(sigma_s)
    # the model's state of this class (its per-class gains, where it has them)
    x = top * n if sigma_s is None else pipe.codec.to_model(pipe.codec.encode(torch.from_numpy(waves)).float(),
                                                            label) + top * n
    sig = karras_sigmas(steps, sigma_min or e.sigma_min, top, rho or e.rho)
    fn = get_sampler(sampler)
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        den = GuidedDenoiser(pipe.model, torch.full((len(xb),), label, dtype=torch.long), 1.0, None)
        out.append(fn(den, xb, sig))
    return _pcm16(pipe.codec.decode(pipe.codec.from_model(torch.cat(out).float(), label)).numpy())


def run(checkpoints, labels, sigmas, n_per_class, sampler, steps, start_seed, ref_seed, ref_per_class,
        starts=((None, None, None),), rho=None):
    from edmsound.copydetect.encoders import load_encoder
    enc = load_encoder(ROOT / "checkpoints" / "encoder")
    first = EDMSoundPipeline(checkpoints[0], device="cpu")
    classes, sr, ns = first.classes, first.sample_rate, first.codec.num_samples
    ref = {c: synth_audioset([c], ref_per_class, ref_seed, sr, ns).waves for c in classes}
    start = {c: synth_audioset([c], n_per_class, start_seed, sr, ns).waves for c in classes}
    ref_e = {c: _embed(enc, ref[c], sr) for c in classes}
    all_ref = np.concatenate([ref_e[c] for c in classes])

    ref_bands = {c: F.band_power(ref[c], sr) for c in classes}

    def score(sets):
        emb = {c: _embed(enc, sets[c], sr) for c in classes}
        row = {"fad": M.fad(np.concatenate([emb[c] for c in classes]), all_ref),
               "per_class": {c: M.fad(emb[c], ref_e[c]) for c in classes},
               "level_gap_db": {c: M.level_gap_db(sets[c], ref[c]) for c in classes},
               "band_gap_db": {c: list(10 * np.log10(F.band_power(sets[c], sr) / ref_bands[c])) for c in classes}}
        row["level_gap_db"]["overall"] = float(np.mean(list(row["level_gap_db"].values())))
        row["band_gap_db"]["overall"] = list(np.mean([row["band_gap_db"][c] for c in classes], axis=0))
        return row

    rows = [{"model": "real clips", "sigma_s": 0.0, **score(start)}]
    for ck, lab in zip(checkpoints, labels):
        pipe = first if ck == checkpoints[0] else EDMSoundPipeline(ck, device="cpu")
        e = pipe.preset.edm
        todo = [(s, None, rho, None) for s in sigmas] + [(None, m, r or rho, lo) for m, r, lo in starts]
        for s, m, r, lo in tqdm(todo, desc=lab, unit="level"):
            t0 = time.perf_counter()
            sets = {c: round_trip(pipe, start[c], i, s, sampler, steps, seed=1000 * (s is None) + i, sigma_max=m,
                                  rho=r, sigma_min=lo) for i, c in enumerate(classes)}
            rows.append({"model": lab, "sigma_s": NOISE if s is None else float(s),
                         "sigma_max": m or e.sigma_max, "rho": r or e.rho, "sigma_min": lo or e.sigma_min,
                         "seconds": round(time.perf_counter() - t0, 1), **score(sets)})
    return {"settings": {"checkpoints": [str(c) for c in checkpoints], "labels": labels, "classes": classes,
                         "sample_rate": sr, "band_edges_hz": [float(x) for x in F.band_edges(sr)],
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

    def start(r):
        if r["sigma_s"] != NOISE:
            return f"{r['sigma_s']:g}"
        return (f"pure noise at σ_max {r['sigma_max']:g}" + (f" (ρ {r['rho']:g}" if "rho" in r else "")
                + (f", σ_min {r['sigma_min']:g})" if "sigma_min" in r else ")" if "rho" in r else ""))
    for r in rows:
        L.append(f"| {r['model']} | {start(r)} | {r['fad']:.4f} | "
                 + " | ".join(f"{r['per_class'][c]:.3f}" for c in cls) + f" | {r['level_gap_db']['overall']:+.1f} |")
    if all("band_gap_db" in r for r in rows):
        L += ["", "## Level gap per class (dB, mean RMS dBFS minus the reference's)", "",
              "| model | σ_s | " + " | ".join(cls) + " |", "|" + "---|" * (len(cls) + 2)]
        for r in rows:
            L.append(f"| {r['model']} | {start(r)} | " + " | ".join(f"{r['level_gap_db'][c]:+.1f}" for c in cls) + " |")
        edges = np.asarray(s["band_edges_hz"])
        centres = np.sqrt(edges[:-1] * edges[1:])
        hz = [f"{c:.0f}" if c < 1000 else f"{c / 1000:.1f}k" for c in centres]
        L += ["", "## Band gaps (dB, mean over classes of each class's gap; band centres in Hz)", "",
              "| model | σ_s | " + " | ".join(hz) + " | worst class-band |", "|" + "---|" * (len(hz) + 3)]
        for r in rows:
            worst = max(((c, b, g) for c in cls for b, g in enumerate(r["band_gap_db"][c])), key=lambda t: abs(t[2]))
            L.append(f"| {r['model']} | {start(r)} | " + " | ".join(f"{g:+.1f}" for g in r["band_gap_db"]["overall"])
                     + f" | {worst[2]:+.1f} ({worst[0]}, {hz[worst[1]]}) |")
    return "\n".join(L) + "\n"


def _finish(ax, log_axis: str, xlabel: str, ylabel: str, legend_size: int):
    (ax.set_xscale if log_axis == "x" else ax.set_yscale)("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save(fig, path: Path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(res, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.0))
    ax = axes[0]
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
    ax.legend(fontsize=7)
    ax2 = axes[1]
    ax2.axhline(res["rows"][0]["level_gap_db"]["overall"], color="k", ls=":", label="real clips (floor)")
    for lab in res["settings"]["labels"]:
        rs = [r for r in res["rows"] if r["model"] == lab]
        pts = [(r["sigma_s"], r["level_gap_db"]["overall"]) for r in rs if r["sigma_s"] != NOISE]
        line, = ax2.plot(*zip(*pts), marker="o", label=f"{lab}: round trip from σ_s")
        for r in (r for r in rs if r["sigma_s"] == NOISE):
            ax2.scatter([r["sigma_max"]], [r["level_gap_db"]["overall"]], marker="*", s=120, color=line.get_color(),
                        zorder=5)
            ax2.annotate(f"ρ {r.get('rho', 0):g}", (r["sigma_max"], r["level_gap_db"]["overall"]), fontsize=6,
                         xytext=(3, 3), textcoords="offset points")
    _finish(ax2, "x", "start noise level σ_s or σ_max", "level gap dB (mean over classes)", 7)
    _save(fig, path)


def plot_bands(res, path: Path):
    """Band gap (mean over classes) against band, one line per start."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    edges = np.asarray(res["settings"]["band_edges_hz"])
    centres = np.sqrt(edges[:-1] * edges[1:])
    labels = res["settings"]["labels"]
    fig, axes = plt.subplots(1, len(labels), figsize=(5.2 * len(labels), 3.8), squeeze=False, sharey=True)
    for ax, lab in zip(axes[0], labels):
        ax.plot(centres, res["rows"][0]["band_gap_db"]["overall"], color="k", ls=":", label="real clips (floor)")
        for r in (r for r in res["rows"] if r["model"] == lab):
            name = (f"round trip from σ {r['sigma_s']:g}" if r["sigma_s"] != NOISE else
                    f"pure noise at σ_max {r['sigma_max']:g}, ρ {r.get('rho', 0):g}")
            ax.plot(centres, r["band_gap_db"]["overall"], marker=".", ls="-" if r["sigma_s"] != NOISE else "--",
                    label=name)
        ax.axhline(0, color="gray", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("band centre (Hz)")
        ax.set_title(lab, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("band gap dB (mean over classes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def data_scale(checkpoint, n_per_class: int, seed: int, out: Path) -> str:
    """The compressed spectrograms' own scale per frequency (std, 99.9th percentile and max of |Y| over clips and
    frames) against the sampler's starting noise level: where sigma_max does not dominate the data, pure noise
    at sigma_max is not the distribution the model was trained to start from."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pipe = EDMSoundPipeline(checkpoint, device="cpu")
    sr, ns = pipe.sample_rate, pipe.codec.num_samples
    e = pipe.preset.edm
    L = ["# The data's scale per frequency against the sampler's start", "",
         f"- built-in clips, base seed {seed}, {n_per_class} per class, encoded with the checkpoint's codec "
         f"(α {pipe.preset.codec.alpha:g}, β {pipe.preset.codec.beta:g}); σ_data {e.sigma_data:g}, "
         f"preset σ_max {e.sigma_max:g}",
         "- per class: the real/imaginary parts' std over all bins and frames; the largest |Y| of a bin; and the "
         "*loudest event*: the largest energy in any 8 × 8 (bins × frames) patch, as an equivalent noise level "
         "√(patch energy / 2·64) — a start at σ_max hides such an event only when σ_max is well above it", "",
         "| class | std (all bins) | std, lowest / highest bin | max |Y| | loudest 8×8 event (σ-equivalent), median / max over clips |",
         "|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    freqs = np.linspace(0, sr / 2, pipe.codec.shape[1])
    for i, c in enumerate(pipe.classes):
        waves = synth_audioset([c], n_per_class, seed, sr, ns).waves
        Y = pipe.codec.encode(torch.from_numpy(waves)).double()                  # (n, 2, F, T)
        std_f = Y.permute(2, 0, 1, 3).reshape(Y.shape[2], -1).std(dim=1).numpy()
        mag = (Y[:, 0] ** 2 + Y[:, 1] ** 2)                                      # (n, F, T) energy of both parts
        patch = torch.nn.functional.avg_pool2d(mag[:, None], 8, stride=4)[:, 0] * 64
        ev = (patch.flatten(1).max(dim=1).values / (2 * 64)).sqrt().numpy()
        L.append(f"| {c} | {Y.std().item():.3f} | {std_f.min():.3f} / {std_f.max():.3f} | "
                 f"{mag.sqrt().max().item():.2f} | {np.median(ev):.2f} / {ev.max():.2f} |")
        ax.plot(freqs, std_f, label=c)
    ax.axhline(e.sigma_data, color="k", ls=":", label=f"σ_data {e.sigma_data:g}")
    _finish(ax, "y", "frequency (Hz)", "std of Re/Im (compressed)", 6)
    _save(fig, out / "data_scale.png")
    text = "\n".join(L) + "\n"
    (out / "data_scale.md").write_text(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=None, help="repeat to compare models")
    ap.add_argument("--label", default=None, help="comma-separated names for the checkpoints")
    ap.add_argument("--sigmas", default="0.1,0.3,0.6,1.2,3")
    ap.add_argument("--n-per-class", type=int, default=32)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--sigma-max", default=None, metavar="SIGMA[:RHO[:SIGMA_MIN]],...",
                    help="pure-noise rows: comma-separated starting noise levels, each optionally with its own Karras "
                         "rho and lowest level (default: the preset's schedule)")
    ap.add_argument("--rho", type=float, default=None, help="Karras rho of the round trips (default: the preset's)")
    ap.add_argument("--data-scale", action="store_true", help="also write the data's scale per frequency")
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
    try:
        starts = [tuple(float(x) for x in v.split(":")) for v in a.sigma_max.split(",")] if a.sigma_max else [()]
        starts = [tuple(t) + (None,) * (3 - len(t)) for t in starts]
    except ValueError:
        ap.error(f"--sigma-max must be SIGMA[:RHO[:SIGMA_MIN]],..., got {a.sigma_max!r}")
    if any(len(t) != 3 or any(v is not None and not v > 0 for v in t) for t in starts):
        ap.error(f"--sigma-max must be SIGMA[:RHO[:SIGMA_MIN]] with positive numbers, got {a.sigma_max!r}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.data_scale:
        print(data_scale(cks[0], a.n_per_class, a.start_seed, out))
    res = run(cks, labels, sorted(sigmas), a.n_per_class, a.sampler, a.steps, a.start_seed, a.reference_seed,
              a.reference_per_class, starts, a.rho)
    (out / "noise_levels.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "noise_levels.md").write_text(markdown(res))
    plot(res, out / "noise_levels.png")
    plot_bands(res, out / "bands.png")
    print(markdown(res))
    print(f"wrote {out}/noise_levels.md, .json, .png")


if __name__ == "__main__":
    main()
