"""Spectrum matching: a few-step model is tuned so that its own samples — drawn as it is sampled, with its sampler,
step count and schedule — have each class's spectral envelope and level of the training clips.

A consistency-tuned model can lose part of a class's envelope in its jumps (a top octave, the low mids) while the
shape of each sound is right: an error in the class's mean, the same in every clip, that a loss on single clips
does not see (it is the mean over the clips the noisy input leaves possible that comes out dull). This tuning looks
at that mean directly. Every step draws ``per_class`` samples of every class from fresh noise, as the sampler does
(all jumps but the last without gradient), and measures per class, from the last jump's output,

    P_cb   the mean power over the class's samples in band b (12 log-spaced bands, 50 Hz to Nyquist: the bands of the
           spectral-envelope measure of :mod:`edmsound.evaluation.fidelity`), from the uncompressed STFT power
    L_c    the mean of the samples' levels (dB of their total power)

against the same figures for the class's training clips (measured once, at the start). The batch figures are noisy
(a few clips per class), so the error is read from a running mean of them (``momentum``), and the gradient from the
batch:

    loss_spectrum = mean_cb  e_cb · 10 log10 P_cb  +  mean_c  e'_c · L_c
    e_cb = 10 log10 P̄_cb − target_cb,   e'_c = L̄_c − target_c       (P̄, L̄ the running means; e, e' held constant)

whose gradient is that of half the squared dB errors, with the running means' error in place of the batch's. The
band term compares mean powers and the level term means of decibels, as the fidelity measures do (the two differ
where a class's clips spread in level).

How that gradient reaches each clip (``push``):

    'clip'   10 log10 P_cb is replaced in the loss by the class mean of each clip's own 10 log10 (p_icb + f_cb), the
             floor f_cb 30 dB under the band power of the class's training clips (fixed at the start): every clip of
             a class is pushed by the same number of dB in a band, so the spread between its clips is left alone
             (the default);
    'mean'   the exact gradient of the class mean: each clip in proportion to its share of the band's power, so
             the clips that carry the most are moved most. A few clips a step then pull a class towards one shape
             (a loss of diversity seen in the first runs).
    'rank'   the class's spread is matched, not only its mean: in every band (and in level) the class's ``per_class``
             clips are sorted by their dB (above the same floor) and the i-th is pushed towards the mean of the
             i-th smallest of ``per_class`` training clips drawn at random (:func:`order_statistic_means`), the
             error read from a running mean per rank. A class whose clips all share a band too strongly is
             corrected in the clips that carry it; one with too many loud and too many faint clips is narrowed,
             one too narrow widened. At rest the expected rank errors are zero exactly when the band's dB is
             distributed as in the training clips (the 1-D optimal transport between the two, per band).

An anchor keeps everything else where it was: a frozen copy of the starting model is the target at noise levels
drawn from the model's tuning distribution over its whole range, on training clips,

    loss = mean((D(x, t, c) - D_frozen(x, t, c))^2) / sigma_data^2  +  weight · loss_spectrum

so the tuning moves the model only as far as the class spectra ask. Validation reports the anchor term alone (the
distance to the starting model on held-out clips); ``spectrum.csv`` in the run logs the running dB errors.

With ``guided`` the samples are drawn with the model's own per-class guidance (its scales, intervals and guide
model or null class), as a guided model is sampled, so the spectra matched are those of its guided clips; the
exported model records that guidance (``matched_spectrum`` → ``guided``) but carries no guide model: it is given
the same guidance back with ``attach_guide`` and ``write_class_guidance`` (``edmsound attach-guide`` /
``set-guidance``).

This changes the network, not its output: nothing is rescaled after sampling, and the model samples as before
(the same sampler, steps and schedule; guidance 1 in every class unless given its guidance back).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..core.guidance import guided_combination, interval_list
from ..core.model import load_denoiser, load_guide
from ..core.samplers import sample_consistency
from ..core.schedules import karras_sigmas
from .bake import guidance_tables
from .consistency import continuation, lognormal_levels, noisy_draws, stored_round, tuned_range
from .trainer import StudentTrainer, read_teacher

__all__ = ["SpectrumMatcher", "band_matrix", "spectrum_stats", "class_targets", "DEFAULT_WEIGHT", "DEFAULT_PER_CLASS",
           "PUSHES", "order_statistic_means"]

PUSHES = ("clip", "mean", "rank")
SPECTRUM_LOG_FIELDS = ["step", "band_rms_db", "band_max_db", "band_max_class", "level_max_db", "level_max_class"]
DEFAULT_WEIGHT = 0.01
DEFAULT_PER_CLASS = 4
DEFAULT_MOMENTUM = 0.9
DEFAULT_PUSH = "clip"
CLIP_FLOOR_DB = 30.0
DEFAULT_LR = 3e-5
DEFAULT_EMA_HALFLIFE = 100.0
N_BANDS = 12
F_LO = 50.0


def band_matrix(n_fft: int, sample_rate: int, n_bands: int = N_BANDS, f_lo: float = F_LO) -> torch.Tensor:
    """(n_bands, n_fft // 2 + 1) matrix: the share of each STFT bin's power that falls in each of ``n_bands``
    log-spaced bands from ``f_lo`` to Nyquist — the overlap of the bin's width (its frequency ± half the bin
    spacing) with the band, over that width — so bands narrower than a bin still get their share (an STFT of 254
    points has bins 63 Hz apart; the lowest bands are 26 and 40 Hz wide)."""
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    df = sample_rate / n_fft
    edges = np.geomspace(f_lo, sample_rate / 2, n_bands + 1)
    lo = np.maximum(freqs - df / 2, 0.0)
    hi = np.minimum(freqs + df / 2, sample_rate / 2)
    m = np.clip(np.minimum(hi[None], edges[1:, None]) - np.maximum(lo[None], edges[:-1, None]), 0.0, None) / df
    return torch.tensor(m, dtype=torch.float32)


def spectrum_stats(codec, spec: torch.Tensor, bands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(band power (B, n_bands), level dB (B,)) of encoded spectrograms ``spec`` (B, 2, F, T) — the codec's
    compressed, per-bin scaled representation, not a class's diffusion state: the power of the uncompressed STFT
    summed over frames and the bins of each band, and 10 log10 of the power over all bins. Differentiable; in float32.
    Both are in the STFT's own units: compare them with the same figures of other encoded clips."""
    c = codec.config
    s = spec.float()
    sq = s[:, 0] ** 2 + s[:, 1] ** 2                                # |Y|^2 of the compressed, scaled STFT
    if c.freq_scale is not None:
        g = torch.tensor(c.freq_scale, dtype=torch.float32, device=s.device)[:, None]
        sq = sq / g ** 2
    power = (sq / c.alpha ** 2) ** (1.0 / c.beta)                   # |X|^2 = (|Y| / alpha)^(2 / beta)
    per_bin = power.sum(dim=-1)                                     # (B, F)
    band = per_bin @ bands.to(per_bin.device).T
    level = 10 * torch.log10(per_bin.sum(dim=-1).clamp_min(1e-20))
    return band, level


