"""Easy consistency tuning (ECT; Geng et al., ICLR 2025, "Consistency Models Made Easy"): a diffusion model is tuned
into a consistency model, one that maps a noisy clip at any level straight to its clean end point, so it samples in
one to a few evaluations (:func:`edmsound.core.samplers.sample_consistency`).

No teacher runs during tuning: the model is its own target. For a training clip ``y``, one unit noise ``n`` and two
levels r < t on the same trajectory,

    x_t = y + t n,   x_r = y + r n
    loss = w(t, r) d(D(x_t, t), sg[D(x_r, r)])        (sg: no gradient; the target is y itself where r = 0)

with w(t, r) = 1 / (t - r) and d the pseudo-Huber distance sqrt(mean(delta^2) + c^2) - c. The gap between the levels
shrinks in stages (ECT's schedule): r = t (1 - n(t) / q^ceil(i / d)), n(t) = 1 + k sigmoid(-b t'), clamped at 0.
Stage 0 (r = 0 everywhere) is plain denoising — the diffusion model's own training, so tuning starts where the
model is; each later stage halves (q = 2) the gap, until the model is self-consistent along short stretches of the
trajectory. ECT's constants assume data of std 0.5; here t' = t * 0.5 / sigma_data and c scales the same way, so
they mean the same thing on spectrograms of std sigma_data. Noise levels t are drawn from the model's own training
distribution (log-normal with its P_mean and P_std, or others given for the tuning) over its whole range
[sigma_min, sigma_max] — below the lowest level the sampler re-noises to as well, so the model stays anchored to the
clean clip at the bottom of the trajectory. A larger P_mean spends more of the tuning on the high levels a jump from
pure noise starts at.

Spectral envelope (optional, ``envelope_weight`` > 0): the pseudo-Huber distance on the complex spectrogram is
minimised by averaging where a clip's phase is uncertain, and averaging complex values cancels energy — a jump can
come out duller than the clips, most in quiet high bands. Audio codecs and vocoders answer this with a
spectral-magnitude loss beside the waveform one; here one is added at the low levels the last jump of multistep
sampling starts from (t <= ``envelope_max_sigma``):

    loss += w_env * mean over bins and time chunks of (P(D(x_t, t)) - P(y))^2 / sigma_data^4

with P the power of the (compressed, per-bin scaled) spectrogram averaged over chunks of ``ENVELOPE_CHUNK`` frames.
It compares magnitudes only, so it asks for the clip's energy per bin and moment without asking for a phase the
noisy input cannot tell. It is a squared difference of powers, not of their logarithms: under uncertainty its
minimiser is the expected power, while a log distance is minimised by the geometric mean, quieter than the expected
power. Off by default: in short trials on the shipped few-step model neither form closed its dull top bands; both
left its clips about 1 dB quieter, as did (slightly more) the same tuning without the term (the model card has the
figures).

Classifier-free guidance: the tuned model learns the conditional model (labels still dropped at the training rate,
so guidance stays possible at sampling); the shipped default's guidance is 1 in every class, so this is the model
users hear. To bake a guided teacher into a student use progressive distillation (:mod:`.distill`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch

from ..core.storage import read_config
from .export import guided_classes, with_sampling_defaults
from .trainer import StudentTrainer, read_teacher

ECT_Q = 2.0          # the gap halves every stage
ECT_K = 8.0          # n(t) = 1 + k sigmoid(-b t'): wider gaps at low noise
ECT_B = 1.0
DEFAULT_SIGMA_MID = 0.3      # the lowest level multistep sampling re-noises to, about 1.5 sigma_data
HUBER_C = 0.00054    # pseudo-Huber constant per element for data of std 0.5 (iCT's 0.00054 sqrt(d) on the norm)
ENVELOPE_CHUNK = 16  # frames per time chunk of the envelope term (16 hops of 128 samples: 128 ms at 16 kHz)
DEFAULT_ENVELOPE_MAX_SIGMA = 1.0


def ect_gap_ratio(t: torch.Tensor, stage: int, sigma_data: float, q: float = ECT_Q, k: float = ECT_K,
                  b: float = ECT_B) -> torch.Tensor:
    """(t - r) / t for levels ``t`` at ``stage`` (0: r = 0, plain denoising), in [0, 1]."""
    t_unit = t * (0.5 / sigma_data)
    n = 1.0 + k * torch.sigmoid(-b * t_unit)
    return (n / q ** int(stage)).clamp(max=1.0)


def ect_levels(t: torch.Tensor, stage: int, sigma_data: float) -> torch.Tensor:
    """The inner level r for each outer level ``t`` (0 where the gap covers the whole trajectory)."""
    return t * (1.0 - ect_gap_ratio(t, stage, sigma_data))


def pseudo_huber(delta: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample sqrt(mean(delta^2) + c^2) - c: like L2 for large errors' direction, like L1 for their size."""
    return (delta.flatten(1).pow(2).mean(dim=1) + c * c).sqrt() - c


