"""The evaluation sweep: every metric per (sampler, NFE, guidance), per class and overall.

Papers compare samplers, step counts and checkpoints by numbers (EDMSound, Zhu et al. 2023: FAD at 10 and
50 steps; seed 002: FAD + classifier top-k / mAP@10; seed 003: FAD, IS, KID). :func:`evaluate_sweep`

1. plans the grid (:func:`plan_sweep`): an (sampler, NFE) pair the sampler cannot spend exactly (Heun-type
   samplers spend ``2 * steps - 1`` evaluations, so only odd budgets) is **mapped to the nearest valid
   budget** (ties: the lower one, never more compute than asked) and the actual NFE is recorded next to
   the requested one; ``invalid_nfe="skip"`` drops such pairs instead. Either way a note says so;
2. generates ``n_per_class`` clips per class and configuration, or reuses them: clips are cached as
   ``OUT/clips/<sampler>_nfe<k>_w<g>/<class>/<class>_<i>.wav`` (16-bit PCM) and only missing ones are
   generated. Clip ``i`` of the class with checkpoint index ``c`` always starts from the noise seed
   ``seed * 1_000_000 + c * 100_000 + i``, so every configuration sees the same initial noise;
3. scores them against held-out real clips (``reference``): FAD and KID (:mod:`edmsound.metrics`) in an
   encoder's embedding space, classifier scores (accuracy = "category fit", top-k, mAP@10, IS analogue),
   diversity relative to the real clips of the class, and the share of clips above the training set's
   own 95th percentile of top-1 similarity in the copy-detection index;
4. adds baseline rows: a real *training* subset of the same size scored the same way (its FAD is the
   yardstick for generated clips: ``fad_vs_baseline``) and the reference itself (classifier accuracy on
   held-out clips, copy share of held-out real clips);
5. writes ``results.csv``, ``results.md``, ``results.json`` and ``plots/<metric>.png`` (metric vs NFE per
   sampler, one panel per guidance scale).

For the built-in set, ``reference="builtin"`` re-synthesises held-out clips with base seed 7
(:func:`edmsound.synth.clip_seed`), disjoint from the training set's base seed 0.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from . import fidelity as F
from .bars import FAD_RATIO_MAX
from . import metrics as M
from .checkpoint import atomic_write_bytes, atomic_write_json
from .data import AudioSet, fit_length, load_audio, scan_folder
from .guidance import interval_list
from .presets import format_class_guidance

__all__ = ["SweepPoint", "plan_sweep", "synth_audioset", "load_reference", "load_train_subset", "noise_seed",
           "evaluate_sweep", "estimate_generation_seconds", "write_outputs", "METRIC_COLUMNS", "INVALID_NFE_POLICIES",
           "DEFAULT_SAMPLERS", "DEFAULT_NFES", "DEFAULT_GUIDANCES"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INDEX_DIR = REPO_ROOT / "checkpoints" / "index"
DEFAULT_SAMPLERS = ("heun", "dpmpp_2m", "deis")
DEFAULT_NFES = (5, 10, 20, 50)
DEFAULT_GUIDANCES = (1.0, 2.0, 4.0)
INVALID_NFE_POLICIES = ("nearest", "skip")
EMBEDDING_LEVELS = ("windows", "clips")
REFERENCE_SEED = 7          # held-out built-in clips; the built-in training set used base seed 0
TRAIN_SEED = 0
MAX_CLIPS_PER_CALL = 64     # EDMSoundPipeline.generate's limit


# ------------------------------------------------------------------------------------------ planning
CLASS_GUIDANCE = "class"     # the guidance of a point that uses the checkpoint's per-class default scales


@dataclass(frozen=True)
class SweepPoint:
    sampler: str
    nfe: int                 # the budget actually spent (counted by the pipeline)
    guidance: float | str    # a scale, or CLASS_GUIDANCE: each class at its own scale (class_guidance)
    requested_nfe: int
    interval: tuple[float, float] | None = None   # guidance only for lo < sigma <= hi (None: every sigma)
    class_guidance: tuple[tuple[str, float], ...] | None = None   # ((class, w), ...) when guidance == "class"
    # classes guided in their own interval ((class, (lo, hi) | None), ...) when guidance == "class"; the others
    # use ``interval``
    class_intervals: tuple[tuple[str, tuple[float, float] | None], ...] | None = None

    def guidance_for(self, class_name: str) -> float:
        if self.guidance == CLASS_GUIDANCE:
            return dict(self.class_guidance)[class_name]
        return float(self.guidance)

    def interval_for(self, class_name: str) -> tuple[float, float] | None:
        own = dict(self.class_intervals or ())
        return own[class_name] if class_name in own else self.interval

    @property
    def class_guidance_text(self) -> str:
        """``""`` or ``"dog_bark=3 gunshot=1 moving_motor_vehicle=4@2:10 ..."`` (the per-class scales, and
        intervals where a class has its own, of a CLASS_GUIDANCE point)."""
        return format_class_guidance(self.class_guidance, self.class_intervals)

    @property
    def guided(self) -> bool:
        """Whether any class runs guided (double-batch) evaluations."""
        ws = [w for _, w in self.class_guidance] if self.guidance == CLASS_GUIDANCE else [self.guidance]
        return any(w not in (0.0, 1.0) for w in ws)

    @property
    def key(self) -> str:
        if self.guidance == CLASS_GUIDANCE:
            g = "cls-" + "-".join(f"{w:g}".replace(".", "p") for _, w in self.class_guidance)
        else:
            g = f"{self.guidance:g}".replace(".", "p")
        key = f"{self.sampler}_nfe{self.nfe}_w{g}"
        if self.interval is not None:
            key += "_i" + "-".join(f"{v:g}".replace(".", "p") for v in self.interval)
        if self.class_intervals:
            key += "_ci" + hashlib.sha1(self.class_guidance_text.encode()).hexdigest()[:8]
        return key

    @property
    def interval_text(self) -> str:
        """``""`` or ``"LO:HI"`` (the --points syntax)."""
        from .guidance import interval_text
        return interval_text(self.interval)


def _nearest_valid_nfe(sampler: str, nfe: int) -> int:
    from .samplers import valid_nfes
    valid = valid_nfes(sampler, max(nfe + 3, 4))
    return min(valid, key=lambda v: (abs(v - nfe), v))          # ties: the lower budget


def plan_sweep(samplers, nfes, guidances, invalid_nfe: str = "nearest",
               extra_points=(), guidance_interval=None, class_guidance=None,
               class_intervals=None) -> tuple[list[SweepPoint], list[str]]:
    """The configurations to evaluate and notes about (sampler, NFE) pairs that were remapped or skipped.

    The grid samplers x nfes x guidances (any of the three may be empty for no grid) followed by
    ``extra_points``, explicit ``(sampler, nfe, guidance)`` triples (e.g. one expensive reference such as Heun at
    NFE 51 without crossing it with everything else) or ``(sampler, nfe, guidance, (lo, hi))`` with a guidance
    interval. ``guidance_interval`` applies to the guided grid points (w != 1; it is meaningless at w = 1).
    A point's guidance may be ``"class"``: every class at its own scale from ``class_guidance`` (((class, w), ...),
    the checkpoint's calibrated per-class defaults), with the interval applied to the guided classes except those
    in ``class_intervals`` (((class, (lo, hi) | None), ...): classes calibrated with their own interval).
    Invalid pairs (e.g. ``heun`` with an even NFE) are mapped to the nearest valid budget (ties: the lower) with ``invalid_nfe="nearest"``, or dropped with ``"skip"``.
    Duplicates are removed, order is kept."""
    from .guidance import check_guidance, check_guidance_interval
    from .pipeline import MAX_NFE
    from .samplers import get_sampler, steps_for_nfe
    if invalid_nfe not in INVALID_NFE_POLICIES:
        raise ValueError(f"invalid_nfe must be one of {', '.join(INVALID_NFE_POLICIES)}, got {invalid_nfe!r}")
    samplers, nfes, guidances = list(samplers), list(nfes), list(guidances)
    extra_points = [tuple(p) for p in extra_points]
    grid = bool(samplers and nfes and guidances)
    if not grid and not extra_points:
        raise ValueError("need at least one sampler, one NFE and one guidance scale (or explicit points)")
    for p in extra_points:
        if len(p) not in (3, 4):
            raise ValueError(f"a point is (sampler, nfe, guidance) or (sampler, nfe, guidance, (lo, hi)), got {p!r}")
    grid_interval = check_guidance_interval(guidance_interval)

    def interval_for(g, interval):
        return None if g == 1.0 else interval

    def check_nfe(n):
        if isinstance(n, bool) or int(n) != n or not 1 <= int(n) <= MAX_NFE:
            raise ValueError(f"NFE must be an integer in [1, {MAX_NFE}], got {n!r}")
        return int(n)

    requests = []                                 # (sampler, requested NFE, guidance, interval), in order
    if grid:
        for s in samplers:
            get_sampler(s)                                # ValueError naming the valid samplers
        checked = [check_nfe(n) for n in nfes]
        gs = [check_guidance(g) for g in guidances]
        requests += [(s, n, g, interval_for(g, grid_interval)) for s in samplers for n in checked for g in gs]
    for p in extra_points:
        s, n, g = p[:3]
        get_sampler(s)
        iv = check_guidance_interval(p[3] if len(p) == 4 else None)
        if g == CLASS_GUIDANCE:
            if not class_guidance:
                raise ValueError("a point with guidance 'class' needs per-class guidance scales; this checkpoint has "
                                 "none (set them with 'edmsound calibrate-guidance --write')")
            requests.append((s, check_nfe(n), g, iv))
            continue
        g = check_guidance(g)
        requests.append((s, check_nfe(n), g, interval_for(g, iv)))

    points, notes, seen, noted = [], [], set(), set()
    for s, n, g, iv in requests:
        actual = n
        try:
            steps_for_nfe(s, n)
        except ValueError:
            why = (f"{s}: NFE {n} is not a valid budget (Heun-type samplers spend 2*steps-1 evaluations, i.e. "
                   "odd budgets); ")
            if invalid_nfe == "skip":
                note = why + "skipped"
                actual = None
            else:
                actual = _nearest_valid_nfe(s, n)
                note = why + f"using NFE {actual}"
            if note not in noted:
                noted.add(note)
                notes.append(note)
            if actual is None:
                continue
        if (s, actual, g, iv) in seen:
            continue
        seen.add((s, actual, g, iv))
        per_class = g == CLASS_GUIDANCE
        points.append(SweepPoint(s, actual, g, n, iv, tuple(class_guidance) if per_class else None,
                                 tuple(class_intervals) if per_class and class_intervals else None))
    return points, notes


def parse_points(text: str) -> list[tuple]:
    """``"heun:51:2,dpmpp_2m:10:4:0.05:1"`` -> ``[("heun", 51, 2.0), ("dpmpp_2m", 10, 4.0, (0.05, 1.0))]``
    (the optional LO:HI is a guidance interval of noise levels). GUIDANCE may be ``class``: the checkpoint's
    per-class default scales."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (3, 5):
            raise ValueError(f"a point is SAMPLER:NFE:GUIDANCE[:SIGMA_LO:SIGMA_HI] (e.g. heun:51:2 or "
                             f"dpmpp_2m:10:3:0.05:1), got {item!r}")
        try:
            g = parts[2].strip().lower()
            point = (parts[0], int(parts[1]), CLASS_GUIDANCE if g == CLASS_GUIDANCE else float(g))
            if len(parts) == 5:
                point += ((float(parts[3]), float(parts[4])),)
        except ValueError:
            raise ValueError(f"a point is SAMPLER:NFE:GUIDANCE[:SIGMA_LO:SIGMA_HI] with an integer NFE, a guidance "
                             f"scale or 'class', and numbers, got {item!r}") from None
        out.append(point)
    return out


