"""Teacher matching: a few-step model's first jump learns where its teacher's sampler lands from the same noise —
knowledge distillation of the sampler's whole path (Luhman & Luhman 2021, "Knowledge Distillation in Iterative
Generative Models for Improved Sampling Speed"), with the teacher exactly as it ships: its sampler, step count and
per-class guidance, the guide model included.

A consistency-tuned model is tuned on training clips alone; it never sees its teacher's samples, and where the
teacher's quality comes from how it is sampled (its per-class guidance — in the embedded default, the engines
guided away from a weaker model) the tuned model does not inherit it. This round shows it the teacher's samples.

**Pairs.** For noise seeds s (a range of their own, apart from the evaluation's and the calibration's), the teacher
samples its class from x = sigma_max n(s), n(s) the seeded unit noise every pipeline draws for seed s; its final
state (the class's diffusion state, before any output EQ) is stored once, in ``RUN/pairs/<class>.safetensors``,
written as it goes so an interrupted run resumes where it stopped, and tied to the teacher's weights and settings.

**Loss.** The model's jump from the same noise should land there:

    loss = anchor + weight · mean((D(sigma_max n(s), sigma_max, c) - x_teacher(s))^2) / sigma_data^2

with the anchor of :mod:`.spectrum_match` (a frozen copy of the starting model as the target over the model's whole
noise range, on training clips) keeping everything else — the later jumps — where it was. Validation reports the
anchor alone; ``teacher.csv`` in the run logs the teacher term on the training pairs.

This changes the network, not its output; the model samples as before (the same sampler, steps and schedule,
guidance 1 in every class).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.storage import atomic_save_safetensors, load_safetensors, read_config
from .anchored import AnchoredRound
from .trainer import read_teacher

__all__ = ["TeacherMatcher", "pair_seed", "pair_noise", "teacher_pairs", "PAIR_SEED", "DEFAULT_PER_CLASS"]

PAIR_SEED = 50                # noise seeds 50_000_000 + class * 100_000 + i; evaluation uses 0, calibration 1
RESERVED_SEEDS = (0, 1)
DEFAULT_PER_CLASS = 320
DEFAULT_WEIGHT = 1.0
DEFAULT_LR = 2e-5
DEFAULT_EMA_HALFLIFE = 100.0
TEACHER_LOG_FIELDS = ["step", "teacher_mse"]


def pair_seed(seed: int, class_index: int, i: int) -> int:
    """The noise seed of pair ``i`` of class ``class_index`` (the evaluation's own layout, at base ``seed``)."""
    return int(seed) * 1_000_000 + int(class_index) * 100_000 + int(i)


def pair_noise(seeds, shape) -> torch.Tensor:
    """Unit noise (B, *shape) for ``seeds``: the same draw a pipeline makes for each seed (float64, then float32)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)),
                                    dtype=torch.float64) for s in seeds]).float()


def _settings(pipe, class_name: str) -> dict:
    p = pipe.preset
    interval = pipe.resolve_guidance_interval("default", class_name)
    return {"sampler": p.default_sampler, "nfe": int(p.default_nfe), "guidance": float(p.guidance_for(class_name)),
            "interval": None if interval is None else [float(v) for v in interval],
            "reference": pipe.resolve_reference(None)}


def teacher_pairs(teacher, out_dir, per_class: int = DEFAULT_PER_CLASS, *, seed: int = PAIR_SEED, batch: int = 16,
                  precision: str = "auto", device: str = "cpu", progress: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(targets (N, C, F, T) in each class's diffusion state, labels (N,), seeds (N,), the teacher's settings per
    class): the teacher's samples at its shipped settings from the noise of ``per_class`` seeds per class. Kept in ``out_dir/<class>.safetensors`` and
    read back when the teacher, its settings and the seeds are the same (more pairs per class are added to them);
    other stored pairs are refused rather than mixed in."""
    from ..core.pipeline import EDMSoundPipeline       # the pipeline samples; training imports stay light

    if int(seed) in RESERVED_SEEDS:
        raise ValueError(f"pair seed base {seed} is the evaluation's or the calibration's; use another (default "
                         f"{PAIR_SEED})")
    if not (isinstance(per_class, int) and 1 <= per_class <= 100_000):
        raise ValueError(f"pairs per class must be a whole number in [1, 100000], got {per_class!r}")
    pipe = EDMSoundPipeline(teacher, device=device, bf16=precision)
    if pipe.preset.student_sampler is not None:
        raise ValueError(f"{pipe.model_dir} is a few-step model; the teacher is the diffusion model it came from")
    sha = hashlib.sha256((pipe.model_dir / "ema.safetensors").read_bytes()).hexdigest()
    guide = pipe.model_dir / "guide.safetensors"
    guide_sha = hashlib.sha256(guide.read_bytes()).hexdigest() if guide.is_file() else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets, labels, seeds, settings = [], [], [], {}
    total = per_class * len(pipe.classes)
    with tqdm(total=total, desc="teacher pairs", unit="clip", disable=not progress) as bar:
        for ci, name in enumerate(pipe.classes):
            meta = dict(_settings(pipe, name), teacher_sha256=sha, guide_sha256=guide_sha, seed=int(seed),
                        precision=pipe.precision)
            path = out_dir / f"{name}.safetensors"
            have = torch.zeros((0, *pipe.codec.shape))
            if path.is_file():
                stored = load_safetensors(path)
                info = json.loads(_read_meta(path).get("pairs", "{}"))
                if info != meta:
                    raise ValueError(f"{path} holds pairs of another teacher or other settings; remove it, or use "
                                     f"another run folder")
                have = stored["target"][:per_class]
            bar.update(len(have))
            while len(have) < per_class:
                ids = list(range(len(have), min(per_class, len(have) + batch)))
                s = [pair_seed(seed, ci, i) for i in ids]
                spec, _, _ = pipe.sample_specs(name, s, meta["sampler"], meta["nfe"], meta["guidance"],
                                               guidance_interval=meta["interval"], reference=meta["reference"])
                if not bool(torch.isfinite(spec).all()):
                    raise ValueError(f"the teacher gave non-finite values for {name} (seeds {s[0]}..{s[-1]})")
                have = torch.cat([have, pipe.codec.to_model(spec, ci).float()])
                atomic_save_safetensors(path, {"target": have.contiguous()},
                                        metadata={"pairs": json.dumps(meta, sort_keys=True)})
                bar.update(len(ids))
            targets.append(have)
            settings[name] = meta
            labels.append(torch.full((per_class,), ci, dtype=torch.long))
            seeds.append(torch.tensor([pair_seed(seed, ci, i) for i in range(per_class)], dtype=torch.long))
    return torch.cat(targets), torch.cat(labels), torch.cat(seeds), settings


def _read_meta(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def diffusion_teacher(model_dir: Path, record: dict, teacher=None) -> Path:
    """The diffusion model a consistency-tuned model's samples are matched to: ``teacher`` if given, else the one it
    was tuned from (its record's first name), beside it."""
    if teacher is not None:
        return read_teacher(teacher)[0]
    origin = Path(model_dir).parent / record["teacher"]
    if not (origin / "config.json").is_file():
        raise ValueError(f"{model_dir} was tuned from {record['teacher']!r}, which is not beside it; name the "
                         "diffusion model to match (--diffusion-model)")
    return origin


class TeacherMatcher(AnchoredRound):
    """:class:`Trainer` that tunes a consistency-tuned model's first jump towards its diffusion teacher's samples
    from the same noise (resumable, checkpointed, logged and exported like the tuning). ``steps`` counts the
    matching steps, added to the model's own count. The pairs are made first (``RUN/pairs``), or read back."""

    KEY = "matched_teacher"
    WHAT = "teacher matching"

    def __init__(self, model, data_dir, run_dir, *, diffusion_model=None, steps: int = 600,
                 weight: float = DEFAULT_WEIGHT, per_class: int = DEFAULT_PER_CLASS, pair_seed: int = PAIR_SEED,
                 pairs_per_step: int | None = None, lr: float | None = None, ema_halflife: float | None = None,
                 **kw):
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"the weight must be a number > 0, got {weight!r}")
        if int(steps) != steps or steps < 1:           # before the pairs are made
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        if pairs_per_step is not None and not (isinstance(pairs_per_step, int) and pairs_per_step >= 1):
            raise ValueError(f"pairs per step must be a whole number >= 1, got {pairs_per_step!r}")
        model_dir, mpreset, classes, minfo = read_teacher(model)
        record = minfo.get("consistency")
        if record is None or mpreset.student_sampler != "consistency":
            raise ValueError(f"{model_dir} is not a consistency-tuned model; {self.WHAT} tunes one "
                             "(`edmsound consistency-tune` makes it)")
        tdir = diffusion_teacher(model_dir, record, diffusion_model)
        tpreset, tclasses = read_config(tdir)
        if list(tclasses) != list(classes) or tpreset.codec != mpreset.codec:
            raise ValueError(f"{tdir} is not {model_dir}'s kind of model (other classes or another representation); "
                             "match a model to the diffusion model it was tuned from")
        if float(tpreset.edm.sigma_max) != float(mpreset.edm.sigma_max):
            raise ValueError(f"{tdir} starts sampling at sigma {tpreset.edm.sigma_max:g} and {model_dir} at "
                             f"{mpreset.edm.sigma_max:g}; the two must start from the same noise level")
        precision, device = kw.get("precision", "auto"), kw.get("device", "cpu")
        self.pair_targets, self.pair_labels, self.pair_seeds, tsettings = teacher_pairs(
            tdir, Path(run_dir) / "pairs", per_class, seed=pair_seed, precision=precision, device=device,
            progress=kw.get("progress", True))
        self.weight = float(weight)
        self.pairs_per_step = pairs_per_step
        settings = {"weight": self.weight, "per_class": int(per_class), "pair_seed": int(pair_seed),
                    "pairs_per_step": pairs_per_step, "teacher": tdir.name, "teacher_settings": tsettings}
        super().__init__(model, data_dir, run_dir, settings, steps=steps, lr=DEFAULT_LR if lr is None else lr,
                         ema_halflife=DEFAULT_EMA_HALFLIFE if ema_halflife is None else ema_halflife, **kw)
        if self.pairs_per_step is None:
            self.pairs_per_step = int(self.preset.train.batch_size)
        self._teacher_log = None

    def teacher_term(self, model, idx: torch.Tensor) -> torch.Tensor:
        """Per-pair distance of the model's first jump from the pairs' noise to the teacher's samples."""
        e = self.preset.edm
        x = pair_noise(self.pair_seeds[idx].tolist(), self.codec.shape).to(self.device) * float(e.sigma_max)
        t = torch.full((len(idx),), float(e.sigma_max), device=self.device)
        d = model(x, t, self.pair_labels[idx].to(self.device)).float() - self.pair_targets[idx].to(self.device)
        return d.flatten(1).pow(2).mean(dim=1) / e.sigma_data ** 2

    def round_loss(self, model, generator) -> torch.Tensor:
        idx = torch.randint(len(self.pair_seeds), (self.pairs_per_step,), generator=generator)
        term = self.teacher_term(model, idx).mean()
        self._log_teacher(float(term.detach()))
        return self.weight * term

    def _log_teacher(self, value: float):
        if not self.is_main or (self.step + 1) % self.preset.train.log_every:
            return
        if self._teacher_log is None:
            self._teacher_log, self._teacher_writer = self._log_writer("teacher.csv", TEACHER_LOG_FIELDS)
        self._teacher_writer.writerow({"step": self.step + 1, "teacher_mse": f"{value:.5f}"})
        self._teacher_log.flush()