def ect_loss(model, y: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, r: torch.Tensor, noise: torch.Tensor,
             sigma_data: float, envelope: tuple[float, float] | None = None) -> torch.Tensor:
    """Per-sample ECT loss of ``model`` (called as ``model(x, sigma, labels)``) for levels r < t (r may be 0);
    ``envelope`` = (weight, highest level) adds the spectral-envelope term against ``y`` where t <= that level."""
    b = (-1,) + (1,) * (y.dim() - 1)
    x_t = y + t.reshape(b) * noise
    with torch.no_grad():
        pos = r > 0
        r_eval = torch.where(pos, r, t)                  # any level where the target is y itself
        target = model(y + r_eval.reshape(b) * noise, r_eval, labels)
        target = torch.where(pos.reshape(b), target.to(y.dtype), y)
    f_t = model(x_t, t, labels)
    c = HUBER_C * sigma_data / 0.5
    loss = pseudo_huber(f_t - target, c) / (t - r)
    if envelope is not None:
        weight, max_sigma = envelope
        low = (t <= max_sigma).to(loss.dtype)
        loss = loss + weight * low * envelope_distance(f_t, y, sigma_data)
    return loss


def chunk_power(x: torch.Tensor, chunk: int = ENVELOPE_CHUNK) -> torch.Tensor:
    """Power per frequency bin of complex spectrograms ``x`` (batch, 2, bins, frames), averaged over chunks of
    ``chunk`` frames (a last partial chunk is averaged over what it has): (batch, bins, chunks)."""
    p = x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).sum(dim=1)      # at least float32 under autocast
    frames = p.shape[-1]
    pad = -frames % chunk
    if pad:
        p = torch.nn.functional.pad(p, (0, pad))
    sums = p.reshape(*p.shape[:-1], -1, chunk).sum(dim=-1)
    counts = torch.full((sums.shape[-1],), float(chunk), device=p.device, dtype=p.dtype)
    if pad:
        counts[-1] = chunk - pad
    return sums / counts


def envelope_distance(x: torch.Tensor, y: torch.Tensor, sigma_data: float, chunk: int = ENVELOPE_CHUNK) -> torch.Tensor:
    """Per-sample mean squared difference of the chunked power of ``x`` and ``y`` in units of sigma_data^4: 0 for
    equal magnitudes, whatever the phases."""
    d = (chunk_power(x, chunk) - chunk_power(y, chunk)) / sigma_data ** 2
    return d.pow(2).flatten(1).mean(dim=1)


def lognormal_levels(n: int, edm, t_range: tuple[float, float], generator) -> torch.Tensor:
    """``n`` levels with ln(sigma) ~ N(edm.p_mean, edm.p_std^2), clamped to ``t_range``."""
    return (torch.randn(n, generator=generator) * edm.p_std + edm.p_mean).exp().clamp(*t_range)


