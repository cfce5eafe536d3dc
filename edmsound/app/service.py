"""The app's service layer: one object holding the diffusion pipeline and the (optional) copy index.

:class:`EDMSoundService` is created once per process (``EDMSoundService.from_paths(checkpoint, index)``)
and exposes plain-Python methods that the Gradio handlers (:mod:`edmsound.app_ui`) and the tests call:

* :meth:`EDMSoundService.generate` -> :class:`GenerateResult` (clips as float waves, 16-bit PCM and WAV
  files written in the service's own temporary directory, complex spectrograms, the settings used);
* :meth:`EDMSoundService.neighbours` -> :class:`NeighbourResult` (top-k training clips from the FAISS
  index, percentiles in the training set's own top-1 distribution, copy-risk verdict, window matches,
  the neighbours' re-synthesised audio);
* :meth:`EDMSoundService.side_by_side` (a generated clip and one neighbour, matching windows marked);
* :meth:`EDMSoundService.compare` (one class / seed / NFE / guidance across several samplers);
* :meth:`EDMSoundService.spectrogram_image` (a rendered spectrogram figure as an RGB array).

Every user-facing value is validated here; a bad value raises ``ValueError`` whose message names the
allowed range or the valid values (the UI turns it into ``gr.Error``). The service never reads a path
that comes from a caller: the only files it reads are its checkpoint, its index, the training clips the index
names and uploads the app's server has already placed in its own upload folder (:meth:`read_source`); the only
files it writes are WAVs and exports under its own temporary directory.
"""
from __future__ import annotations

import logging
import os
import math
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from .. import (check_guidance, check_level_target, clip_stem, describe_level, EDMSoundPipeline, GUIDANCE_RANGE,
                interval_list, PRESET_DEFAULT, SPECTROGRAM_VIEWS as MODES, steps_for_nfe, to_pcm16,
                valid_nfes, wav_bytes)

__all__ = ["EDMSoundService", "Clip", "GenerateResult", "Neighbour", "NeighbourResult", "CompareEntry",
           "CompareResult", "as_int", "nfe_rule", "nfe_slider_spec", "snap_nfe", "wav_bytes", "MAX_NFE",
           "MAX_VARIATIONS", "MAX_K", "DEFAULT_K", "SEED_MAX", "MODE_LABELS"]

log = logging.getLogger("edmsound.app")

MAX_NFE = 50            # the app's cap (the pipeline allows 200): keeps one request interactive on a CPU
MAX_VARIATIONS = 4      # clips per request
MAX_COST = 400          # network evaluations per request (NFE x clips x samplers, x2 when guided): any generate
                        # fits (50 x 4 x 2); a compare of every sampler at NFE 50 with guidance does not
MAX_K = 10              # neighbours per query
DEFAULT_K = 5
SEED_MAX = 2 ** 31 - 1
MODE_LABELS = MappingProxyType({"magphase": "log magnitude + phase", "realimag": "real + imaginary"})
HEUN_LIKE = ("heun", "edm_stochastic")
FILE_MAX_AGE_S = 3600   # generated WAVs older than this are deleted from the service's temp dir
MAX_TOOL_SECONDS = 12.0  # longest clip the app's tools make (the library allows 60 s); uploads may be up to 60 s
TOOLS = ("vary", "regen", "extend", "long", "loop")


# ----------------------------------------------------------------------------------------- validation
def as_int(value, what: str, lo: int, hi: int) -> int:
    """An integer in [lo, hi] (integral floats such as 10.0 from sliders/JSON are accepted)."""
    rng = f"an integer in [{lo}, {hi}]"
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what} must be {rng}, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{what} must be {rng}, got {value!r}") from None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be {rng}, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"{what} must be {rng}, got {value!r}")
    iv = int(f)
    if not lo <= iv <= hi:
        raise ValueError(f"{what} {iv} is out of range: allowed [{lo}, {hi}]")
    return iv


def nfe_rule(sampler: str, max_nfe: int = MAX_NFE) -> str:
    """Human description of the budgets ``sampler`` can spend exactly, e.g. 'odd values in [1, 49]'."""
    v = valid_nfes(sampler, max_nfe)
    if sampler in HEUN_LIKE:
        return f"odd values in [{v[0]}, {v[-1]}] (2 evaluations per step, 1 for the last)"
    return f"any integer in [{v[0]}, {v[-1]}]"


def nfe_slider_spec(sampler: str, max_nfe: int = MAX_NFE) -> dict:
    """minimum / maximum / step of a slider that can only land on valid budgets of ``sampler``."""
    v = valid_nfes(sampler, max_nfe)
    step = v[1] - v[0] if len(v) > 1 else 1
    return {"minimum": v[0], "maximum": v[-1], "step": step}


def snap_nfe(sampler: str, nfe, max_nfe: int = MAX_NFE) -> int:
    """The largest valid budget of ``sampler`` that is <= ``nfe`` (at least the smallest valid one)."""
    v = valid_nfes(sampler, max_nfe)
    try:
        nfe = float(nfe)
    except (TypeError, ValueError):
        return v[0]
    below = [x for x in v if x <= nfe]
    return below[-1] if below else v[0]


def _safe_stem(source: str) -> str:
    """A file-name-safe stem for a training clip: synth://rain/42 -> rain_42, dir/a b.wav -> a_b."""
    stem = source.split("://", 1)[1] if "://" in source else Path(source).stem
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem).strip("_")
    return stem[-60:] or "clip"


