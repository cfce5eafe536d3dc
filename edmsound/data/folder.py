"""Class-per-folder audio datasets (``root/<class>/<files>``) and the one reader every command uses.

This is the DCASE2023 Task 7 development-set layout (DogBark, Footstep, ...) and the layout that
``edmsound data synth`` writes for the built-in foley set. :func:`load_folder` reads every format in
:data:`edmsound.audio.io.AUDIO_EXTENSIONS`, makes clips mono at the requested rate and either cuts or
zero-pads them to one length (training) or keeps each clip's own length (copy-detection indexes). Files
that cannot be used are skipped with one reason each, counted per reason, and never abort a run:

- ``unreadable (...)``: the decoder's own message; ``empty``: no samples;
- ``silent``: the whole file peaks below -100 dBFS; ``too quiet``: it peaks below -60 dBFS;
- ``onset outside the clip``: the file is loud enough but nothing audible falls in the kept part.

Cutting is reported too (:class:`ReadReport`): how many clips were cut and how much of their energy was
lost. A class folder left without a usable clip is refused with one line naming it.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..audio.io import AUDIO_EXTENSIONS, AudioLoadWarning, AudioReadError, check_sample_rate, load_audio

SILENT_PEAK = 1e-5          # -100 dBFS
SILENCE_PEAK = 1e-3         # -60 dBFS: quieter clips are not used (kept name: the training loader's gate)
CUT_LOSS_NOTE = 0.10        # cut clips losing more than this share of their energy are named


def scan_folder(root) -> tuple[list[str], list[tuple[Path, str]]]:
    """(sorted class names, [(file, class)]) for a class-per-folder tree."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = []
    for c in classes:
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS and not f.name.startswith("."):
                files.append((f, c))
    if not files:
        raise FileNotFoundError(
            f"no audio files ({' '.join(AUDIO_EXTENSIONS)}) found in {root}/<class>/: expected a class-per-folder tree")
    return classes, files


def _db(x: float) -> float:
    return 20.0 * np.log10(max(float(x), 1e-12))


def skip_reason(wave: np.ndarray, kept: np.ndarray, sample_rate: int) -> str | None:
    """Why a decoded file (``wave``) cut to ``kept`` is not usable, or None when it is."""
    peak = float(np.abs(wave).max()) if len(wave) else 0.0
    if peak == 0.0:
        return "silent (digital silence)"
    if peak < SILENT_PEAK:
        return f"silent (peak {_db(peak):.0f} dBFS, below {_db(SILENT_PEAK):.0f} dBFS)"
    if peak < SILENCE_PEAK:
        return f"too quiet (peak {_db(peak):.1f} dBFS, below {_db(SILENCE_PEAK):.0f} dBFS)"
    kept_peak = float(np.abs(kept).max()) if len(kept) else 0.0
    if kept_peak < SILENCE_PEAK:
        onset = int(np.argmax(np.abs(wave) >= SILENCE_PEAK))
        return (f"onset outside the clip (sound starts at {onset / sample_rate:.2f} s; clips keep the first "
                f"{len(kept) / sample_rate:.3f} s)")
    return None


@dataclass
class ReadReport:
    """What happened to every file of a folder: used, skipped (with reasons) and cut."""
    files: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)           # (path, reason)
    cut: list[tuple[str, float, float]] = field(default_factory=list)      # (path, seconds before, energy lost)
    kept_seconds: float | None = None

    def reason_counts(self) -> dict[str, int]:
        """Skipped files per reason kind (``unreadable``, ``silent``, ``too quiet``, ...)."""
        return dict(Counter(r.split(" (")[0] for _, r in self.skipped))

    def lines(self, limit: int = 20) -> list[str]:
        out = []
        if self.skipped:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.reason_counts().items()))
            out.append(f"  skipped {len(self.skipped)} of {self.files} file(s): {kinds}")
            out += [f"    {p}: {why}" for p, why in self.skipped[:limit]]
            if len(self.skipped) > limit:
                out.append(f"    ... and {len(self.skipped) - limit} more")
        else:
            out.append(f"  skipped 0 of {self.files} files")
        if self.cut:
            lost = np.array([x for _, _, x in self.cut])
            big = [(p, s, x) for p, s, x in self.cut if x > CUT_LOSS_NOTE]
            out.append(f"  cut {len(self.cut)} file(s) to {self.kept_seconds:.3f} s: energy lost median "
                       f"{100 * np.median(lost):.1f} %, max {100 * lost.max():.1f} %; {len(big)} lost more than "
                       f"{100 * CUT_LOSS_NOTE:.0f} %")
            out += [f"    {p}: {s:.2f} s, {100 * x:.0f} % of the energy cut" for p, s, x in big[:limit]]
            if len(big) > limit:
                out.append(f"    ... and {len(big) - limit} more")
        return out

    def to_dict(self) -> dict:
        return {"files": self.files, "skipped": len(self.skipped), "skipped_by_reason": self.reason_counts(),
                "cut": len(self.cut), "cut_losing_over_10pct": sum(x > CUT_LOSS_NOTE for *_, x in self.cut),
                "kept_seconds": self.kept_seconds}


