"""A round of tuning on a consistency-tuned model that stays anchored to where it started: the shared frame of
:mod:`.spectrum_match` and :mod:`.teacher_match`.

The round continues the model's own run record (its lineage extended, its step count going on), records its own
settings under one key of that record (with the starting weights' sha256, so a resumed run is refused if they
changed), and keeps a frozen copy of the starting model. Its anchor term holds the model to that copy over the
whole noise range it was tuned on, on training clips:

    anchor = mean((D(x, t, c) - D_frozen(x, t, c))^2) / sigma_data^2,   x = y + t n,  ln t ~ the model's tuning draw

so a round moves the model only as far as its own term asks. Validation reports the anchor alone (the distance to
the starting model on held-out clips).
"""
from __future__ import annotations

import torch

from ..core.model import load_denoiser
from ..core.schedules import karras_sigmas
from .consistency import continuation, lognormal_levels, noisy_draws, stored_round, tuned_range
from .trainer import StudentTrainer, read_teacher

__all__ = ["AnchoredRound"]


class AnchoredRound(StudentTrainer):
    """:class:`Trainer` for one anchored round on a consistency-tuned model (resumable, checkpointed, logged and
    exported like the tuning). ``steps`` counts the round's steps, added to the model's own count; ``settings``
    (the round's own, JSON-able) are recorded under ``KEY``. Subclasses add their term in :meth:`round_loss`."""

    RECORD = "consistency"
    KEY = "round"
    WHAT = "this round"

    def __init__(self, model, data_dir, run_dir, settings: dict, *, steps: int, lr: float, ema_halflife: float,
                 resume: bool = False, seed: int = 0, device: str = "cpu", progress: bool = True,
                 max_minutes: float | None = None, batch_size: int | None = None, checkpoint_every: int | None = None,
                 precision: str = "auto", fit_minutes: float | None = None):
        model_dir, mpreset, classes, minfo = read_teacher(model)
        before = minfo.get("consistency")
        if before is None or mpreset.student_sampler != "consistency":
            raise ValueError(f"{model_dir} is not a consistency-tuned model; {self.WHAT} tunes one "
                             "(`edmsound consistency-tune` makes it)")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        weights_sha, stored = stored_round(model_dir, run_dir, resume, self.KEY, self.RECORD)
        e = mpreset.edm
        self.model_dir = model_dir
        self.model_record = before
        self.t_range = tuned_range(model_dir, before, mpreset)
        self.sigmas = [float(s) for s in karras_sigmas(int(mpreset.default_nfe), e.sigma_min, e.sigma_max, e.rho)]
        start = int(minfo.get("steps", 0)) if stored is None else int(stored["from_step"])
        student, record = continuation(model_dir, mpreset, before, start, batch_size=batch_size, lr=lr,
                                       checkpoint_every=checkpoint_every, ema_halflife=ema_halflife)
        record[self.KEY] = dict(settings, sigmas=self.sigmas, from_model=model_dir.name, from_step=start, teacher_sha256=weights_sha)
        if before.get(self.KEY) is not None:            # a round of this kind before: it stays on record
            earlier = f"earlier_{self.KEY}"
            record[earlier] = list(before.get(earlier, [])) + [before[self.KEY]]
        super().__init__(student, model_dir, classes, record, data_dir, run_dir, steps=start + int(steps),
                         resume=resume, seed=seed, device=device, progress=progress, max_minutes=max_minutes,
                         continued=True, precision=precision, fit_minutes=fit_minutes)
        self.frozen, _, _, _ = load_denoiser(model_dir, self.device, "ema", bf16=precision)
        self.frozen.requires_grad_(False).eval()

    def steps_option(self, total: int) -> int:
        return total - self.record[self.KEY]["from_step"]          # --steps counts the round's steps

    def anchor(self, model, y, labels, generator) -> torch.Tensor:
        """Per-sample distance to the frozen starting model on noised training clips ``y``."""
        e = self.preset.edm
        t, noise, labels = noisy_draws(lambda n, g: lognormal_levels(n, e, self.t_range, g), e, y, labels,
                                       model.null_class, generator)
        x = y + t.reshape((-1,) + (1,) * (y.dim() - 1)) * noise

        def frozen():
            with torch.no_grad():
                return self.frozen(x, t, labels)
        d = model(x, t, labels) - self.teacher_targets(frozen).to(y.dtype)
        return d.flatten(1).pow(2).mean(dim=1) / e.sigma_data ** 2

    def round_loss(self, model, generator) -> torch.Tensor:
        """The round's own term (a scalar, weighted), added to the anchor in training steps."""
        raise NotImplementedError

    def loss(self, model, y, labels, generator):
        per_sample = self.anchor(model, y, labels, generator)
        if not torch.is_grad_enabled():              # validation: the distance to the starting model only
            return per_sample
        return per_sample + self.round_loss(model, generator)
