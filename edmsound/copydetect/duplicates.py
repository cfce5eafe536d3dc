"""Near-duplicates inside an indexed set, and the copy level they are judged by.

Real sample libraries hold near-duplicates: the same take at another gain, velocity layers, a file
exported twice. Counted in the training set's reference distribution, they make every copy look
ordinary (each clip's top-1 among the others is ~1.0). Here a **near-duplicate pair** is two indexed
clips whose signal fingerprints (:mod:`edmsound.copydetect.signal`) are as close as a plain copy of a
clip is to the clip itself: the copy level is measured on the set's own clips with
:class:`edmsound.data.augment.LeadInCopy` (gain, lead-in, faint noise) and set at a low percentile of
those copies' similarities. Pairs are reported as groups (connected components), a dataset-hygiene
finding, and each clip's reference top-1 leaves out its own near-duplicates, so a flag means "closer to
a training clip than training recordings are to *other* recordings".
"""
from __future__ import annotations

import faiss
import numpy as np

__all__ = ["copy_level", "near_duplicate_pairs", "duplicate_groups", "neighbours"]


def copy_level(copy_similarities, percentile: float = 1.0, cap: float = 0.999) -> float:
    """The similarity a plain copy reaches: the ``percentile``-th percentile of copies' similarities to
    their sources (at most ``cap``, so only genuinely copy-close pairs count)."""
    s = np.asarray(copy_similarities, np.float64)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        raise ValueError("no copy similarities to calibrate the copy level from")
    return float(min(np.percentile(s, percentile), cap))


def near_duplicate_pairs(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """(P, 2) int64 pairs ``i < j`` of unit vectors with inner product >= ``threshold`` (exact)."""
    x = np.ascontiguousarray(vectors, np.float32)
    if len(x) < 2:
        return np.zeros((0, 2), np.int64)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, ids = index.range_search(x, float(threshold))
    rows = np.repeat(np.arange(len(x)), np.diff(lims).astype(np.int64))
    ids = ids.astype(np.int64)
    keep = rows < ids
    return np.stack([rows[keep], ids[keep]], 1).astype(np.int64)


def duplicate_groups(pairs: np.ndarray, n: int) -> list[np.ndarray]:
    """Connected components (of two or more clips) of the near-duplicate graph, largest first."""
    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in np.asarray(pairs, np.int64).reshape(-1, 2):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)])
    groups = [np.flatnonzero(roots == r) for r in np.unique(roots)]
    groups = [g for g in groups if len(g) > 1]
    return sorted(groups, key=lambda g: (-len(g), int(g[0])))


def neighbours(pairs: np.ndarray, n: int) -> list[set]:
    """Each clip's near-duplicates (direct pairs only)."""
    out = [set() for _ in range(n)]
    for a, b in np.asarray(pairs, np.int64).reshape(-1, 2):
        out[int(a)].add(int(b))
        out[int(b)].add(int(a))
    return out
