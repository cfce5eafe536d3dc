import math

import pytest
import torch

from edmsound.core.edm import EDMPrecond, edm_loss, loss_weight, precond_coefficients
from edmsound.core.model import build_denoiser
from edmsound.core.presets import PRESETS, EDMConfig
from edmsound.core.unet import AttentionBlock, EfficientUNet, count_parameters

SD = 0.2
SIGMAS = torch.logspace(-4, 1, 40, dtype=torch.float64)


def test_precond_identities():
    c_skip, c_out, c_in, c_noise = precond_coefficients(SIGMAS, SD)
    # unit-variance network input: c_in^2 (sigma^2 + sd^2) = 1
    torch.testing.assert_close(c_in ** 2 * (SIGMAS ** 2 + SD ** 2), torch.ones_like(SIGMAS))
    # effective-target variance: the error of D = c_skip x on data of variance sd^2 equals c_out^2
    err_var = (1 - c_skip) ** 2 * SD ** 2 + c_skip ** 2 * SIGMAS ** 2
    torch.testing.assert_close(err_var, c_out ** 2)
    torch.testing.assert_close(loss_weight(SIGMAS, SD), 1 / c_out ** 2)
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4)
    assert c_skip[0] > 0.999 and c_out[0] < 1e-3          # sigma -> 0: D(x) -> x
    assert c_skip[-1] < 1e-3                                # sigma >> sd: the skip path vanishes


def _randomise_zero_params(module):
    """Give the zero-initialised layers random weights so that every input matters."""
    for p in module.parameters():
        if p.dim() > 1 and p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.1)


def _zero_net_denoiser():
    return build_denoiser(PRESETS["tiny"], num_classes=2, bf16=False)


def test_zero_initialised_net_is_the_exact_gaussian_denoiser():
    # The last conv is zero-initialised, so D = c_skip x, which is the exact denoiser E[y | x] for
    # y ~ N(0, sd^2 I); its expected EDM loss is lambda * c_out^2 = 1 at every sigma.
    den = _zero_net_denoiser()
    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, 2, 32, 64, generator=g) * SD
    labels = torch.randint(0, 2, (64,), generator=g)
    loss = edm_loss(den, y, labels, EDMConfig(sigma_data=SD), generator=g)
    assert loss.shape == (64,)
    assert abs(loss.mean().item() - 1.0) < 0.02
    x = torch.randn(4, 2, 32, 64, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.1, 1.0, 3.0], dtype=torch.float64)
    D = den(x, sigma, None)
    assert D.dtype == torch.float64
    torch.testing.assert_close(D, precond_coefficients(sigma, SD)[0].reshape(-1, 1, 1, 1) * x)


def test_null_class_and_label_validation():
    den = _zero_net_denoiser()
    _randomise_zero_params(den.net)
    x = torch.randn(2, 2, 32, 64)
    a = den(x, 0.5, None)
    b = den(x, 0.5, torch.tensor([2, 2]))
    torch.testing.assert_close(a, b)
    c = den(x, 0.5, torch.tensor([0, 1]))
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="class labels"):
        den(x, 0.5, torch.tensor([0, 3]))


