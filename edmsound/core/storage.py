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
        yield tmp
        os.chmod(tmp, _umask_mode())   # mkstemp (and some writers) create 0600: ordinary permissions, set last
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


MANIFEST = "manifest.json"


def write_manifest(folder) -> None:
    """Record the size and sha256 of every file of a checkpoint folder (written last)."""
    folder = Path(folder)
    files = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST and not f.name.startswith(".")}
    atomic_write_json(folder / MANIFEST, {"files": files})


def verify_checkpoint(folder) -> str | None:
    """None when a checkpoint folder is intact, else one line saying what is wrong. Folders with a manifest
    are checked file by file (size, sha256); older ones by reading every JSON file and every safetensors
    header (a truncated safetensors file no longer matches its header)."""
    from safetensors import safe_open
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        return "state.json is missing (an incomplete checkpoint)"
    man = folder / MANIFEST
    if man.is_file():
        try:
            files = json.loads(man.read_text())["files"]
        except (ValueError, KeyError) as e:
            return f"{MANIFEST} is unreadable ({e})"
        for name, want in files.items():
            f = folder / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != want["bytes"]:
                return f"{name} is truncated or altered ({f.stat().st_size} bytes, expected {want['bytes']})"
            if file_sha256(f) != want["sha256"]:
                return f"{name} is corrupt (sha256 differs from the manifest)"
        return None
    for f in sorted(folder.iterdir()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
        except Exception as e:
            return f"{f.name} is unreadable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
    return None


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_checkpoint(run_dir, verify: bool = True) -> Path | None:
    """The newest intact checkpoint of a run directory (``latest.json``'s first; a broken one is skipped
    with a one-line warning naming it and the reason), or None when the run has none."""
    import sys
    run_dir = Path(run_dir)
    ptr = run_dir / LATEST
    cands = sorted((p for p in run_dir.glob("ckpt-*") if p.is_dir()), key=_step_of, reverse=True)
    if ptr.is_file():
        try:
            named = run_dir / json.loads(ptr.read_text())["checkpoint"]
            cands = [named] + [c for c in cands if c != named]
        except (ValueError, KeyError):
            print(f"warning: {ptr} is unreadable; looking for the newest intact checkpoint", file=sys.stderr)
    if not cands:
        return None
    for c in cands:
        why = verify_checkpoint(c) if verify else (None if (c / "state.json").is_file() else "incomplete")
        if why is None:
            return c
        print(f"warning: skipping broken checkpoint {c}: {why}", file=sys.stderr)
    raise ValueError(f"{run_dir} has no intact checkpoint ({len(cands)} broken); start a new run with another --out")


def clean_orphans(run_dir) -> list[Path]:
    """Remove temporary folders and files left by a checkpoint write that was killed; returns them."""
    import shutil
    run_dir = Path(run_dir)
    gone = []
    if not run_dir.is_dir():
        return gone
    for p in run_dir.glob(".ckpt-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        gone.append(p)
    for p in run_dir.glob(".*.tmp"):
        p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where) -> None:
    """``module.load_state_dict(tensors)`` with one clear line for a file that does not fit the network
    (missing or unexpected tensors, or the first shape that differs) instead of PyTorch's list."""
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    wrong = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    if wrong:
        k, got, need = wrong[0]
        raise ValueError(f"{where} does not fit this network: tensor {k} is {list(got)} in the file, the network "
                         f"needs {list(need)} ({len(wrong)} tensor(s) differ); was it trained with another preset "
                         "or number of classes?")
    if missing or unexpected:
        raise ValueError(f"{where} does not fit this network: {len(missing)} tensor(s) missing (e.g. "
                         f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


# --- model directories ------------------------------------------------------------------------------
GUIDE_FILE = "guide.safetensors"     # autoguidance: a weaker version of the model (see Preset.guide)


def write_config(model_dir, preset: Preset, classes) -> None:
    """A model directory's config.json: the preset and the class names, written atomically."""
    atomic_write_json(Path(model_dir) / "config.json", {"preset": preset.to_dict(), "classes": list(classes)})


def write_model_dir(out_dir, preset: Preset, classes: list[str], ema: dict[str, torch.Tensor],
                    model: dict[str, torch.Tensor] | None = None, info: dict | None = None,
                    model_dtype: torch.dtype | None = torch.float16):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config(out_dir, preset, classes)
    atomic_save_safetensors(out_dir / "ema.safetensors", {k: v.float() for k, v in ema.items()})
    if model is not None:
        atomic_save_safetensors(out_dir / "model.safetensors",
                                {k: (v.to(model_dtype) if model_dtype else v) for k, v in model.items()})
    if info is not None:
        atomic_write_json(out_dir / "info.json", info)


def read_config_json(model_dir) -> dict:
    """A model directory's config.json as it is stored (the preset, the classes and any per-model extras such as a
    matching EQ)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not an EDMSound checkpoint directory")
    return json.loads(path.read_text())


def read_config(model_dir, cfg: dict | None = None) -> tuple[Preset, list[str]]:
    """(preset, classes) of a model directory, or of its config already read (``cfg``)."""
    cfg = read_config_json(model_dir) if cfg is None else cfg
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


def find_models(root) -> list[Path]:
    """The generative model directories directly under ``root`` (config.json with a preset and classes, plus
    ema.safetensors; encoders, classifiers and indexes are skipped): ``default`` first, then by name."""
    root = Path(root)
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        cfg = d / "config.json"
        if not (cfg.is_file() and (d / "ema.safetensors").is_file()):
            continue
        try:
            keys = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(keys, dict) and "preset" in keys and "classes" in keys:
            found.append(d)
    return sorted(found, key=lambda d: (d.name != "default", d.name))


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