@dataclass
class AudioSet:
    waves: np.ndarray | list          # (N, num_samples) float32, or a list of 1-D clips of their own lengths
    labels: np.ndarray                # (N,) int64
    classes: list[str]
    sources: list[str]                # file path or synth://class/seed
    sample_rate: int
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    report: ReadReport | None = None

    def __len__(self):
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        """Samples per clip."""
        return np.array([len(w) for w in self.waves], np.int64)

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}

    def summary(self) -> str:
        secs = self.lengths / self.sample_rate
        span = (f"{secs[0]:.3f} s each" if np.ptp(secs) < 1e-9 else
                f"{secs.min():.2f}-{secs.max():.2f} s (median {np.median(secs):.2f})") if len(secs) else ""
        lines = [f"{len(self)} clips in {len(self.classes)} classes at {self.sample_rate} Hz, {span}"]
        lines += [f"  {c:<24s} {n}" for c, n in self.counts().items()]
        report = self.report or ReadReport(len(self) + len(self.skipped), list(self.skipped))
        lines += report.lines()
        return "\n".join(lines)

    def subset(self, idx) -> "AudioSet":
        idx = np.asarray(idx)
        waves = self.waves[idx] if isinstance(self.waves, np.ndarray) else [self.waves[i] for i in idx]
        return AudioSet(waves, self.labels[idx], self.classes, [self.sources[i] for i in idx], self.sample_rate, [])


def _manifest_sources(root: Path) -> dict[str, str]:
    """Relative path -> synth URI for trees written by ``edmsound data synth``."""
    m = root / "synth.json"
    if not m.is_file():
        return {}
    try:
        return dict(json.loads(m.read_text())["files"])
    except Exception as e:  # a damaged manifest only loses the URIs, not the data
        warnings.warn(f"{m}: unreadable manifest ({e}); using file paths as sources", AudioLoadWarning)
        return {}


def read_clip(path, sample_rate: int, num_samples: int | None = None, max_samples: int | None = None):
    """One file through the common policy -> ``(wave, reason, cut)``: ``wave`` is None when the file is
    skipped (``reason`` says why); ``cut`` is ``(seconds before, energy lost)`` when it was shortened."""
    try:
        full = load_audio(path, sample_rate)
    except AudioReadError as e:
        return None, e.reason, None
    limit = num_samples if num_samples is not None else max_samples
    kept = full[:limit] if limit is not None else full
    why = skip_reason(full, kept, sample_rate)
    if why is not None:
        return None, why, None
    cut = None
    if len(kept) < len(full):
        total = float(np.sum(full.astype(np.float64) ** 2))
        cut = (len(full) / sample_rate, float(np.sum(full[len(kept):].astype(np.float64) ** 2)) / total)
    if num_samples is not None and len(kept) < num_samples:
        kept = np.pad(kept, (0, num_samples - len(kept)))
    return np.ascontiguousarray(kept, np.float32), None, cut


def load_folder(root, sample_rate: int, num_samples: int | None, classes: list[str] | None = None,
                progress: bool = True, verbose: bool = True, max_seconds: float | None = None,
                allow_empty_classes: bool = False) -> AudioSet:
    """Load a class-per-folder tree.

    ``num_samples``: cut or zero-pad every clip to this length (training), or None to keep each clip's
    own length (at most ``max_seconds``). ``classes`` fixes the label order (e.g. a checkpoint's);
    folders not in it are ignored. A class without a usable clip is an error unless
    ``allow_empty_classes``."""
    root = Path(root)
    sample_rate = check_sample_rate(sample_rate)
    if num_samples is not None and int(num_samples) <= 0:
        raise ValueError(f"clip length must be positive, got {num_samples} samples")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
    found, files = scan_folder(root)
    classes = list(classes) if classes is not None else found
    index = {c: i for i, c in enumerate(classes)}
    uris = _manifest_sources(root)
    max_samples = None if max_seconds is None else int(round(max_seconds * sample_rate))
    report = ReadReport(kept_seconds=(num_samples or max_samples or 0) / sample_rate or None)
    waves, labels, sources = [], [], []
    per_class_skips: dict[str, list[str]] = {}
    for path, c in tqdm(files, desc=f"loading {root.name}", disable=not progress, unit="file"):
        if c not in index:
            continue
        report.files += 1
        wave, why, cut = read_clip(path, sample_rate, num_samples, max_samples)
        if wave is None:
            if why.startswith(("unreadable", "empty")):
                warnings.warn(f"skipping {path}: {why}", AudioLoadWarning)
            report.skipped.append((str(path), why))
            per_class_skips.setdefault(c, []).append(why.split(" (")[0])
            continue
        if cut is not None:
            report.cut.append((str(path), cut[0], cut[1]))
        waves.append(wave)
        labels.append(index[c])
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        sources.append(uris.get(rel, str(path)))
    if not waves:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(report.reason_counts().items())) or "no audio files"
        raise ValueError(f"no usable clips in {root} ({kinds})")
    labels = np.asarray(labels, dtype=np.int64)
    empty = [c for i, c in enumerate(classes) if not np.any(labels == i)]
    if empty and not allow_empty_classes:
        why = "; ".join(f"{c} ({', '.join(f'{n} {k}' for k, n in sorted(Counter(per_class_skips.get(c, [])).items())) or 'no audio files'})"
                        for c in empty)
        raise ValueError(f"class folder(s) without a usable clip: {why}; add audio there or remove the folder")
    stacked = np.stack(waves).astype(np.float32) if num_samples is not None else waves
    ds = AudioSet(stacked, labels, classes, sources, sample_rate, report.skipped, report)
    if verbose:
        print(ds.summary())
    return ds


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split (paper: 95/5)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
