"""The network's precision: bf16 autocast only where the hardware computes bfloat16, fp32 elsewhere or on request."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edmsound.core.model import bf16_native, build_denoiser, precision_name, resolve_bf16
from edmsound.core.pipeline import EDMSoundPipeline
from edmsound.core.presets import get_preset
from edmsound.evaluation.sweep import _check_meta

ROOT = Path(__file__).resolve().parents[2]


def _cpu_flags() -> set[str]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return flags


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or platform.machine() not in ("x86_64", "AMD64"),
                    reason="reads the x86 CPU flags from /proc/cpuinfo")
def test_native_bf16_matches_the_cpu_flags():
    flags = _cpu_flags()
    assert bf16_native("cpu") == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


def test_explicit_precision_wins_and_auto_follows_the_hardware():
    p = get_preset("tiny")
    assert p.train.bf16
    assert resolve_bf16(p, "cpu", True) and resolve_bf16(p, "cpu", "bf16")
    assert not resolve_bf16(p, "cpu", False) and not resolve_bf16(p, "cpu", "fp32")
    assert resolve_bf16(p, "cpu", None) == resolve_bf16(p, "cpu", "auto") == bf16_native("cpu")
    assert not resolve_bf16(p.replace_train(bf16=False), "cpu", "auto")   # a preset trained in fp32 stays fp32
    assert not bf16_native("meta")                            # no hardware claim for devices it cannot probe
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        resolve_bf16(p, "cpu", "fp16")
    assert precision_name(build_denoiser(p, 2, bf16="bf16")) == "bf16"
    assert build_denoiser(p, 2, bf16="bf16").autocast_dtype == torch.bfloat16
    assert precision_name(build_denoiser(p, 2, bf16="fp32")) == "fp32"
    assert build_denoiser(p, 2, bf16="fp32").autocast_dtype is None


def test_both_precisions_sample_the_same_clips_to_rounding_and_say_which(tiny_ckpt):
    clips = {}
    for prec in ("bf16", "fp32"):
        pipe = EDMSoundPipeline(tiny_ckpt, device="cpu", bf16=prec)
        assert pipe.precision == prec
        gen = pipe.generate("low", n=2, sampler="dpmpp_2m", nfe=6, seed=3)
        assert gen.settings["precision"] == prec
        clips[prec] = gen.waves
    a, b = clips["bf16"], clips["fp32"]
    rel = np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2))
    assert 0 < rel < 0.1, rel                 # bf16 rounds the network's products: close, not equal
    auto = EDMSoundPipeline(tiny_ckpt, device="cpu")
    assert auto.precision == ("bf16" if bf16_native("cpu") else "fp32")


def test_cli_precision_flag_is_recorded_and_a_bad_one_is_one_line(tiny_ckpt, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "gen"
    base = [sys.executable, "-m", "edmsound.cli", "generate", "--checkpoint", str(tiny_ckpt), "--class", "high",
            "--sampler", "euler", "--nfe", "2", "--no-figures", "--out", str(out)]
    r = subprocess.run(base + ["--precision", "fp32"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (side,) = out.glob("*.json")
    assert json.loads(side.read_text())["precision"] == "fp32"
    bad = subprocess.run(base + ["--precision", "half"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice: 'half'" in bad.stderr and "Traceback" not in bad.stderr


def test_training_records_its_precision(tmp_path):
    from conftest import write_tone_tree
    from edmsound.training.trainer import Trainer
    write_tone_tree(tmp_path / "data")
    tr = Trainer(get_preset("tiny"), tmp_path / "data", tmp_path / "run", steps=3, progress=False,
                 precision="fp32")
    tr.run()
    assert tr.denoiser.autocast_dtype is None and tr.ema.autocast_dtype is None
    assert tr.info()["segments"][-1]["precision"] == "fp32"


def test_cached_evaluation_clips_of_another_precision_are_refused(tmp_path):
    meta = tmp_path / "point" / "meta.json"
    meta.parent.mkdir()
    old = {"ema_sha256": "abc", "seed": 0, "sampler": "dpmpp_2m", "nfe": 8}     # written before precision was kept
    meta.write_text(json.dumps(old))
    assert _check_meta(meta, dict(old, precision="bf16"), regenerate=False) == old   # those clips ran under bf16
    with pytest.raises(ValueError, match="precision differ"):
        _check_meta(meta, dict(old, precision="fp32"), regenerate=False)


def test_few_step_trainers_take_the_precision_for_student_and_teacher(tiny_ckpt, tone_tree, tmp_path):
    from edmsound import ConsistencyTuner, Distiller
    d = Distiller(tiny_ckpt, tone_tree, tmp_path / "d", student_nfe=2, steps=1, progress=False, precision="bf16")
    assert d.precision == "bf16" and precision_name(d.teacher) == "bf16"
    d = Distiller(tiny_ckpt, tone_tree, tmp_path / "d2", student_nfe=2, steps=1, progress=False, precision="fp32")
    assert d.precision == "fp32" and precision_name(d.teacher) == "fp32"
    c = ConsistencyTuner(tiny_ckpt, tone_tree, tmp_path / "c", steps=1, progress=False, precision="fp32")
    assert c.precision == "fp32" and c.ema.autocast_dtype is None