def noise_seed(seed: int, class_index: int, i: int) -> int:
    """Noise seed of clip ``i`` of the class at ``class_index`` (the same for every configuration)."""
    if not 0 <= i < 100_000 or not 0 <= class_index < 10:
        raise ValueError(f"need 0 <= i < 100000 and 0 <= class_index < 10, got i={i}, class_index={class_index}")
    return int(seed) * 1_000_000 + int(class_index) * 100_000 + int(i)


# ------------------------------------------------------------------------------------------ real data
def _pcm16(x: np.ndarray) -> np.ndarray:
    """Round-trip through 16-bit PCM, as generated clips are stored, so both sides see the same quantiser."""
    return (np.clip(np.round(x.astype(np.float64) * 32768.0), -32768, 32767) / 32768.0).astype(np.float32)


def synth_audioset(classes, per_class: int, base_seed: int, sample_rate: int, num_samples: int,
                   start: int = 0, progress: bool = False) -> AudioSet:
    """Built-in clips ``start .. start+per_class-1`` of each class for ``base_seed`` (see ``synth.clip_seed``)."""
    from .synth import CLASSES, clip_seed, synth_uri, synthesize
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise ValueError(f"classes {unknown} are not built-in classes ({', '.join(CLASSES)}); "
                         "pass a reference directory instead of 'builtin'")
    seconds = num_samples / sample_rate
    waves, labels, sources = [], [], []
    with tqdm(total=len(classes) * per_class, desc=f"synth (seed {base_seed})", unit="clip",
              disable=not progress) as bar:
        for li, c in enumerate(classes):
            ci = CLASSES.index(c)
            for i in range(start, start + per_class):
                s = clip_seed(base_seed, ci, i)
                waves.append(_pcm16(fit_length(synthesize(c, s, sample_rate, seconds), num_samples)))
                labels.append(li)
                sources.append(synth_uri(c, s))
                bar.update(1)
    return AudioSet(np.stack(waves), np.asarray(labels, np.int64), list(classes), sources, sample_rate)


