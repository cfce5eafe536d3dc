"""From a checkpoint to audio: load once, then ``generate(class, n, sampler, nfe, guidance, seed)``.

Level: every clip's integrated loudness (LUFS) and true peak are measured and reported (``Generation.levels``,
the sidecar). Nothing is normalised unless asked: ``normalize="peak"`` / ``"lufs"`` with a target applies one gain
per clip (:mod:`edmsound.audio.loudness`), recorded per clip in ``Generation.normalization`` and the sidecar.
A model that ships a per-class matching EQ (:mod:`edmsound.core.spectral_eq`) has it applied to the frames it makes,
before the inverse STFT, unless a call passes ``eq=False``; the settings say which (``matching_eq``).

Reproducibility: clip i of a call with seed s uses its own generator seeded with s + i for its initial
noise (and, for the stochastic sampler, its churn noise), so a batch starts from the single calls' noise.
The sampler state is float32 (float64 on request). The network runs under bf16 autocast where the hardware
computes bfloat16 (a batch then differs from single calls by about 2 %: kernels depend on the batch shape), in
float32 elsewhere or with ``bf16=False`` (by float rounding only); each generation records which.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .codec import make_codec
from ..audio import loudness
from ..audio.export import check_format, encode_clip, extension, keeps_overs
from .inpainting import (KnownRegionDenoiser, TiledDenoiser, bin_span, check_band, check_span, frame_span,
                         tile_starts)
from .guidance import GuidedDenoiser, check_guidance, check_guidance_interval, check_reference, interval_list
from .model import load_guide, load_model_dir, precision_name
from .samplers import FEW_STEP_SAMPLERS, SAMPLERS, CountingDenoiser, get_sampler, steps_for_nfe, valid_nfes
from .schedules import karras_sigmas
from .spectral_eq import ClassEQ, apply_to_spec, bin_freqs, eq_budget, eq_for_nfe, load_class_eqs

MAX_NFE = 200
MAX_CLIPS = 64
MAX_SECONDS = 60.0      # longest clip made or taken as a source (window by window)
PRESET_DEFAULT = "default"     # guidance_interval argument: use the checkpoint preset's shipped interval


@dataclass
class Generation:
    waves: np.ndarray                  # (n, num_samples) float32
    specs: torch.Tensor                # (n, 2, F, T) float32 complex spectrograms (compressed)
    seeds: list[int]
    settings: dict = field(default_factory=dict)
    levels: list[dict] = field(default_factory=list)          # per clip: loudness.ClipLevel.to_dict() as written
    normalization: list[dict | None] = field(default_factory=list)   # per clip: what was done (None: nothing)

    @property
    def sample_rate(self) -> int:
        return self.settings["sample_rate"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_nfe(sampler: str, nfe) -> int:
    get_sampler(sampler)
    try:
        nfe = int(nfe)
    except (TypeError, ValueError):
        raise ValueError(f"NFE must be an integer in [1, {MAX_NFE}], got {nfe!r}") from None
    if not 1 <= nfe <= MAX_NFE:
        raise ValueError(f"NFE {nfe} is out of range: allowed [1, {MAX_NFE}]")
    steps_for_nfe(sampler, nfe)          # raises with the nearest valid budgets
    return nfe


class EDMSoundPipeline:
    def __init__(self, checkpoint, device: str | None = None, weights: str = "ema", dtype=torch.float32,
                 bf16: bool | str | None = None):
        """``bf16``: the network's bfloat16 autocast: True / ``"bf16"``, False / ``"fp32"``, or None / ``"auto"``
        (default: as the preset trained it where the device computes bfloat16 in hardware, float32 where it would
        be emulated and several times slower; see :func:`edmsound.core.model.resolve_bf16`). In float32 a batch
        gives the single calls' clips to float rounding; under autocast a batch differs from single calls by about
        1 % (the autocast kernels depend on the batch shape). :attr:`precision` says which one runs."""
        self.device = torch.device(device or default_device())
        self.model, self.preset, self.classes, self.model_dir, cfg = load_model_dir(checkpoint, self.device, weights,
                                                                                    bf16=bf16)
        self.guide = load_guide(self.model_dir, self.preset, len(self.classes), self.device, bf16=bf16)
        self.codec = make_codec(self.preset.codec)
        self.dtype = dtype
        self.checkpoint = str(checkpoint)
        # the model's matching EQs by the budget each was measured at (eq_at picks a request's)
        self.class_eqs = load_class_eqs(cfg, self.classes, self.preset.default_nfe)

    # --- introspection ---------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """``"bf16"`` (the network under bfloat16 autocast) or ``"fp32"``; recorded with every generation."""
        return precision_name(self.model)

    @property
    def sample_rate(self) -> int:
        return self.preset.codec.sample_rate

    @property
    def student_nfe(self) -> int | None:
        """A few-step student's budget (see :attr:`student_sampler`); None: any sampler and budget."""
        return self.preset.student_nfe

    @property
    def student_sampler(self) -> str | None:
        """The one sampler a few-step student takes: ``euler`` (distilled: exactly :attr:`student_nfe`
        evaluations) or ``consistency`` (consistency-tuned: 1 to :attr:`student_nfe`); None: any solver."""
        return (self.preset.student_sampler or "euler") if self.student_nfe else None

    @property
    def samplers(self) -> list[str]:
        return [self.student_sampler] if self.student_nfe else list(SAMPLERS)

    @property
    def summary(self) -> str:
        """What kind of model this is and how it samples, in a few words (for menus and logs)."""
        p = self.preset
        if self.student_sampler == "consistency":
            return f"consistency model, 1 to {self.student_nfe} steps"
        if self.student_nfe:
            return f"distilled {self.student_nfe}-step student (euler)"
        return f"diffusion model, {p.default_sampler} at {p.default_nfe} steps by default"

    def valid_nfes(self, sampler: str, max_nfe: int = 50) -> list[int]:
        if self.student_nfe:
            self.check_student(sampler, self.student_nfe)
            return self.student_budgets()
        self.check_student(sampler, 1)
        return valid_nfes(sampler, max_nfe)

    def student_budgets(self) -> list[int]:
        """The budgets a student accepts (empty for a diffusion model: any the sampler can spend)."""
        m = self.student_nfe
        if not m:
            return []
        return list(range(1, m + 1)) if self.student_sampler == "consistency" else [m]

    def check_student(self, sampler: str, nfe) -> None:
        """A student refuses any sampler or budget but those it was trained for, naming them; a diffusion model
        refuses the few-step samplers (they need a model trained to jump)."""
        m, own = self.student_nfe, self.student_sampler
        if not m:
            if sampler in FEW_STEP_SAMPLERS:
                raise ValueError(f"the {sampler} sampler needs a consistency-tuned model; this one is a diffusion "
                                 f"model: use one of {', '.join(SAMPLERS)}")
            return
        if own == "consistency":
            if sampler != own or not 1 <= int(nfe) <= m:
                raise ValueError(f"this checkpoint is a consistency-tuned model: it samples with consistency at "
                                 f"NFE 1 to {m} only (got {sampler} at NFE {nfe})")
        elif sampler != own or int(nfe) != m:
            raise ValueError(f"this checkpoint is a distilled {m}-step student: it samples with euler at NFE {m} "
                             f"only (got {sampler} at NFE {nfe})")

    def class_index(self, class_name: str) -> int:
        if class_name not in self.classes:
            raise ValueError(f"unknown class {class_name!r}; valid: {', '.join(self.classes)}")
        return self.classes.index(class_name)

    # --- sampling ----------------------------------------------------------------------------------
    def noise(self, seeds: list[int], frames: int | None = None) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Unit Gaussian noise, one generator per clip (seeded with its own seed); ``frames`` for spectrograms
        longer than one model window (the first window's noise is the same as a single clip's)."""
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        shape = self.codec.shape if frames is None else (*self.codec.shape[:-1], int(frames))
        x = torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in gens])
        return x.to(self.dtype), gens

    @torch.no_grad()
    def resolve_guidance_interval(self, interval=PRESET_DEFAULT, class_name: str | None = None
                                  ) -> tuple[float, float] | None:
        """``"default"``: the shipped interval of ``class_name`` (its own if calibrated, else the preset's);
        anything else is checked and returned as (lo, hi) or None."""
        if isinstance(interval, str) and interval.strip().lower() == PRESET_DEFAULT:
            if class_name is None:
                return self.preset.default_guidance_interval
            return self.preset.guidance_interval_for(class_name)
        return check_guidance_interval(interval)

    def strength_sigma(self, strength) -> float:
        """The noise level a variation of ``strength`` in (0, 1] starts from: log-uniform between the
        preset's sigma_min (0: the clip itself) and sigma_max (1: as far as a fresh generation)."""
        try:
            st = float(strength)
        except (TypeError, ValueError):
            st = math.nan
        if not (0.0 < st <= 1.0):
            raise ValueError(f"strength must be in (0, 1] (0 keeps the clip, 1 is a fresh generation), got {strength!r}")
        e = self.preset.edm
        return float(e.sigma_min * (e.sigma_max / e.sigma_min) ** st)

    def encode_clip(self, wave) -> torch.Tensor:
        """A clip at the pipeline's rate -> its complex spectrogram (1, C, F, T), cut or zero-padded to the
        model's length."""
        w = self._source(wave, limit=False)
        n = self.codec.num_samples
        w = w[:n] if len(w) >= n else np.pad(w, (0, n - len(w)))
        return self.codec.encode(torch.from_numpy(w)[None])

    def sample_specs(self, class_name: str, seeds: list[int], sampler: str, nfe: int, guidance: float,
                     callback=None, guidance_interval=None, init: torch.Tensor | None = None,
                     sigma_start: float | None = None, known: torch.Tensor | None = None,
                     keep: torch.Tensor | None = None, tiles: list[int] | None = None, circular: bool = False,
                     reference: str | None = None, **options) -> tuple[torch.Tensor, int, int]:
        """Spectrograms for one batch of seeds; returns (specs, network evaluations counted, of which guided).
        ``guidance_interval``: None (guidance at every sigma) or (lo, hi); see :mod:`edmsound.guidance`.
        ``init`` (1 or B, C, F, T) with ``sigma_start``: SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis
        and Editing with Stochastic Differential Equations"): the clip's spectrogram plus noise at
        ``sigma_start``, solved back to sigma_min with the same exact NFE budget. ``known`` (1 or B, C, F, T)
        with ``keep`` (bool, broadcastable): those entries are held at ``known`` and come back exactly.
        ``tiles`` (first frames of model windows): T may exceed one window; every step averages the windows'
        estimates (``circular``: around a ring). See :mod:`edmsound.core.inpainting`. The counted evaluations
        are per window: each of the ``len(tiles)`` windows spends them. ``reference``: what guidance pushes away
        from, "null" / "guide" / "default" (see :meth:`resolve_reference`)."""
        label = self.class_index(class_name)
        reference = self.resolve_reference(reference)
        fn = get_sampler(sampler)
        nfe = check_nfe(sampler, nfe)
        guidance = check_guidance(guidance)
        guidance_interval = check_guidance_interval(guidance_interval)
        e = self.preset.edm
        top = e.sigma_max if init is None else float(sigma_start)
        sigmas = karras_sigmas(steps_for_nfe(sampler, nfe), e.sigma_min, top, e.rho)
        frames = None
        for t in (known, init):
            if t is not None:
                frames = t.shape[-1]
        noise, gens = self.noise(seeds, frames)
        x = (noise * float(sigmas[0])).to(self.device)
        codec = self.codec
        if init is not None:      # the model's state of this class (the per-class gains, where the model has them)
            x = x + codec.to_model(init, label).to(device=self.device, dtype=x.dtype)
        T, W = x.shape[-1], self.window_frames
        if tiles is None and (T != W or circular):
            raise ValueError(f"a spectrogram of {T} frames needs windows (tiles); the model's window is {W}")
        labels = torch.full((len(seeds),), label, dtype=torch.long, device=self.device)
        model = self.model if tiles is None else TiledDenoiser(self.model, tiles, W, T, circular=circular)
        ref_model = None
        if reference == "guide":
            ref_model = self.guide if tiles is None else TiledDenoiser(self.guide, tiles, W, T, circular=circular)
        guided = GuidedDenoiser(model, labels, guidance, guidance_interval, reference=ref_model)
        counter = CountingDenoiser(guided)
        denoiser = counter
        if known is not None:
            known = known.to(device=self.device, dtype=x.dtype)
            known_state = codec.to_model(known, label)
            keep = keep.to(device=self.device).bool()
            if init is None:              # the kept entries start on the source's own noising trajectory
                x = torch.where(keep, x + known_state, x)
            denoiser = KnownRegionDenoiser(counter, known_state, keep.to(x.dtype))
        out = codec.from_model(fn(denoiser, x, sigmas, callback=callback, generator=gens, **options), label)
        if known is not None:
            out = torch.where(keep, known.to(out.dtype), out)      # exact, even where D returned non-finite values
        return out.float().cpu(), counter.count, guided.guided_calls

    def resolve_reference(self, reference=None) -> str:
        """What guidance pushes away from: "null" (the model's null class: classifier-free guidance) or "guide"
        (the checkpoint's weaker guide model: autoguidance). "default" / None: "guide" where the checkpoint has
        one, else "null". ValueError for "guide" on a checkpoint without one."""
        reference = check_reference(reference)
        if reference == "default":
            return "guide" if self.guide is not None else "null"
        if reference == "guide" and self.guide is None:
            raise ValueError(f"{self.model_dir.name} has no guide model; guidance reference must be 'null' "
                             "(classifier-free) or 'default'")
        return reference

    def _settle(self, class_name, sampler, nfe, guidance, guidance_interval, normalize, target, n,
                reference=None, eq=True) -> dict:
        """The checked request: everything a generation needs besides its source and tool."""
        sampler = sampler or self.preset.default_sampler
        nfe = self.preset.default_nfe if nfe is None else nfe
        self.class_index(class_name)
        guidance = self.preset.guidance_for(class_name) if guidance is None else guidance
        get_sampler(sampler)
        nfe, guidance = check_nfe(sampler, nfe), check_guidance(guidance)
        self.check_student(sampler, nfe)
        interval = self.resolve_guidance_interval(guidance_interval, class_name)
        norm_mode, norm_target = loudness.check_target(normalize, target)
        if not 1 <= int(n) <= MAX_CLIPS:
            raise ValueError(f"n must be in [1, {MAX_CLIPS}], got {n}")
        return dict(class_name=class_name, sampler=sampler, nfe=nfe, guidance=guidance, interval=interval,
                    norm_mode=norm_mode, norm_target=norm_target, n=int(n),
                    reference=self.resolve_reference(reference), eq=self.eq_for(class_name, eq, nfe))

    def eq_at(self, nfe: int | None = None) -> ClassEQ | None:
        """The matching EQ a request at ``nfe`` evaluations gets (None: the default budget): the one measured at
        that budget, else the default budget's; None if the model has none."""
        default = int(self.preset.default_nfe)
        return eq_for_nfe(self.class_eqs, default if nfe is None else int(nfe), default)

    def eq_for(self, class_name: str, eq=True, nfe: int | None = None) -> bool | None:
        """Whether a request of ``class_name`` at ``nfe`` evaluations gets the model's matching EQ
        (:mod:`edmsound.core.spectral_eq`): None where the model has none for the class, else ``eq``."""
        if not isinstance(eq, bool):
            raise ValueError(f"eq must be True (the model's matching EQ, where it has one) or False, got {eq!r}")
        class_eq = self.eq_at(nfe)
        if class_eq is None or class_name not in class_eq.gains_db:
            return None
        return eq

    def equalize(self, req: dict, specs: torch.Tensor, todo=None) -> torch.Tensor:
        """``specs`` with the class's matching EQ on the bins ``todo`` (F, T) the model made (None: all), when the
        request has it on; else ``specs`` itself."""
        if not req.get("eq"):
            return specs
        gains = self.eq_at(req["nfe"]).curve(req["class_name"], bin_freqs(self.codec))
        return apply_to_spec(self.codec, specs, gains, todo)

    def _finish(self, req: dict, waves: np.ndarray, specs: torch.Tensor, seeds: list[int], seed: int,
                nfe_total: int, guided: int, wall: float, extra: dict | None = None) -> Generation:
        """Levels (and the asked-for normalisation) per clip, and the settings every sidecar carries."""
        reports: list[dict | None] = [None] * len(seeds)
        if req["norm_mode"] is not None:
            for i in range(len(waves)):
                waves[i], rep = loudness.normalize(waves[i], self.sample_rate, req["norm_mode"], req["norm_target"])
                reports[i] = rep.to_dict()
        levels = [rep["after"] if rep else loudness.measure(w, self.sample_rate).to_dict()   # measured once
                  for w, rep in zip(waves, reports)]
        audio_s = waves.shape[1] / self.sample_rate
        settings = {"class": req["class_name"], "sampler": req["sampler"], "nfe": req["nfe"],
                    "guidance": req["guidance"], "guidance_interval": interval_list(req["interval"]),
                    "guidance_reference": req["reference"] if req["guidance"] != 1.0 else None,
                    "guided_nfe": guided,      # evaluations (per window) that ran the double (guided) batch
                    "seed": seed, "n": len(seeds), "sample_rate": self.sample_rate,
                    "seconds": round(wall, 4), "seconds_per_clip": round(wall / len(seeds), 4),
                    "audio_seconds": round(audio_s, 4),
                    "real_time_factor": round(wall / (len(seeds) * audio_s), 4),
                    "normalize": None if req["norm_mode"] is None else {"mode": req["norm_mode"],
                                                                        "target": req["norm_target"]},
                    "checkpoint": self.checkpoint, "device": str(self.device), "precision": self.precision}
        if req.get("eq") is not None:
            settings["matching_eq"] = req["eq"]           # the model has one for this class: on or off
            if req["eq"]:                                  # the budget it was measured at
                settings["matching_eq_nfe"] = eq_budget(self.class_eqs, req["nfe"], self.preset.default_nfe)
        if nfe_total != req["nfe"]:
            settings["nfe_total"] = nfe_total          # several windows: NFE per window x windows
        settings.update(extra or {})
        return Generation(waves=waves, specs=specs, seeds=seeds, settings=settings, levels=levels,
                          normalization=reports)

    def generate(self, class_name: str, n: int = 1, sampler: str | None = None, nfe: int | None = None,
                 guidance: float | None = None, seed: int = 0, batch_size: int = 8, progress: bool = False,
                 callback=None, guidance_interval=PRESET_DEFAULT, normalize: str | None = None,
                 target: float | None = None, init=None, strength: float | None = None, guidance_reference=None,
                 eq: bool = True, **options) -> Generation:
        """``guidance_interval``: ``"default"`` (the class's shipped interval), None / "none" (guidance at every
        noise level) or (lo, hi) / "LO,HI" (guidance only for lo < sigma <= hi). ``normalize``: None / "off"
        (default: the clips as the model made them), "peak" (``target`` dBFS sample peak) or "lufs" (``target``
        LUFS integrated loudness, true peak held at or below -1 dBTP); each clip's level is measured either way.
        ``init`` (a clip at the pipeline's rate) with ``strength`` in (0, 1]: variations of that clip (SDEdit,
        see :meth:`sample_specs`); clip i still uses seed + i. ``guidance_reference``: "default", "null" or
        "guide" (:meth:`resolve_reference`). ``eq``: the model's matching EQ where it has one (default on; False:
        the clips as the network made them)."""
        req = self._settle(class_name, sampler, nfe, guidance, guidance_interval, normalize, target, n,
                           guidance_reference, eq)
        init_spec = sigma_start = None
        if init is not None or strength is not None:
            if init is None or strength is None:
                raise ValueError("variations need both a source clip (init) and a strength in (0, 1]")
            sigma_start = self.strength_sigma(strength)
            init_spec = self.encode_clip(init)
        seed = int(seed)
        seeds = [seed + i for i in range(req["n"])]
        batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
        specs, counts, guided = [], [], 0
        t0 = time.perf_counter()
        for b in tqdm(batches, desc=f"{class_name}", disable=not progress or len(batches) < 2, unit="batch"):
            s, c, guided = self.sample_specs(class_name, b, req["sampler"], req["nfe"], req["guidance"],
                                             callback=callback, guidance_interval=req["interval"], init=init_spec,
                                             sigma_start=sigma_start, reference=req["reference"], **options)
            specs.append(s)
            counts.append(c)
        specs = self.equalize(req, torch.cat(specs))
        waves = self.codec.decode(specs).numpy().astype(np.float32)
        wall = time.perf_counter() - t0
        if any(c != req["nfe"] for c in counts):
            raise RuntimeError(f"{req['sampler']} made {counts} network evaluations per batch, expected {req['nfe']}")
        extra = None
        if init_spec is not None:
            extra = {"tool": "vary", "variation": {"strength": float(strength), "sigma_start": round(sigma_start, 6)}}
        return self._finish(req, waves, specs, seeds, seed, req["nfe"], guided, wall, extra)

    # --- editing: region regeneration, longer clips, loops (:mod:`edmsound.core.inpainting`) ------------------
    max_seconds = MAX_SECONDS

    def check_region(self, start, end, duration: float, low_hz=None, high_hz=None):
        """``((start, end), (low_hz, high_hz))`` checked against a clip of ``duration`` seconds and Nyquist."""
        return check_span(start, end, duration, "region"), check_band(low_hz, high_hz, self.sample_rate)

    @property
    def window_frames(self) -> int:
        """Frames of one model window (the clip length the network was trained on)."""
        return self.codec.shape[-1]

    def _source(self, clip, what: str = "source clip", limit: bool = True) -> np.ndarray:
        """A source clip as float32 samples, checked (and, with ``limit``, at most ``MAX_SECONDS`` long)."""
        w = np.asarray(clip, np.float32)
        if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)):
            raise ValueError(f"the {what} must be a non-empty 1-D array of finite samples")
        if limit and len(w) > MAX_SECONDS * self.sample_rate:
            raise ValueError(f"the {what} is {len(w) / self.sample_rate:.1f} s long; at most {MAX_SECONDS:g} s")
        return w

    def check_seconds(self, seconds, what: str = "length", hi: float = MAX_SECONDS, where: str = "") -> float:
        """``seconds`` as a float between one model window and ``hi``, or one line saying so (``where``: e.g.
        " in the app", for a caller with a lower cap)."""
        lo = self.codec.num_samples / self.sample_rate
        try:
            sec = float(seconds)
        except (TypeError, ValueError):
            sec = math.nan
        if not (lo - 1e-9 <= sec <= hi):
            raise ValueError(f"the {what} must be between {lo:.3f} s (one model window) and {hi:g} s{where}, "
                             f"got {seconds!r}")
        return sec

    def fill(self, buffer: torch.Tensor, todo: np.ndarray, req: dict, seeds: list[int], *, circular: bool = False,
             context: int | None = None, init_strength: float | None = None, progress: bool = False,
             callback=None, **options) -> tuple[torch.Tensor, int, int, int]:
        """Make the entries ``todo`` (F, N) of the spectrograms ``buffer`` (B, C, F, N) and keep the rest, with
        model windows every ``W - context`` frames (default: half a window apart) sampled together and averaged
        where they overlap (``circular``: around a ring, for loops). ``init_strength``: start the entries to make
        from the buffer's own content at that strength (SDEdit) instead of from noise. Returns (buffer, windows,
        network evaluations in all, guided evaluations per window)."""
        W = self.window_frames
        context = W // 2 if context is None else int(context)
        if not 0 <= context < W:
            raise ValueError(f"context must be in [0, {W}) frames, got {context}")
        starts = tile_starts(todo, W, W - context, circular=circular)
        if not starts:
            return buffer.clone(), 0, 0, 0
        sigma_start = None if init_strength is None else self.strength_sigma(init_strength)
        keep = torch.from_numpy(~np.asarray(todo, bool))[None, None]                 # (1, 1, F, N)
        out, count, guided = self.sample_specs(req["class_name"], seeds, req["sampler"], req["nfe"], req["guidance"],
                                               callback=callback, guidance_interval=req["interval"], known=buffer,
                                               keep=keep, init=None if sigma_start is None else buffer,
                                               sigma_start=sigma_start, tiles=starts, circular=circular,
                                               reference=req["reference"], **options)
        if count != req["nfe"]:
            raise RuntimeError(f"{req['sampler']} made {count} network evaluations, expected {req['nfe']}")
        return out, len(starts), count * len(starts), guided

    def windows_for(self, tool: str, seconds: float | None = None, source_seconds: float | None = None,
                    span: tuple[float, float] | None = None, context: int | None = None) -> int:
        """How many model windows a tool will sample (each spends the NFE budget), before running it:
        ``"regen"`` (``span`` of a ``source_seconds`` clip), ``"extend"`` / ``"long"`` (to ``seconds``, from a
        ``source_seconds`` clip or from nothing), ``"loop"`` (``seconds``; with ``source_seconds``, a source
        whose wrap point is remade)."""
        c, W, sr = self.codec.config, self.window_frames, self.sample_rate
        stride = W - (W // 2 if context is None else int(context))

        def count(first: int, last: int, N: int, circular: bool = False) -> int:
            todo = np.zeros((1, N), dtype=bool)
            if circular and first > last:
                todo[:, first:] = True
                todo[:, :last] = True
            else:
                todo[:, first:last] = True
            return len(tile_starts(todo, W, stride, circular)) if todo.any() else 0
        if tool == "regen":
            length = max(int(round(source_seconds * sr)), self.codec.num_samples)
            N = self.codec.frames_for(length)
            return count(*frame_span(span[0], span[1], sr, c.hop_length, c.n_fft, N), N)
        if tool in ("extend", "long"):
            length = int(round(self.check_seconds(seconds) * sr))
            N = self.codec.frames_for(length)
            first = 0 if not source_seconds else frame_span(source_seconds, length / sr, sr, c.hop_length, c.n_fft, N)[0]
            return count(first, N, N)
        if tool == "loop":
            sec = source_seconds if source_seconds else self.check_seconds(seconds, "loop length")
            N = self._loop_frames(sec, source=bool(source_seconds))
            if source_seconds:
                seam = W // 4
                return count(N - seam // 2, seam - seam // 2, N, circular=True)
            return count(0, N, N, circular=True)
        raise ValueError(f"unknown tool {tool!r}; valid: regen, extend, long, loop")

    def _loop_frames(self, seconds: float, source: bool = False) -> int:
        """Frames of a loop of ``seconds`` (at least one window; a source's loop never reaches past its end)."""
        hop, W = self.codec.config.hop_length, self.window_frames
        n = seconds * self.sample_rate / hop
        return max(W, int(n) if source else int(round(n)))

    def regenerate(self, clip, class_name: str, start: float, end: float, low_hz: float | None = None,
                   high_hz: float | None = None, n: int = 1, seed: int = 0, sampler: str | None = None,
                   nfe: int | None = None, guidance: float | None = None, strength: float | None = None,
                   guidance_interval=PRESET_DEFAULT, normalize: str | None = None, target: float | None = None,
                   progress: bool = False, callback=None, guidance_reference=None, eq: bool = True,
                   **options) -> Generation:
        """Regenerate the time span [start, end) seconds of ``clip`` (optionally only the band [low_hz, high_hz])
        and keep the rest: outside ``n_fft`` samples around the span the output is the source (see
        :mod:`edmsound.core.inpainting`). ``strength`` in (0, 1]: remake the region starting from its own
        content (a variation of the region) instead of from noise."""
        req = self._settle(class_name, sampler, nfe, guidance, guidance_interval, normalize, target, n,
                           guidance_reference, eq)
        src = self._source(clip)
        length = len(src)
        a, b = check_span(start, end, length / self.sample_rate)
        lo, hi = check_band(low_hz, high_hz, self.sample_rate)
        c = self.codec.config
        padded = np.pad(src, (0, max(0, self.codec.num_samples - length)))
        spec = self.codec.encode(torch.from_numpy(padded)[None], fit=False)
        F, N = spec.shape[-2:]
        fa, fb = frame_span(a, b, self.sample_rate, c.hop_length, c.n_fft, N)
        ba, bb = bin_span(lo, hi, self.sample_rate, F)
        todo = np.zeros((F, N), dtype=bool)
        todo[ba:bb, fa:fb] = True
        seed = int(seed)
        seeds = [seed + i for i in range(req["n"])]
        t0 = time.perf_counter()
        buf, windows, total, guided = self.fill(spec.expand(len(seeds), -1, -1, -1).contiguous(), todo, req, seeds,
                                                init_strength=strength, progress=progress, callback=callback,
                                                **options)
        buf = self.equalize(req, buf, todo)
        waves = self.codec.decode(buf, length=length).numpy().astype(np.float32)
        extra = {"tool": "regen", "span": [a, b], "band": [lo, hi], "frames": [fa, fb], "bins": [ba, bb],
                 "windows": windows, "strength": None if strength is None else float(strength),
                 "kept_outside": [round(max(0.0, a - c.n_fft / self.sample_rate), 6),
                                  round(min(length / self.sample_rate, b + c.n_fft / self.sample_rate), 6)]}
        return self._finish(req, waves, buf, seeds, seed, total, guided, time.perf_counter() - t0, extra)

    def extend(self, clip, class_name: str, seconds: float, n: int = 1, seed: int = 0, sampler: str | None = None,
               nfe: int | None = None, guidance: float | None = None, guidance_interval=PRESET_DEFAULT,
               normalize: str | None = None, target: float | None = None, context: int | None = None,
               progress: bool = False, callback=None, guidance_reference=None, eq: bool = True,
               **options) -> Generation:
        """Continue ``clip`` (or, with ``clip=None``, start from nothing) to ``seconds`` in total, one model
        window at a time: each window keeps ``context`` frames (default half a window) of what is already
        there and makes the rest; the windows' frames join in one inverse STFT, with no crossfade. The source's
        samples come back unchanged up to ``n_fft`` samples before its end."""
        req = self._settle(class_name, sampler, nfe, guidance, guidance_interval, normalize, target, n,
                           guidance_reference, eq)
        total_s = self.check_seconds(seconds)
        length = int(round(total_s * self.sample_rate))
        src = None if clip is None else self._source(clip)
        if src is not None and len(src) >= length:
            raise ValueError(f"the clip is already {len(src) / self.sample_rate:.3f} s long; "
                             f"ask for more than that (got {total_s:g} s)")
        c = self.codec.config
        base = np.zeros(length, np.float32)
        if src is not None:
            base[:len(src)] = src
        spec = self.codec.encode(torch.from_numpy(base)[None], fit=False)
        F, N = spec.shape[-2:]
        first = 0 if src is None else frame_span(len(src) / self.sample_rate, total_s, self.sample_rate,
                                                 c.hop_length, c.n_fft, N)[0]
        todo = np.zeros((F, N), dtype=bool)
        todo[:, first:] = True
        seed = int(seed)
        seeds = [seed + i for i in range(req["n"])]
        t0 = time.perf_counter()
        buf, windows, total, guided = self.fill(spec.expand(len(seeds), -1, -1, -1).contiguous(), todo, req, seeds,
                                                context=context, progress=progress, callback=callback, **options)
        buf = self.equalize(req, buf, todo)
        waves = self.codec.decode(buf, length=length).numpy().astype(np.float32)
        extra = {"tool": "extend" if src is not None else "long", "length_seconds": round(length / self.sample_rate, 4),
                 "source_seconds": None if src is None else round(len(src) / self.sample_rate, 4),
                 "windows": windows, "context_frames": self.window_frames // 2 if context is None else int(context)}
        return self._finish(req, waves, buf, seeds, seed, total, guided, time.perf_counter() - t0, extra)

    def generate_long(self, class_name: str, seconds: float, **kwargs) -> Generation:
        """A clip of ``seconds`` (one model window up to ``MAX_SECONDS``), made window by window
        (:meth:`extend` from nothing)."""
        return self.extend(None, class_name, seconds, **kwargs)

    def loop(self, class_name: str, seconds: float | None = None, clip=None, n: int = 1, seed: int = 0,
             sampler: str | None = None, nfe: int | None = None, guidance: float | None = None,
             guidance_interval=PRESET_DEFAULT, normalize: str | None = None, target: float | None = None,
             progress: bool = False, callback=None, guidance_reference=None, eq: bool = True,
             **options) -> Generation:
        """A seamless loop: a clip whose end flows into its start. The frames are a ring (frame N follows
        N - 1 as frame 0) and the model windows wrap around it, so the wrap point is made like any other frame
        (:class:`~edmsound.core.inpainting.TiledDenoiser` with ``circular=True``). With ``clip``, the source cut to
        whole frames is kept and only a quarter window of frames around its wrap point is remade, with its end
        and its start as context. The ring decodes circularly (:meth:`SpectrogramCodec.decode_loop`): played
        back to back, the clip has no seam."""
        req = self._settle(class_name, sampler, nfe, guidance, guidance_interval, normalize, target, n,
                           guidance_reference, eq)
        hop = self.codec.config.hop_length
        W = self.window_frames
        if clip is not None:
            src = self._source(clip)
            sec = len(src) / self.sample_rate if seconds is None else min(float(seconds), len(src) / self.sample_rate)
            sec = self.check_seconds(sec, "loop source")
        else:
            sec = self.check_seconds(self.codec.num_samples / self.sample_rate if seconds is None else seconds,
                                     "loop length")
        N = self._loop_frames(sec, source=clip is not None)
        period = N * hop
        seam = W // 4
        seed = int(seed)
        seeds = [seed + i for i in range(req["n"])]
        F = self.codec.shape[1]
        t0 = time.perf_counter()
        if clip is not None:
            if len(src) < period:
                raise ValueError(f"the loop source must be at least one model window ({W * hop / self.sample_rate:.3f} s)")
            pad = -(-self.codec.config.n_fft // hop)
            # frames of the period as a periodic signal's STFT sees them: the source wrapped around
            ring = np.concatenate([src[period - hop * pad:period], src[:period], src[:hop * pad]])
            spec = self.codec.encode(torch.from_numpy(ring)[None], fit=False)[..., pad:pad + N]
            todo = np.zeros((F, N), dtype=bool)
            todo[:, :seam - seam // 2] = True
            todo[:, N - seam // 2:] = True
        else:
            spec = torch.zeros(1, 2, F, N)
            todo = np.ones((F, N), dtype=bool)
        buf, windows, total, guided = self.fill(spec.expand(len(seeds), -1, -1, -1).contiguous(), todo, req, seeds,
                                                circular=True, progress=progress, callback=callback, **options)
        buf = self.equalize(req, buf, todo)
        waves = self.codec.decode_loop(buf).numpy().astype(np.float32)
        extra = {"tool": "loop", "length_seconds": round(period / self.sample_rate, 4), "windows": windows,
                 "source": clip is not None, "seam_frames": seam if clip is not None else None}
        return self._finish(req, waves, buf, seeds, seed, total, guided, time.perf_counter() - t0, extra)


def clip_stem(settings: dict, seed: int) -> str:
    """``class[_tool]_sampler_nfeN_wG_seedS``: the settings a listener compares, in the file name."""
    g = f"{settings['guidance']:g}".replace(".", "p")
    tool = f"_{settings['tool']}" if settings.get("tool") else ""
    return f"{settings['class']}{tool}_{settings['sampler']}_nfe{settings['nfe']}_w{g}_seed{seed}"


def save_generation(gen: Generation, out_dir, codec, figures: bool = True, fmt: str = "wav16") -> list[Path]:
    """One audio file (``fmt``: ``wav16`` 16-bit WAV by default, ``wav24``, ``wav32f`` 32-bit float WAV, which
    keeps peaks above full scale, or ``flac``), one PNG (log magnitude + phase) and one JSON sidecar per clip."""
    from .plotting import save_figure, spectrogram_figure
    fmt = check_format(fmt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, seed in enumerate(gen.seeds):
        stem = clip_stem(gen.settings, seed)
        wav = out_dir / f"{stem}{extension(fmt)}"
        wav.write_bytes(encode_clip(gen.waves[i], gen.sample_rate, fmt))
        if figures:
            save_figure(spectrogram_figure(gen.specs[i], codec, title=stem), out_dir / f"{stem}.png")
        peak = float(np.abs(gen.waves[i]).max())
        side = dict(gen.settings, seed=seed, file=wav.name, format=fmt, peak=peak,
                    clipped=bool(peak > 1.0 and not keeps_overs(fmt)),
                    level=gen.levels[i] if gen.levels else None,
                    normalization=gen.normalization[i] if gen.normalization else None)
        (out_dir / f"{stem}.json").write_text(json.dumps(side, indent=2) + "\n")
        paths.append(wav)
    return paths
