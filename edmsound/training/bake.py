"""Baking a consistency-tuned model's per-class guidance into its weights: the model learns to give, in one
evaluation, what its guided self gave in two (conditional and unconditional), so the guided classes sample as fast
as the others.

A frozen copy of the model is the teacher. For a training clip ``y``, unit noise ``n`` and a level t,
x = y + t n and

    target = D_u + w_c (D_c - D_u)      where the class c is guided (w_c != 1) and t is in its interval (lo, hi]
    target = D_c                         everywhere else (the model's own output: an anchor, so nothing else moves)
    loss   = mean((D_student(x, t, c) - target)^2) / sigma_data^2

with D_c, D_u the frozen model's conditional and unconditional outputs. A model that guides with a guide model
(autoguidance: ``guide.safetensors``) has the guide's conditional output in place of D_u, as it samples; the baked
model needs the guide no longer and is exported without it. A share of the levels (``share``) is drawn
log-uniformly over the guided levels (lo, hi] within the model's range — where the guided first jump of a few-step
sample starts — and the rest from the model's tuning distribution over its whole range. Labels are dropped at the
training rate (anchored to the frozen unconditional output), so guidance stays possible after baking.

The baked model ships with guidance 1 in every class and keeps its consistency record (with ``baked_guidance``
added; a model baked before keeps its earlier bakes in ``earlier_bakes``): it samples, is evaluated and can be tuned
or baked further like any consistency-tuned model.
"""
from __future__ import annotations

import math

import torch

from ..core.guidance import guided_combination, interval_list
from ..core.model import load_denoiser, load_guide
from .consistency import continuation, lognormal_levels, noisy_draws, stored_round, tuned_range
from .trainer import StudentTrainer, read_teacher

DEFAULT_SHARE = 0.5
DEFAULT_LR = 5e-5
DEFAULT_EMA_HALFLIFE = 250.0


def guided_region(scales: dict[str, float], intervals: dict[str, tuple[float, float] | None],
                  t_range: tuple[float, float]) -> tuple[float, float] | None:
    """The noise levels (lo, hi] where any guided class is guided, within ``t_range``; None where a guided class
    is guided at every level (then the tuning distribution already covers it)."""
    guided = [c for c, w in scales.items() if w != 1.0]
    if any(intervals.get(c) is None for c in guided):
        return None
    lo = max(min(intervals[c][0] for c in guided), t_range[0])
    hi = min(max(intervals[c][1] for c in guided), t_range[1])
    if not lo < hi:
        raise ValueError(f"the guidance intervals ({lo:g}, {hi:g}] lie outside the model's noise range "
                         f"[{t_range[0]:g}, {t_range[1]:g}]: nothing to bake")
    return lo, hi