def _subset_folder(root, classes, per_class, sample_rate, num_samples, seed) -> AudioSet:
    """Up to ``per_class`` clips per class from a class-per-folder tree (a seeded random choice of files)."""
    found, files = scan_folder(root)
    missing = [c for c in classes if c not in found]
    if missing:
        raise ValueError(f"{root} has no folder for classes {missing}; it has: {', '.join(found)}")
    rng = np.random.default_rng(seed)
    waves, labels, sources = [], [], []
    for li, c in enumerate(classes):
        fs = [f for f, fc in files if fc == c]
        pick = sorted(rng.choice(len(fs), min(per_class, len(fs)), replace=False)) if per_class else range(len(fs))
        for j in pick:
            try:
                w = load_audio(fs[j], sample_rate)
            except Exception as e:
                warnings.warn(f"skipping {fs[j]}: unreadable ({e})")
                continue
            waves.append(fit_length(w, num_samples))
            labels.append(li)
            sources.append(str(fs[j]))
    if not waves:
        raise ValueError(f"no usable clips in {root}")
    return AudioSet(np.stack(waves).astype(np.float32), np.asarray(labels, np.int64), list(classes), sources,
                    sample_rate)


def load_reference(reference, classes, sample_rate: int, num_samples: int, per_class: int | None = 200,
                   seed: int = REFERENCE_SEED, progress: bool = False) -> tuple[AudioSet, str]:
    """Held-out real clips: ``"builtin"`` (fresh synth seeds, base ``seed``) or a class-per-folder directory
    (all clips, or a seeded random ``per_class`` of them). Never pass the training clips themselves."""
    if str(reference) == "builtin":
        if seed == TRAIN_SEED:
            raise ValueError(f"reference seed {seed} is the built-in training set's base seed; use another "
                             f"(default {REFERENCE_SEED})")
        n = int(per_class or 200)
        ds = synth_audioset(classes, n, seed, sample_rate, num_samples, progress=progress)
        return ds, f"built-in synth, base seed {seed}, {n} clips/class (training used base seed {TRAIN_SEED})"
    root = Path(reference)
    if not root.is_dir():
        raise FileNotFoundError(f"reference {reference!r} is neither 'builtin' nor a directory")
    ds = _subset_folder(root, classes, per_class, sample_rate, num_samples, seed)
    return ds, f"{root} ({len(ds)} clips, {min(ds.counts().values())}-{max(ds.counts().values())}/class)"


def _resolve_train(train, model_dir: Path | None, classes) -> str | None:
    if train is not None and str(train) not in ("auto", ""):
        return None if str(train) == "none" else str(train)
    if model_dir is not None and (model_dir / "info.json").is_file():
        try:
            d = json.loads((model_dir / "info.json").read_text()).get("data", {}).get("data_dir")
        except Exception:
            d = None
        if d:
            for base in (Path.cwd(), REPO_ROOT):
                p = Path(d) if Path(d).is_absolute() else base / d
                if p.is_dir():
                    return str(p)
    from .synth import CLASSES
    return "builtin" if all(c in CLASSES for c in classes) else None


def load_train_subset(train, classes, sample_rate: int, num_samples: int, per_class: int,
                      seed: int = 0) -> tuple[AudioSet, str]:
    """``per_class`` real training clips per class: ``"builtin"`` (base seed 0) or a directory (seeded choice)."""
    if str(train) == "builtin":
        return (synth_audioset(classes, per_class, TRAIN_SEED, sample_rate, num_samples),
                f"built-in synth, base seed {TRAIN_SEED}, clips 0-{per_class - 1} of each class")
    ds = _subset_folder(Path(train), classes, per_class, sample_rate, num_samples, seed)
    return ds, f"{train} (random {per_class}/class, seed {seed})"


