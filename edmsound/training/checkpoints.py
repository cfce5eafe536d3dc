"""Training checkpoints: the optimizer state as flat tensors + JSON, and versioned ``ckpt-<step>/`` folders in a
run directory, written so that a kill at any moment leaves the previous checkpoint intact (see
:mod:`edmsound.core.storage` for the layout and the atomic writes)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..core.storage import (LATEST, _fsync_dir, _step_of, atomic_save_safetensors, atomic_write_json, verify_checkpoint,
                            write_manifest)


# --- optimizer state <-> flat tensors + json ------------------------------------------------------
def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict):
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_checkpoint(run_dir, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                             json_files: dict[str, dict], keep: int = 2) -> Path:
    """Write ``ckpt-<step>/`` (``<name>.safetensors`` per key of ``tensors``, ``<name>.json`` per key of
    ``json_files``, which must include ``state``) then move ``latest.json`` to it; older checkpoints
    beyond ``keep`` are removed."""
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".ckpt-{step:08d}."))
    try:
        for name, group in tensors.items():
            atomic_save_safetensors(tmp / f"{name}.safetensors", group)
        for name, obj in json_files.items():
            atomic_write_json(tmp / f"{name}.json", obj)
        write_manifest(tmp)                          # sizes and sha256: resume can tell a damaged checkpoint
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(run_dir / LATEST, {"checkpoint": final.name, "step": step})
    # prune: broken checkpoints go; of the intact older ones the newest keep-1 stay (never a broken one
    # in place of an intact one)
    olds = sorted((p for p in run_dir.glob("ckpt-*") if p.is_dir() and p != final), key=_step_of, reverse=True)
    intact = [p for p in olds if verify_checkpoint(p) is None]
    for p in olds:
        if p not in intact[: max(0, keep - 1)]:
            shutil.rmtree(p, ignore_errors=True)
    return final


