"""Round-trip error of each representation on real clips: what a model working in it could at best give back.

For every representation behind the codec interface (``complex``: the compressed complex STFT with its exact
inverse; ``magnitude``: the compressed magnitude with the phase recovered by fast Griffin-Lim at several iteration
counts; ``mel``: a log-mel spectrogram, back through the filterbank's pseudo-inverse and Griffin-Lim), each clip
is encoded and decoded at the default preset's codec settings, and scored:

* waveform SNR (dB) of the decoded clip against the original;
* spectral convergence ||  |STFT(decoded)| - |STFT(original)| || / || |STFT(original)| || (0 = the same magnitudes);
* log-spectral distance (dB, RMS over bins and frames of the 20 log10 magnitude difference, floor -80 dB);
* seconds per clip to decode.

Clips: the built-in foley set (``data/builtin``) and, when fetched, the real recordings of
``benchmarks/real_sets.py`` (``benchmarks/.cache/real_sets``: drum one-shots, game foley).

    python benchmarks/representations.py --per-set 40
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edmsound import get_preset, load_folder  # noqa: E402
from edmsound.core.codec import make_codec  # noqa: E402

VARIANTS = (("complex", None), ("magnitude", 16), ("magnitude", 64), ("magnitude", 256), ("mel", 64))


def scores(codec_cfg, waves: torch.Tensor, rep: str, iters) -> dict:
    cfg = dataclasses.replace(codec_cfg, representation=rep, griffin_lim_iters=iters or codec_cfg.griffin_lim_iters)
    codec = make_codec(cfg)
    t0 = time.perf_counter()
    back = codec.decode(codec.encode(waves))
    sec = (time.perf_counter() - t0) / len(waves)
    win = torch.hann_window(cfg.n_fft)

    def mag(x):
        return torch.stft(x, cfg.n_fft, cfg.hop_length, window=win, center=True, return_complex=True).abs()
    A, B = mag(waves), mag(back)
    snr = 10 * torch.log10(waves.pow(2).sum(1) / (back - waves).pow(2).sum(1).clamp_min(1e-20))
    sc = (B - A).flatten(1).norm(dim=1) / A.flatten(1).norm(dim=1).clamp_min(1e-12)
    la, lb = (20 * torch.log10(m.clamp_min(1e-4)) for m in (A, B))
    lsd = (la - lb).pow(2).flatten(1).mean(1).sqrt()
    return {"snr_db": float(snr.median()), "spectral_convergence": float(sc.median()),
            "log_spectral_distance_db": float(lsd.median()), "seconds_per_clip": sec, "clips": len(waves)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-set", type=int, default=40, help="clips per set (spread over its classes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "representations.md"))
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    codec_cfg = get_preset("default").codec
    sets = {"built-in foley (synthesised)": ROOT / "data" / "builtin"}
    for name in ("drums", "foley"):
        d = ROOT / "benchmarks" / ".cache" / "real_sets" / name
        if d.is_dir():
            sets[f"real {name} (Debian packages)"] = d
    rows = []
    for set_name, root in sets.items():
        data = load_folder(root, codec_cfg.sample_rate, codec_cfg.num_samples, progress=False, verbose=False)
        rng = np.random.default_rng(0)
        idx = rng.choice(len(data.waves), size=min(a.per_set, len(data.waves)), replace=False)
        waves = torch.from_numpy(data.waves[idx])
        waves = waves[waves.abs().amax(1) > 1e-4]
        for rep, iters in tqdm(VARIANTS, desc=set_name):
            rows.append({"set": set_name, "representation": rep, "griffin_lim_iters": iters,
                         **scores(codec_cfg, waves, rep, iters)})
    head = (f"# Round trip of each representation\n\n`benchmarks/representations.py`, {date.today().isoformat()}, "
            f"{platform.platform()}, {os.cpu_count()} CPUs; the default preset's codec ({codec_cfg.sample_rate} Hz, "
            f"n_fft {codec_cfg.n_fft}, hop {codec_cfg.hop_length}, |X|^{codec_cfg.beta}); medians over the clips.\n\n"
            "| clips | representation | waveform SNR (dB) | spectral convergence | log-spectral distance (dB) | "
            "decode s / clip |\n|---|---|---|---|---|---|\n")
    lines = [f"| {r['set']} ({r['clips']}) | {r['representation']}"
             + (f", Griffin-Lim {r['griffin_lim_iters']} it." if r["griffin_lim_iters"] else ", exact inverse")
             + f" | {r['snr_db']:.1f} | {r['spectral_convergence']:.4f} | {r['log_spectral_distance_db']:.2f} | "
             f"{r['seconds_per_clip']:.4f} |" for r in rows]
    text = head + "\n".join(lines) + "\n"
    out = Path(a.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
