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