# ------------------------------------------------------------------------------------------ clip cache
def _wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    from .pipeline import to_pcm16
    buf = io.BytesIO()
    sf.write(buf, to_pcm16(wave), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _clip_path(root: Path, point: SweepPoint, class_name: str, i: int) -> Path:
    return root / point.key / class_name / f"{class_name}_{i:04d}.wav"


def _missing(root: Path, point: SweepPoint, classes, n: int) -> dict[str, list[int]]:
    return {c: [i for i in range(n) if not _clip_path(root, point, c, i).is_file()] for c in classes}


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs (start, length) of sorted indices, each at most MAX_CLIPS_PER_CALL long."""
    out = []
    for i in idx:
        if out and out[-1][0] + out[-1][1] == i and out[-1][1] < MAX_CLIPS_PER_CALL:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def _check_meta(meta_path: Path, want: dict, regenerate: bool) -> dict:
    """The configuration's record; refuses clips made with other settings unless ``regenerate`` (which
    deletes every cached clip of the configuration)."""
    if meta_path.is_file():
        have = json.loads(meta_path.read_text())
        diff = [k for k in ("ema_sha256", "seed", "sample_rate", "num_samples", "sampler", "nfe", "guidance",
                            "guidance_interval", "class_guidance", "class_guidance_interval")
                if have.get(k) != want.get(k)]
        if diff and not regenerate:
            raise ValueError(f"{meta_path.parent} holds clips made with other settings ({', '.join(diff)} differ: "
                             f"{[(k, have.get(k), want.get(k)) for k in diff]}); use another --out or --regenerate")
        if not regenerate:
            return have
    if regenerate and meta_path.parent.is_dir():
        for f in meta_path.parent.rglob("*.wav"):
            f.unlink()
    return dict(want, generation={"clips": 0, "seconds": 0.0})


def estimate_generation_seconds(pipe, points, missing_counts: dict, batch_size: int = 8) -> dict:
    """Time a short probe (2 network evaluations on one batch, unguided and guided) and extrapolate to every
    missing clip: seconds ~ clips x NFE x (seconds per clip-evaluation; guided calls run a double batch)."""
    total_units = {p: missing_counts[p] * p.nfe for p in points}
    if not any(total_units.values()):
        return {"seconds": 0.0, "per_eval": {}, "clip_evaluations": 0}
    b = max(1, min(batch_size, max(missing_counts.values())))
    seeds = list(range(b))
    cls = pipe.classes[0]
    pipe.sample_specs(cls, seeds[:1], "euler", 1, 1.0)                  # warm-up
    per = {}
    for guided in sorted({p.guided for p in points if total_units[p]}):   # interval / per-class points: upper bound
        t0 = time.perf_counter()
        pipe.sample_specs(cls, seeds, "euler", 2, 2.0 if guided else 1.0)
        per[guided] = (time.perf_counter() - t0) / (2 * b)
    secs = sum(u * per[p.guided] for p, u in total_units.items() if u)
    return {"seconds": float(secs), "per_eval": {("guided" if k else "unguided"): v for k, v in per.items()},
            "clip_evaluations": int(sum(total_units.values()))}


def _generate_point(pipe, point: SweepPoint, classes, n: int, seed: int, clips_root: Path, fingerprint: str,
                    batch_size: int, regenerate: bool, bar) -> dict:
    d = clips_root / point.key
    want = {"checkpoint": pipe.checkpoint, "ema_sha256": fingerprint, "seed": int(seed),
            "sample_rate": pipe.sample_rate, "num_samples": pipe.codec.num_samples, "sampler": point.sampler,
            "nfe": point.nfe, "requested_nfe": point.requested_nfe, "guidance": point.guidance,
            "guidance_interval": interval_list(point.interval),
            "noise_seed": "seed * 1_000_000 + class_index * 100_000 + i"}
    if point.class_guidance:
        want["class_guidance"] = dict(point.class_guidance)
    if point.class_intervals:
        want["class_guidance_interval"] = {c: interval_list(iv) for c, iv in point.class_intervals}
    meta = _check_meta(d / "meta.json", want, regenerate)
    missing = _missing(clips_root, point, classes, n)
    made = 0
    for c, idx in missing.items():
        ci = pipe.class_index(c)
        for start, length in _runs(idx):
            t0 = time.perf_counter()
            gen = pipe.generate(c, n=length, sampler=point.sampler, nfe=point.nfe, guidance=point.guidance_for(c),
                                seed=noise_seed(seed, ci, start), batch_size=batch_size,
                                guidance_interval=point.interval_for(c))
            meta["generation"]["seconds"] += time.perf_counter() - t0
            meta["generation"]["clips"] += length
            for j in range(length):
                p = _clip_path(clips_root, point, c, start + j)
                p.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(p, _wav_bytes(gen.waves[j], pipe.sample_rate))
            made += length
            if bar is not None:
                bar.update(length * point.nfe)
    meta["generation"]["seconds"] = round(meta["generation"]["seconds"], 3)
    atomic_write_json(d / "meta.json", meta)
    return {"generated": made, "reused": n * len(classes) - made, "meta": meta}


def _load_point(clips_root: Path, point: SweepPoint, classes, n: int, sample_rate: int,
                num_samples: int) -> dict[str, np.ndarray]:
    out = {}
    for c in classes:
        waves = [fit_length(load_audio(_clip_path(clips_root, point, c, i), sample_rate), num_samples)
                 for i in range(n)]
        out[c] = np.stack(waves).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------ scoring
METRIC_COLUMNS = ["fad", "fad_vs_baseline", "kid", "kid_std", "accuracy", "map_at_10", "inception_score",
                  "diversity", "diversity_real", "diversity_ratio", *F.FIDELITY_COLUMNS, "copy_share", "copy_top1_mean"]


class _Scorer:
    """Holds the encoder, classifier, index and the reference's statistics; scores one set of clips."""

    def __init__(self, encoder, classifier, index, reference: AudioSet, classes, topk, kid_subsets: int,
                 level: str, progress: bool):
        self.encoder, self.classifier, self.index = encoder, classifier, index
        self.classes, self.topk, self.kid_subsets, self.level = list(classes), list(topk), kid_subsets, level
        self.progress = progress
        ref = {c: reference.waves[reference.labels == i] for i, c in enumerate(reference.classes)}
        self.ref_emb = {c: self.embed(ref[c], reference.sample_rate) for c in self.classes}
        self.ref_div = {c: M.mean_pairwise_cosine_distance(self.ref_emb[c][1]) for c in self.classes}
        sr = reference.sample_rate
        self.ref_levels = {c: F.clip_levels(ref[c], sr) for c in self.classes}      # encoder-free fidelity
        self.ref_bands = {c: F.band_power(ref[c], sr) for c in self.classes}
        self.thresholds = {}
        if index is not None:
            for c in self.classes:
                try:
                    self.thresholds[c] = index.threshold(95, c)
                except ValueError:
                    self.thresholds[c] = float("nan")
        self.cls_map = None
        if classifier is not None:
            self.cls_map = {c: classifier.classes.index(c) for c in self.classes}

    def embed(self, waves: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
        """(set embeddings used for FAD/KID, clip embeddings used for diversity)."""
        e, ci, _ = self.encoder.embed_windows(waves, sr, progress=False)
        clips = np.zeros((len(waves), e.shape[1]), np.float64)
        np.add.at(clips, ci, e)
        clips /= np.maximum(np.linalg.norm(clips, axis=1, keepdims=True), 1e-12)
        return (e if self.level == "windows" else clips.astype(np.float32)), clips.astype(np.float32)

    def score(self, sets: dict[str, np.ndarray], sr: int, *, fad_kid: bool = True, copying: bool = True,
              seed: int = 0) -> dict[str, dict]:
        rows = {c: {"n": len(sets[c])} for c in self.classes}
        rows["overall"] = {"n": int(sum(len(v) for v in sets.values()))}
        emb = {c: self.embed(sets[c], sr) for c in self.classes}
        # FAD / KID
        for c in self.classes:
            rows[c].update(self._fad_kid(emb[c][0], self.ref_emb[c][0], seed) if fad_kid else self._no_fad_kid())
        rows["overall"].update(self._fad_kid(np.concatenate([emb[c][0] for c in self.classes]),
                                             np.concatenate([self.ref_emb[c][0] for c in self.classes]), seed)
                               if fad_kid else self._no_fad_kid())
        # diversity
        ratios = []
        for c in self.classes:
            d = M.mean_pairwise_cosine_distance(emb[c][1])
            r = d / self.ref_div[c] if (np.isfinite(d) and self.ref_div[c] > 0) else float("nan")
            rows[c].update(diversity=d, diversity_real=self.ref_div[c], diversity_ratio=r)
            ratios.append(r)
        rows["overall"].update(diversity=float(np.nanmean([rows[c]["diversity"] for c in self.classes])),
                               diversity_real=float(np.nanmean(list(self.ref_div.values()))),
                               diversity_ratio=float(np.nanmean(ratios)) if np.any(np.isfinite(ratios)) else float("nan"))
        # fidelity without a learned encoder: level, loudness, true peak, spectral envelope (a gain-invariant
        # encoder does not see a quiet or dull clip)
        fid = {c: F.compare(F.clip_levels(sets[c], sr), self.ref_levels[c], F.band_power(sets[c], sr),
                            self.ref_bands[c]) for c in self.classes if len(sets[c])}
        for c, r in fid.items():
            rows[c].update(r)
        if fid:
            for k in ("level_gap_db", "lufs_gap", "true_peak_gap"):
                rows["overall"][k] = float(np.mean([r[k] for r in fid.values()]))
            worst = max(fid, key=lambda c: abs(fid[c]["band_gap_worst_db"]))
            rows["overall"].update(band_gap_worst_db=fid[worst]["band_gap_worst_db"],
                                   band_gap_worst_band=fid[worst]["band_gap_worst_band"],
                                   band_gap_worst_class=worst)
        # classifier
        if self.classifier is not None:
            probs = {c: self.classifier.predict_proba(sets[c], sr) for c in self.classes}
            for key, cs in [(c, [c]) for c in self.classes] + [("overall", self.classes)]:
                p = np.concatenate([probs[c] for c in cs])
                y = np.concatenate([np.full(len(probs[c]), self.cls_map[c]) for c in cs])
                rows[key]["accuracy"] = M.top_k_accuracy(p, y, 1)
                for k in self.topk:
                    if k > 1:
                        rows[key][f"top{k}_accuracy"] = M.top_k_accuracy(p, y, k)
                rows[key]["map_at_10"] = M.map_at_k(p, y, 10)
                rows[key]["inception_score"] = M.inception_score(p)
        # copying
        if copying and self.index is not None:
            above_all, sims_all = [], []
            for c in self.classes:
                thr = self.thresholds.get(c, float("nan"))
                if c not in self.index.classes or not np.isfinite(thr):
                    continue
                res = self.index.search(list(sets[c]), k=1, same_class=c, sample_rate=sr, progress=False)
                sims = np.array([r[0].similarity if len(r) else np.nan for r in res], np.float64)
                above = sims > thr
                rows[c].update(copy_share=float(np.mean(above)), copy_top1_mean=float(np.nanmean(sims)),
                               copy_threshold=thr)
                above_all += list(above)
                sims_all += list(sims)
            if above_all:
                rows["overall"].update(copy_share=float(np.mean(above_all)),
                                       copy_top1_mean=float(np.nanmean(sims_all)))
        return rows

    @staticmethod
    def _no_fad_kid() -> dict:
        return {"fad": float("nan"), "kid": float("nan"), "kid_std": float("nan")}

    def _fad_kid(self, x, y, seed) -> dict:
        out = self._no_fad_kid()
        if len(x) >= 2 and len(y) >= 2:
            out["fad"] = M.fad(x, y)
            k = M.kid(x, y, subsets=self.kid_subsets, seed=seed)
            out["kid"], out["kid_std"] = k["mean"], k["std"]
        return out


# ------------------------------------------------------------------------------------------ the sweep
def _load_encoder(encoder):
    from .encoders import load_encoder
    if hasattr(encoder, "embed_windows"):
        return encoder
    return load_encoder(encoder or "default", head=None)


def _load_classifier(classifier, classes):
    from .classifier import DEFAULT_CLASSIFIER_DIR, AudioClassifier, load_classifier
    if classifier is None or str(classifier) == "none":
        return None, "none"
    if isinstance(classifier, AudioClassifier):
        clf = classifier
    else:
        default = str(classifier) == "default"
        if default and not (DEFAULT_CLASSIFIER_DIR / "classifier.json").is_file():
            warnings.warn(f"no classifier at {DEFAULT_CLASSIFIER_DIR}; classifier scores are left empty "
                          "(train one with 'edmsound classifier train')")
            return None, "none (not found)"
        clf = load_classifier(classifier)
    missing = [c for c in classes if c not in clf.classes]
    if missing:
        warnings.warn(f"the classifier ({', '.join(clf.classes)}) does not know the checkpoint's classes {missing}; "
                      "classifier scores are left empty")
        return None, f"{clf.name} (classes do not match)"
    ho = clf.info.get("holdout", {}).get("accuracy")
    return clf, f"{clf.name}" + (f" (held-out accuracy {ho:.3f})" if ho is not None else "")


def _load_index(index):
    from .index import CopyIndex
    if index is None or str(index) == "none":
        return None, "none"
    if isinstance(index, CopyIndex):
        return index, repr(index)
    path = DEFAULT_INDEX_DIR if str(index) == "default" else Path(index)
    if str(index) == "default" and not (path / "index.json").is_file():
        warnings.warn(f"no copy-detection index at {path}; the copy share is left empty (build one with "
                      "'edmsound index build --data data/builtin --out checkpoints/index')")
        return None, "none (not found)"
    idx = CopyIndex.load(path)
    return idx, f"{path} ({idx.encoder_info.get('name')})"


def evaluate_sweep(checkpoint, out_dir, *, reference="builtin", samplers=DEFAULT_SAMPLERS, nfes=DEFAULT_NFES,
                   guidances=DEFAULT_GUIDANCES, n_per_class: int = 32, encoder="default", classifier="default",
                   index="default", train="auto", reference_per_class: int | None = 200,
                   reference_seed: int = REFERENCE_SEED, seed: int = 0, invalid_nfe: str = "nearest",
                   batch_size: int = 8, device: str | None = None, topk=(1, 3), kid_subsets: int = 100,
                   embedding_level: str = "windows", regenerate: bool = False, dry_run: bool = False,
                   progress: bool = True, points=(), guidance_interval=None, log=print) -> dict:
    """Run the sweep (see the module docstring) and write ``results.{csv,md,json}`` and ``plots/`` to
    ``out_dir``. Returns the results dict (``rows``: one dict per (kind, config, class))."""
    from .encoders import file_sha256
    from .pipeline import EDMSoundPipeline
    if embedding_level not in EMBEDDING_LEVELS:
        raise ValueError(f"embedding_level must be one of {', '.join(EMBEDDING_LEVELS)}, got {embedding_level!r}")
    n_per_class = int(n_per_class)
    if not 2 <= n_per_class <= 100_000:
        raise ValueError(f"n_per_class must be in [2, 100000], got {n_per_class}")
    topk = sorted({int(k) for k in topk} | {1})
    if topk[0] < 1:
        raise ValueError(f"top-k values must be >= 1, got {topk}")
    pipe = EDMSoundPipeline(checkpoint, device=device)
    points, notes = plan_sweep(samplers, nfes, guidances, invalid_nfe, extra_points=points,
                               guidance_interval=guidance_interval,
                               class_guidance=pipe.preset.class_scales(pipe.classes),
                               class_intervals=pipe.preset.class_intervals(pipe.classes))
    for n in notes:
        log(f"note: {n}")
    out = Path(out_dir)
    clips_root = out / "clips"
    classes, sr, ns = list(pipe.classes), pipe.sample_rate, pipe.codec.num_samples
    fingerprint = file_sha256(pipe.model_dir / "ema.safetensors")
    missing = {p: sum(len(v) for v in _missing(clips_root, p, classes, n_per_class).values()) for p in points}
    if regenerate:
        missing = {p: n_per_class * len(classes) for p in points}
    est = estimate_generation_seconds(pipe, points, missing, batch_size)
    log(f"{len(points)} configurations x {len(classes)} classes x {n_per_class} clips; "
        f"{sum(missing.values())} clips to generate, {len(points) * len(classes) * n_per_class - sum(missing.values())} cached")
    if est["clip_evaluations"]:
        per = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in est["per_eval"].items())
        log(f"estimated generation time: {est['seconds'] / 60:.1f} min ({est['clip_evaluations']} clip-evaluations; "
            f"probe per clip and evaluation: {per}); scoring adds about "
            f"{(40 + 0.03 * len(points) * len(classes) * n_per_class) / 60:.0f} min")
        if est["seconds"] > 3600:
            top = max(p.nfe for p in points)
            share = sum(missing[p] * p.nfe for p in points if p.nfe == top) / max(1, est["clip_evaluations"])
            log(f"hint: NFE {top} is {100 * share:.0f}% of the network evaluations; fewer NFE values, a smaller "
                "--n-per-class (cost is linear in it) or fewer guided scales (w != 1 runs a double batch) shorten "
                "the run; cached clips are reused by later runs")
    if dry_run:
        return {"points": [asdict(p) for p in points], "notes": notes, "estimate": est, "missing": {p.key: m for p, m in missing.items()}}

    t_start = time.perf_counter()
    enc = _load_encoder(encoder)
    clf, clf_desc = _load_classifier(classifier, classes)
    idx, idx_desc = _load_index(index)
    ref, ref_desc = load_reference(reference, classes, sr, ns, reference_per_class, reference_seed, progress)
    log(f"reference: {ref_desc}")
    scorer = _Scorer(enc, clf, idx, ref, classes, topk, kid_subsets, embedding_level, progress)

    rows = []

    def add(kind, point, per, extra=None):
        for key, r in per.items():
            row = {"kind": kind, "sampler": point.sampler if point else "", "requested_nfe": point.requested_nfe if point else "",
                   "nfe": point.nfe if point else "", "guidance": point.guidance if point else "",
                   "guidance_interval": point.interval_text if point else "", "class": key}
            if point is not None and point.class_guidance:
                row["guidance_per_class"] = point.class_guidance_text
            row.update(r)
            row.update(extra or {})
            rows.append(row)

    # baselines
    train_src = _resolve_train(train, pipe.model_dir, classes)
    train_desc = "none"
    if train_src is not None:
        try:
            tr, train_desc = load_train_subset(train_src, classes, sr, ns, n_per_class, seed)
        except (FileNotFoundError, ValueError) as e:
            warnings.warn(f"training subset unavailable ({e}); no baseline row")
            tr = None
        if tr is not None:
            sets = {c: tr.waves[tr.labels == i] for i, c in enumerate(classes)}
            add("baseline: training subset", None, scorer.score(sets, sr, copying=False, seed=seed))
    ref_sets = {c: ref.waves[ref.labels == i] for i, c in enumerate(classes)}
    add("baseline: reference", None, scorer.score(ref_sets, sr, fad_kid=False, seed=seed))
    base_fad = {r["class"]: r.get("fad", float("nan")) for r in rows if r["kind"] == "baseline: training subset"}

    # generation + scoring
    total_units = sum(missing[p] * p.nfe for p in points)
    with tqdm(total=total_units, desc="generate", unit="clip-NFE", disable=not progress or total_units == 0) as bar:
        for p in points:
            res = _generate_point(pipe, p, classes, n_per_class, seed, clips_root, fingerprint, batch_size,
                                  regenerate, bar)
            sets = _load_point(clips_root, p, classes, n_per_class, sr, ns)
            g = res["meta"]["generation"]
            spc = g["seconds"] / g["clips"] if g["clips"] else float("nan")
            add("generated", p, scorer.score(sets, sr, seed=seed), {"seconds_per_clip": spc})
            bar.set_postfix_str(p.key)
    for r in rows:
        b = base_fad.get(r["class"], float("nan"))
        r["fad_vs_baseline"] = r.get("fad", float("nan")) / b if (np.isfinite(b) and b > 0) else float("nan")

    settings = {
        "checkpoint": str(checkpoint), "ema_sha256": fingerprint, "classes": classes, "sample_rate": sr,
        "n_per_class": n_per_class, "seed": seed, "noise_seed": "seed * 1_000_000 + class_index * 100_000 + i",
        "reference": ref_desc, "training_subset": train_desc,
        "encoder": {"name": enc.name, "weights_hash": enc.weights_hash, "level": embedding_level},
        "classifier": clf_desc, "index": idx_desc, "kid": {"gamma2": M.KID_GAMMA2, "subsets": kid_subsets},
        "topk": topk, "invalid_nfe": invalid_nfe, "notes": notes,
        "points": [asdict(p) for p in points], "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    result = {"settings": settings, "rows": rows}
    write_outputs(result, out)
    log(f"wrote {out / 'results.md'}, {out / 'results.csv'} and {out / 'plots'}/ "
        f"({settings['wall_seconds'] / 60:.1f} min)")
    return result


# ------------------------------------------------------------------------------------------ outputs
def _columns(rows) -> list[str]:
    base = ["kind", "sampler", "requested_nfe", "nfe", "guidance", "guidance_interval", "class", "n"]
    if any("guidance_per_class" in r for r in rows):
        base.insert(6, "guidance_per_class")
    extra = []
    for r in rows:
        for k in r:
            if k not in base and k not in extra:
                extra.append(k)
    order = {k: i for i, k in enumerate(["fad", "fad_vs_baseline", "kid", "kid_std", "accuracy"])}
    extra.sort(key=lambda k: (order.get(k, 5 if k.startswith("top") else 10 + (METRIC_COLUMNS.index(k)
                                                                              if k in METRIC_COLUMNS else 50))))
    return base + extra


def _csv(rows) -> str:
    cols = _columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, list):
                v = ";".join(f"{x:.4g}" for x in v)
            vals.append("" if (isinstance(v, float) and not math.isfinite(v)) else
                        (f"{v:.6g}" if isinstance(v, float) else v))
        w.writerow(vals)
    return buf.getvalue()


