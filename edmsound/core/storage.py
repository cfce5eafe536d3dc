"""Model and run directories on disk: safetensors for tensors, JSON for config and counters, written atomically.

A *run directory* holds training state as versioned folders ``ckpt-<step>/`` plus ``latest.json`` which
points at the newest complete one; a folder is fully written (and fsynced) before the pointer moves,
so a kill at any moment leaves the previous checkpoint intact.

A *model directory* (what ships under ``checkpoints/``) holds ``config.json`` (preset + classes),
``ema.safetensors`` (the weights used for sampling) and optionally ``model.safetensors`` (raw training
weights, so that training can continue from it) and ``info.json`` (steps, wall time, machine).
Nothing here unpickles: weights are safetensors only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .presets import Preset

LATEST = "latest.json"
REPO_ROOT = Path(__file__).resolve().parents[2]     # where the embedded checkpoints/ live


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(path: Path):
    try:
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``,
    on any error it is removed and ``path`` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, _umask_mode())   # mkstemp creates 0600; give the file ordinary permissions
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_safetensors(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e


def latest_checkpoint(run_dir) -> Path | None:
    run_dir = Path(run_dir)
    ptr = run_dir / LATEST
    if not ptr.is_file():
        return None
    name = json.loads(ptr.read_text())["checkpoint"]
    path = run_dir / name
    if not (path / "state.json").is_file():
        raise ValueError(f"{ptr} points at {path}, which is incomplete")
    return path


# --- model directories ------------------------------------------------------------------------------
def write_model_dir(out_dir, preset: Preset, classes: list[str], ema: dict[str, torch.Tensor],
                    model: dict[str, torch.Tensor] | None = None, info: dict | None = None,
                    model_dtype: torch.dtype | None = torch.float16):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "config.json", {"preset": preset.to_dict(), "classes": list(classes)})
    atomic_save_safetensors(out_dir / "ema.safetensors", {k: v.float() for k, v in ema.items()})
    if model is not None:
        atomic_save_safetensors(out_dir / "model.safetensors",
                                {k: (v.to(model_dtype) if model_dtype else v) for k, v in model.items()})
    if info is not None:
        atomic_write_json(out_dir / "info.json", info)


def read_config(model_dir) -> tuple[Preset, list[str]]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not an EDMSound checkpoint directory")
    cfg = json.loads(path.read_text())
    return Preset.from_dict(cfg["preset"]), list(cfg["classes"])


def resolve_model_dir(path) -> Path:
    """A model directory, or a run directory (resolved to its newest checkpoint)."""
    path = Path(path)
    if (path / "ema.safetensors").is_file() and (path / "config.json").is_file():
        return path
    ck = latest_checkpoint(path) if path.is_dir() else None
    if ck is not None:
        return ck
    raise FileNotFoundError(f"{path} is neither a model directory (config.json + ema.safetensors) nor a run "
                            "directory with a checkpoint")


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def weights_sha256(files) -> str:
    """sha256 over the weight files (sorted by name; each file's name and bytes)."""
    files = sorted(Path(f) for f in files)
    if len(files) == 1:
        return file_sha256(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()
