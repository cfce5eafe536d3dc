"""Blending two models of one network in weight space: the weights are the exact interpolation, the blend takes the
end model's settings without its matching EQ, records where it came from, samples, and refuses what is not a blend."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from edmsound.core.pipeline import EDMSoundPipeline
from edmsound.training.export import blend_models


@pytest.fixture
def two_models(tiny_ckpt, tmp_path):
    """(tiny_ckpt, a copy with every weight moved by a known amount and a matching EQ in its config)."""
    from conftest import copy_model
    eq = {"centres_hz": [100.0, 1000.0], "gains_db": {}}
    end, cfg = copy_model(tiny_ckpt, tmp_path / "end", lambda c: c.update(class_eq=eq))
    w = load_file(tiny_ckpt / "ema.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in w.items()}, end / "ema.safetensors")
    return tiny_ckpt, end


def test_a_blend_is_the_interpolation_of_the_weights_with_the_end_models_settings(two_models, tmp_path, capsys):
    start, end = two_models
    wa, wb = load_file(start / "ema.safetensors"), load_file(end / "ema.safetensors")
    for weight in (0.0, 0.25, 1.0):
        out = blend_models(start, end, tmp_path / f"blend{weight}", weight=weight)
        w = load_file(out / "ema.safetensors")
        for k in wa:
            expect = (1 - weight) * wa[k].double() + weight * wb[k].double()
            torch.testing.assert_close(w[k].double(), expect, rtol=1e-7, atol=1e-9)
            if weight in (0.0, 1.0):                           # the end points are the models themselves, bit for bit
                assert torch.equal(w[k], (wa if weight == 0.0 else wb)[k])
    cfg = json.loads((out / "config.json").read_text())
    assert "class_eq" not in cfg and cfg["preset"] == json.loads((end / "config.json").read_text())["preset"]
    rec = json.loads((out / "info.json").read_text())["blend"]
    assert rec["start"] == start.name and rec["end"] == "end" and rec["weight"] == 1.0 and len(rec["end_sha256"]) == 64
    gen = EDMSoundPipeline(tmp_path / "blend0.25", device="cpu").generate("low", n=1, seed=0)
    assert np.isfinite(gen.waves).all()
    from edmsound.cli import main
    main(["blend", "--start", str(start), "--end", str(end), "--weight", "0.5", "--out", str(tmp_path / "cli")])
    assert "0.5 x" in capsys.readouterr().out and (tmp_path / "cli" / "ema.safetensors").is_file()


def test_blend_refuses_what_is_not_one_model_tuned_two_ways(two_models, tmp_path):
    from conftest import copy_model
    start, end = two_models
    with pytest.raises(ValueError, match="between 0 and 1, got 1.5"):
        blend_models(start, end, tmp_path / "x", weight=1.5)
    other, _ = copy_model(end, tmp_path / "other", lambda c: c.update(classes=c["classes"][::-1]))
    with pytest.raises(ValueError, match="have other classes"):
        blend_models(start, other, tmp_path / "x", weight=0.5)
    wider, _ = copy_model(end, tmp_path / "wider", lambda c: c["preset"]["net"].update(dim=c["preset"]["net"]["dim"] * 2))
    with pytest.raises(ValueError, match="other networks or representations"):
        blend_models(start, wider, tmp_path / "x", weight=0.5)
    with pytest.raises(ValueError, match="to a new directory"):
        blend_models(start, end, end, weight=0.5)
    assert not (tmp_path / "x").exists()
    assert (end / "ema.safetensors").is_file()