# ----------------------------------------------------------------------------------------- results
@dataclass
class Clip:
    """One generated clip."""
    wave: np.ndarray          # (L,) float32
    spec: np.ndarray          # (2, F, T) float32 compressed complex spectrogram (real, imag)
    sample_rate: int
    class_name: str
    seed: int
    settings: dict            # settings of the request, with this clip's seed
    name: str                 # file stem: class[_tool]_sampler_nfeN_wG_seedS
    path: Path | None = None  # its 16-bit WAV in the service's temp dir
    uid: int | None = None    # its number in the session's history
    level: dict | None = None          # LUFS, true peak, sample peak, RMS of the clip as delivered
    normalization: dict | None = None  # what the opt-in normalisation did (None: nothing)

    @property
    def pcm16(self) -> np.ndarray:
        return to_pcm16(self.wave)

    @property
    def audio(self) -> tuple[int, np.ndarray]:
        """(sample rate, int16 samples), the form ``gr.Audio(type='numpy')`` takes."""
        return self.sample_rate, self.pcm16

    def wav_bytes(self) -> bytes:
        return wav_bytes(self.wave, self.sample_rate)

    def to_dict(self) -> dict:
        return {"name": self.name, "class": self.class_name, "seed": self.seed, "number": self.uid,
                "tool": self.settings.get("tool") or "generate",
                "seconds": round(len(self.wave) / self.sample_rate, 4),
                "peak": round(float(np.abs(self.wave).max()), 4) if self.wave.size else 0.0,
                "level": self.level, "normalization": self.normalization,
                "file": self.path.name if self.path else None}

    @property
    def level_text(self) -> str:
        """e.g. ``-18.2 LUFS · true peak -3.1 dBTP`` (+ what normalisation did, if any)."""
        return describe_level(self.level, self.normalization) if self.level else ""


@dataclass
class GenerateResult:
    clips: list[Clip]
    settings: dict
    figures: list[np.ndarray] = field(default_factory=list)   # RGB spectrogram images, when requested

    @property
    def paths(self) -> list[str]:
        return [str(c.path) for c in self.clips if c.path is not None]

    def to_dict(self) -> dict:
        return {**self.settings, "clips": [c.to_dict() for c in self.clips]}


@dataclass
class Neighbour:
    """One training clip near a generated clip."""
    rank: int
    similarity: float         # cosine, max over window pairs
    percentile: float         # within the training set's own top-1 distribution
    class_name: str
    source: str               # synth://class/seed or a file path relative to the training set
    clip_id: int              # row in the index
    query_offset: float       # start (s) of the generated clip's window of the best pair
    train_offset: float       # start (s) of the training clip's window of the best pair
    above_p95: bool
    wave: np.ndarray | None = None     # audio at the pipeline's rate (None when not available here)
    sample_rate: int = 0
    spec: np.ndarray | None = None
    path: Path | None = None
    note: str = ""
    figure: np.ndarray | None = None   # rendered spectrogram, when requested
    signal_similarity: float | None = None   # gain- and onset-normalised log-mel correlation
    evidence: tuple = ()               # tiers that call this a copy: "embedding", "signal"

    def to_dict(self) -> dict:
        return {"rank": self.rank, "similarity": round(self.similarity, 6),
                "signal_similarity": None if self.signal_similarity is None else round(self.signal_similarity, 6),
                "copy": bool(self.evidence), "evidence": list(self.evidence),
                "percentile": round(self.percentile, 2) if math.isfinite(self.percentile) else None,
                "class": self.class_name, "source": self.source, "training_clip": self.clip_id,
                "query_offset": round(self.query_offset, 4), "train_offset": round(self.train_offset, 4),
                "above_p95": self.above_p95, "audio": self.wave is not None, "note": self.note}


@dataclass
class NeighbourResult:
    query: Clip
    clip_number: int          # 1-based number of the query among the request's clips
    neighbours: list[Neighbour]
    windows: list[dict]       # per window of the generated clip: its best training window
    threshold: float | None   # the training set's 95th percentile (same class, or all classes)
    scope: str                # "dog_bark" or "all classes"
    same_class: bool
    risk: dict                # {"level": "high"|"low"|"unknown", "text": ...}
    stitching: dict           # edmsound.copies.stitching_analysis (reason, sources)
    window_seconds: float
    hop_seconds: float

    def to_dict(self) -> dict:
        return {"clip": self.clip_number, "name": self.query.name, "class": self.query.class_name,
                "seed": self.query.seed, "k": len(self.neighbours), "same_class": self.same_class,
                "scope": self.scope,
                "threshold_p95": None if self.threshold is None else round(self.threshold, 6),
                "risk": self.risk,
                "stitching": {"flag": self.stitching.get("stitching", False),
                              "reason": self.stitching.get("reason", "")},
                "window_seconds": self.window_seconds, "hop_seconds": self.hop_seconds,
                "neighbours": [n.to_dict() for n in self.neighbours],
                "windows": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in w.items()}
                            for w in self.windows]}


@dataclass
class CompareEntry:
    sampler: str
    nfe_requested: int
    nfe: int
    note: str
    clip: Clip


@dataclass
class CompareResult:
    entries: list[CompareEntry]
    settings: dict
    figures: list[np.ndarray] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [str(e.clip.path) for e in self.entries if e.clip.path is not None]

    def to_dict(self) -> dict:
        return {**self.settings,
                "samplers": [{"sampler": e.sampler, "nfe": e.clip.settings["nfe"], "nfe_requested": e.nfe_requested,
                              "note": e.note, "seconds": e.clip.settings["seconds"],
                              "real_time_factor": e.clip.settings["real_time_factor"], **e.clip.to_dict()}
                             for e in self.entries]}