@torch.no_grad()
def clip_stats(codec, waves: torch.Tensor, bands: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(band power (N, n_bands), level dB (N,)) of every clip of ``waves``, in float64 (:func:`spectrum_stats`)."""
    band, level = [], []
    for i in range(0, len(waves), batch):
        b, lv = spectrum_stats(codec, codec.encode(waves[i:i + batch]), bands)
        band.append(b.double())
        level.append(lv.double())
    return torch.cat(band), torch.cat(level)


def class_means(band: torch.Tensor, level: torch.Tensor, labels: torch.Tensor, num_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(10 log10 of each class's mean band power (C, n_bands), each class's mean level dB (C,)) from the clips'
    figures (:func:`clip_stats`)."""
    lab = labels.long()
    counts = torch.bincount(lab, minlength=num_classes).double()
    if bool((counts == 0).any()):
        missing = [int(k) for k in torch.nonzero(counts == 0).flatten()]
        raise ValueError(f"no training clips of class {missing}: every class needs clips to match against")
    sums = torch.zeros(num_classes, band.shape[1], dtype=torch.float64).index_add_(0, lab, band.double())
    levels = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, lab, level.double())
    return (10 * torch.log10(sums / counts[:, None])).float(), (levels / counts).float()


def class_targets(codec, waves: torch.Tensor, labels: torch.Tensor, num_classes: int, bands: torch.Tensor,
                  batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(10 log10 of each class's mean band power (C, n_bands), each class's mean level dB (C,)) over ``waves``."""
    return class_means(*clip_stats(codec, waves, bands, batch), labels, num_classes)


def order_statistic_means(values: torch.Tensor, k: int) -> torch.Tensor:
    """(k, ...) the expected i-th smallest of ``k`` draws (with replacement) from the empirical distribution of
    ``values`` (n, ...), each trailing position on its own: with the values sorted, v_(j) weighs the probability
    that the i-th smallest of k uniforms falls in ((j - 1) / n, j / n], from P(U_(i:k) <= u) = sum_{m >= i} C(k, m)
    u^m (1 - u)^(k - m). In float64; k = 1 gives the mean, and the k means average to the mean."""
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a whole number >= 1, got {k!r}")
    v = torch.sort(values.double(), dim=0).values
    n = v.shape[0]
    if n == 0:
        raise ValueError("order statistics of an empty set")
    u = torch.arange(n + 1, dtype=torch.float64) / n                       # the n + 1 cut points
    cdf = torch.stack([sum(math.comb(k, m) * u ** m * (1 - u) ** (k - m) for m in range(i, k + 1))
                       for i in range(1, k + 1)])                          # (k, n + 1): P(U_(i:k) <= u)
    w = cdf[:, 1:] - cdf[:, :-1]                                           # (k, n)
    return torch.tensordot(w, v, dims=([1], [0]))


def rank_targets(band: torch.Tensor, level: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 floor: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the expected sorted dB of ``k`` random training clips, from the clips' figures (:func:`clip_stats`):
    (C, k, n_bands) for the band dB above ``floor`` (C, n_bands, linear power) and (C, k) for the level."""
    labels = labels.long()
    out_b = torch.zeros(num_classes, k, band.shape[1], dtype=torch.float64)
    out_l = torch.zeros(num_classes, k, dtype=torch.float64)
    for c in range(num_classes):
        sel = labels == c
        out_b[c] = order_statistic_means(10 * torch.log10(band[sel].double() + floor[c].double()), k)
        out_l[c] = order_statistic_means(level[sel], k)
    return out_b.float(), out_l.float()


def _running(prev: torch.Tensor | None, new: torch.Tensor, momentum: float) -> torch.Tensor:
    """A running mean: ``new`` at the first step, then ``momentum`` of the previous value and the rest of ``new``."""
    return new if prev is None else momentum * prev + (1 - momentum) * new


class SpectrumMatcher(StudentTrainer):
    """:class:`Trainer` that tunes a consistency-tuned model's class spectra and levels towards its training
    clips' (resumable, checkpointed, logged and exported like the tuning). ``steps`` counts the matching steps,
    added to the model's own count."""

    RECORD = "consistency"

    def __init__(self, model, data_dir, run_dir, *, steps: int = 600, weight: float = DEFAULT_WEIGHT,
                 per_class: int = DEFAULT_PER_CLASS, momentum: float = DEFAULT_MOMENTUM, push: str = DEFAULT_PUSH,
                 guided: bool = False, resume: bool = False,
                 seed: int = 0, device: str = "cpu", progress: bool = True, max_minutes: float | None = None,
                 batch_size: int | None = None, lr: float | None = None, checkpoint_every: int | None = None,
                 ema_halflife: float | None = None, precision: str = "auto", fit_minutes: float | None = None):
        model_dir, mpreset, classes, minfo = read_teacher(model)
        before = minfo.get("consistency")
        if before is None or mpreset.student_sampler != "consistency":
            raise ValueError(f"{model_dir} is not a consistency-tuned model; spectrum matching tunes one "
                             "(`edmsound consistency-tune` makes it)")
        for name, value, ok, allowed in (("weight", weight, lambda v: v > 0, "> 0"),
                                         ("momentum", momentum, lambda v: 0 <= v < 1, "in [0, 1)")):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
                raise ValueError(f"the {name} must be a number {allowed}, got {value!r}")
        if not (isinstance(per_class, int) and per_class >= 1):
            raise ValueError(f"samples per class must be a whole number >= 1, got {per_class!r}")
        if push not in PUSHES:
            raise ValueError(f"unknown push {push!r}: one of {', '.join(PUSHES)}")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        weights_sha, stored = stored_round(model_dir, run_dir, resume, "matched_spectrum", self.RECORD)
        e = mpreset.edm
        self.t_range = tuned_range(model_dir, before, mpreset)
        self.sigmas = [float(s) for s in karras_sigmas(int(mpreset.default_nfe), e.sigma_min, e.sigma_max, e.rho)]
        start = int(minfo.get("steps", 0)) if stored is None else int(stored["from_step"])
        student, record = continuation(model_dir, mpreset, before, start, batch_size=batch_size,
                                       lr=DEFAULT_LR if lr is None else lr, checkpoint_every=checkpoint_every,
                                       ema_halflife=DEFAULT_EMA_HALFLIFE if ema_halflife is None else ema_halflife)
        scales = {c: float(mpreset.guidance_for(c)) for c in classes if mpreset.guidance_for(c) != 1.0}
        intervals = {c: mpreset.guidance_interval_for(c) for c in scales}
        if stored is not None:                       # a resumed run goes on as it started
            push, guided = stored.get("push", "mean"), stored.get("guided") is not None
            if guided:
                scales = dict(stored["guided"]["scales"])
                intervals = {c: None if v is None else tuple(v) for c, v in stored["guided"]["intervals"].items()}
        if guided and not scales:
            raise ValueError(f"{model_dir} has no guidance to sample with: every class samples at guidance 1")
        record["matched_spectrum"] = {"weight": float(weight), "per_class": int(per_class), "momentum": float(momentum),
                                      "push": push,
                                      "sigmas": self.sigmas, "bands": N_BANDS, "f_lo_hz": F_LO,
                                      "from_model": model_dir.name, "from_step": start, "teacher_sha256": weights_sha}
        if guided:
            record["matched_spectrum"]["guided"] = {
                "scales": scales, "intervals": {c: interval_list(intervals[c]) for c in scales},
                "reference": "guide" if mpreset.guide is not None else "null"}
            if mpreset.guide is not None:
                record["matched_spectrum"]["guided"]["guide"] = mpreset.guide
        if before.get("matched_spectrum") is not None:    # matched before: the earlier rounds stay on record
            record["earlier_matches"] = list(before.get("earlier_matches", [])) + [before["matched_spectrum"]]
        self.weight, self.per_class, self.momentum, self.push = float(weight), int(per_class), float(momentum), push
        super().__init__(student, model_dir, classes, record, data_dir, run_dir, steps=start + int(steps),
                         resume=resume, seed=seed, device=device, progress=progress, max_minutes=max_minutes,
                         continued=True, precision=precision, fit_minutes=fit_minutes)
        self.frozen, _, _, _ = load_denoiser(model_dir, self.device, "ema", bf16=precision)
        self.frozen.requires_grad_(False).eval()
        self.scale_of = self.lo_of = self.hi_of = self.guide = None
        if guided:
            self.scale_of, self.lo_of, self.hi_of = guidance_tables(scales, intervals, self.classes,
                                                                    self.frozen.null_class + 1)
            self.guide = load_guide(model_dir, mpreset, len(self.classes), self.device, bf16=precision)
        cfg = self.codec.config
        self.bands = band_matrix(cfg.n_fft, cfg.sample_rate).to(self.device)
        clip_band, clip_level = clip_stats(self.codec, self.train_waves, self.bands.cpu())   # once, for both targets
        self.target_band, self.target_level = (
            v.to(self.device) for v in class_means(clip_band, clip_level, self.train_labels, len(self.classes)))
        self.run_band: torch.Tensor | None = None         # running class means (linear band power, level dB)
        self.run_level: torch.Tensor | None = None
        # each band's clip floor: 30 dB under the class's band power in the training clips (the 'rank' push)
        self.floor = 10 ** ((self.target_band - CLIP_FLOOR_DB) / 10)
        self.rank_band = self.rank_level = self.run_rank_band = self.run_rank_level = None
        if push == "rank":
            self.rank_band, self.rank_level = (
                v.to(self.device) for v in rank_targets(clip_band, clip_level, self.train_labels, len(self.classes),
                                                        self.floor.cpu(), self.per_class))
        self._spectrum_log = None

    def steps_option(self, total: int) -> int:
        return total - self.record["matched_spectrum"]["from_step"]     # --steps counts the matching steps

    def sample_last_jump(self, model, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` samples of every class drawn as the model samples (consistency sampling on its own
        schedule, guidance 1): (the last jump's output with gradient, as encoded spectrograms; their labels)."""
        labels = torch.arange(len(self.classes)).repeat_interleave(self.per_class).to(self.device)
        shape = (len(labels),) + tuple(self.codec.shape)
        sig = list(self.sigmas)
        x = torch.randn(shape, generator=generator).to(self.device) * sig[0]
        if len(sig) > 2:      # every jump but the last: the consistency sampler itself (no gradient), then re-noised
            den = sample_consistency(lambda z, s: self._jump(model, z, float(s[0]), labels), x,
                                     sig[:-2] + [0.0], generator=generator)
            x = den + sig[-2] * torch.randn(shape, generator=generator).to(self.device)
        den = self._jump(model, x, sig[-2], labels)
        return self.codec.from_model(den, labels), labels

    def _jump(self, model, x, sigma: float, labels) -> torch.Tensor:
        """One jump at level ``sigma``: the model's estimate, guided where sampling guides it (``guided``)."""
        t = torch.full((len(labels),), sigma, device=self.device)
        den = model(x, t, labels).float()
        if self.scale_of is None:
            return den
        scale, lo, hi = (v.to(self.device)[labels] for v in (self.scale_of, self.lo_of, self.hi_of))
        g = (scale != 1.0) & (t > lo) & (t <= hi)
        if not bool(g.any()):
            return den
        if self.guide is not None:                   # autoguidance: the frozen guide's conditional estimate
            with torch.no_grad():
                ref = self.guide(x[g], t[g], labels[g]).float()
        else:
            ref = model(x[g], t[g], torch.full_like(labels[g], model.null_class)).float()
        den = den.clone()
        den[g] = guided_combination(den[g], ref, scale[g].reshape((-1,) + (1,) * (den.dim() - 1)))
        return den

    def spectrum_loss(self, model, generator) -> torch.Tensor:
        spec, labels = self.sample_last_jump(model, generator)
        band, level = spectrum_stats(self.codec, spec, self.bands)
        C, k = len(self.classes), self.per_class
        band_c = band.reshape(C, k, -1).mean(dim=1)                # the batch's class means
        level_c = level.reshape(C, k).mean(dim=1)
        self.run_band = _running(self.run_band, band_c.detach(), self.momentum)
        self.run_level = _running(self.run_level, level_c.detach(), self.momentum)
        e_band = 10 * torch.log10(self.run_band.clamp_min(1e-20)) - self.target_band
        e_level = self.run_level - self.target_level
        self._last_errors = (e_band.detach().cpu(), e_level.detach().cpu())
        if self.push == "rank":        # each clip against the training clips' figure at its rank in its class
            return self._rank_loss(band.reshape(C, k, -1), level.reshape(C, k))
        if self.push == "clip":        # each clip's own dB, above the floor the rank push uses too
            band_db = (10 * torch.log10(band.reshape(C, k, -1) + self.floor[:, None])).mean(dim=1)
        else:
            band_db = 10 * torch.log10(band_c.clamp_min(1e-20))
        return (e_band * band_db).mean() + (e_level * level_c).mean()

    def _rank_loss(self, band: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """The 'rank' push: (C, k, n_bands) band power and (C, k) level dB of the batch's clips, by class."""
        band_db = torch.sort(10 * torch.log10(band + self.floor[:, None]), dim=1).values
        level_db = torch.sort(level, dim=1).values
        err_b, err_l = band_db.detach() - self.rank_band, level_db.detach() - self.rank_level
        self.run_rank_band = _running(self.run_rank_band, err_b, self.momentum)
        self.run_rank_level = _running(self.run_rank_level, err_l, self.momentum)
        return (self.run_rank_band * band_db).mean() + (self.run_rank_level * level_db).mean()

    def loss(self, model, y, labels, generator):
        e = self.preset.edm
        t, noise, labels = noisy_draws(lambda n, g: lognormal_levels(n, e, self.t_range, g), e, y, labels,
                                       model.null_class, generator)
        x = y + t.reshape((-1,) + (1,) * (y.dim() - 1)) * noise

        def anchor():
            with torch.no_grad():
                return self.frozen(x, t, labels)
        d = model(x, t, labels) - self.teacher_targets(anchor).to(y.dtype)
        per_sample = d.flatten(1).pow(2).mean(dim=1) / e.sigma_data ** 2
        if not torch.is_grad_enabled():              # validation: the distance to the starting model only
            return per_sample
        total = per_sample + self.weight * self.spectrum_loss(model, generator)
        self._log_spectrum()
        return total

    def _log_spectrum(self):
        """Every ``log_every`` steps, the running errors (dB) to ``spectrum.csv``: the RMS and the largest band
        error over every class and band, and the largest level error, with the class it is in."""
        if not self.is_main or (self.step + 1) % self.preset.train.log_every:
            return
        e_band, e_level = self._last_errors
        if self._spectrum_log is None:             # a fresh file, or the rows up to this run's checkpoint
            self._spectrum_log, self._spectrum_writer = self._log_writer("spectrum.csv", SPECTRUM_LOG_FIELDS)
        bi = int(e_band.abs().max(dim=1).values.argmax())
        li = int(e_level.abs().argmax())
        self._spectrum_writer.writerow({
            "step": self.step + 1, "band_rms_db": f"{float(e_band.pow(2).mean().sqrt()):.3f}",
            "band_max_db": f"{float(e_band[bi].abs().max()):.3f}", "band_max_class": self.classes[bi],
            "level_max_db": f"{float(e_level[li]):.3f}", "level_max_class": self.classes[li]})
        self._spectrum_log.flush()
