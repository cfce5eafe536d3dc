"""Sliding windows over clips and their embeddings: where windows start, which are silent, and the
``WindowEmbeddings`` tuple every encoder returns (carrying the encoder's identity)."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["WindowEmbeddings", "level_db", "active_windows", "window_starts"]


class WindowEmbeddings(tuple):
    """``(embeddings (M, D) float32, clip_index (M,) int64, offsets_seconds (M,) float32)``.

    A 3-tuple (unpacks as one) that also carries the identity of the encoder that made it
    (``encoder_name``, ``weights_hash``) so an index can refuse embeddings from another encoder, the
    number of clips, and each window's level (``levels_db``: RMS in dBFS) so silent windows can be
    left out of matching (silence is identical in every clip)."""

    def __new__(cls, embeddings, clip_index, offsets, encoder_name: str, weights_hash: str, levels_db=None,
                num_clips: int | None = None):
        self = super().__new__(cls, (np.ascontiguousarray(embeddings, dtype=np.float32),
                                     np.asarray(clip_index, dtype=np.int64),
                                     np.asarray(offsets, dtype=np.float32)))
        self.encoder_name = encoder_name
        self.weights_hash = weights_hash
        self.levels_db = None if levels_db is None else np.asarray(levels_db, dtype=np.float32)
        self._num_clips = num_clips
        return self

    @property
    def num_clips(self) -> int:
        if self._num_clips is not None:
            return int(self._num_clips)
        return int(self[1].max()) + 1 if len(self[1]) else 0

    embeddings = property(lambda self: self[0])
    clip_index = property(lambda self: self[1])
    offsets = property(lambda self: self[2])


def _as_clip_list(waves) -> list[np.ndarray]:
    if isinstance(waves, np.ndarray):
        if waves.ndim == 1:
            return [waves.astype(np.float32, copy=False)]
        if waves.ndim == 2:
            return [w for w in waves.astype(np.float32, copy=False)]
        raise ValueError(f"waves must be (N, L) or a list of 1-D arrays, got shape {waves.shape}")
    if torch.is_tensor(waves):
        return _as_clip_list(waves.detach().cpu().numpy())
    out = []
    for w in waves:
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 1:
            raise ValueError(f"each clip must be a 1-D array, got shape {w.shape}")
        out.append(w)
    return out


def level_db(x: np.ndarray) -> float:
    """RMS level in dBFS (-240 for digital silence)."""
    x = np.asarray(x, np.float64)
    return float(10.0 * np.log10(np.mean(x * x) + 1e-24)) if len(x) else -240.0


def active_windows(levels_db, clip_index, relative_db: float = 60.0, absolute_db: float = -90.0) -> np.ndarray:
    """Mask of non-silent windows: within ``relative_db`` of their clip's loudest window and above
    ``absolute_db`` dBFS. Every clip keeps at least its loudest window."""
    levels = np.asarray(levels_db, np.float64)
    ci = np.asarray(clip_index, np.int64)
    if len(levels) == 0:
        return np.zeros(0, bool)
    loudest = np.full(ci.max() + 1, -np.inf)
    np.maximum.at(loudest, ci, levels)
    keep = (levels >= loudest[ci] - relative_db) & (levels >= absolute_db)
    keep |= levels == loudest[ci]
    return keep


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """Start samples of the sliding windows over a clip: hop-spaced, plus one end-aligned window when
    more than half a hop would otherwise be left uncovered; one window for clips shorter than it."""
    if num_samples <= window:
        return [0]
    n = 1 + (num_samples - window) // hop
    starts = [i * hop for i in range(n)]
    tail = num_samples - (starts[-1] + window)
    if tail > hop // 2:
        starts.append(num_samples - window)
    return starts