def test_bf16_autocast_keeps_fp32_output():
    den = build_denoiser(PRESETS["tiny"], num_classes=2, bf16=True)
    _randomise_zero_params(den.net)
    out = den(torch.randn(2, 2, 32, 64), torch.tensor([0.1, 1.0]), torch.tensor([0, 1]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_label_dropout_uses_null_class():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, c_noise, labels):
            seen.append(labels.clone())
            return torch.zeros_like(x)

    den = EDMPrecond(Spy(), num_classes=3, sigma_data=SD)
    y = torch.zeros(4000, 1, 1, 1)
    edm_loss(den, y, torch.zeros(4000, dtype=torch.long), EDMConfig(label_dropout=0.1),
             generator=torch.Generator().manual_seed(1))
    frac = (seen[0] == 3).float().mean().item()
    assert 0.08 < frac < 0.12 and set(seen[0].tolist()) <= {0, 3}


def test_attention_matches_naive_reference():
    torch.manual_seed(0)
    blk = AttentionBlock(16, heads=2, head_dim=8, groups=4)
    torch.nn.init.normal_(blk.out.weight, std=0.2)
    x = torch.randn(2, 16, 4, 6)
    out = blk(x)
    h = blk.qkv(blk.norm(x)).reshape(2, 3, 2, 8, 24)
    q, k, v = h[:, 0], h[:, 1], h[:, 2]                        # (B, heads, d, N)
    att = torch.softmax(torch.einsum("bhdn,bhdm->bhnm", q, k) / math.sqrt(8), dim=-1)
    o = torch.einsum("bhnm,bhdm->bhdn", att, v).reshape(2, 16, 4, 6)
    torch.testing.assert_close(out, x + blk.out(o), rtol=1e-4, atol=1e-5)


def test_unet_shapes_and_divisibility():
    net = EfficientUNet(PRESETS["tiny"].net, num_classes=3)
    out = net(torch.randn(2, 2, 32, 64), torch.zeros(2), torch.tensor([0, 3]))
    assert out.shape == (2, 2, 32, 64)
    assert out.abs().max() == 0                                # zero-initialised output
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 2, 33, 64), torch.zeros(1), torch.tensor([0]))


def test_paper_dcase_builds_and_steps():
    p = PRESETS["paper-dcase"]
    den = build_denoiser(p, num_classes=7)
    n = count_parameters(den.net)
    assert 30e6 < n < 45e6, n                                  # paper: ~37M
    opt = torch.optim.AdamW(den.net.parameters(), lr=1e-4)
    y = torch.randn(1, 2, p.codec.num_bins, p.codec.num_frames) * 0.2
    before = den.net.out_conv.weight.detach().clone()
    loss = edm_loss(den, y, torch.tensor([3]), p.edm, generator=torch.Generator().manual_seed(0)).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, den.net.out_conv.weight)


def test_channels_last_is_a_layout_not_a_model_change():
    import dataclasses
    from edmsound.training.trainer import same_model
    p = PRESETS["tiny"]
    p_cl = dataclasses.replace(p, net=dataclasses.replace(p.net, channels_last=True))
    assert same_model(p, p_cl)
    a = build_denoiser(p, num_classes=2, bf16=False)
    _randomise_zero_params(a.net)
    b = build_denoiser(p_cl, num_classes=2, bf16=False)
    b.net.load_state_dict(a.net.state_dict())
    assert b.net.init_conv.convs[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 2, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(b(x, torch.tensor([0.2, 1.0]), torch.tensor([0, 1])),
                                   a(x, torch.tensor([0.2, 1.0]), torch.tensor([0, 1])), rtol=1e-4, atol=1e-5)


def test_training_draws_come_from_the_generator_whatever_device_trains():
    # levels, then noise, then label dropout, in that order from the generator (on its own device, then moved to
    # the batch's): a run on a GPU driven by the trainer's CPU generator sees the draws a CPU run would
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, c_noise, labels):
            seen.update(x=x, c_noise=c_noise, labels=labels)
            return torch.zeros_like(x)

    cfg = EDMConfig(sigma_data=SD, p_mean=-1.0, p_std=1.5, label_dropout=0.5)
    den = EDMPrecond(Spy(), num_classes=3, sigma_data=SD)
    y = torch.zeros(6, 2, 4, 4)
    edm_loss(den, y, torch.zeros(6, dtype=torch.long), cfg, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    sigma = (torch.randn(6, generator=g) * 1.5 - 1.0).exp()
    noise = torch.randn(y.shape, generator=g) * sigma.reshape(-1, 1, 1, 1)
    drop = torch.rand(6, generator=g) < 0.5
    c_in = 1 / (sigma ** 2 + SD ** 2).sqrt()
    torch.testing.assert_close(seen["x"], c_in.reshape(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(seen["c_noise"].flatten(), sigma.log() / 4)
    assert seen["labels"].tolist() == [3 if d else 0 for d in drop.tolist()]
