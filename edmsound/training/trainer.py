"""EDM training loop: AdamW, EMA, bf16 autocast, gradient clipping, NaN guard, atomic resumable checkpoints.

Single process by default; several processes (CPU: gloo, GPU: nccl) when launched with ``torchrun``.
Everything random in training (batch indices, sigma, noise, label dropout) comes from one torch.Generator
whose state is checkpointed, so a resumed run continues exactly where the checkpoint left it.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.storage import (atomic_write_json, clean_orphans, latest_checkpoint, load_safetensors, load_weights,
                            read_config, resolve_model_dir, write_model_dir)
from .checkpoints import optimizer_from_flat, optimizer_to_flat, save_training_checkpoint
from ..core.codec import class_whitening_scale, make_codec, whitening_scale
from ..data.folder import load_folder, split_indices
from ..data.weights import clip_keys, file_digest, read_clip_weights
from ..core.edm import edm_loss
from ..core.model import build_denoiser, precision_name
from ..core.presets import EDMConfig, Preset

LOG_FIELDS = ["step", "loss", "val_loss", "lr", "grad_norm", "steps_per_hour", "wall_time"]


class TrainingDiverged(RuntimeError):
    pass


def same_model(a: Preset, b: Preset) -> bool:
    """Same architecture, codec and preconditioning (memory layout, training knobs such as the training noise
    distribution P_mean / P_std, and the sampling defaults sigma_min / sigma_max / rho may differ)."""
    import dataclasses
    knobs = dict(p_mean=0.0, p_std=1.0, sigma_min=1.0, sigma_max=1.0, rho=1.0)
    return (dataclasses.replace(a.net, channels_last=False) == dataclasses.replace(b.net, channels_last=False)
            and a.codec == b.codec and dataclasses.replace(a.edm, **knobs) == dataclasses.replace(b.edm, **knobs))


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return world, rank


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu_model()}, {os.cpu_count()} cores"
    return f"{platform.machine()} {dev}, torch {torch.__version__}"


class Trainer:
    def __init__(self, preset: Preset, data_dir, run_dir, *, steps: int | None = None, resume: bool = False,
                 init=None, seed: int = 0, device: str = "cpu", val_fraction: float = 0.05,
                 progress: bool = True, max_minutes: float | None = None, classes: list[str] | None = None,
                 whiten: bool = False, whiten_class: bool = False, precision: str = "auto",
                 class_weights: dict[str, float] | None = None, clip_weights=None):
        """``precision``: the network's arithmetic, ``auto`` (bf16 autocast as the preset says where the device
        computes bfloat16 in hardware, fp32 where it would be emulated), ``bf16`` or ``fp32``; recorded per stretch
        in ``info.json``. ``whiten``: measure a gain per frequency bin when the run starts (``freq_scale``);
        ``whiten_class``: that and a gain per class and bin on top (``class_scale``). ``class_weights``
        (``{class: w}``, w > 0, 1 for classes not named): a class's clips are drawn w times as often as the others'
        (with replacement), e.g. to spend more of a stretch on the class a model renders worst; recorded per stretch in
        ``info.json`` like the learning rate, so a resumed stretch may change it. ``clip_weights``: a ``clip,weight``
        file (:mod:`edmsound.data.weights`, e.g. from ``edmsound coverage``): each training clip is drawn in proportion
        to its weight (clips the file does not name: 1), times its class's weight; recorded per stretch by the file's
        name and digest, so a resumed stretch may change or drop it."""
        whiten = whiten or whiten_class
        if whiten and preset.codec.representation != "complex":
            raise ValueError(f"--freq-scale whiten applies to the complex representation only "
                             f"(this run: {preset.codec.representation})")
        self.world, self.rank = _dist_info()
        self.is_main = self.rank == 0
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
        self.progress = progress and self.is_main
        self.max_minutes = max_minutes
        self._stop_requested = False

        if self.is_main:
            for p in clean_orphans(self.run_dir):           # left by a checkpoint write that was killed
                print(f"removed {p.name}, left by an interrupted checkpoint write")
        ckpt = latest_checkpoint(self.run_dir) if self.run_dir.is_dir() else None
        if ckpt is not None and not resume:
            raise FileExistsError(f"{self.run_dir} already has a checkpoint ({ckpt.name}); pass --resume to "
                                  "continue it or choose another --out")
        if ckpt is not None:
            stored, stored_classes = read_config(ckpt)
            missing = ("per-class gains" if whiten_class and stored.codec.class_scale is None else
                       "per-bin gains" if whiten and stored.codec.freq_scale is None else None)
            if missing:
                option = "whiten-class" if whiten_class else "whiten"
                raise ValueError(f"{self.run_dir} was started without {missing}; --freq-scale {option} applies "
                                 "only when a run starts")
            # the per-bin (and per-class) gains were measured when the run started and stay with it
            preset = dataclasses.replace(preset, codec=dataclasses.replace(
                preset.codec, freq_scale=stored.codec.freq_scale, class_scale=stored.codec.class_scale))
            if not same_model(stored, preset):
                raise ValueError(f"{self.run_dir} was trained with a different preset ({stored.name}); "
                                 "the network, codec and EDM settings must match to resume")
            classes = stored_classes
        # a run carries no guide model (attach_guide gives an exported model one): its checkpoints and exports name none
        self.preset = preset = preset if preset.guide is None else dataclasses.replace(preset, guide=None)
        self.total_steps = int(steps if steps is not None else preset.train.steps)
        self.codec = make_codec(preset.codec)

        # --- data -------------------------------------------------------------------------------
        data = load_folder(data_dir, preset.codec.sample_rate, preset.codec.num_samples, classes=classes,
                           progress=self.progress, verbose=self.is_main)
        self.classes = data.classes
        tr, va = split_indices(len(data), val_fraction if len(data) >= 20 else 0.0, seed=seed)
        self._all_sources = data.sources
        if whiten and ckpt is None and preset.codec.freq_scale is None:
            gains = whitening_scale(self.codec, torch.from_numpy(data.waves[tr]), preset.edm.sigma_data)
            preset = preset.replace_codec(freq_scale=gains)
            self.preset, self.codec = preset, make_codec(preset.codec)
            if self.is_main:
                print(f"per-bin gains for RMS {preset.edm.sigma_data} in every bin: {min(gains):.2f} … "
                      f"{max(gains):.2f} (bin 0 {gains[0]:.2f}, top bin {gains[-1]:.2f})")
        if whiten_class and ckpt is None and preset.codec.class_scale is None:
            table = class_whitening_scale(self.codec, torch.from_numpy(data.waves[tr]),
                                          torch.from_numpy(data.labels[tr]), len(data.classes),
                                          preset.edm.sigma_data)
            preset = preset.replace_codec(class_scale=table)
            self.preset, self.codec = preset, make_codec(preset.codec)
            if self.is_main:
                flat = [g for row in table for g in row]
                print(f"per-class gains on top: {min(flat):.2f} … {max(flat):.2f} over {len(table)} classes")
        self.train_waves = torch.from_numpy(data.waves[tr])
        self.train_labels = torch.from_numpy(data.labels[tr])
        self.train_sources = [data.sources[i] for i in tr]
        self.class_weights, self.item_weights = self._class_weights(class_weights)
        self.clip_weights = None
        if clip_weights is not None:
            self.clip_weights, per_clip = self._clip_weights(clip_weights, self.train_sources, data_dir)
            self.item_weights = per_clip if self.item_weights is None else self.item_weights * per_clip
        self.val_waves = torch.from_numpy(data.waves[va])
        self.val_labels = torch.from_numpy(data.labels[va])
        self.data_info = {"data_dir": str(data_dir), "counts": data.counts(), "train_clips": len(tr),
                          "val_clips": len(va), "skipped": len(data.skipped),
                          "sources_example": data.sources[:3]}

        # --- model ------------------------------------------------------------------------------
        torch.manual_seed(seed)
        tc = preset.train
        self.denoiser = build_denoiser(preset, len(self.classes), bf16=precision, device=self.device).to(self.device)
        self.ema = build_denoiser(preset, len(self.classes), bf16=precision,
                                  device=self.device).to(self.device).requires_grad_(False).eval()
        self.precision = precision_name(self.denoiser)
        if self.is_main and tc.bf16 and self.precision == "fp32" and precision == "auto":
            print(f"note: {self.device} has no native bfloat16; training in float32 (faster here than emulated "
                  "bf16 autocast)")
        self.ema.net.load_state_dict(self.denoiser.net.state_dict())
        self.raw_net = self.denoiser.net
        self.params = [p for p in self.raw_net.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        self.gen = torch.Generator().manual_seed(seed * 1000 + self.rank)
        self.step = 0
        self.warmup_start = 0               # the learning-rate warm-up counts from here (a warm start's step)
        self.wall_time = 0.0
        self.segments: list[dict] = []     # earlier stretches of this model's training (machine, steps, time)
        self.seed = seed
        self.last_val = float("nan")

        if ckpt is not None:
            self._load_training_checkpoint(ckpt)
        elif init is not None:
            self._init_from(init)

        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.denoiser.net = DDP(self.raw_net)
            if self.rank > 0 and ckpt is not None:   # only rank 0's generator state is stored
                self.gen.manual_seed(seed * 1000 + self.rank + 7919 * self.step)

        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / "config.json",
                              {"preset": preset.to_dict(), "classes": self.classes, "seed": seed,
                               "data": self.data_info})

    def _class_weights(self, weights) -> tuple[dict[str, float], torch.Tensor | None]:
        """The checked ``{class: w}`` (only the classes whose w is not 1, sorted) and each training clip's draw
        weight (None: every clip equally likely, the plain uniform draw)."""
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.classes))
        if unknown:
            raise ValueError(f"class weight for {', '.join(map(repr, unknown))}: not a class of this data; its "
                             f"classes: {', '.join(self.classes)}")
        bad = [c for c, w in weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)]
        if bad:
            raise ValueError(f"class weight for {bad[0]!r} must be a finite number > 0, got {weights[bad[0]]!r}")
        kept = {c: float(weights[c]) for c in sorted(weights) if float(weights[c]) != 1.0}
        if not kept:
            return {}, None
        per_class = torch.tensor([kept.get(c, 1.0) for c in self.classes], dtype=torch.float64)
        return kept, per_class[self.train_labels.long()]

    def _clip_weights(self, path, sources: list[str], data_dir) -> tuple[dict, torch.Tensor]:
        """(the record of a clip-weights file: name, digest, clips named and weighted, the weights' range over the
        training clips; each training clip's draw weight). ValueError for a file naming clips this data lacks."""
        table = read_clip_weights(path)
        keys = clip_keys(sources, data_dir)
        known = set(clip_keys(self._all_sources, data_dir))
        unknown = [k for k in table if k not in known]
        if unknown:
            raise ValueError(f"clip weights {path}: {len(unknown)} of its {len(table)} clips are not in {data_dir} "
                             f"(e.g. {unknown[0]!r}); write the file from this data folder")
        w = torch.tensor([table.get(k, 1.0) for k in keys], dtype=torch.float64)
        named = sum(k in table for k in keys)
        record = {"file": Path(path).name, "sha256": file_digest(path), "clips": named,
                  "min": round(float(w.min()), 4), "max": round(float(w.max()), 4)}
        if self.is_main:
            print(f"clip weights {Path(path).name}: {named} of {len(keys)} training clips weighted, "
                  f"{record['min']:g} … {record['max']:g}")
        return record, w

    def draw(self) -> torch.Tensor:
        """The training clips of the next batch: uniform, or by the class weights (with replacement)."""
        n = self.preset.train.batch_size
        if self.item_weights is None:
            return torch.randint(len(self.train_labels), (n,), generator=self.gen)
        return torch.multinomial(self.item_weights, n, replacement=True, generator=self.gen)

    # --- state ------------------------------------------------------------------------------------
    def _load_training_checkpoint(self, ckpt: Path):
        load_weights(self.raw_net, load_safetensors(ckpt / "model.safetensors"), ckpt / "model.safetensors")
        load_weights(self.ema.net, load_safetensors(ckpt / "ema.safetensors"), ckpt / "ema.safetensors")
        opt_t = load_safetensors(ckpt / "optimizer.safetensors")
        state = json.loads((ckpt / "state.json").read_text())
        optimizer_from_flat(self.opt, opt_t, state["optimizer"])
        self.gen.set_state(load_safetensors(ckpt / "rng.safetensors")["generator"])
        torch.set_rng_state(load_safetensors(ckpt / "rng.safetensors")["torch"])
        self.step = int(state["step"])
        self.warmup_start = int(state.get("warmup_start", 0))
        self.wall_time = float(state["wall_time"])
        self.segments = list(state.get("segments") or (   # checkpoints from before segment tracking
            [{"machine": "unknown", "steps": [0, self.step], "seconds": round(self.wall_time, 1)}]
            if self.step else []))
        if self.is_main:
            print(f"resumed {self.run_dir} at step {self.step}")

    def _init_from(self, init):
        """Warm start from a model directory (weights only: fresh optimizer, step counter kept)."""
        model_dir = resolve_model_dir(init)
        preset, classes = read_config(model_dir)
        # the same network may start on a representation with other per-bin gains (it then adapts to them)
        preset = dataclasses.replace(preset, codec=dataclasses.replace(
            preset.codec, freq_scale=self.preset.codec.freq_scale, class_scale=self.preset.codec.class_scale))
        if not same_model(preset, self.preset) or list(classes) != list(self.classes):
            raise ValueError(f"--init {model_dir}: network or classes differ from this run")
        ema = load_safetensors(model_dir / "ema.safetensors")
        raw_path = model_dir / "model.safetensors"
        raw = load_safetensors(raw_path) if raw_path.is_file() else ema
        load_weights(self.raw_net, raw, raw_path if raw_path.is_file() else model_dir / "ema.safetensors")
        load_weights(self.ema.net, ema, model_dir / "ema.safetensors")
        info_path = model_dir / "info.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            self.step = int(info.get("steps", 0))
            self.warmup_start = self.step       # fresh optimizer: warm the learning rate up again
            self.wall_time = float(info.get("train_seconds", 0.0))
            self.segments = list(info.get("segments") or (
                [{"machine": info.get("machine", "unknown"), "steps": [0, self.step],
                  "seconds": round(self.wall_time, 1)}] if self.step else []))
        if self.is_main:
            print(f"initialised from {model_dir} (step {self.step}); optimizer state starts fresh")

    def save(self):
        if not self.is_main:
            return
        opt_t, opt_meta = optimizer_to_flat(self.opt)
        state = {"step": self.step, "wall_time": self.wall_time, "optimizer": opt_meta,
                 "warmup_start": self.warmup_start,
                 "segments": self.all_segments(),
                 "total_steps": self.total_steps, "val_loss": self.last_val}
        save_training_checkpoint(
            self.run_dir, self.step,
            {"model": self.raw_net.state_dict(), "ema": self.ema.net.state_dict(), "optimizer": opt_t,
             "rng": {"generator": self.gen.get_state(), "torch": torch.get_rng_state()}},
            {"state": state, "config": {"preset": self.preset.to_dict(), "classes": self.classes},
             "info": self.info()})

    def all_segments(self) -> list[dict]:
        """Where and how the training happened: one entry per stretch on one machine with one learning rate, EMA
        half-life, training noise distribution, representation gains and class weights (consecutive runs that share all
        of them are merged), e.g. ``{"machine": ..., "steps": [0, 1966], "seconds": 8732.7, "lr": 0.0002,
        "ema_halflife_steps": 500.0, "p_mean": -3.0, "p_std": 1.0, "per_bin_gains": false, "precision": "bf16"}``
        (older entries lack some knobs; a missing P_mean / P_std was the preset's -3 / 1, a missing per_bin_gains was
        false, a missing per_class_gains false, a missing precision bf16)."""
        segs = [dict(s) for s in self.segments]
        start_step, start_wall = getattr(self, "_run_start", (self.step, self.wall_time))
        if self.step > start_step:
            tc = self.preset.train
            knobs = {"lr": tc.lr, **({"lr_cooldown": [self.total_steps - tc.cooldown_steps, self.total_steps]}
                                     if tc.cooldown_steps else {}),
                     "ema_halflife_steps": tc.ema_halflife_steps,
                     "p_mean": self.preset.edm.p_mean, "p_std": self.preset.edm.p_std,
                     "per_bin_gains": self.preset.codec.freq_scale is not None,
                     "per_class_gains": self.preset.codec.class_scale is not None, "precision": self.precision,
                     **({"class_weights": self.class_weights} if self.class_weights else {}),
                     **({"clip_weights": self.clip_weights} if self.clip_weights else {})}
            cur = {"machine": _machine(), "steps": [start_step, self.step],
                   "seconds": round(self.wall_time - start_wall, 1), **knobs}
            last = segs[-1] if segs else None
            # stretches recorded before the noise knobs were trained with the EDMConfig defaults
            # (and, before per-bin gains existed, without them; before precision was recorded, under bf16 autocast);
            # a stretch without a cooldown (or with every class drawn alike) records none
            legacy = {"p_mean": EDMConfig.p_mean, "p_std": EDMConfig.p_std, "per_bin_gains": False,
                      "per_class_gains": False, "precision": "bf16", "lr_cooldown": None,
                      "class_weights": None, "clip_weights": None}
            if (last and last["machine"] == cur["machine"] and last["steps"][1] == start_step
                    and all(last.get(k, legacy.get(k)) == knobs.get(k, legacy.get(k))
                            for k in knobs.keys() | legacy)):
                segs[-1] = {**cur, "steps": [last["steps"][0], self.step],
                            "seconds": round(last["seconds"] + cur["seconds"], 1)}
            else:
                segs.append(cur)
        return segs

    def info(self) -> dict:
        return {"steps": self.step, "train_seconds": round(self.wall_time, 1), "machine": _machine(),
                "segments": self.all_segments(),
                "batch_size": self.preset.train.batch_size * self.world, "world_size": self.world,
                "data": self.data_info, "seed": self.seed, "val_loss": self.last_val}

    def export(self, out_dir, model_dtype=torch.float16):
        """Write a model directory (EMA weights fp32, raw weights ``model_dtype``) for shipping."""
        write_model_dir(out_dir, self.preset, self.classes, self.ema.net.state_dict(),
                        self.raw_net.state_dict(), self.info(), model_dtype=model_dtype)

    # --- loop ---------------------------------------------------------------------------------------
    def _lr(self) -> float:
        """The learning rate of the next step: a linear warm-up from the stretch's start (a fresh optimizer's
        step), constant, and with ``cooldown_steps`` a linear fall to 0 at ``total_steps`` (warm-up, stable, decay:
        Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"). Both are
        functions of the step, so a resumed run continues the same schedule."""
        tc = self.preset.train
        factor = min(1.0, (self.step - self.warmup_start + 1) / max(1, tc.warmup_steps))
        if tc.cooldown_steps > 0:
            factor = min(factor, max(0.0, (self.total_steps - self.step) / tc.cooldown_steps))
        return tc.lr * factor

    def _ema_beta(self) -> float:
        tc = self.preset.train
        halflife = min(tc.ema_halflife_steps, max(self.step * tc.ema_rampup, 1e-8))
        return 0.5 ** (1.0 / halflife)

    @torch.no_grad()
    def validate(self) -> float:
        """EDM loss of the EMA model on the held-out split, with fixed noise (comparable across steps)."""
        if len(self.val_labels) == 0:
            return float("nan")
        g = torch.Generator().manual_seed(12345)
        total, n = 0.0, 0
        for i in range(0, len(self.val_labels), 32):
            lab = self.val_labels[i:i + 32]
            y = self.codec.to_model(self.codec.encode(self.val_waves[i:i + 32]), lab).to(self.device)
            lab = lab.to(self.device)
            total += float(self.loss(self.ema, y, lab, generator=g).sum())
            n += len(lab)
        return total / n

    def loss(self, model, y: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Per-sample training loss of ``model`` on clean spectrograms ``y`` (the EDM loss)."""
        return edm_loss(model, y, labels, self.preset.edm, generator=generator, kind=self.preset.train.loss)

    def _request_stop(self, signum, frame):
        self._stop_requested = True

    def train_step(self) -> tuple[float, float]:
        tc = self.preset.train
        idx = self.draw()
        labels = self.train_labels[idx]
        y = self.codec.to_model(self.codec.encode(self.train_waves[idx]), labels).to(self.device)
        labels = labels.to(self.device)
        for g in self.opt.param_groups:
            g["lr"] = self._lr()
        loss = self.loss(self.denoiser, y, labels, generator=self.gen).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        loss_v, gn = float(loss.detach()), float(grad_norm)
        if not (math.isfinite(loss_v) and math.isfinite(gn)):
            raise TrainingDiverged(
                f"non-finite {'loss' if not math.isfinite(loss_v) else 'gradient norm'} at step {self.step + 1}; "
                f"stopped without saving. The last good checkpoint is {latest_checkpoint(self.run_dir)}")
        self.opt.step()
        beta = self._ema_beta()
        ema_p = list(self.ema.net.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in self.params], 1.0 - beta)
        self.step += 1
        return loss_v, gn

    def _log_writer(self, name: str = "log.csv", fields=LOG_FIELDS):
        """(file, csv writer) for the run's log ``name``: its rows up to this run's step kept (a resumed run drops
        those newer than its checkpoint), the rest to be written."""
        path = self.run_dir / name
        rows = []
        if path.is_file():   # drop rows newer than the checkpoint we resumed from
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.step]
        f = open(path, "w", newline="")
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
        f.flush()
        return f, w

    def run(self) -> dict:
        tc = self.preset.train
        old_handler = None
        if self.is_main:
            try:
                old_handler = signal.signal(signal.SIGTERM, self._request_stop)
            except ValueError:  # not in the main thread
                pass
        logf, logw = self._log_writer() if self.is_main else (None, None)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="train",
                   dynamic_ncols=True)
        t_start, step_start = time.time(), self.step
        # a stretch starts where this process began training: a time budget's timed steps belong to it
        self._run_start = self.__dict__.pop("_budget_start", None) or (self.step, self.wall_time)
        t_last = time.time()
        smooth = None
        try:
            self.denoiser.train()
            while self.step < self.total_steps:
                loss, gn = self.train_step()
                now = time.time()
                self.wall_time += now - t_last
                t_last = now
                smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
                bar.update(1)
                bar.set_postfix(loss=f"{smooth:.4f}")
                at_ckpt = self.step % tc.checkpoint_every == 0 or self.step == self.total_steps
                out_of_time = (self.max_minutes is not None and now - t_start > 60 * self.max_minutes)
                stop = self._stop_requested or out_of_time
                if at_ckpt or stop:
                    self.last_val = self.validate()
                if self.is_main and (self.step % tc.log_every == 0 or at_ckpt or stop):
                    sph = 3600 * (self.step - step_start) / max(1e-9, now - t_start)
                    logw.writerow({"step": self.step, "loss": f"{loss:.6f}", "lr": f"{self._lr():.3g}",
                                   "grad_norm": f"{gn:.4f}", "steps_per_hour": f"{sph:.0f}",
                                   "wall_time": f"{self.wall_time:.1f}",
                                   "val_loss": "" if not (at_ckpt or stop) else f"{self.last_val:.6f}"})
                    logf.flush()
                if at_ckpt or stop:
                    self.save()
                if stop:
                    if self.is_main:
                        print(f"\nstopping at step {self.step} ({'signal' if self._stop_requested else 'time limit'})"
                              "; resume with --resume")
                    break
        except KeyboardInterrupt:
            self.save()
            raise
        finally:
            bar.close()
            if logf:
                logf.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        return {"step": self.step, "wall_time": self.wall_time, "val_loss": self.last_val,
                "run_dir": str(self.run_dir)}


def read_teacher(teacher) -> tuple[Path, Preset, list[str], dict]:
    """A teacher model directory: (its path, preset, classes, info.json or {})."""
    teacher_dir = resolve_model_dir(teacher)
    preset, classes = read_config(teacher_dir)
    info_path = teacher_dir / "info.json"
    return teacher_dir, preset, list(classes), json.loads(info_path.read_text()) if info_path.is_file() else {}


FIT_PROBE_STEPS = 10        # steps timed before a run with a time budget plans its length


class StudentTrainer(Trainer):
    """A :class:`Trainer` for a few-step student: a fresh run starts from the teacher's weights and counts its own
    steps from 0 (the teacher's steps and time go into ``record``, the student's lineage); ``record`` is written
    to ``RUN/<RECORD>.json`` and into the exported ``info.json`` under ``RECORD``."""

    RECORD = "student"

    def __init__(self, student: Preset, teacher_dir: Path, classes: list[str], record: dict, data_dir, run_dir,
                 continued: bool = False, fit_minutes: float | None = None, **kw):
        """``continued``: ``teacher_dir`` is a student of the same kind whose training goes on (its steps, time
        and segments carry over, and ``record`` already names its lineage). ``fit_minutes``: instead of ``steps``,
        time the first steps and run as many as fit in this many minutes (a new run only; the plan is printed and
        recorded, for ``--resume --steps``)."""
        if fit_minutes is not None:
            if not (isinstance(fit_minutes, (int, float)) and math.isfinite(fit_minutes) and fit_minutes > 0):
                raise ValueError(f"the time budget must be a number of minutes > 0, got {fit_minutes!r}")
            if kw.get("max_minutes") is not None:
                raise ValueError("a time budget sets its own time limit: give the budget (--fit-minutes) or a time "
                                 "limit (--max-minutes), not both")
            if kw.get("resume"):
                raise ValueError("a time budget plans a new run; a resumed run keeps its own steps: pass --steps with "
                                 "the number it printed when it started")
            kw["steps"] = 10 ** 9            # a placeholder until the step rate is known
        self.fit_minutes = fit_minutes
        # the teacher's own learning-rate cooldown (if it had one) belonged to its run, not to this one
        student = student.replace_train(cooldown_steps=0)
        fresh = not (Path(run_dir).is_dir() and latest_checkpoint(Path(run_dir)) is not None)
        super().__init__(student, data_dir, run_dir, init=teacher_dir if fresh else None, classes=classes, **kw)
        self.record = record
        if fresh and not continued:
            record["teacher_steps"] = self.step
            record["teacher_train_seconds"] = round(self.wall_time, 1)
            self.step = self.warmup_start = 0
            self.wall_time = 0.0
            self.segments = []
        self.plan_from = self.step           # where a time budget's plan starts
        if self.is_main:
            atomic_write_json(self.run_dir / f"{self.RECORD}.json", record)
        # a frozen teacher's targets for the held-out clips are the same at every check (validation draws fixed
        # noise): computed at the first one and kept, batch by batch in the order validation asks for them
        self._val_targets: list | None = None
        self._val_batch: int | None = None

    def info(self) -> dict:
        return dict(super().info(), **{self.RECORD: self.record})

    def run(self) -> dict:
        if self.fit_minutes is not None and self.step == self.plan_from:
            self._budget_start = (self.step, self.wall_time)
            self.fit_to_budget()
        return super().run()

    def steps_option(self, total: int) -> int:
        """What ``--steps`` must say for a run to end at step ``total`` (the student commands count from 0)."""
        return total

    def plan_note(self) -> str:
        """What the plan of a time budget means for this kind of student (printed with it)."""
        return f"steps {self.plan_from} to {self.total_steps}"

    def fit_to_budget(self, probe: int = FIT_PROBE_STEPS) -> None:
        """Time up to ``probe`` steps (after one warm-up step, and within a tenth of the budget), then set the run's
        length to the steps that fit in the rest of ``fit_minutes`` at 95 % of the measured rate, and stop there at
        the latest: a short run ends where its schedule ends (the consistency stages, the learning rate)."""
        budget = 60 * self.fit_minutes
        start = time.time()
        self.train_step()                    # the first step pays for warm-up: not timed for the rate
        timed_from, n = time.time(), 0
        while n < probe and time.time() - start < 0.1 * budget:
            self.train_step()
            n += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.time()
        self.wall_time += now - start
        rate = n / max(now - timed_from, 1e-9) if n else 1 / max(timed_from - start, 1e-9)
        left = max(budget - (now - start), 0.0)
        self.total_steps = self.step + max(1, int(0.95 * rate * left))
        self.max_minutes = left / 60
        self.record["fit_minutes"] = self.fit_minutes
        self.record["planned_steps"] = self.total_steps
        if self.is_main:
            atomic_write_json(self.run_dir / f"{self.RECORD}.json", self.record)
            print(f"{rate:.3g} steps/s over the first {n + 1} steps: {self.plan_note()} (after a stop, continue with "
                  f"--resume --steps {self.steps_option(self.total_steps)})")

    def validate(self) -> float:
        first = self._val_targets is None
        if first:
            self._val_targets = []
        self._val_batch = 0
        try:
            return super().validate()
        except BaseException:
            if first:                       # a check cut short keeps nothing
                self._val_targets = None
            raise
        finally:
            self._val_batch = None

    def teacher_targets(self, compute):
        """``compute()`` (a frozen teacher's targets for the batch at hand) in training; in validation, the k-th
        batch's result from the first check, computed then."""
        if self._val_batch is None:
            return compute()
        k, self._val_batch = self._val_batch, self._val_batch + 1
        if k == len(self._val_targets):
            self._val_targets.append(compute())
        return self._val_targets[k]


def init_distributed(device: str):
    world, rank = _dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world, rank


def train(preset: Preset, data_dir, run_dir, **kw) -> dict:
    """Train (or resume) a run; see ``Trainer`` for the options."""
    init_distributed(kw.get("device", "cpu"))
    trainer = Trainer(preset, data_dir, run_dir, **kw)
    try:
        return trainer.run()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
