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

The encoder-free fidelity measures (level, loudness, true peak, spectral envelope, centroid) compare against a
larger held-out set, ``fidelity_reference_per_class`` clips per class (2,000 by default; the FAD reference's clips are
its first ones). They cost no embedding, and a band that a few clips of a class carry (a wooden floor's thump in
the footsteps, 10 % of them) is estimated from 200 clips with an error of several decibels, the same for every model
compared against it.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import fidelity as F
from . import metrics as M
from .points import SweepPoint, noise_seed, plan_sweep
from .tables import write_outputs
from ..core.storage import REPO_ROOT, atomic_write_bytes, atomic_write_json
from ..data.folder import AudioSet, scan_folder
from ..audio.io import fit_length, load_audio, wav_bytes
from ..core.guidance import interval_list

__all__ = ["synth_audioset", "load_reference", "load_references", "load_train_subset", "evaluate_sweep",
           "estimate_generation_seconds", "generate_in_calls", "fidelity_reference_size", "eq_fingerprint",
           "DEFAULT_SAMPLERS", "DEFAULT_NFES", "DEFAULT_GUIDANCES"]

DEFAULT_INDEX_DIR = REPO_ROOT / "checkpoints" / "index"
DEFAULT_SAMPLERS = ("heun", "dpmpp_2m", "deis")
DEFAULT_NFES = (5, 10, 20, 50)
DEFAULT_GUIDANCES = (1.0, 2.0, 4.0)
EMBEDDING_LEVELS = ("windows", "clips")
FIDELITY_REFERENCE_PER_CLASS = 2000   # held-out clips per class for level, loudness and band gaps (no encoder)
REFERENCE_SEED = 7          # held-out built-in clips; the built-in training set used base seed 0
TRAIN_SEED = 0
MAX_CLIPS_PER_CALL = 64     # EDMSoundPipeline.generate's limit


def fidelity_reference_size(per_class: int | None, reference_per_class: int | None) -> int | None:
    """Held-out clips per class the encoder-free fidelity measures compare against: ``per_class``, where None means
    :data:`FIDELITY_REFERENCE_PER_CLASS` and 0 the FAD (or diversity) reference's own ``reference_per_class``."""
    if per_class is None:
        return FIDELITY_REFERENCE_PER_CLASS
    if int(per_class) < 0:
        raise ValueError(f"fidelity_reference_per_class must be >= 0 (0: the FAD reference's own), got {per_class}")
    return int(per_class) or reference_per_class


def generate_in_calls(pipe, class_name: str, n: int, seed: int, **options) -> list:
    """``n`` clips of one class from ``pipe.generate`` in as many calls of at most :data:`MAX_CLIPS_PER_CALL` as
    needed; clip i comes from noise seed ``seed + i``, as from one call. Returns the calls' :class:`Generation`s."""
    n = int(n)
    return [pipe.generate(class_name, n=min(MAX_CLIPS_PER_CALL, n - i), seed=int(seed) + i, **options)
            for i in range(0, n, MAX_CLIPS_PER_CALL)]


# ------------------------------------------------------------------------------------------ real data
def _pcm16(x: np.ndarray) -> np.ndarray:
    """Round-trip through 16-bit PCM, as generated clips are stored, so both sides see the same quantiser."""
    return (np.clip(np.round(x.astype(np.float64) * 32768.0), -32768, 32767) / 32768.0).astype(np.float32)


def synth_audioset(classes, per_class: int, base_seed: int, sample_rate: int, num_samples: int,
                   start: int = 0, progress: bool = False) -> AudioSet:
    """Built-in clips ``start .. start+per_class-1`` of each class for ``base_seed`` (see ``synth.clip_seed``)."""
    from ..data.synth import CLASSES, clip_seed, synth_uri, synthesize
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


def _builtin_description(seed: int, per_class: int) -> str:
    return f"built-in synth, base seed {seed}, {per_class} clips/class (training used base seed {TRAIN_SEED})"


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
        return ds, _builtin_description(seed, n)
    root = Path(reference)
    if not root.is_dir():
        raise FileNotFoundError(f"reference {reference!r} is neither 'builtin' nor a directory")
    ds = _subset_folder(root, classes, per_class, sample_rate, num_samples, seed)
    return ds, f"{root} ({len(ds)} clips, {min(ds.counts().values())}-{max(ds.counts().values())}/class)"


