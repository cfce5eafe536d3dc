"""Checkpoints that survive damage: a truncated newest checkpoint is skipped (with its name) for the
newest intact one, pruning never removes the newest intact checkpoint, folders left by a killed write
are removed at start (a real SIGKILL), and weights of the wrong shape are one line naming the tensor."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edmsound.core.presets import get_preset
from edmsound.core.storage import latest_checkpoint, verify_checkpoint
from edmsound.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def _truncate(path: Path, keep: int = 1000):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_truncated_latest_falls_back_to_the_newest_intact(tone_tree, tmp_path, capsys):
    preset = get_preset("tiny").replace_train(checkpoint_every=5)
    Trainer(preset, tone_tree, tmp_path / "run", steps=10, progress=False).run()
    good, bad = tmp_path / "run" / "ckpt-00000005", tmp_path / "run" / "ckpt-00000010"
    assert good.is_dir() and bad.is_dir() and verify_checkpoint(bad) is None
    _truncate(bad / "model.safetensors")
    assert "model.safetensors is truncated" in verify_checkpoint(bad)
    assert latest_checkpoint(tmp_path / "run") == good
    assert f"skipping broken checkpoint {bad}" in capsys.readouterr().err
    tr = Trainer(preset, tone_tree, tmp_path / "run", steps=15, resume=True, progress=False)
    assert tr.step == 5
    tr.run()
    # pruning (keep 2) removed the broken folder and kept the intact ones
    names = sorted(p.name for p in (tmp_path / "run").glob("ckpt-*"))
    assert names == ["ckpt-00000010", "ckpt-00000015"]
    assert all(verify_checkpoint(tmp_path / "run" / n) is None for n in names)


def test_pruning_never_keeps_a_broken_one_instead_of_an_intact_one(tone_tree, tmp_path):
    preset = get_preset("tiny").replace_train(checkpoint_every=5)
    Trainer(preset, tone_tree, tmp_path / "run", steps=10, progress=False).run()
    # a damaged checkpoint *newer* than the resume point (a copy from elsewhere, a disk error)
    broken = tmp_path / "run" / "ckpt-00000099"
    broken.mkdir()
    (broken / "state.json").write_text("{ not json")
    tr = Trainer(preset, tone_tree, tmp_path / "run", steps=15, resume=True, progress=False)
    assert tr.step == 10
    tr.run()
    names = sorted(p.name for p in (tmp_path / "run").glob("ckpt-*"))
    assert names == ["ckpt-00000010", "ckpt-00000015"]


def test_a_killed_checkpoint_write_leaves_nothing_behind(tone_tree, tmp_path):
    """SIGKILL a training process repeatedly while it checkpoints every step; every restart resumes from an
    intact checkpoint and removes the temporary folders the kills left."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "edmsound.cli", "train", "--preset", "tiny", "--data", str(tone_tree),
           "--out", str(run), "--no-progress", "--checkpoint-every", "1", "--steps", "400"]
    orphans_seen = 0
    for attempt in range(3):
        p = subprocess.Popen(cmd + (["--resume"] if attempt else []), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and len(list(run.glob("ckpt-*"))) < 1:
            time.sleep(0.05)
        time.sleep(0.4 + 0.3 * attempt)                  # mid-training, very likely mid-write
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        orphans_seen += len(list(run.glob(".ckpt-*")))
    # make sure at least one orphan exists for the restart to clean (a kill between writes leaves none)
    (run / ".ckpt-00000999.abcd").mkdir()
    r = subprocess.run(cmd + ["--resume", "--max-minutes", "0.01"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "removed .ckpt-00000999.abcd" in r.stdout
    assert not list(run.glob(".ckpt-*")) and not list(run.glob(".*.tmp"))
    ck = latest_checkpoint(run)
    assert ck is not None and verify_checkpoint(ck) is None


def test_wrong_shape_weights_are_one_line(tone_tree, tmp_path):
    from edmsound.core.model import load_denoiser
    from edmsound.core.storage import load_safetensors
    from safetensors.torch import save_file
    preset = get_preset("tiny")
    tr = Trainer(preset, tone_tree, tmp_path / "run", steps=1, progress=False)
    tr.run()
    tr.export(tmp_path / "model")
    sd = load_safetensors(tmp_path / "model" / "ema.safetensors")
    k = next(k for k, v in sd.items() if v.ndim == 4)
    sd[k] = sd[k][:, :1].contiguous()
    save_file(sd, str(tmp_path / "model" / "ema.safetensors"))
    with pytest.raises(ValueError) as e:
        load_denoiser(tmp_path / "model")
    msg = str(e.value)
    assert k in msg and "does not fit this network" in msg and "\n" not in msg
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "edmsound.cli", "generate", "--checkpoint", str(tmp_path / "model"),
                        "--class", "low", "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and k in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_written_files_have_ordinary_modes(tone_tree, tmp_path):
    """Exported weights and JSON get the umask's ordinary mode (0644 under umask 022), not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        tr = Trainer(get_preset("tiny"), tone_tree, tmp_path / "run", steps=1, progress=False)
        tr.run()
        tr.export(tmp_path / "model")
    finally:
        os.umask(old)
    for f in list((tmp_path / "model").iterdir()) + list((tmp_path / "run").glob("ckpt-*/*")):
        assert f.stat().st_mode & 0o777 == 0o644, f
