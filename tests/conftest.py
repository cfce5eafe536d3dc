import os
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(int(os.environ.get("EDMSOUND_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


def write_tone_tree(root, classes=("low", "high"), per_class=4, sr=8000, seconds=0.3, seed=0):
    """A tiny class-per-folder tree of decaying tones with per-class frequency ranges."""
    rng = np.random.default_rng(seed)
    freqs = {c: 250 * (3 ** i) for i, c in enumerate(classes)}
    t = np.arange(int(sr * seconds)) / sr
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            f = freqs[c] * (1 + 0.2 * rng.random())
            x = 0.5 * np.sin(2 * np.pi * f * t) * np.exp(-t * (4 + 8 * rng.random()))
            sf.write(root / c / f"{c}_{i}.wav", x.astype(np.float32), sr)
    return root


@pytest.fixture
def tone_tree(tmp_path):
    return write_tone_tree(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A model directory of the ``tiny`` preset trained 20 steps on a tone tree (shared, read-only)."""
    from edmsound.core.presets import get_preset
    from edmsound.training.trainer import Trainer
    d = tmp_path_factory.mktemp("ckpt")
    write_tone_tree(d / "data")
    tr = Trainer(get_preset("tiny"), d / "data", d / "run", steps=20, progress=False)
    tr.run()
    tr.export(d / "model")
    return d / "model"


def tune_tiny(tiny_ckpt, root):
    """A consistency-tuned tiny model (2 steps, 3 tuning steps) at ``root/tuned`` and its tone tree:
    (model directory, data directory)."""
    from edmsound.training.consistency import ConsistencyTuner
    data = write_tone_tree(root / "data")
    c = ConsistencyTuner(tiny_ckpt, data, root / "run", max_nfe=2, stages=1, steps=3, progress=False, batch_size=4)
    c.run()
    c.export(root / "tuned")
    return root / "tuned", data


def copy_model(src, dest, edit):
    """A copy of the model directory ``src`` at ``dest`` whose config.json ``edit(cfg)`` changed in place; returns
    (dest, the config as written)."""
    import json
    import shutil
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    edit(cfg)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest, cfg


@pytest.fixture
def guided_teacher(tiny_ckpt, tmp_path):
    """(a copy of ``tiny_ckpt`` whose first class is guided at w 3 on sigma in (0.5, 3], that class's name)."""
    def guide_first(cfg):
        c = cfg["classes"][0]
        cfg["preset"].update(default_class_guidance={c: 3.0}, default_class_guidance_interval={c: [0.5, 3.0]})
    teacher, cfg = copy_model(tiny_ckpt, tmp_path / "guided-teacher", guide_first)
    return teacher, cfg["classes"][0]


@pytest.fixture(scope="session")
def pipe(tiny_ckpt):
    from edmsound.core.pipeline import EDMSoundPipeline
    return EDMSoundPipeline(tiny_ckpt, device="cpu")