def _f(v, fmt="{:.3f}"):
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


# (column title, key, formatter) of the markdown tables
def _md_metrics(rows):
    tops = sorted({k for r in rows for k in r if k.startswith("top") and k.endswith("_accuracy")},
                  key=lambda k: int(k[3:-9]))
    cols = [("FAD", "fad", "{:.4f}"), ("FAD / baseline", "fad_vs_baseline", "{:.2f}"),
            ("KID ×10³", "kid", None), ("accuracy", "accuracy", "{:.3f}")]
    cols += [(f"top-{k[3:-9]}", k, "{:.3f}") for k in tops]
    cols += [("mAP@10", "map_at_10", "{:.3f}"), ("IS", "inception_score", "{:.2f}"),
             ("diversity ratio", "diversity_ratio", "{:.2f}"), ("level gap dB", "level_gap_db", "{:+.1f}"),
             ("LUFS gap", "lufs_gap", "{:+.1f}"), ("worst band dB", "band_gap_worst_db", "{:+.1f}"),
             ("copy %", "copy_share", None)]
    return cols


def _cell(r, key, fmt):
    if key == "kid":
        v, s = r.get("kid"), r.get("kid_std")
        return "–" if v is None or not math.isfinite(v) else f"{1e3 * v:.2f} ± {1e3 * (s or 0):.2f}"
    if key == "copy_share":
        v = r.get(key)
        return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"
    return _f(r.get(key), fmt)


