"""Training the discriminator of :mod:`edmsound.core.discriminator` and giving it to a model.

Real: the model's training clips of the chosen classes, in each class's diffusion state. Generated: the model's own
samples at its shipped settings (the plain path, without any discriminator it has), from noise seeds of their own
(base ``seed``; the evaluation's 0 and the calibration's 1 are refused), made once into ``RUN/generated/`` and read
back on a rerun. A tenth of each side is held out. Every step noises a batch of each to levels drawn log-uniformly
over the interval the guidance will act on (fresh noise every step: the augmentation that keeps a small
discriminator from learning the few hundred clips by heart) and takes a logistic-loss step; the network with the
lowest held-out loss (measured every ``eval_every`` steps on fixed noise) is kept. ``RUN/log.csv`` logs the
held-out loss and accuracy; ``RUN/discriminator.json`` records the run.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.codec import make_codec
from ..core.discriminator import (CONFIG_KEY, WEIGHTS_FILE, DiscriminatorSpec, NoisyDiscriminator)
from ..core.storage import atomic_save_safetensors, atomic_write_json, load_safetensors, read_config, resolve_model_dir
from ..data.folder import load_folder
from .teacher_match import teacher_pairs

__all__ = ["train_discriminator", "attach_discriminator", "DEFAULT_INTERVAL"]

DEFAULT_INTERVAL = (3.0, 15.0)
GENERATED_SEED = 60
LOG_FIELDS = ["step", "train_loss", "val_loss", "val_accuracy"]


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: a tenth held out, at least one of each (seeded)."""
    if n < 2:
        raise ValueError(f"a discriminator needs at least 2 clips on each side, got {n}")
    perm = np.random.default_rng(0).permutation(n)
    k = min(n - 1, max(1, round(0.1 * n)))
    return np.sort(perm[k:]), np.sort(perm[:k])


def _log_uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.exp(math.log(lo) + torch.rand(n, generator=g) * (math.log(hi) - math.log(lo)))