def load_references(reference, classes, sample_rate: int, num_samples: int, per_class: int | None,
                    fidelity_per_class: int | None, seed: int = REFERENCE_SEED,
                    progress: bool = False) -> tuple[tuple[AudioSet, str], tuple[AudioSet, str]]:
    """The FAD / diversity reference (``per_class`` clips) and the fidelity reference (``fidelity_per_class``),
    each as :func:`load_reference` returns it. ``"builtin"`` synthesises the larger set once and takes the smaller
    as its first clips of every class (the very clips a call of its own makes); a folder is read once per size."""
    if str(reference) != "builtin":
        ref = load_reference(reference, classes, sample_rate, num_samples, per_class, seed, progress)
        if per_class == fidelity_per_class:
            return ref, ref
        return ref, load_reference(reference, classes, sample_rate, num_samples, fidelity_per_class, seed, progress)
    n, m = int(per_class or 200), int(fidelity_per_class or 200)
    big, _ = load_reference(reference, classes, sample_rate, num_samples, max(n, m), seed, progress)

    def first(k: int) -> AudioSet:          # the first k clips of every class (synth_audioset is class-major)
        return big if k == max(n, m) else big.subset([c * max(n, m) + i for c in range(len(big.classes))
                                                      for i in range(k)])
    return (first(n), _builtin_description(seed, n)), (first(m), _builtin_description(seed, m))


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
    from ..data.synth import CLASSES
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


LEGACY_META = {"precision": "bf16"}    # clip caches from before precision was recorded all ran under bf16 autocast


def eq_fingerprint(eq) -> str | None:
    """sha256 of a matching EQ's curves (its centres and gains; None: no EQ), so cached clips name the EQ they got."""
    if eq is None:
        return None
    d = eq.to_dict()
    return hashlib.sha256(json.dumps({"centres_hz": d["centres_hz"], "gains_db": d["gains_db"]},
                                     sort_keys=True).encode()).hexdigest()


