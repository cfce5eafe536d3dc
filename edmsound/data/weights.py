"""Per-clip draw weights for training: the ``clip,weight`` CSV that ``train`` and ``consistency-tune`` read with
``--clip-weights`` (e.g. written by ``edmsound coverage``), and the names it gives a data folder's clips."""
from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

__all__ = ["clip_keys", "write_clip_weights", "read_clip_weights", "file_digest"]


def clip_keys(sources: list[str], root) -> list[str]:
    """The names a clip-weights file uses for a data folder's clips: a built-in clip's ``synth://`` source, a file's
    path relative to the folder (POSIX separators), so the file holds wherever the folder is mounted."""
    root = Path(root).resolve()
    out = []
    for s in sources:
        if "://" in s:
            out.append(s)
            continue
        p = Path(s).resolve()
        try:
            out.append(p.relative_to(root).as_posix())
        except ValueError:
            out.append(p.as_posix())
    return out


def write_clip_weights(path, keys: list[str], weights) -> Path:
    """Write ``clip,weight`` rows (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["clip", "weight"])
        for k, w in zip(keys, weights):
            wr.writerow([k, f"{float(w):.6g}"])
    tmp.replace(path)
    return path


def read_clip_weights(path) -> dict[str, float]:
    """A clip-weights file as {clip: weight}; ValueError naming the file and row for anything malformed (a weight
    must be a finite number > 0; a clip may appear once)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"clip weights {path}: cannot read it ({e})") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["clip", "weight"]:
        raise ValueError(f"clip weights {path}: the first row must be the header 'clip,weight'")
    out: dict[str, float] = {}
    for i, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise ValueError(f"clip weights {path}, row {i}: expected 2 fields (clip,weight), got {len(row)}")
        key, raw = row[0], row[1].strip()
        try:
            w = float(raw)
        except ValueError:
            w = float("nan")
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"clip weights {path}, row {i}: the weight must be a finite number > 0, got {raw!r}")
        if key in out:
            raise ValueError(f"clip weights {path}, row {i}: {key!r} appears twice")
        out[key] = w
    if not out:
        raise ValueError(f"clip weights {path}: no rows after the header")
    return out


def file_digest(path) -> str:
    """The first 16 hex digits of a file's sha256 (what a training record names a weights file by)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