def _label(r):
    if r["kind"] == "generated":
        g = "per class" if r["guidance"] == CLASS_GUIDANCE else f"{r['guidance']:g}"
        return [r["sampler"], str(r["nfe"]) + ("" if r["nfe"] == r["requested_nfe"] else f" (asked {r['requested_nfe']})"),
                g + _interval_label(r)]
    return [f"*{r['kind']}*", "", ""]


def _interval_label(r) -> str:
    """`` σ∈(lo, hi]`` for a row with a guidance interval, else ``""``."""
    iv = r.get("guidance_interval") or ""
    if not iv:
        return ""
    lo, hi = iv.split(":")
    return f" (σ∈({lo}, {hi}])"


def _series(r) -> str:
    """Plot series of a generated row: the sampler, with its guidance interval if any."""
    return r["sampler"] + _interval_label(r)


def _markdown(result) -> str:
    s, rows = result["settings"], result["rows"]
    cols = _md_metrics(rows)
    L = ["# EDMSound evaluation", ""]
    L += [f"- checkpoint: `{s['checkpoint']}` (ema sha256 {s['ema_sha256'][:12]})",
          f"- reference (held-out real clips): {s['reference']}",
          f"- baseline training subset: {s['training_subset']}",
          f"- encoder for FAD, KID and diversity: **{s['encoder']['name']}** (weights {s['encoder']['weights_hash'][:12]}, "
          f"{s['encoder']['level'][:-1]}-level embeddings). FAD and KID values are only comparable with the same encoder.",
          f"- classifier: {s['classifier']}", f"- copy-detection index: {s['index']}",
          f"- {s['n_per_class']} clips per class and configuration; clip i of class c starts from noise seed "
          f"{s['noise_seed']} with seed = {s['seed']}, identical for every configuration",
          f"- KID: IMQ kernel, γ² = {s['kid']['gamma2']:g}, mean ± std over {s['kid']['subsets']} subsets"]
    for n in s["notes"]:
        L.append(f"- note: {n}")
    L += ["", "Lower is better for FAD, FAD / baseline (target: ≤ 2.5) and KID; higher is better for accuracy, "
          "top-k and mAP@10; IS is at most the number of classes; a diversity ratio near 1 means as diverse as "
          "real clips; the level gap is the mean RMS level (dBFS) of the clips minus the real clips' (0 = as loud); "
          "copy % is the share above the training set's own 95th percentile (≈ 5 % for real "
          "held-out clips). See docs/evaluation.md.", "", "## Overall", ""]
    head = ["sampler", "NFE", "w"] + [c[0] for c in cols] + ["s / clip"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["class"] != "overall":
            continue
        L.append("| " + " | ".join(_label(r) + [_cell(r, k, f) for _, k, f in cols]
                                   + [_f(r.get("seconds_per_clip"), "{:.2f}")]) + " |")
    classes = s["classes"]
    for title, key, fmt in cols:
        if not any(key in r and not (isinstance(r[key], float) and not math.isfinite(r[key])) for r in rows):
            continue
        L += ["", f"## Per class: {title}", ""]
        head = ["sampler", "NFE", "w"] + classes + ["overall"]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in _groups(rows):
            first = next(iter(g.values()))
            L.append("| " + " | ".join(_label(first) + [_cell(g[c], key, fmt) if c in g else "–"
                                                        for c in classes + ["overall"]]) + " |")
    L += _md_fidelity(result)
    return "\n".join(L) + "\n"


def _groups(rows) -> list[dict]:
    """Rows grouped by configuration (kind, sampler, NFE, guidance, interval): ``{class: row}`` each, in order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["kind"], r["sampler"], r["nfe"], r["guidance"], r.get("guidance_interval", "")),
                          {})[r["class"]] = r
    return list(groups.values())


def _md_fidelity(result) -> list[str]:
    """The encoder-free fidelity tables: each gap beside its noise floor (the training subset, real clips of the
    same size, measured against the same reference)."""
    s, rows = result["settings"], result["rows"]
    if not any("band_gap_db" in r for r in rows):
        return []
    classes = s["classes"]
    groups = _groups(rows)
    floor = next((g for g in groups if next(iter(g.values()))["kind"] == "baseline: training subset"), {})
    ref = next((g for g in groups if next(iter(g.values()))["kind"] == "baseline: reference"), {})
    edges = F.band_edges(s["sample_rate"], len(next(r["band_gap_db"] for r in rows if "band_gap_db" in r)))
    L = ["", "## Fidelity without a learned encoder", "",
         "Gaps of the generated clips against the reference, each beside its **floor**: the same gap for the "
         "training subset (real clips, as many per class, disjoint from the reference). Level = mean RMS dBFS; "
         "LUFS = median BS.1770 integrated loudness; TP = median true peak (dBTP); worst band = the largest "
         f"|gap| of {len(edges) - 1} log-spaced bands ({edges[0]:.0f} Hz – {edges[-1] / 1000:g} kHz) of mean power. "
         "Reference LUFS / TP: the real clips' medians."]
    head = ["class", "level gap", "floor", "LUFS gap", "floor", "LUFS p10–p90", "TP gap", "floor", "TP p90",
            "worst band", "floor", "ref LUFS / TP"]

    def v(g, c, k, fmt="{:+.1f}"):
        return _f(g.get(c, {}).get(k), fmt)

    def band(g, c):
        r = g.get(c, {})
        if "band_gap_worst_db" not in r:
            return "–"
        b = r["band_gap_worst_band"]
        return f"{r['band_gap_worst_db']:+.1f} ({edges[b]:.0f}–{edges[b + 1]:.0f} Hz)" if isinstance(b, int) else "–"

    for g in groups:
        first = next(iter(g.values()))
        if first["kind"] != "generated":
            continue
        L += ["", f"### {' '.join(x for x in _label(first) if x)}", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in classes + ["overall"]:
            spread = (f"{g[c]['lufs_p10']:.1f} … {g[c]['lufs_p90']:.1f}" if c in g and "lufs_p10" in g[c] else "–")
            refl = (f"{ref[c]['lufs_median']:.1f} / {ref[c]['true_peak_median']:.1f}"
                    if c in ref and "lufs_median" in ref[c] else "–")
            L.append("| " + " | ".join([c, v(g, c, "level_gap_db"), v(floor, c, "level_gap_db"), v(g, c, "lufs_gap"),
                                        v(floor, c, "lufs_gap"), spread, v(g, c, "true_peak_gap"),
                                        v(floor, c, "true_peak_gap"), v(g, c, "true_peak_p90", "{:.1f}"),
                                        band(g, c), band(floor, c), refl]) + " |")
    centres = np.sqrt(edges[:-1] * edges[1:])
    hz = [f"{c:.0f}" if c < 1000 else f"{c / 1000:.1f}k" for c in centres]
    L += ["", "### Band gaps (dB) per class", "", "Band centres in Hz. *floor*: the training subset's gaps.", ""]
    head = ["configuration", "class"] + hz
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        first = next(iter(g.values()))
        if first["kind"] == "baseline: reference":
            continue
        name = "*floor*" if first["kind"] != "generated" else " ".join(x for x in _label(first) if x)
        for c in classes:
            if c in g and "band_gap_db" in g[c]:
                L.append("| " + " | ".join([name, c] + [f"{x:+.1f}" for x in g[c]["band_gap_db"]]) + " |")
    return L


PLOT_METRICS = [("fad", "FAD"), ("fad_vs_baseline", "FAD / training baseline"), ("kid", "KID"),
                ("accuracy", "classifier accuracy (category fit)"), ("map_at_10", "mAP@10"),
                ("inception_score", "IS analogue"), ("diversity_ratio", "diversity ratio (generated / real)"),
                ("copy_share", "share above training p95 (copying)")]


OVERVIEW_METRICS = ["fad_vs_baseline", "accuracy", "diversity_ratio", "copy_share"]


def _draw_metric(ax, key, g, gen, base, samplers):
    """One panel: ``key`` vs NFE for every sampler at guidance ``g``, with the baselines and the targets."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    for s in samplers:
        rs = sorted((r for r in gen if _series(r) == s and r["guidance"] == g), key=lambda r: r["nfe"])
        x = [r["nfe"] for r in rs]
        y = [r.get(key, np.nan) for r in rs]
        if key == "kid":
            ax.errorbar(x, y, yerr=[r.get("kid_std", 0) for r in rs], marker="o", capsize=3, label=s)
        else:
            ax.plot(x, y, marker="o", label=s)
    b = base.get("baseline: training subset", {}).get(key, np.nan)
    if key == "fad_vs_baseline":
        ax.axhline(1.0, color="gray", ls="--", lw=1, label="training subset")
        ax.axhline(FAD_RATIO_MAX, color="red", ls=":", lw=1, label=f"{FAD_RATIO_MAX:g} × baseline")
    elif np.isfinite(b):
        ax.axhline(b, color="gray", ls="--", lw=1, label="training subset")
        if key == "fad":
            ax.axhline(FAD_RATIO_MAX * b, color="red", ls=":", lw=1, label=f"{FAD_RATIO_MAX:g} × baseline")
    r = base.get("baseline: reference", {}).get(key, np.nan)
    if key in ("accuracy", "copy_share") and np.isfinite(r):
        ax.axhline(r, color="green", ls="-.", lw=1, label="held-out real")
    ax.set_xscale("log")
    ticks = sorted({r["nfe"] for r in gen})          # every NFE of the sweep (panels may share the x axis)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE")
    ax.grid(alpha=0.3)


def _save_fig(fig, path: Path):
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _plots(result, out: Path) -> list[Path]:
    """``plots/<metric>.png`` (one panel per guidance scale) and ``plots/overview.png`` (the key
    metrics, one row each, one column per guidance scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["class"] == "overall"]
    gen = [r for r in rows if r["kind"] == "generated" and r["guidance"] != CLASS_GUIDANCE]   # per-class: tables only
    base = {r["kind"]: r for r in rows if r["kind"] != "generated"}
    tops = sorted({k for r in rows for k in r if k.startswith("top") and k.endswith("_accuracy")})
    metrics = PLOT_METRICS[:4] + [(k, f"top-{k[3:-9]} accuracy") for k in tops] + PLOT_METRICS[4:]
    titles = dict(metrics)
    guid = sorted({r["guidance"] for r in gen})
    samplers = list(dict.fromkeys(_series(r) for r in gen))
    (out / "plots").mkdir(parents=True, exist_ok=True)
    paths = []
    enc = result["settings"]["encoder"]["name"]

    def ylabel(key):
        return titles[key] + (f"\n[{enc}]" if key in ("fad", "kid", "diversity_ratio") else "")

    def has(key):
        return any(np.isfinite(r.get(key, np.nan)) for r in gen)

    for key, title in metrics:
        if not has(key):
            continue
        fig, axes = plt.subplots(1, len(guid), figsize=(4.2 * len(guid), 3.4), squeeze=False, sharey=True)
        for ax, g in zip(axes[0], guid):
            _draw_metric(ax, key, g, gen, base, samplers)
            ax.set_title(f"guidance w = {g:g}", fontsize=9)
        axes[0][0].set_ylabel(ylabel(key))
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{title} vs NFE", fontsize=10)
        fig.tight_layout()
        _save_fig(fig, out / "plots" / f"{key}.png")
        paths.append(out / "plots" / f"{key}.png")

    bands = _band_plot(result, out / "plots" / "bands.png")
    if bands is not None:
        paths.append(bands)

    keys = [k for k in OVERVIEW_METRICS if has(k)]
    if keys:
        fig, axes = plt.subplots(len(keys), len(guid), figsize=(3.6 * len(guid) + 0.8, 2.6 * len(keys)),
                                 squeeze=False, sharex=True, sharey="row")
        for i, key in enumerate(keys):
            for j, g in enumerate(guid):
                _draw_metric(axes[i][j], key, g, gen, base, samplers)
                if i == 0:
                    axes[i][j].set_title(f"guidance w = {g:g}", fontsize=9)
                if i < len(keys) - 1:
                    axes[i][j].set_xlabel("")
            axes[i][0].set_ylabel(ylabel(key), fontsize=8)
            axes[i][-1].legend(fontsize=6)
        fig.suptitle(f"EDMSound evaluation: {result['settings'].get('checkpoint', '')}", fontsize=10)
        fig.tight_layout()
        _save_fig(fig, out / "plots" / "overview.png")
        paths.append(out / "plots" / "overview.png")
    return paths


def _band_plot(result, path: Path) -> Path | None:
    """Per class: the band gaps (dB) of every generated configuration against the reference, with the floor
    (the training subset's gaps) in grey."""
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "band_gap_db" in r and r["class"] != "overall"]
    if not rows:
        return None
    classes = result["settings"]["classes"]
    edges = F.band_edges(result["settings"]["sample_rate"], len(rows[0]["band_gap_db"]))
    centres = np.sqrt(edges[:-1] * edges[1:])
    cols = min(4, len(classes))
    nrow = math.ceil(len(classes) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(3.3 * cols, 2.6 * nrow), squeeze=False, sharex=True, sharey=True)
    for ax, c in zip(axes.flat, classes):
        for r in rows:
            if r["class"] != c or r["kind"] == "baseline: reference":
                continue
            if r["kind"] == "generated":
                ax.plot(centres, r["band_gap_db"], marker=".", label=" ".join(x for x in _label(r) if x))
            else:
                ax.plot(centres, r["band_gap_db"], color="gray", ls="--", label="floor (training subset)")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_title(c, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("band gap dB")
    for ax in axes[-1]:
        ax.set_xlabel("Hz")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("mean power per band, generated minus real (dB)", fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)
    return path


def write_outputs(result: dict, out_dir) -> dict:
    """``results.csv``, ``results.md``, ``results.json`` and ``plots/*.png`` (all written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.csv", _csv(result["rows"]).encode())
    atomic_write_bytes(out / "results.md", _markdown(result).encode())

    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v
    atomic_write_json(out / "results.json", {"settings": result["settings"],
                                             "rows": [{k: clean(v) for k, v in r.items()} for r in result["rows"]]})
    plots = _plots(result, out)
    return {"csv": out / "results.csv", "markdown": out / "results.md", "plots": plots}
