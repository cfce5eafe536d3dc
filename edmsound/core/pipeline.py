"""From a checkpoint to audio: load once, then ``generate(class, n, sampler, nfe, guidance, seed)``.

Level: every clip's integrated loudness (LUFS) and true peak are measured and reported (``Generation.levels``,
the sidecar). Nothing is normalised unless asked: ``normalize="peak"`` / ``"lufs"`` with a target applies one gain
per clip (:mod:`edmsound.audio.loudness`), recorded per clip in ``Generation.normalization`` and the sidecar.

Reproducibility: clip i of a call with seed s uses its own generator seeded with s + i for its initial
noise (and, for the stochastic sampler, its churn noise), so a batch starts from the single calls' noise.
The sampler state is float32 (float64 on request); under the network's bf16 autocast a batch differs from
single calls by about 2 % (kernels depend on the batch shape), with ``bf16=False`` by float rounding only.
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

from .codec import SpectrogramCodec
from ..audio import loudness
from ..audio.io import write_wav
from .guidance import GuidedDenoiser, check_guidance, check_guidance_interval, interval_list
from .model import load_denoiser
from .samplers import SAMPLERS, CountingDenoiser, get_sampler, steps_for_nfe, valid_nfes
from .schedules import karras_sigmas

MAX_NFE = 200
MAX_CLIPS = 64
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
                 bf16: bool | None = None):
        """``bf16``: the network's bfloat16 autocast (None: as the preset trained it). Off, a batch gives
        the single calls' clips to float rounding; on, a batch differs from single calls by about 1 %
        (the autocast kernels depend on the batch shape)."""
        self.device = torch.device(device or default_device())
        self.model, self.preset, self.classes, self.model_dir = load_denoiser(checkpoint, self.device, weights,
                                                                              bf16=bf16)
        self.codec = SpectrogramCodec(self.preset.codec)
        self.dtype = dtype
        self.checkpoint = str(checkpoint)

    # --- introspection ---------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.preset.codec.sample_rate

    @property
    def samplers(self) -> list[str]:
        return list(SAMPLERS)

    def valid_nfes(self, sampler: str, max_nfe: int = 50) -> list[int]:
        return valid_nfes(sampler, max_nfe)

    def class_index(self, class_name: str) -> int:
        if class_name not in self.classes:
            raise ValueError(f"unknown class {class_name!r}; valid: {', '.join(self.classes)}")
        return self.classes.index(class_name)

    # --- sampling ----------------------------------------------------------------------------------
    def noise(self, seeds: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Unit Gaussian noise, one generator per clip (seeded with its own seed)."""
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        shape = self.codec.shape
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
        w = np.asarray(wave, np.float32)
        if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)):
            raise ValueError("the source clip must be a non-empty 1-D array of finite samples")
        n = self.codec.num_samples
        w = w[:n] if len(w) >= n else np.pad(w, (0, n - len(w)))
        return self.codec.encode(torch.from_numpy(w)[None])

    def sample_specs(self, class_name: str, seeds: list[int], sampler: str, nfe: int, guidance: float,
                     callback=None, guidance_interval=None, init: torch.Tensor | None = None,
                     sigma_start: float | None = None, **options) -> tuple[torch.Tensor, int, int]:
        """Spectrograms for one batch of seeds; returns (specs, network evaluations counted, of which guided).
        ``guidance_interval``: None (guidance at every sigma) or (lo, hi); see :mod:`edmsound.guidance`.
        ``init`` (1, C, F, T) with ``sigma_start``: SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis
        and Editing with Stochastic Differential Equations"): the clip's spectrogram plus noise at
        ``sigma_start``, solved back to sigma_min with the same exact NFE budget."""
        label = self.class_index(class_name)
        fn = get_sampler(sampler)
        nfe = check_nfe(sampler, nfe)
        guidance = check_guidance(guidance)
        guidance_interval = check_guidance_interval(guidance_interval)
        e = self.preset.edm
        top = e.sigma_max if init is None else float(sigma_start)
        sigmas = karras_sigmas(steps_for_nfe(sampler, nfe), e.sigma_min, top, e.rho)
        noise, gens = self.noise(seeds)
        x = (noise * float(sigmas[0])).to(self.device)
        if init is not None:
            x = x + init.to(device=self.device, dtype=x.dtype)
        labels = torch.full((len(seeds),), label, dtype=torch.long, device=self.device)
        guided = GuidedDenoiser(self.model, labels, guidance, guidance_interval)
        counter = CountingDenoiser(guided)
        out = fn(counter, x, sigmas, callback=callback, generator=gens, **options)
        return out.float().cpu(), counter.count, guided.guided_calls

    def generate(self, class_name: str, n: int = 1, sampler: str | None = None, nfe: int | None = None,
                 guidance: float | None = None, seed: int = 0, batch_size: int = 8, progress: bool = False,
                 callback=None, guidance_interval=PRESET_DEFAULT, normalize: str | None = None,
                 target: float | None = None, init=None, strength: float | None = None, **options) -> Generation:
        """``guidance_interval``: ``"default"`` (the class's shipped interval), None / "none" (guidance at every
        noise level) or (lo, hi) / "LO,HI" (guidance only for lo < sigma <= hi). ``normalize``: None / "off"
        (default: the clips as the model made them), "peak" (``target`` dBFS sample peak) or "lufs" (``target``
        LUFS integrated loudness, true peak held at or below -1 dBTP); each clip's level is measured either way.
        ``init`` (a clip at the pipeline's rate) with ``strength`` in (0, 1]: variations of that clip (SDEdit,
        see :meth:`sample_specs`); clip i still uses seed + i."""
        sampler = sampler or self.preset.default_sampler
        nfe = self.preset.default_nfe if nfe is None else nfe
        self.class_index(class_name)
        guidance = self.preset.guidance_for(class_name) if guidance is None else guidance
        get_sampler(sampler)
        nfe, guidance = check_nfe(sampler, nfe), check_guidance(guidance)
        interval = self.resolve_guidance_interval(guidance_interval, class_name)
        norm_mode, norm_target = loudness.check_target(normalize, target)
        if not 1 <= int(n) <= MAX_CLIPS:
            raise ValueError(f"n must be in [1, {MAX_CLIPS}], got {n}")
        init_spec = sigma_start = None
        if init is not None or strength is not None:
            if init is None or strength is None:
                raise ValueError("variations need both a source clip (init) and a strength in (0, 1]")
            sigma_start = self.strength_sigma(strength)
            init_spec = self.encode_clip(init)
        seed = int(seed)
        seeds = [seed + i for i in range(int(n))]
        batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
        specs, counts, guided = [], [], 0
        t0 = time.perf_counter()
        for b in tqdm(batches, desc=f"{class_name}", disable=not progress or len(batches) < 2, unit="batch"):
            s, c, guided = self.sample_specs(class_name, b, sampler, nfe, guidance, callback=callback,
                                             guidance_interval=interval, init=init_spec, sigma_start=sigma_start,
                                             **options)
            specs.append(s)
            counts.append(c)
        specs = torch.cat(specs)
        waves = self.codec.decode(specs).numpy().astype(np.float32)
        wall = time.perf_counter() - t0
        if any(c != nfe for c in counts):
            raise RuntimeError(f"{sampler} made {counts} network evaluations per batch, expected {nfe}")
        reports: list[dict | None] = [None] * len(seeds)
        if norm_mode is not None:
            for i in range(len(waves)):
                waves[i], rep = loudness.normalize(waves[i], self.sample_rate, norm_mode, norm_target)
                reports[i] = rep.to_dict()
        levels = [rep["after"] if rep else loudness.measure(w, self.sample_rate).to_dict()   # measured once
                  for w, rep in zip(waves, reports)]
        settings = {"class": class_name, "sampler": sampler, "nfe": counts[0], "guidance": guidance,
                    "guidance_interval": interval_list(interval),
                    "guided_nfe": guided,      # evaluations that ran the double (guided) batch
                    "seed": seed, "n": int(n), "sample_rate": self.sample_rate,
                    "seconds": round(wall, 4), "seconds_per_clip": round(wall / len(seeds), 4),
                    "audio_seconds": round(self.codec.num_samples / self.sample_rate, 4),
                    "real_time_factor": round(wall / (len(seeds) * self.codec.num_samples / self.sample_rate), 4),
                    "normalize": None if norm_mode is None else {"mode": norm_mode, "target": norm_target},
                    "checkpoint": self.checkpoint, "device": str(self.device)}
        if init_spec is not None:
            settings["variation"] = {"strength": float(strength), "sigma_start": round(sigma_start, 6)}
        return Generation(waves=waves, specs=specs, seeds=seeds, settings=settings, levels=levels,
                          normalization=reports)