def train_discriminator(model, data_dir, run_dir, classes: list[str], *, n_generated: int = 512,
                        interval: tuple[float, float] = DEFAULT_INTERVAL, steps: int = 2000, batch: int = 32,
                        lr: float = 1e-3, eval_every: int = 100, seed: int = GENERATED_SEED,
                        widths=DiscriminatorSpec.widths, precision: str = "auto", device: str = "cpu",
                        progress: bool = True) -> dict:
    """Train a discriminator for ``model``'s ``classes`` into ``run_dir`` (``discriminator.safetensors`` and its
    record); returns the record."""
    lo, hi = (float(v) for v in interval)
    if not (0 < lo < hi):
        raise ValueError(f"the interval must be two noise levels 0 < lo < hi, got {interval!r}")
    for name, v in (("steps", steps), ("batch", batch), ("eval_every", eval_every)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
    model_dir = resolve_model_dir(model)
    preset, all_classes = read_config(model_dir)
    if not classes:
        raise ValueError(f"name the classes to correct; valid: {', '.join(all_classes)}")
    for c in classes:
        if c not in all_classes:
            raise ValueError(f"unknown class {c!r}; valid: {', '.join(all_classes)}")
    if preset.student_sampler is not None:
        raise ValueError(f"{model_dir} is a few-step model; discriminator guidance corrects a diffusion model's path")
    run_dir = Path(run_dir)
    codec = make_codec(preset.codec)
    gen, gen_labels, gen_seeds, settings = teacher_pairs(model_dir, run_dir / "generated", n_generated, seed=seed,
                                                         precision=precision, device=device, progress=progress,
                                                         classes=classes, discriminator=False)
    data = load_folder(data_dir, preset.codec.sample_rate, preset.codec.num_samples, classes=all_classes,
                       progress=progress, verbose=progress)
    keep = np.isin(data.labels, [all_classes.index(c) for c in classes])
    waves, labels = torch.from_numpy(data.waves[keep]), torch.from_numpy(data.labels[keep])
    real = torch.cat([codec.to_model(codec.encode(waves[i:i + 256]), labels[i:i + 256])
                      for i in range(0, len(labels), 256)])
    rtr, rva = _split(len(real))
    gtr, gva = _split(len(gen))
    torch.manual_seed(0)
    net = NoisyDiscriminator(codec.shape[0], codec.shape[1], len(all_classes), widths, preset.edm.sigma_data)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    gv = torch.Generator().manual_seed(2)                         # fixed held-out noise
    vx = torch.cat([real[rva], gen[gva]])
    vy = torch.cat([torch.ones(len(rva)), torch.zeros(len(gva))])
    vl = torch.cat([labels[rva], gen_labels[gva]])
    vs = _log_uniform(len(vy), lo, hi, gv)
    vx = vx + vs.reshape(-1, 1, 1, 1) * torch.randn(vx.shape, generator=gv)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    run_dir.mkdir(parents=True, exist_ok=True)
    best, best_state, rows = math.inf, None, []
    with open(run_dir / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        running = 0.0
        for step in tqdm(range(1, steps + 1), desc="discriminator", disable=not progress):
            ir = torch.from_numpy(rtr)[torch.randint(len(rtr), (batch,), generator=g)]
            ig = torch.from_numpy(gtr)[torch.randint(len(gtr), (batch,), generator=g)]
            x = torch.cat([real[ir], gen[ig]])
            lab = torch.cat([labels[ir], gen_labels[ig]])
            y = torch.cat([torch.ones(batch), torch.zeros(batch)])
            s = _log_uniform(2 * batch, lo, hi, g)
            x = x + s.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)
            loss = bce(net(x, s, lab), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += float(loss.detach())
            if step % eval_every == 0 or step == steps:
                with torch.no_grad():
                    logit = torch.cat([net(vx[i:i + 256], vs[i:i + 256], vl[i:i + 256])
                                       for i in range(0, len(vy), 256)])
                    vloss = float(bce(logit, vy))
                    acc = float(((logit > 0).float() == vy).float().mean())
                n = step % eval_every or eval_every
                row = {"step": step, "train_loss": round(running / n, 5), "val_loss": round(vloss, 5),
                       "val_accuracy": round(acc, 4)}
                running = 0.0
                w.writerow(row)
                f.flush()
                rows.append(row)
                if vloss < best:
                    best, best_state = vloss, {k: v.detach().clone() for k, v in net.state_dict().items()}
    atomic_save_safetensors(run_dir / WEIGHTS_FILE, best_state)
    best_row = min(rows, key=lambda r: r["val_loss"])
    record = {"model": model_dir.name, "classes": list(classes), "interval": [lo, hi], "widths": list(widths),
              "n_generated": n_generated, "generated_seed": seed, "real_clips": int(len(real)), "steps": steps,
              "batch": batch, "lr": lr, "kept_step": best_row["step"], "val_loss": best_row["val_loss"],
              "val_accuracy": best_row["val_accuracy"], "sampled_with": settings}
    atomic_write_json(run_dir / "discriminator.json", record)
    return record


def attach_discriminator(model_dir, run_dir, scales: dict[str, float]) -> DiscriminatorSpec:
    """Give the model directory ``model_dir`` the discriminator trained in ``run_dir``: its weights beside the model
    and ``config.json`` → ``discriminator`` with the per-class ``scales`` (classes it was trained for only; an empty
    dict removes it). Returns the spec written."""
    model_dir = resolve_model_dir(model_dir)
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if not scales:
        cfg.pop(CONFIG_KEY, None)
        (model_dir / WEIGHTS_FILE).unlink(missing_ok=True)
        atomic_write_json(cfg_path, cfg)
        return None
    rec_path = Path(run_dir) / "discriminator.json"
    if not rec_path.is_file():
        raise ValueError(f"{run_dir} holds no trained discriminator (no discriminator.json); "
                         "`edmsound train-discriminator` makes one")
    record = json.loads(rec_path.read_text())
    sha = hashlib.sha256((model_dir / "ema.safetensors").read_bytes()).hexdigest()
    trained_on = {v["teacher_sha256"] for v in record["sampled_with"].values()}
    if trained_on != {sha}:
        raise ValueError(f"the discriminator in {run_dir} was trained on another model's samples; train one on "
                         f"{model_dir}'s own")
    others = [c for c in scales if c not in record["classes"]]
    if others:
        raise ValueError(f"the discriminator in {run_dir} was trained for {', '.join(record['classes'])}, not "
                         f"{', '.join(others)}")
    for c, v in scales.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"the scale of {c} must be a number >= 0, got {v!r}")
    spec = DiscriminatorSpec(scales={c: float(v) for c, v in scales.items()},
                             intervals={c: tuple(record["interval"]) for c in scales}, widths=tuple(record["widths"]))
    atomic_save_safetensors(model_dir / WEIGHTS_FILE, load_safetensors(Path(run_dir) / WEIGHTS_FILE))
    cfg[CONFIG_KEY] = dict(spec.to_dict(), info=dict(record, model_sha256=sha))
    atomic_write_json(cfg_path, cfg)
    return spec
