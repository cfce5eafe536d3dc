"""Class-per-folder audio datasets: ``root/<class>/*.wav|flac|ogg``.

This is the DCASE2023 Task 7 development-set layout (DogBark, Footstep, ...) and the layout that
``edmsound data synth`` writes for the built-in foley set. Clips are made mono, resampled to the
preset's rate, cut or zero-padded to the clip length; silent clips (peak < 1e-3) are dropped.
Unreadable or empty files are named in a warning and skipped: they never abort a run.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..audio.io import AUDIO_EXTENSIONS, AudioLoadWarning, fit_length, load_audio

log = logging.getLogger(__name__)

SILENCE_PEAK = 1e-3


def scan_folder(root) -> tuple[list[str], list[tuple[Path, str]]]:
    """(sorted class names, [(file, class)]) for a class-per-folder tree."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = []
    for c in classes:
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS:
                files.append((f, c))
    if not files:
        raise FileNotFoundError(
            f"no audio files ({'/'.join(AUDIO_EXTENSIONS)}) found in {root}/<class>/: expected a class-per-folder tree")
    return classes, files


@dataclass
class AudioSet:
    waves: np.ndarray                 # (N, num_samples) float32
    labels: np.ndarray                # (N,) int64
    classes: list[str]
    sources: list[str]                # file path or synth://class/seed
    sample_rate: int
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)

    def __len__(self):
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}

    def summary(self) -> str:
        lines = [f"{len(self)} clips in {len(self.classes)} classes at {self.sample_rate} Hz"]
        lines += [f"  {c:<24s} {n}" for c, n in self.counts().items()]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} file(s):")
            lines += [f"    {p}: {why}" for p, why in self.skipped]
        else:
            lines.append("  skipped 0 files")
        return "\n".join(lines)

    def subset(self, idx) -> "AudioSet":
        idx = np.asarray(idx)
        return AudioSet(self.waves[idx], self.labels[idx], self.classes, [self.sources[i] for i in idx],
                        self.sample_rate, [])


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


def load_folder(root, sample_rate: int, num_samples: int, classes: list[str] | None = None,
                progress: bool = True, verbose: bool = True) -> AudioSet:
    """Load a class-per-folder tree. ``classes`` fixes the label order (e.g. a checkpoint's classes);
    folders not in it are ignored, classes with no folder get no clips."""
    root = Path(root)
    found, files = scan_folder(root)
    classes = list(classes) if classes is not None else found
    index = {c: i for i, c in enumerate(classes)}
    uris = _manifest_sources(root)
    waves, labels, sources, skipped = [], [], [], []
    for path, c in tqdm(files, desc=f"loading {root.name}", disable=not progress, unit="file"):
        if c not in index:
            continue
        try:
            wave = load_audio(path, sample_rate)
        except Exception as e:
            reason = f"unreadable ({type(e).__name__}: {e})"
            warnings.warn(f"skipping {path}: {reason}", AudioLoadWarning)
            skipped.append((str(path), reason))
            continue
        wave = fit_length(wave, num_samples)
        peak = float(np.abs(wave).max())
        if peak < SILENCE_PEAK:
            skipped.append((str(path), f"silent (peak {peak:.2e} < {SILENCE_PEAK})"))
            continue
        waves.append(wave)
        labels.append(index[c])
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        sources.append(uris.get(rel, str(path)))
    if not waves:
        raise ValueError(f"no usable clips in {root}" + (f"; skipped: {skipped}" if skipped else ""))
    ds = AudioSet(np.stack(waves).astype(np.float32), np.asarray(labels, dtype=np.int64), classes, sources,
                  sample_rate, skipped)
    if verbose:
        print(ds.summary())
    return ds


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split (paper: 95/5)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