def clip_stem(settings: dict, seed: int) -> str:
    g = f"{settings['guidance']:g}".replace(".", "p")
    return f"{settings['class']}_{settings['sampler']}_nfe{settings['nfe']}_w{g}_seed{seed}"


def save_generation(gen: Generation, out_dir, codec, figures: bool = True) -> list[Path]:
    """One 16-bit WAV, one PNG (log magnitude + phase) and one JSON sidecar per clip."""
    from .plotting import save_figure, spectrogram_figure
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, seed in enumerate(gen.seeds):
        stem = clip_stem(gen.settings, seed)
        wav = out_dir / f"{stem}.wav"
        write_wav(wav, gen.waves[i], gen.sample_rate)
        if figures:
            save_figure(spectrogram_figure(gen.specs[i], codec, title=stem), out_dir / f"{stem}.png")
        side = dict(gen.settings, seed=seed, file=wav.name, peak=float(np.abs(gen.waves[i]).max()),
                    clipped=bool(np.abs(gen.waves[i]).max() > 1.0),
                    level=gen.levels[i] if gen.levels else None,
                    normalization=gen.normalization[i] if gen.normalization else None)
        (out_dir / f"{stem}.json").write_text(json.dumps(side, indent=2) + "\n")
        paths.append(wav)
    return paths