def guidance_tables(scales: dict, intervals: dict, classes: list[str], n: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per label (``n`` of them, the null class included): the guidance scale and the levels lo < sigma <= hi it
    applies at; 1 and every level for the classes not in ``scales``."""
    scale, lo, hi = torch.ones(n), torch.zeros(n), torch.full((n,), math.inf)
    for c, w in scales.items():
        i = classes.index(c)
        scale[i] = w
        if intervals.get(c) is not None:
            lo[i], hi[i] = intervals[c]
    return scale, lo, hi


def baked_targets(teacher, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                  lo: torch.Tensor, hi: torch.Tensor, reference=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, guided mask): the frozen ``teacher``'s guided output D_u + w (D_c - D_u) where a sample's scale
    ``scale`` != 1 and lo < t <= hi (per sample), its plain output for its label elsewhere. ``reference``: a guide
    model whose conditional output replaces D_u (autoguidance)."""
    with torch.no_grad():
        target = teacher(x, t, labels)
        g = (scale != 1.0) & (t > lo) & (t <= hi) & (labels != teacher.null_class)
        if bool(g.any()):
            un = (teacher(x[g], t[g], torch.full_like(labels[g], teacher.null_class)) if reference is None
                  else reference(x[g], t[g], labels[g]))
            target[g] = guided_combination(target[g], un, scale[g])
    return target, g


class GuidanceBaker(StudentTrainer):
    """:class:`Trainer` that bakes a consistency-tuned model's per-class guidance into its weights (resumable,
    checkpointed, logged and exported like the tuning). ``steps`` counts the baking steps, added to the model's own
    count."""

    RECORD = "consistency"

    def __init__(self, teacher, data_dir, run_dir, *, steps: int = 1500, share: float = DEFAULT_SHARE,
                 resume: bool = False, seed: int = 0, device: str = "cpu", progress: bool = True,
                 max_minutes: float | None = None, batch_size: int | None = None, lr: float | None = None,
                 checkpoint_every: int | None = None, ema_halflife: float | None = None, precision: str = "auto",
                 fit_minutes: float | None = None):
        teacher_dir, tpreset, classes, tinfo = read_teacher(teacher)
        before = tinfo.get("consistency")
        if before is None or tpreset.student_sampler != "consistency":
            raise ValueError(f"{teacher_dir} is not a consistency-tuned model; guidance is baked into one "
                             "(`edmsound consistency-tune` makes it)")
        scales = {c: float(tpreset.guidance_for(c)) for c in classes}
        intervals = {c: tpreset.guidance_interval_for(c) for c in classes}
        weights_sha, stored = stored_round(teacher_dir, run_dir, resume, "baked_guidance", self.RECORD)
        if stored is not None:              # a resumed run bakes what it started with, from the same frozen weights
            scales = {c: float(stored["scales"].get(c, 1.0)) for c in classes}
            intervals = {c: None if stored["intervals"].get(c) is None else tuple(stored["intervals"][c])
                         for c in classes}
        guided = {c: w for c, w in scales.items() if w != 1.0}
        if not guided:
            raise ValueError(f"{teacher_dir} has no guidance to bake: every class samples at guidance 1")
        if not (isinstance(share, (int, float)) and 0.0 <= share <= 1.0):
            raise ValueError(f"share must be between 0 and 1, got {share!r}")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        self.t_range = tuned_range(teacher_dir, before, tpreset)
        self.region = guided_region(scales, intervals, self.t_range)
        start = int(tinfo.get("steps", 0)) if stored is None else int(stored["from_step"])
        student, record = continuation(teacher_dir, tpreset, before, start, batch_size=batch_size,
                                       lr=DEFAULT_LR if lr is None else lr, checkpoint_every=checkpoint_every,
                                       ema_halflife=DEFAULT_EMA_HALFLIFE if ema_halflife is None else ema_halflife)
        record["baked_guidance"] = {"scales": guided, "intervals": {c: interval_list(intervals[c]) for c in guided},
                                    "levels": interval_list(self.region), "share": float(share),
                                    "from_model": teacher_dir.name, "from_step": start, "teacher_sha256": weights_sha,
                                    "reference": "guide" if tpreset.guide is not None else "null"}
        if tpreset.guide is not None:
            record["baked_guidance"]["guide"] = tpreset.guide
        if before.get("baked_guidance") is not None:      # a model baked before: its earlier bakes stay on record
            record["earlier_bakes"] = list(before.get("earlier_bakes", [])) + [before["baked_guidance"]]
        self.share = float(share)
        super().__init__(student, teacher_dir, classes, record, data_dir, run_dir, steps=start + int(steps),
                         resume=resume, seed=seed, device=device, progress=progress, max_minutes=max_minutes,
                         continued=True, precision=precision, fit_minutes=fit_minutes)
        self.teacher, _, _, _ = load_denoiser(teacher_dir, self.device, "ema", bf16=precision)
        self.teacher.requires_grad_(False).eval()
        self.reference = load_guide(teacher_dir, tpreset, len(classes), self.device, bf16=precision)
        self.scale_of, self.lo_of, self.hi_of = guidance_tables(guided, intervals, self.classes,
                                                                self.teacher.null_class + 1)

    def draw_levels(self, n: int, generator) -> torch.Tensor:
        """``n`` levels: a ``share`` log-uniform over the guided region, the rest from the tuning distribution."""
        t = lognormal_levels(n, self.preset.edm, self.t_range, generator)
        if self.region is not None and self.share > 0:
            lo, hi = (math.log(v) for v in self.region)
            region = (lo + (hi - lo) * torch.rand(n, generator=generator)).exp()
            t = torch.where(torch.rand(n, generator=generator) < self.share, region, t)
        return t

    def steps_option(self, total: int) -> int:
        return total - self.record["baked_guidance"]["from_step"]     # --steps counts the baking steps

    def loss(self, model, y, labels, generator):
        e = self.preset.edm
        t, noise, labels = noisy_draws(self.draw_levels, e, y, labels, model.null_class, generator)
        x = y + t.reshape((-1,) + (1,) * (y.dim() - 1)) * noise
        lab = labels.cpu()
        scale, lo, hi = (v[lab].to(y.device) for v in (self.scale_of, self.lo_of, self.hi_of))
        target = self.teacher_targets(lambda: baked_targets(self.teacher, x, t, labels, scale, lo, hi,
                                                                       reference=self.reference)[0])
        d = model(x, t, labels) - target.to(y.dtype)
        return d.flatten(1).pow(2).mean(dim=1) / e.sigma_data ** 2