# ----------------------------------------------------------------------------------------- service
class EDMSoundService:
    """The pipeline + the optional copy index, loaded once; all methods are safe to call from threads."""

    def __init__(self, pipeline: EDMSoundPipeline, index=None, *, index_note: str | None = None,
                 max_nfe: int = MAX_NFE, file_max_age_s: float = FILE_MAX_AGE_S):
        self.pipeline = pipeline
        self.index = index
        self.index_note = index_note or ("" if index is not None else "no copy index loaded")
        self.max_nfe = int(max_nfe)
        self.file_max_age_s = float(file_max_age_s)
        self._plot_lock = threading.Lock()       # matplotlib (pyplot, font cache) is not thread-safe
        self._tmp = Path(tempfile.mkdtemp(prefix="edmsound-app-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._tmp), True)

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def from_paths(cls, checkpoint="checkpoints/default", index=None, device: str | None = None, *,
                   require_index: bool = False, precision: str = "auto", **kwargs) -> "EDMSoundService":
        """Load the checkpoint (and the copy index with its encoder) once; ``precision``: ``auto``, ``bf16`` or
        ``fp32`` (see :class:`EDMSoundPipeline`).

        ``index`` None: no neighbours. A missing or unloadable index raises when ``require_index``,
        otherwise the service runs without neighbours and ``index_note`` says why."""
        pipeline = EDMSoundPipeline(checkpoint, device=device, bf16=precision)
        idx, note = None, None
        if index is None:
            note = "no copy index given (--index DIR)"
        else:
            try:
                idx = cls._load_index(index)
            except Exception as e:                       # noqa: BLE001 - reported, or re-raised
                if require_index:
                    raise
                note = (f"copy index not found at {index}" if isinstance(e, FileNotFoundError)
                        and not Path(index).exists() else f"copy index {index} could not be loaded: {e}")
                log.warning("running without the neighbours panel: %s", note)
        return cls(pipeline, idx, index_note=note, **kwargs)

    @classmethod
    def load_family(cls, checkpoints, index=None, device: str | None = None, *, require_index: bool = False,
                    precision: str = "auto", **kwargs) -> dict[str, "EDMSoundService"]:
        """Several models served side by side (the shipped model and its few-step students): one service per
        checkpoint, keyed by folder name in the given order, sharing one copy index. The models must make the
        same classes at the same sample rate (the app's controls and uploads are shared); otherwise a
        ``ValueError`` names the one that differs."""
        checkpoints = [Path(c) for c in checkpoints]
        if not checkpoints:
            raise ValueError("no model to serve: give at least one checkpoint directory")
        names = [os.path.basename(os.path.normpath(str(c))) for c in checkpoints]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two checkpoints are both called {dup[0]!r}: the app names models by folder")
        first = cls.from_paths(checkpoints[0], index=index, device=device, require_index=require_index,
                               precision=precision, **kwargs)
        family = {names[0]: first}
        for name, ck in zip(names[1:], checkpoints[1:]):
            pipe = EDMSoundPipeline(ck, device=device, bf16=precision)
            if list(pipe.classes) != first.classes or pipe.sample_rate != first.sample_rate:
                for svc in family.values():
                    svc.close()
                raise ValueError(f"model {name!r} makes other classes or another sample rate than {names[0]!r} "
                                 f"({pipe.sample_rate} Hz: {', '.join(pipe.classes)}); serve it on its own")
            family[name] = cls(pipe, first.index, index_note=first.index_note, **kwargs)
        return family

    @staticmethod
    def _load_index(path):
        from .. import CopyIndex
        idx = CopyIndex.load(path)
        idx.encoder                                       # resolve and load the encoder now, once
        return idx

    def close(self) -> None:
        """Delete the service's temp dir (also done at garbage collection / exit)."""
        self._finalizer()

    # --- introspection -------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.pipeline.classes)

    @property
    def samplers(self) -> list[str]:
        return self.pipeline.samplers

    @property
    def sample_rate(self) -> int:
        return self.pipeline.sample_rate

    @property
    def has_index(self) -> bool:
        return self.index is not None

    @property
    def workdir(self) -> Path:
        return self._tmp

    @property
    def defaults(self) -> dict:
        p = self.pipeline.preset
        sampler = p.default_sampler if p.default_sampler in self.samplers else self.samplers[0]
        return {"sampler": sampler, "nfe": self.snap_nfe(sampler, min(p.default_nfe, self.max_nfe)),
                "guidance": float(p.default_guidance), "seed": 0, "n": 1, "k": DEFAULT_K,
                "guidance_interval": interval_list(p.default_guidance_interval),
                "class_guidance": {c: p.guidance_for(c) for c in self.classes},
                "class_guidance_interval": {c: interval_list(p.guidance_interval_for(c)) for c in self.classes},
                "guide": p.guide if self.pipeline.guide is not None else None}

    def valid_nfes(self, sampler: str) -> list[int]:
        return self.pipeline.valid_nfes(self.check_sampler(sampler), self.max_nfe)

    def nfe_slider(self, sampler: str) -> dict:
        """The NFE slider's minimum / maximum / step for ``sampler`` (a student: the budgets it was trained for)."""
        budgets = self.pipeline.student_budgets()
        if budgets:
            return {"minimum": budgets[0], "maximum": budgets[-1], "step": 1}
        return nfe_slider_spec(sampler, self.max_nfe)

    def nfe_rule(self, sampler: str) -> str:
        """The budgets ``sampler`` can spend here, in words (a student: those it was trained for)."""
        budgets = self.pipeline.student_budgets()
        if not budgets:
            return nfe_rule(sampler, self.max_nfe)
        if len(budgets) == 1:
            return f"{budgets[0]} only (the budget this model was distilled for)"
        return f"any integer in [{budgets[0]}, {budgets[-1]}] (the budgets this model was tuned for)"

    def snap_nfe(self, sampler: str, nfe) -> int:
        """The nearest budget ``sampler`` can spend here at or below ``nfe`` (a student: within its budgets)."""
        budgets = self.pipeline.student_budgets()
        if not budgets:
            return snap_nfe(sampler, nfe, self.max_nfe)
        try:
            nfe = float(nfe)
        except (TypeError, ValueError):
            return budgets[-1]
        return max([b for b in budgets if b <= nfe] or budgets[:1])

    @staticmethod
    def check_cost(nfe_per_clip, clips: int, guided: bool) -> int:
        """Network evaluations a request will spend; over :data:`MAX_COST` is refused naming the limit.
        ``nfe_per_clip``: one NFE, or a list with one per sampler of a comparison."""
        nfes = list(nfe_per_clip) if isinstance(nfe_per_clip, (list, tuple)) else [nfe_per_clip]
        cost = sum(int(x) for x in nfes) * int(clips) * (2 if guided else 1)
        if cost > MAX_COST:
            what = (f"{len(nfes)} samplers x NFE {max(nfes)}" if len(nfes) > 1 else f"NFE {nfes[0]}") + \
                (f" x {clips} clips" if clips > 1 else "") + (" x 2 for guidance" if guided else "")
            raise ValueError(f"this request would spend {cost} network evaluations ({what}); the limit is {MAX_COST} "
                             "per request: choose fewer samplers or clips, a lower NFE, or guidance 1")
        return cost

    @property
    def checkpoint_name(self) -> str:
        """The checkpoint's folder name (what visitors see: the server's paths stay on the server)."""
        return os.path.basename(os.path.normpath(str(self.pipeline.checkpoint)))

    def info(self) -> dict:
        d = {"checkpoint": self.checkpoint_name, "model": self.pipeline.summary, "device": str(self.pipeline.device),
             "precision": self.pipeline.precision,
             "classes": self.classes, "samplers": self.samplers, "sample_rate": self.sample_rate,
             "seconds": round(self.pipeline.codec.num_samples / self.sample_rate, 4),
             "max_nfe": self.max_nfe, "guidance_range": list(GUIDANCE_RANGE), "max_variations": MAX_VARIATIONS,
             "defaults": self.defaults, "index": None, "index_note": self.index_note}
        if self.index is not None:
            enc = self.index.encoder
            d["index"] = {"clips": self.index.num_clips, "windows": self.index.ntotal, "kind": self.index.kind,
                          "classes": list(self.index.classes), "encoder": enc.name,
                          "window_seconds": enc.window_seconds, "hop_seconds": enc.hop_seconds}
        return d

    # --- validation ----------------------------------------------------------------------------
    def check_class(self, class_name) -> str:
        if not isinstance(class_name, str) or class_name not in self.pipeline.classes:
            raise ValueError(f"unknown class {class_name!r}; valid: {', '.join(self.classes)}")
        return class_name

    def check_sampler(self, sampler) -> str:
        if not isinstance(sampler, str) or sampler not in self.samplers:
            raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(self.samplers)}")
        return sampler

    def check_nfe(self, sampler: str, nfe) -> int:
        nfe = as_int(nfe, "NFE", 1, self.max_nfe)
        self.pipeline.check_student(sampler, nfe)
        if nfe not in valid_nfes(sampler, self.max_nfe):
            lower = snap_nfe(sampler, nfe, self.max_nfe)
            upper = [v for v in valid_nfes(sampler, self.max_nfe) if v > nfe]
            near = f"{lower}" + (f", {upper[0]}" if upper else "")
            raise ValueError(f"NFE {nfe} is not valid for {sampler}: allowed {nfe_rule(sampler, self.max_nfe)}; "
                             f"nearest valid budgets: {near}")
        return nfe

    @staticmethod
    def check_guidance(guidance) -> float:
        lo, hi = GUIDANCE_RANGE
        if isinstance(guidance, str):
            try:
                guidance = float(guidance.strip())
            except ValueError:
                pass
        if isinstance(guidance, (bool, str)):
            raise ValueError(f"guidance scale must be a number in [{lo:g}, {hi:g}], got {guidance!r}")
        return check_guidance(guidance)

    @staticmethod
    def check_seed(seed) -> int:
        return as_int(seed, "seed", 0, SEED_MAX)

    @staticmethod
    def check_n(n) -> int:
        return as_int(n, "number of variations", 1, MAX_VARIATIONS)

    @staticmethod
    def check_k(k) -> int:
        return as_int(k, "k (neighbours)", 1, MAX_K)

    @staticmethod
    def check_mode(mode) -> str:
        if mode not in MODES:
            raise ValueError(f"unknown spectrogram view {mode!r}; valid: {', '.join(MODES)}")
        return mode

    # --- files ---------------------------------------------------------------------------------
    def _request_dir(self) -> Path:
        self._prune()
        d = self._tmp / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def _prune(self) -> None:
        cutoff = time.time() - self.file_max_age_s
        for d in self._tmp.iterdir():
            try:
                if d.is_dir() and d.stat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass

    @staticmethod
    def _write(path: Path, wave: np.ndarray, sample_rate: int) -> Path:
        path.write_bytes(wav_bytes(wave, sample_rate))
        return path

    def write_clip(self, clip: Clip) -> Path:
        """A clip's 16-bit WAV written again (its first file expires after ``file_max_age_s``)."""
        return self._write(self._request_dir() / f"{clip.name}.wav", clip.wave, clip.sample_rate)

    # --- figures -------------------------------------------------------------------------------
    def spectrogram_figure(self, spec, mode: str = "magphase", title: str | None = None, marks=None):
        """A matplotlib Figure (already detached from pyplot, so it is garbage-collected normally)."""
        import matplotlib.pyplot as plt
        from .. import spectrogram_figure
        mode = self.check_mode(mode)
        spec = torch.as_tensor(np.asarray(spec, np.float32))
        with self._plot_lock:
            fig = spectrogram_figure(spec, self.pipeline.codec, mode=mode, title=title, marks=marks)
            plt.close(fig)
        return fig

    def spectrogram_image(self, spec, mode: str = "magphase", title: str | None = None, marks=None,
                          dpi: int = 90) -> np.ndarray:
        """The figure rendered to an (H, W, 3) uint8 RGB array (rendering is serialised: thread-safe)."""
        import matplotlib.pyplot as plt
        from .. import spectrogram_figure
        mode = self.check_mode(mode)
        spec = torch.as_tensor(np.asarray(spec, np.float32))
        with self._plot_lock:
            fig = spectrogram_figure(spec, self.pipeline.codec, mode=mode, title=title, marks=marks)
            try:
                fig.set_dpi(dpi)
                fig.canvas.draw()
                img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
            finally:
                plt.close(fig)
        return img

    def encode(self, wave: np.ndarray) -> np.ndarray:
        """A wave at the pipeline's rate -> its (2, F, T) compressed complex spectrogram (cut/padded)."""
        return self.pipeline.codec.encode(torch.as_tensor(np.asarray(wave, np.float32)))[0].numpy()

    # --- generation ----------------------------------------------------------------------------
    def _validate(self, class_name, sampler, nfe, guidance, seed):
        d = self.defaults
        class_name = self.check_class(class_name)
        sampler = self.check_sampler(d["sampler"] if sampler is None else sampler)
        nfe = self.check_nfe(sampler, d["nfe"] if nfe is None else nfe)
        guidance = self.check_guidance(d["class_guidance"][class_name] if guidance is None else guidance)
        seed = self.check_seed(0 if seed is None else seed)
        return class_name, sampler, nfe, guidance, seed

    def _clips(self, gen, out_dir: Path | None) -> list[Clip]:
        clips = []
        for i, s in enumerate(gen.seeds):
            settings = dict(gen.settings, seed=int(s), checkpoint=self.checkpoint_name)   # the name, not the path
            name = clip_stem(settings, s)
            clip = Clip(wave=np.ascontiguousarray(gen.waves[i], np.float32),
                        spec=gen.specs[i].numpy().astype(np.float32), sample_rate=gen.sample_rate,
                        class_name=settings["class"], seed=int(s), settings=settings, name=name,
                        level=gen.levels[i] if gen.levels else None,
                        normalization=gen.normalization[i] if gen.normalization else None)
            if out_dir is not None:
                clip.path = self._write(out_dir / f"{name}.wav", clip.wave, clip.sample_rate)
            clips.append(clip)
        return clips

    def _result(self, gen, write_files: bool, figures: str | None) -> GenerateResult:
        """A pipeline generation as the app's result: clips (with their WAVs), settings, optional figures."""
        settings = dict(gen.settings)
        settings["wall_seconds"] = settings["seconds"]
        settings["checkpoint"] = self.checkpoint_name
        clips = self._clips(gen, self._request_dir() if write_files else None)
        result = GenerateResult(clips=clips, settings=settings)
        if figures is not None:
            result.figures = [self.spectrogram_image(c.spec, figures, c.name) for c in clips]
        return result

    def generate(self, class_name, sampler=None, nfe=None, guidance=None, seed=0, n=1, *, progress=None,
                 figures: str | None = None, write_files: bool = True,
                 guidance_interval=PRESET_DEFAULT, normalize: str | None = None,
                 target: float | None = None, init=None, strength=None) -> GenerateResult:
        """``n`` clips of ``class_name`` (clip i uses seed + i); with ``init`` (a clip's wave) and ``strength``
        in (0, 1], variations of that clip (SDEdit). ``progress(done, total, desc)`` is called
        once per solver step; ``figures`` = a spectrogram view ('magphase' / 'realimag') renders them.
        ``guidance_interval``: "default" (the class's shipped one), None or (lo, hi) noise levels.
        ``normalize``: None / "off" (default), "peak" (``target`` dBFS) or "lufs" (``target`` LUFS); every clip's
        loudness and true peak are reported either way (``Clip.level``)."""
        class_name, sampler, nfe, guidance, seed = self._validate(class_name, sampler, nfe, guidance, seed)
        normalize, target = check_level_target(normalize, target)
        interval = self.pipeline.resolve_guidance_interval(guidance_interval, class_name)
        n = self.check_n(n)
        if seed + n - 1 > SEED_MAX:
            raise ValueError(f"seed + variations - 1 must be <= {SEED_MAX}; allowed seeds: [0, {SEED_MAX - n + 1}]")
        if figures is not None:
            self.check_mode(figures)
        steps = steps_for_nfe(sampler, nfe)
        self.check_cost(nfe, n, guidance != 1.0)
        callback = None
        if progress is not None:
            progress(0, steps, f"sampling {class_name} with {sampler}")

            def callback(info):
                progress(int(info["i"]) + 1, steps, f"sampling {class_name} with {sampler}")
        gen = self.pipeline.generate(class_name, n=n, sampler=sampler, nfe=nfe, guidance=guidance, seed=seed,
                                     callback=callback, guidance_interval=interval, normalize=normalize,
                                     target=target, init=init, strength=strength)
        return self._result(gen, write_files, figures)

    # --- sound-designer tools ---------------------------------------------------------------------
    def read_source(self, path) -> tuple[np.ndarray, str]:
        """An uploaded file (already in the app's upload folder) as a source clip at the model's rate:
        WAV/FLAC/OGG/MP3, at most 20 MB and 60 s; every violation is one line."""
        from .. import read_upload
        wave = read_upload(path, self.sample_rate)
        return wave, Path(str(path)).name

    def check_seconds(self, seconds, what: str = "length") -> float:
        return self.pipeline.check_seconds(seconds, what, hi=MAX_TOOL_SECONDS, where=" in the app")

    def edit(self, tool: str, source, class_name, sampler=None, nfe=None, guidance=None, seed=0, n=1, *,
             strength=None, span=None, band=None, seconds=None, progress=None, figures: str | None = None,
             write_files: bool = True, normalize: str | None = None, target: float | None = None) -> GenerateResult:
        """One of the tools on ``source`` (a wave at the model's rate; None for a long clip or a loop made from
        nothing): ``"vary"`` (``strength``), ``"regen"`` (``span`` seconds, optional ``band`` Hz, optional
        ``strength``), ``"extend"`` / ``"long"`` / ``"loop"`` (``seconds``). The request's cost is every window's
        NFE x clips (x2 when guided), checked against :data:`MAX_COST` before anything runs."""
        if tool not in TOOLS:
            raise ValueError(f"unknown tool {tool!r}; valid: {', '.join(TOOLS)}")
        class_name, sampler, nfe, guidance, seed = self._validate(class_name, sampler, nfe, guidance, seed)
        normalize, target = check_level_target(normalize, target)
        n = self.check_n(n)
        if seed + n - 1 > SEED_MAX:
            raise ValueError(f"seed + variations - 1 must be <= {SEED_MAX}; allowed seeds: [0, {SEED_MAX - n + 1}]")
        if figures is not None:
            self.check_mode(figures)
        p = self.pipeline
        src_s = None if source is None else len(source) / self.sample_rate
        if tool in ("vary", "regen", "extend") and source is None:
            raise ValueError(f"{tool} needs a source clip: a clip of this session or an uploaded file")
        if tool == "vary":
            windows = 1
        elif tool == "regen":
            start, end = (None, None) if span is None else span
            span, band = p.check_region(start, end, src_s, *(band or (None, None)))
            windows = p.windows_for("regen", source_seconds=src_s, span=span)
        elif tool == "loop" and source is not None:
            windows = p.windows_for("loop", source_seconds=min(src_s, MAX_TOOL_SECONDS))
        else:
            seconds = self.check_seconds(seconds, "loop length" if tool == "loop" else "length")
            if tool == "extend" and seconds <= src_s:
                raise ValueError(f"the source is already {src_s:.2f} s long; ask for more than that "
                                 f"(up to {MAX_TOOL_SECONDS:g} s)")
            windows = p.windows_for(tool, seconds=seconds, source_seconds=src_s if tool == "extend" else None)
        self.check_cost(nfe * windows, n, guidance != 1.0)
        steps = steps_for_nfe(sampler, nfe)
        callback = None
        desc = f"{tool} {class_name} with {sampler}"
        if progress is not None:
            progress(0, steps, desc)

            def callback(info):
                progress(int(info["i"]) + 1, steps, desc)
        common = dict(n=n, sampler=sampler, nfe=nfe, guidance=guidance, seed=seed, callback=callback,
                      normalize=normalize, target=target)
        if tool == "vary":
            gen = p.generate(class_name, init=source, strength=strength, **common)
        elif tool == "regen":
            gen = p.regenerate(source, class_name, span[0], span[1], low_hz=band[0], high_hz=band[1],
                               strength=strength, **common)
        elif tool == "extend":
            gen = p.extend(source, class_name, seconds, **common)
        elif tool == "long":
            gen = p.generate_long(class_name, seconds, **common)
        else:
            length = seconds if source is None else min(src_s, MAX_TOOL_SECONDS)     # a source: its first 12 s
            gen = p.loop(class_name, length, clip=source, **common)
        return self._result(gen, write_files, figures)

    def export(self, clips: list[Clip], fmt: str = "wav16", normalize: str | None = None,
               target: float | None = None) -> Path:
        """The clips as one file (a single clip) or a zip of audio files with JSON sidecars, written in the
        service's own folder; names carry class, tool, sampler, NFE, guidance and seed."""
        from .. import export_clip, write_export
        if not clips:
            raise ValueError("nothing to export: keep at least one clip of this session")
        normalize, target = check_level_target(normalize, target)
        d = self._request_dir()
        if len(clips) == 1:
            c = clips[0]
            name, data, _ = export_clip(c.wave, c.sample_rate, c.settings, fmt, normalize, target)
            path = d / name
            path.write_bytes(data)
            return path
        return write_export(d / f"edmsound-{len(clips)}-clips.zip", [(c.wave, c.settings) for c in clips],
                            self.sample_rate, fmt, normalize, target)

    def compare(self, class_name, seed=0, nfe=None, guidance=None, samplers=None, *, progress=None,
                figures: str | None = None, write_files: bool = True,
                guidance_interval=PRESET_DEFAULT) -> CompareResult:
        """One clip per sampler with the same class, seed, NFE and guidance. Heun-type samplers spend
        odd budgets only: with an even NFE they use NFE - 1 (noted in the entry)."""
        d = self.defaults
        class_name = self.check_class(class_name)
        seed = self.check_seed(0 if seed is None else seed)
        nfe = as_int(d["nfe"] if nfe is None else nfe, "NFE", 1, self.max_nfe)
        guidance = self.check_guidance(d["class_guidance"][class_name] if guidance is None else guidance)
        interval = self.pipeline.resolve_guidance_interval(guidance_interval, class_name)
        if samplers is None:
            samplers = self.samplers
        if isinstance(samplers, str):
            samplers = [samplers]
        if not isinstance(samplers, (list, tuple)) or not samplers:
            raise ValueError(f"choose at least one sampler; valid: {', '.join(self.samplers)}")
        chosen = []
        for s in samplers:
            s = self.check_sampler(s)
            if s not in chosen:
                chosen.append(s)
        if figures is not None:
            self.check_mode(figures)
        plan = []
        for s in chosen:
            eff = self.snap_nfe(s, nfe)
            note = "" if eff == nfe else f"{s} spends odd budgets only: NFE {eff} instead of {nfe}"
            plan.append((s, eff, note))
        self.check_cost([eff for _, eff, _ in plan], 1, guidance != 1.0)
        total = sum(steps_for_nfe(s, eff) for s, eff, _ in plan)
        done = 0
        out_dir = self._request_dir() if write_files else None
        entries = []
        t0 = time.perf_counter()
        for s, eff, note in plan:
            callback = None
            if progress is not None:
                progress(done, total, f"{s} (NFE {eff})")

                def callback(info, base=done, s=s, eff=eff):
                    progress(base + int(info["i"]) + 1, total, f"{s} (NFE {eff})")
            gen = self.pipeline.generate(class_name, n=1, sampler=s, nfe=eff, guidance=guidance, seed=seed,
                                         callback=callback, guidance_interval=interval)
            done += steps_for_nfe(s, eff)
            clip = self._clips(gen, out_dir)[0]
            entries.append(CompareEntry(sampler=s, nfe_requested=nfe, nfe=eff, note=note, clip=clip))
        settings = {"class": class_name, "seed": seed, "nfe": nfe, "guidance": guidance,
                    "guidance_interval": interval_list(interval), "sample_rate": self.sample_rate, "seconds": round(time.perf_counter() - t0, 4),
                    "checkpoint": self.checkpoint_name, "device": str(self.pipeline.device),
                    "precision": self.pipeline.precision}
        result = CompareResult(entries=entries, settings=settings)
        if figures is not None:
            result.figures = [self.spectrogram_image(e.clip.spec, figures, f"{e.sampler}: {e.clip.name}")
                              for e in entries]
        return result

    # --- copy detection ------------------------------------------------------------------------
    def _require_index(self):
        if self.index is None:
            raise ValueError(f"the neighbours panel is unavailable: {self.index_note}")
        return self.index

    def _threshold(self, class_name: str | None) -> float | None:
        try:
            if class_name is None:
                return float(self.index.threshold(95, all_classes=True))
            return float(self.index.threshold(95, class_name))
        except ValueError:
            return None

    def _training_audio(self, clip_id: int) -> tuple[np.ndarray | None, str]:
        """A training clip at the pipeline's rate (re-synthesised for synth:// sources)."""
        try:
            wave, _ = self.index.fetch_audio(int(clip_id), sample_rate=self.sample_rate)
            return np.asarray(wave, np.float32), ""
        except FileNotFoundError as e:
            return None, str(e)

    def neighbours(self, clip: Clip, k=DEFAULT_K, *, clip_number: int = 1, write_files: bool = True,
                   figures: str | None = None) -> NeighbourResult:
        """Top-``k`` training clips of ``clip`` (same class when the index knows it, else all classes)."""
        index = self._require_index()
        if not isinstance(clip, Clip):
            raise ValueError("neighbours() needs a generated Clip (generate first)")
        k = self.check_k(k)
        if figures is not None:
            self.check_mode(figures)
        same = clip.class_name if clip.class_name in index.classes else None
        res = index.search(clip.wave[None], k=k, same_class=same, sample_rate=clip.sample_rate)[0]
        thr = self._threshold(same)
        scope = same if same is not None else "all classes"
        out_dir = self._request_dir() if write_files else None
        nbs = []
        for m in res:
            wave, note = self._training_audio(m.clip)
            nb = Neighbour(rank=int(m.rank), similarity=float(m.similarity), percentile=float(m.percentile),
                           class_name=m.class_name, source=m.source, clip_id=int(m.clip),
                           query_offset=float(m.query_offset), train_offset=float(m.train_offset),
                           above_p95=bool(thr is not None and m.similarity > thr), wave=wave,
                           sample_rate=self.sample_rate if wave is not None else 0, note=note,
                           signal_similarity=m.signal_similarity, evidence=tuple(m.evidence))
            if wave is not None:
                nb.spec = self.encode(wave)
                if out_dir is not None:
                    nb.path = self._write(out_dir / f"neighbour{m.rank}_{_safe_stem(m.source)}.wav", wave,
                                          self.sample_rate)
            nbs.append(nb)
        from .. import stitching_analysis
        enc = index.encoder
        st = stitching_analysis(res, thr if thr is not None else math.inf, enc.hop_seconds)
        windows = st.pop("windows")
        rank_of = {n.clip_id: n.rank for n in nbs}
        for w in windows:
            w["neighbour_rank"] = rank_of.get(w["clip"])
        risk = self._risk(nbs, thr, scope, st)
        result = NeighbourResult(query=clip, clip_number=int(clip_number), neighbours=nbs, windows=windows,
                                 threshold=thr, scope=scope, same_class=same is not None, risk=risk,
                                 stitching=st, window_seconds=enc.window_seconds, hop_seconds=enc.hop_seconds)
        if figures is not None:
            for nb in nbs:
                nb.figure = self.neighbour_image(nb, figures)
        return result

    @staticmethod
    def _risk(nbs: list[Neighbour], thr, scope: str, st: dict) -> dict:
        if not nbs:
            return {"level": "unknown", "text": "no training clips to compare with", "similarity": None,
                    "percentile": None}
        top = nbs[0]
        pct = f"{top.percentile:.1f}" if math.isfinite(top.percentile) else "n/a"
        base = {"similarity": round(top.similarity, 6),
                "percentile": round(top.percentile, 2) if math.isfinite(top.percentile) else None}
        if thr is None:
            return {**base, "level": "unknown",
                    "text": f"top-1 similarity {top.similarity:.3f}; no training reference distribution for {scope}"}
        sig = "" if top.signal_similarity is None else f", signal similarity {top.signal_similarity:.3f}"
        if top.evidence:
            text = (f"closer to a training clip than training recordings are to each other: "
                    f"{' and '.join(top.evidence)} above the 95th percentile of training clips vs each other "
                    f"({scope}, both tiers together); top-1 similarity {top.similarity:.3f}{sig}; percentile {pct}")
            level = "high"
        elif top.similarity > thr:
            text = (f"above the training set's 95th percentile: top-1 similarity {top.similarity:.3f} > "
                    f"{thr:.3f} (p95 of training clips vs each other, {scope}); percentile {pct}")
            level = "high"
        else:
            text = (f"below the training set's 95th percentile: top-1 similarity {top.similarity:.3f} <= "
                    f"{thr:.3f} (p95 of training clips vs each other, {scope}){sig}; percentile {pct}")
            level = "low"
        if st.get("stitching"):
            text += f"; possible stitching copy ({st['reason']})"
        return {**base, "level": level, "text": text, "threshold_p95": round(thr, 6)}

    def neighbour_image(self, nb: Neighbour, mode: str = "magphase", marks=None) -> np.ndarray | None:
        if nb.spec is None:
            return None
        title = f"neighbour #{nb.rank}: {nb.source}  (similarity {nb.similarity:.3f})"
        return self.spectrogram_image(nb.spec, mode, title, marks)

    def side_by_side(self, result: NeighbourResult, rank: int = 1, mode: str = "magphase") -> dict:
        """The generated clip and neighbour ``rank`` with their matching windows marked.

        Both clips are embedded in windows and every window pair is compared (cosine). Each window of
        the generated clip is paired with its most similar window of the neighbour; pairs reaching the
        training 95th percentile are marked with the same letter on both spectrograms (the best pair is
        always marked). Returns images, marks, pairs and the window similarity matrix."""
        index = self._require_index()
        mode = self.check_mode(mode)
        ranks = [n.rank for n in result.neighbours]
        rank = as_int(rank, "neighbour rank", 1, max(ranks) if ranks else 1)
        nb = next(n for n in result.neighbours if n.rank == rank)
        q = result.query
        enc = index.encoder
        win = enc.window_seconds
        pairs, matrix, q_offs, t_offs = [], None, [], []
        if nb.wave is not None:
            eq = index.embed_queries(q.wave[None], q.sample_rate)      # at the index's query hop, as searched
            et = enc.embed_windows(nb.wave[None], nb.sample_rate)       # at the indexed hop
            matrix = eq.embeddings @ et.embeddings.T
            q_offs, t_offs = [float(o) for o in eq.offsets], [float(o) for o in et.offsets]
            best = np.argmax(matrix, axis=1)
            top = int(np.argmax(matrix.max(axis=1)))
            thr = result.threshold
            letters = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
            for i, j in enumerate(best):
                s = float(matrix[i, j])
                matched = thr is not None and s >= thr
                if matched or i == top:
                    pairs.append({"label": next(letters, "?"), "query_offset": q_offs[i],
                                  "train_offset": t_offs[int(j)], "similarity": round(s, 4),
                                  "above_p95": bool(matched), "best": i == top})
        dur_q = len(q.wave) / q.sample_rate
        dur_t = self.pipeline.codec.num_samples / self.sample_rate
        q_marks = [(p["query_offset"], min(p["query_offset"] + win, dur_q), f"{p['label']} {p['similarity']:.2f}")
                   for p in pairs]
        t_marks = [(p["train_offset"], min(p["train_offset"] + win, dur_t), p["label"]) for p in pairs]
        return {"rank": rank, "neighbour": nb, "pairs": pairs, "matrix": matrix,
                "query_offsets": q_offs, "train_offsets": t_offs, "query_marks": q_marks, "train_marks": t_marks,
                "query_image": self.spectrogram_image(q.spec, mode, f"generated: {q.name} (matching windows shaded)",
                                                      q_marks),
                "neighbour_image": self.neighbour_image(nb, mode, t_marks)}
