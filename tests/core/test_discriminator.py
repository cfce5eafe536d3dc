"""Discriminator guidance: the correction is sigma^2 times the logit's gradient, only inside the class's interval
(analytic, with a linear logit), and with the exact log density ratio it turns a wrong Gaussian model's denoiser into
the true one; a discriminator trained on a tiny model's samples tells them from real clips, and a model given it
samples through the corrected path (recorded), the plain path when asked or at scale 0."""
import json
import shutil

import numpy as np
import pytest
import torch

from edmsound.core.discriminator import DiscriminatorGuidedDenoiser, NoisyDiscriminator
from edmsound.core.pipeline import EDMSoundPipeline


class LinearLogit(torch.nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, sigma, labels):
        return (x * self.a).flatten(1).sum(dim=1)


def test_the_correction_is_sigma_squared_times_the_logits_gradient_inside_the_interval_only():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 4, 8, generator=g)
    x = torch.randn(3, 2, 4, 8, generator=g)
    plain = lambda x, s: 0.5 * x                                   # noqa: E731
    dg = DiscriminatorGuidedDenoiser(plain, LinearLogit(a), torch.zeros(3), scale=0.7, interval=(1.0, 5.0))
    for sigma, inside in ((4.0, True), (5.0, True), (1.0, False), (8.0, False)):
        out = dg(x, torch.tensor(sigma))
        want = 0.5 * x + (0.7 * sigma ** 2 * a if inside else 0.0)
        torch.testing.assert_close(out, want)
    assert dg.corrected_calls == 2


class GaussianRatio(torch.nn.Module):
    """The exact log density ratio of N(0, s_d^2 + sigma^2) over N(0, s_m^2 + sigma^2), per element, summed."""

    def __init__(self, s_d, s_m):
        super().__init__()
        self.s_d, self.s_m = s_d, s_m

    def forward(self, x, sigma, labels):
        vd = self.s_d ** 2 + sigma.reshape(-1, 1, 1, 1) ** 2
        vm = self.s_m ** 2 + sigma.reshape(-1, 1, 1, 1) ** 2
        return (-x ** 2 / (2 * vd) + x ** 2 / (2 * vm) - 0.5 * torch.log(vd / vm)).flatten(1).sum(dim=1)


def test_the_exact_density_ratio_corrects_a_wrong_gaussian_model_into_the_true_denoiser():
    s_d, s_m = 0.5, 0.3                          # the data's scale and the (too quiet) model's
    model = lambda x, s: x * s_m ** 2 / (s_m ** 2 + s.reshape(-1, 1, 1, 1) ** 2)     # noqa: E731  its denoiser
    dg = DiscriminatorGuidedDenoiser(model, GaussianRatio(s_d, s_m), torch.zeros(4), scale=1.0, interval=(0, 100))
    x = torch.randn(4, 2, 4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    for sigma in (0.2, 1.0, 7.0):
        s = torch.full((4,), sigma)
        true = x * s_d ** 2 / (s_d ** 2 + sigma ** 2)
        torch.testing.assert_close(dg(x, s), true, rtol=1e-4, atol=1e-6)


def test_the_network_takes_any_frame_count_and_refuses_bins_it_cannot_halve():
    net = NoisyDiscriminator(2, 32, 3, widths=(4, 8))
    out = net(torch.randn(5, 2, 32, 20), torch.full((5,), 2.0), torch.tensor([0, 1, 2, 0, 1]))
    assert out.shape == (5,) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="30 frequency bins cannot be halved 2 times"):
        NoisyDiscriminator(2, 30, 3, widths=(4, 8))


