"""Ablation switches: attention and normalisation in the U-Net, L1 / L2 loss; recorded in the config."""
import json

import pytest
import torch
from torch import nn

from edmsound.core.edm import edm_loss
from edmsound.core.model import build_denoiser
from edmsound.core.presets import Preset, get_preset
from edmsound.core.unet import AttentionBlock


def _count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


def test_switches_remove_attention_and_normalisation_and_the_net_still_runs():
    base = get_preset("tiny")
    full = build_denoiser(base, 2)
    assert _count(full, AttentionBlock) > 0 and _count(full, nn.GroupNorm) > 0
    for kw, gone in ((dict(attention=False), AttentionBlock), (dict(norm="none"), nn.GroupNorm)):
        p = base.replace_net(**kw)
        den = build_denoiser(p, 2)
        assert _count(den, gone) == 0
        assert sum(t.numel() for t in den.parameters()) < sum(t.numel() for t in full.parameters())
        x = torch.randn(2, 2, p.codec.num_bins, p.codec.num_frames)
        out = den(x, torch.tensor([0.5, 2.0]), torch.tensor([0, 1]))
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert Preset.from_dict(json.loads(json.dumps(p.to_dict()))) == p      # recorded and read back
    with pytest.raises(ValueError, match="unknown normalisation 'batch'; valid: group, none"):
        build_denoiser(base.replace_net(norm="batch"), 2)


def test_l1_and_l2_losses_weigh_the_same_target():
    """With D - y = delta everywhere, L2 = lambda delta^2 and L1 = sqrt(lambda) |delta|: L2 = L1^2 per sample
    (the same noise levels drawn from the same seed)."""
    cfg = get_preset("tiny").edm
    y = torch.randn(5, 2, 8, 8)

    class Offset(nn.Module):
        null_class = 3

        def forward(self, x, sigma, labels):
            return y + 0.3
    l2 = edm_loss(Offset(), y, torch.zeros(5, dtype=torch.long), cfg, torch.Generator().manual_seed(1), "l2")
    l1 = edm_loss(Offset(), y, torch.zeros(5, dtype=torch.long), cfg, torch.Generator().manual_seed(1), "l1")
    torch.testing.assert_close(l2, l1 ** 2)
    assert not torch.allclose(l1, l2)
    with pytest.raises(ValueError, match="unknown loss 'huber'"):
        edm_loss(Offset(), y, torch.zeros(5, dtype=torch.long), cfg, kind="huber")


def test_cli_trains_a_switched_model_and_records_it(tone_tree, tmp_path):
    from edmsound.cli import main
    run = tmp_path / "run"
    main(["train", "--preset", "tiny", "--data", str(tone_tree), "--out", str(run), "--steps", "3",
          "--batch-size", "2", "--loss", "l1", "--no-attention", "--norm", "none", "--no-progress",
          "--no-jemalloc"])
    cfg = json.loads((run / "config.json").read_text())["preset"]
    assert cfg["train"]["loss"] == "l1" and cfg["net"]["attention"] is False and cfg["net"]["norm"] == "none"
    with pytest.raises(ValueError, match="different preset"):
        from edmsound import Trainer
        Trainer(get_preset("tiny"), tone_tree, run, steps=4, resume=True, progress=False)


def test_a_magnitude_only_model_trains_and_generates_through_griffin_lim(tone_tree, tmp_path):
    from edmsound.cli import main
    from edmsound.core.pipeline import EDMSoundPipeline
    run = tmp_path / "mag"
    main(["train", "--preset", "tiny", "--data", str(tone_tree), "--out", str(run), "--steps", "3",
          "--batch-size", "2", "--representation", "magnitude", "--no-progress", "--no-jemalloc",
          "--export", str(tmp_path / "model")])
    pipe = EDMSoundPipeline(tmp_path / "model", device="cpu")
    assert pipe.codec.shape[0] == 1 and pipe.preset.codec.representation == "magnitude"
    gen = pipe.generate(pipe.classes[0], n=2, sampler="euler", nfe=3, seed=0)
    assert gen.specs.shape[1] == 1 and gen.waves.shape == (2, pipe.codec.num_samples)
    assert torch.isfinite(torch.from_numpy(gen.waves)).all()
    from edmsound.core.plotting import spectrogram_figure
    spectrogram_figure(gen.specs[0], pipe.codec)                    # a magnitude-only figure