def noisy_draws(draw_levels, edm, y: torch.Tensor, labels: torch.Tensor, null_class: int, generator):
    """One batch's random draws, in this order: levels ``draw_levels(n, generator)``, unit noise like ``y``, and the
    labels dropped to ``null_class`` at the label-dropout rate; levels and noise on ``y``'s device and dtype."""
    bsz = y.shape[0]
    t = draw_levels(bsz, generator)
    noise = torch.randn(y.shape, generator=generator)
    if edm.label_dropout > 0:
        drop = torch.rand(bsz, generator=generator) < edm.label_dropout
        labels = torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)
    return t.to(device=y.device, dtype=y.dtype), noise.to(device=y.device, dtype=y.dtype), labels


class ConsistencyTuner(StudentTrainer):
    """:class:`Trainer` whose loss is easy consistency tuning of a model directory (resumable, checkpointed, logged
    and exported the same way). The exported model samples with ``consistency`` at 1 to ``max_nfe`` evaluations
    on a Karras schedule from the model's sigma_max down to ``sigma_mid`` (the lowest level it re-noises to)."""

    RECORD = "consistency"

    def __init__(self, teacher, data_dir, run_dir, *, max_nfe: int = 4, stages: int = 8, sigma_mid: float | None = None,
                 steps: int | None = None, resume: bool = False, seed: int = 0, device: str = "cpu",
                 progress: bool = True, max_minutes: float | None = None, batch_size: int | None = None,
                 lr: float | None = None, checkpoint_every: int | None = None, p_mean: float | None = None,
                 p_std: float | None = None, envelope_weight: float = 0.0,
                 envelope_max_sigma: float = DEFAULT_ENVELOPE_MAX_SIGMA, precision: str = "auto",
                 fit_minutes: float | None = None, ema_halflife: float | None = None, clip_weights=None,
                 class_weights: dict[str, float] | None = None):
        """``fit_minutes``: instead of ``steps``, time the first steps and lay the stages over the steps that fit in
        this many minutes of tuning (a new run only; the number is printed and recorded, for ``--resume --steps``).
        ``ema_halflife``: the student's EMA half-life in steps (default: the teacher's own). ``clip_weights``: a
        ``clip,weight`` file to draw the training clips by, ``class_weights`` ``{class: w}`` to draw a class's clips w times
        as often (both as :class:`edmsound.training.trainer.Trainer`)."""
        if not (math.isfinite(envelope_weight) and envelope_weight >= 0):
            raise ValueError(f"the envelope weight must be a finite number >= 0, got {envelope_weight!r}")
        if not (math.isfinite(envelope_max_sigma) and envelope_max_sigma > 0):
            raise ValueError(f"the envelope's highest level must be a finite number > 0, got {envelope_max_sigma!r}")
        if ema_halflife is not None and not (math.isfinite(ema_halflife) and ema_halflife > 0):
            raise ValueError(f"the EMA half-life must be a finite number of steps > 0, got {ema_halflife!r}")
        teacher_dir, tpreset, classes, tinfo = read_teacher(teacher)
        if "distillation" in tinfo:
            raise ValueError(f"{teacher_dir} is a distilled few-step student; tune a diffusion model or continue a "
                             "consistency-tuned one")
        before = tinfo.get("consistency")          # a consistency-tuned model: tuning continues where it stopped
        M = int(max_nfe)
        if M < 1 or M != max_nfe:
            raise ValueError(f"the largest budget must be a whole number >= 1, got {max_nfe!r}")
        S = int(stages)
        if S < 1 or S != stages:
            raise ValueError(f"stages must be a whole number >= 1, got {stages!r}")
        if before is not None:
            start_stage = int(before.get("final_stage", before["stages"]))
            if S < start_stage:
                raise ValueError(f"{teacher_dir} stopped in stage {start_stage}; continuing it needs --stages >= "
                                 f"{start_stage}, got {S}")
            if sigma_mid is None:
                sigma_mid = float(before["sigma_mid"])
            # the tuning levels span the original diffusion model's range (the tuned model's sigma_min is only
            # its sampler's re-noise floor)
            t_range = tuned_range(teacher_dir, before, tpreset)
        else:
            start_stage = 0
            sigma_mid = DEFAULT_SIGMA_MID if sigma_mid is None else sigma_mid
            t_range = (float(tpreset.edm.sigma_min), float(tpreset.edm.sigma_max))
        if not (math.isfinite(sigma_mid) and t_range[0] <= sigma_mid < t_range[1]):
            raise ValueError(f"sigma_mid must be in [{t_range[0]:g}, {t_range[1]:g}), got {sigma_mid!r}")
        # a new student plays the conditional model (no per-class guidance of its teacher's); a tuned model tuned
        # further keeps the guidance calibrated for it
        student = with_sampling_defaults(tpreset, "consistency", min(2, M), guidance=1.0, guidance_interval="none",
                                         sigma_min=float(sigma_mid), clear_class_guidance=before is None)
        student = dataclasses.replace(student.replace_train(batch_size=batch_size, lr=lr,
                                                            checkpoint_every=checkpoint_every,
                                                            ema_halflife_steps=ema_halflife
                                                            ).replace_noise(p_mean=p_mean, p_std=p_std),
                                      student_nfe=M, student_sampler="consistency")
        self.stages = S
        self.envelope_weight = float(envelope_weight)
        self.envelope_max_sigma = float(envelope_max_sigma)
        # the tuning levels span the teacher's whole range: the student's own sigma_min is only the lowest level
        # its sampler re-noises to, and clamping there would pile every lower draw onto that one level
        self.t_range = t_range
        self.consistency = {"method": "ECT", "teacher": teacher_dir.name, "max_nfe": M, "stages": S,
                            "sigma_mid": float(sigma_mid), "q": ECT_Q, "k": ECT_K, "b": ECT_B,
                            "t_min": t_range[0], "lineage": [teacher_dir.name]}
        if before is not None:
            self.consistency.update(
                teacher=before["teacher"], lineage=list(before.get("lineage", [before["teacher"]])) + [teacher_dir.name],
                continued_from={"model": teacher_dir.name, "steps": int(tinfo.get("steps", 0)), "stage": start_stage},
                **{k: before[k] for k in ("teacher_steps", "teacher_train_seconds", "envelope") if k in before})
            # the guidance kept was set with the tuned model's guide model, which a run does not carry: the record
            # names it, so an export without it says so (export.missing_guide_note)
            guided = guided_classes(student, classes)
            set_with = ({"guide": tpreset.guide, "scales": guided} if tpreset.guide is not None
                        else before.get("guidance_guide"))
            if set_with and guided:
                self.consistency["guidance_guide"] = set_with
        if self.envelope_weight > 0:
            envelope = {"weight": self.envelope_weight, "max_sigma": self.envelope_max_sigma, "chunk": ENVELOPE_CHUNK,
                        "from_step": int(tinfo.get("steps", 0)) if before is not None else 0}
            self.consistency["envelope"] = envelope
        run_record = Path(run_dir) / f"{self.RECORD}.json"
        if resume and run_record.is_file():     # a resumed run keeps the start it was given, whatever the source is now
            stored = json.loads(run_record.read_text()).get("continued_from")
            if stored is not None:
                self.consistency["continued_from"] = stored
        start = self.consistency.get("continued_from")
        self.start_stage = int(start["stage"]) if start else 0
        self.start_step = int(start["steps"]) if start else 0
        total = int(steps if steps is not None else student.train.steps)     # what the trainer will run to
        if start is not None and total <= self.start_step and fit_minutes is None:     # refused before the data loads
            raise ValueError(f"--steps counts from the tuned model's start: {teacher_dir} has {self.start_step} "
                             f"steps, so --steps must exceed that, got {total}")
        super().__init__(student, teacher_dir, classes, self.consistency, data_dir, run_dir, steps=steps,
                         resume=resume, seed=seed, device=device, progress=progress, max_minutes=max_minutes,
                         continued=start is not None, precision=precision, fit_minutes=fit_minutes,
                         clip_weights=clip_weights, class_weights=class_weights)
        set_with = self.consistency.get("guidance_guide")
        if self.is_main and set_with:
            guided = ", ".join(f"{c} {w:g}" for c, w in set_with["scales"].items())
            print(f"the guidance kept ({guided}) was set with {teacher_dir.name}'s guide model ({set_with['guide']}), "
                  "which a run does not carry: after export, attach it again (edmsound attach-guide)")

    def stage(self, step: int | None = None) -> int:
        """The stage of ``step`` (default: the current one): ceil(step / (steps / stages)), at most ``stages``;
        a continued model's stages run from the one it stopped in, over the steps from its own count."""
        step = self.step if step is None else step
        if self.start_stage >= self.stages:
            return self.stages
        per = max(1, (self.total_steps - self.start_step) // (self.stages - self.start_stage))
        return min(self.stages, self.start_stage + -(-(int(step) - self.start_step) // per))

    def draw_levels(self, n: int, generator) -> torch.Tensor:
        """``n`` outer levels t from the tuning's noise distribution (the teacher's unless replaced) over the teacher's
        whole noise range."""
        return lognormal_levels(n, self.preset.edm, self.t_range, generator)

    def loss(self, model, y, labels, generator):
        e = self.preset.edm
        t, noise, labels = noisy_draws(self.draw_levels, e, y, labels, model.null_class, generator)
        r = ect_levels(t, self.stage(), e.sigma_data)
        envelope = (self.envelope_weight, self.envelope_max_sigma) if self.envelope_weight > 0 else None
        return ect_loss(model, y, labels, t, r, noise, e.sigma_data, envelope=envelope)

    def info(self) -> dict:
        self.consistency["final_stage"] = self.stage()
        return super().info()

    def plan_note(self) -> str:
        return f"the {self.stages} stages are laid over steps {self.plan_from} to {self.total_steps}"


def stored_round(model_dir: Path, run_dir, resume: bool, key: str, record_name: str = "consistency"
                 ) -> tuple[str, dict | None]:
    """(sha256 of ``model_dir``'s EMA weights, the round ``key`` a resumed run recorded in
    ``RUN/<record_name>.json`` or None for a new run). A run that goes on from a frozen copy of a model must resume
    from the same weights: ValueError if they changed since (the round records them as ``teacher_sha256``)."""
    sha = hashlib.sha256((model_dir / "ema.safetensors").read_bytes()).hexdigest()
    path = Path(run_dir) / f"{record_name}.json"
    stored = json.loads(path.read_text()).get(key) if resume and path.is_file() else None
    if stored is not None and stored["teacher_sha256"] != sha:
        raise ValueError(f"{model_dir} is not the model this run started from (its weights changed since); "
                         "resume with that model, or start a new run")
    return sha, stored


def continuation(model_dir: Path, preset, before: dict, start: int, *, batch_size, lr: float, checkpoint_every,
                 ema_halflife: float):
    """(preset, record) of a run that goes on training the consistency-tuned model in ``model_dir`` (its consistency
    record ``before``) from its step ``start``: the preset samples at guidance 1 in every class and trains with the
    settings given; the record is the model's own, its lineage extended with this model and where it went on from."""
    student = with_sampling_defaults(preset, guidance=1.0, guidance_interval="none", clear_class_guidance=True)
    student = student.replace_train(batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every,
                                    ema_halflife_steps=ema_halflife)
    record = dict(before)
    record.update(lineage=list(before.get("lineage", [before["teacher"]])) + [model_dir.name],
                  continued_from={"model": model_dir.name, "steps": start,
                                  "stage": int(before.get("final_stage", before["stages"]))})
    return student, record


def tuned_range(model_dir: Path, record: dict, preset) -> tuple[float, float]:
    """The noise range a consistency-tuned model was tuned over: as recorded, or (models that predate the record)
    its diffusion model's sampling range, read from that model beside it (the lineage's first name)."""
    if "t_min" in record:
        return float(record["t_min"]), float(preset.edm.sigma_max)
    origin = Path(model_dir).parent / record["teacher"]
    if not (origin / "config.json").is_file():
        raise ValueError(f"{model_dir} does not record the noise range it was tuned over, and its diffusion model "
                         f"{record['teacher']!r} is not beside it; put it there or tune that model instead")
    opreset, _ = read_config(origin)
    return float(opreset.edm.sigma_min), float(preset.edm.sigma_max)