def test_a_trained_discriminator_tells_samples_from_clips_and_guides_its_model(tiny_ckpt, tmp_path):
    from conftest import write_tone_tree
    from edmsound.training.discriminator import attach_discriminator, train_discriminator
    data = write_tone_tree(tmp_path / "data")
    pipe0 = EDMSoundPipeline(tiny_ckpt, device="cpu", bf16="fp32")
    c0 = pipe0.classes[0]
    # a 20-step model's samples are far from its tones: at low noise a small network must tell them apart
    rec = train_discriminator(tiny_ckpt, data, tmp_path / "run", [c0], n_generated=24, interval=(0.05, 0.5),
                              steps=60, batch=8, eval_every=20, widths=(8, 8), precision="fp32", progress=False)
    assert rec["val_accuracy"] >= 0.8, rec
    assert (tmp_path / "run" / "discriminator.safetensors").is_file() and rec["classes"] == [c0]
    model = tmp_path / "model"
    shutil.copytree(tiny_ckpt, model)
    attach_discriminator(model, tmp_path / "run", {c0: 1.0})
    cfg = json.loads((model / "config.json").read_text())["discriminator"]
    assert cfg["scales"] == {c0: 1.0} and cfg["intervals"][c0] == [0.05, 0.5]
    pipe = EDMSoundPipeline(model, device="cpu", bf16="fp32")
    assert pipe.discriminator_for(c0) and not pipe.discriminator_for(pipe.classes[1])
    gen = pipe.generate(c0, n=2, seed=3)
    plain = pipe0.generate(c0, n=2, seed=3)
    assert gen.settings["discriminator_guidance"] == {"scale": 1.0, "interval": [0.05, 0.5]}
    assert "discriminator_guidance" not in plain.settings and np.isfinite(gen.waves).all()
    assert not np.allclose(gen.waves, plain.waves, atol=1e-6)                     # the path was corrected
    spec_off, _, _ = pipe.sample_specs(c0, [3, 4], "heun", 5, 1.0, discriminator=False)
    spec_plain, _, _ = pipe0.sample_specs(c0, [3, 4], "heun", 5, 1.0)
    torch.testing.assert_close(spec_off, spec_plain)                              # asked off: the plain path
    other = pipe.generate(pipe.classes[1], n=1, seed=3)                           # a class it does not correct
    np.testing.assert_allclose(other.waves, pipe0.generate(pipe.classes[1], n=1, seed=3).waves, atol=1e-6)
    attach_discriminator(model, tmp_path / "run", {c0: 0.0})
    zero = EDMSoundPipeline(model, device="cpu", bf16="fp32").generate(c0, n=2, seed=3)
    np.testing.assert_allclose(zero.waves, plain.waves, atol=1e-6)                 # scale 0: the plain path


def test_discriminator_training_and_attaching_refuse_what_they_cannot_do(tiny_ckpt, tmp_path):
    from conftest import write_tone_tree
    from edmsound.training.discriminator import attach_discriminator, train_discriminator
    data = write_tone_tree(tmp_path / "data")
    with pytest.raises(ValueError, match="unknown class 'nope'"):
        train_discriminator(tiny_ckpt, data, tmp_path / "r", ["nope"], progress=False)
    with pytest.raises(ValueError, match="the interval must be two noise levels 0 < lo < hi"):
        train_discriminator(tiny_ckpt, data, tmp_path / "r", ["x"], interval=(3, 1), progress=False)
    pipe = EDMSoundPipeline(tiny_ckpt, device="cpu")
    c0 = pipe.classes[0]
    rec = train_discriminator(tiny_ckpt, data, tmp_path / "r", [c0], n_generated=4, steps=2, batch=2, eval_every=1,
                              widths=(4, 4), precision="fp32", progress=False)
    other = tmp_path / "other"
    shutil.copytree(tiny_ckpt, other)
    w = other / "ema.safetensors"
    from safetensors.torch import load_file, save_file
    sd = load_file(w)
    k = next(iter(sd))
    sd[k] = sd[k] + 1.0
    save_file(sd, w)
    with pytest.raises(ValueError, match="was trained on another model's samples"):
        attach_discriminator(other, tmp_path / "r", {c0: 1.0})
    same = tmp_path / "same"
    shutil.copytree(tiny_ckpt, same)
    with pytest.raises(ValueError, match=f"was trained for {c0}, not {pipe.classes[1]}"):
        attach_discriminator(same, tmp_path / "r", {pipe.classes[1]: 1.0})
    with pytest.raises(ValueError, match="must be a number >= 0"):
        attach_discriminator(same, tmp_path / "r", {c0: -1.0})
    assert rec["kept_step"] in (1, 2)