def _check_meta(meta_path: Path, want: dict, regenerate: bool) -> dict:
    """The configuration's record; refuses clips made with other settings unless ``regenerate`` (which
    deletes every cached clip of the configuration)."""
    if meta_path.is_file():
        have = json.loads(meta_path.read_text())
        diff = [k for k in ("ema_sha256", "seed", "sample_rate", "num_samples", "sampler", "nfe", "guidance",
                            "guidance_interval", "class_guidance", "class_guidance_interval", "precision",
                            "matching_eq")
                if have.get(k, LEGACY_META.get(k)) != want.get(k)]
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
    missing clip: seconds ~ clips x NFE x (seconds per clip-evaluation; guided calls run two passes)."""
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
            "guidance_interval": interval_list(point.interval), "precision": pipe.precision,
            "noise_seed": "seed * 1_000_000 + class_index * 100_000 + i"}
    want["matching_eq"] = eq_fingerprint(pipe.eq_at(point.nfe))
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
                atomic_write_bytes(p, wav_bytes(gen.waves[j], pipe.sample_rate))
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


class _Scorer:
    """Holds the encoder, classifier, index and the reference's statistics; scores one set of clips."""

    def __init__(self, encoder, classifier, index, reference: AudioSet, classes, topk, kid_subsets: int,
                 level: str, progress: bool, fidelity_reference: AudioSet | None = None):
        self.encoder, self.classifier, self.index = encoder, classifier, index
        self.classes, self.topk, self.kid_subsets, self.level = list(classes), list(topk), kid_subsets, level
        self.progress = progress
        ref = {c: reference.waves[reference.labels == i] for i, c in enumerate(reference.classes)}
        self.ref_emb = {c: self.embed(ref[c], reference.sample_rate) for c in self.classes}
        self.ref_div = {c: M.mean_pairwise_cosine_distance(self.ref_emb[c][1]) for c in self.classes}
        sr = reference.sample_rate
        if fidelity_reference is not None:      # encoder-free fidelity: against the larger held-out set
            ref = {c: fidelity_reference.waves[fidelity_reference.labels == i]
                   for i, c in enumerate(fidelity_reference.classes)}
        self.ref_levels = {c: F.clip_levels(ref[c], sr) for c in self.classes}
        self.ref_bands = {c: F.clip_band_power(ref[c], sr) for c in self.classes}
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
        fid = {c: F.compare(F.clip_levels(sets[c], sr), self.ref_levels[c], F.clip_band_power(sets[c], sr),
                            self.ref_bands[c]) for c in self.classes if len(sets[c])}
        for c, r in fid.items():
            rows[c].update(r)
        if fid:
            for k in ("level_gap_db", "lufs_gap", "true_peak_gap"):
                rows["overall"][k] = float(np.mean([r[k] for r in fid.values()]))
            n_over = sum(r["over_full_scale"] * len(sets[c]) for c, r in fid.items())
            rows["overall"]["over_full_scale"] = float(n_over / sum(len(sets[c]) for c in fid))
            worst = max(fid, key=lambda c: abs(fid[c]["band_gap_worst_db"]))
            rows["overall"].update(band_gap_worst_db=fid[worst]["band_gap_worst_db"],
                                   band_gap_worst_se_db=fid[worst]["band_gap_worst_se_db"],
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
    from ..copydetect.encoders import load_encoder
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
    from ..copydetect.index import CopyIndex
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
                   fidelity_reference_per_class: int | None = None,
                   batch_size: int = 8, device: str | None = None, precision: str = "auto", topk=(1, 3),
                   kid_subsets: int = 100,
                   embedding_level: str = "windows", regenerate: bool = False, dry_run: bool = False,
                   progress: bool = True, points=(), guidance_interval=None, log=print) -> dict:
    """Run the sweep (see the module docstring) and write ``results.{csv,md,json}`` and ``plots/`` to
    ``out_dir``. Returns the results dict (``rows``: one dict per (kind, config, class)). ``precision``: the network's
    arithmetic (``auto``, ``bf16``, ``fp32``; see :class:`EDMSoundPipeline`), recorded with the results.
    ``fidelity_reference_per_class``: held-out clips per class the encoder-free fidelity measures compare against
    (see the module docstring; None: :data:`FIDELITY_REFERENCE_PER_CLASS`; 0: the FAD reference itself)."""
    from ..core.storage import file_sha256
    from ..core.pipeline import EDMSoundPipeline
    if embedding_level not in EMBEDDING_LEVELS:
        raise ValueError(f"embedding_level must be one of {', '.join(EMBEDDING_LEVELS)}, got {embedding_level!r}")
    n_per_class = int(n_per_class)
    if not 2 <= n_per_class <= 100_000:
        raise ValueError(f"n_per_class must be in [2, 100000], got {n_per_class}")
    topk = sorted({int(k) for k in topk} | {1})
    if topk[0] < 1:
        raise ValueError(f"top-k values must be >= 1, got {topk}")
    pipe = EDMSoundPipeline(checkpoint, device=device, bf16=precision)
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
                "--n-per-class (cost is linear in it) or fewer guided scales (w != 1 runs two passes) shorten "
                "the run; cached clips are reused by later runs")
    if dry_run:
        return {"points": [asdict(p) for p in points], "notes": notes, "estimate": est, "missing": {p.key: m for p, m in missing.items()}}

    t_start = time.perf_counter()
    enc = _load_encoder(encoder)
    clf, clf_desc = _load_classifier(classifier, classes)
    idx, idx_desc = _load_index(index)
    fid_n = fidelity_reference_size(fidelity_reference_per_class, reference_per_class)
    (ref, ref_desc), (fid_ref, fid_desc) = load_references(reference, classes, sr, ns, reference_per_class, fid_n,
                                                           reference_seed, progress)
    log(f"reference: {ref_desc}")
    if fid_n != reference_per_class:
        log(f"fidelity reference (level, loudness, bands): {fid_desc}")
    scorer = _Scorer(enc, clf, idx, ref, classes, topk, kid_subsets, embedding_level, progress,
                     fidelity_reference=fid_ref)

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
        "checkpoint": str(checkpoint), "ema_sha256": fingerprint, "precision": pipe.precision,
        "classes": classes, "sample_rate": sr,
        "n_per_class": n_per_class, "seed": seed, "noise_seed": "seed * 1_000_000 + class_index * 100_000 + i",
        "reference": ref_desc, "fidelity_reference": fid_desc, "training_subset": train_desc,
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


