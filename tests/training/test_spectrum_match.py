"""Spectrum matching of a few-step model: the band matrix and the spectrum measures (analytic: bin widths, a known
gain, a tone's band), the loss driving a model's output gain to the one that matches its targets, and a short
resumable run on a tuned tiny model that exports a model sampling as before with the matching recorded."""
import csv
import json
import math

import numpy as np
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edmsound.core.codec import make_codec
from edmsound.core.pipeline import EDMSoundPipeline
from edmsound.core.storage import read_config
from edmsound.training.spectrum_match import (SpectrumMatcher, band_matrix, class_targets, order_statistic_means,
                                             spectrum_stats)

ROOT = Path(__file__).resolve().parents[2]


def test_band_matrix_shares_every_bin_by_its_overlap_with_each_band():
    sr, n_fft = 16000, 254
    m = band_matrix(n_fft, sr).double().numpy()
    df = sr / n_fft
    edges = np.geomspace(50.0, sr / 2, 13)
    # every band gets exactly its own width in bins (in units of the bin spacing), however narrow it is
    np.testing.assert_allclose(m.sum(axis=1), np.diff(edges) / df, rtol=1e-6)
    assert (m > 0).any(axis=1).all()                       # the 26-Hz lowest band included
    # a bin wholly above 50 Hz + half a bin is shared out in full; the 0-Hz bin lies below every band
    freqs = np.fft.rfftfreq(n_fft, 1 / sr)
    whole = (freqs - df / 2 >= 50.0) & (freqs + df / 2 <= sr / 2)
    np.testing.assert_allclose(m.sum(axis=0)[whole], 1.0, rtol=1e-6)
    assert m[:, 0].sum() == 0.0


@pytest.fixture(scope="module")
def codec():
    preset, _ = read_config(ROOT / "checkpoints" / "default")          # the shipped codec: per-bin gains and compression
    return make_codec(preset.codec)


def test_spectrum_stats_see_a_known_gain_exactly_and_a_tone_in_its_band(codec):
    sr, n = codec.sample_rate, codec.num_samples
    t = torch.arange(n, dtype=torch.float64) / sr
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.standard_normal(n)) * 0.05
    f = 19 * sr / codec.config.n_fft                      # a bin centre (1197 Hz), well inside its band
    tone = 0.3 * torch.sin(2 * math.pi * f * t)
    waves = torch.stack([noise, 0.25 * noise, tone]).float()
    bands = band_matrix(codec.config.n_fft, sr)
    band, level = spectrum_stats(codec, codec.encode(waves), bands)
    # a gain of 1/4 is -12.04 dB in level and in every band, through the compression and the per-bin gains
    assert float(level[1] - level[0]) == pytest.approx(20 * math.log10(0.25), abs=0.02)
    np.testing.assert_allclose((10 * torch.log10(band[1] / band[0])).numpy(), 20 * math.log10(0.25), atol=0.02)
    # the power sums to the signal's (up to the STFT's fixed scale): a tone's power lies in its band
    edges = np.geomspace(50.0, sr / 2, 13)
    k = int(np.searchsorted(edges, f)) - 1
    assert float(band[2, k] / band[2].sum()) > 0.99
    # the level is of the signal's power: the tone (power 0.045) against the noise (0.0025) by 12.55 dB
    assert float(level[2] - level[0]) == pytest.approx(10 * math.log10(0.045 / 0.0025), abs=0.3)


def test_class_targets_are_the_class_means_of_band_power_and_of_level(codec):
    g = torch.Generator().manual_seed(0)
    waves = torch.randn(6, codec.num_samples, generator=g) * torch.tensor([0.1, 0.2, 0.4, 0.05, 0.05, 0.1])[:, None]
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    bands = band_matrix(codec.config.n_fft, codec.sample_rate)
    tb, tl = class_targets(codec, waves, labels, 2, bands, batch=4)         # batches that cut across classes
    band, level = spectrum_stats(codec, codec.encode(waves), bands)
    torch.testing.assert_close(tb[0], 10 * torch.log10(band[:3].mean(dim=0)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tl[1], level[3:].mean(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"no training clips of class \[2\]"):
        class_targets(codec, waves, labels, 3, bands)


@pytest.fixture(scope="module")
def tuned(tiny_ckpt, tmp_path_factory):
    """A consistency-tuned tiny model (2 steps) and its tone tree."""
    from conftest import tune_tiny
    return tune_tiny(tiny_ckpt, tmp_path_factory.mktemp("match"))


class GainModel(torch.nn.Module):
    """D(x, sigma, label) = g · (a fixed clip of the label's class): one learnable output gain."""

    def __init__(self, clips: torch.Tensor, g: float):
        super().__init__()
        self.clips = clips
        self.log_g = torch.nn.Parameter(torch.tensor(math.log(g)))
        self.null_class = len(clips)

    def forward(self, x, sigma, labels):
        return self.log_g.exp() * self.clips[labels]


def test_the_spectrum_loss_brings_a_quiet_model_to_the_level_and_bands_of_its_targets(tuned, tmp_path):
    model, data = tuned
    m = SpectrumMatcher(model, data, tmp_path / "run", steps=1, progress=False, per_class=2, momentum=0.5)
    # one clip per class, encoded as the model's state; the targets are those clips' own figures, so the loss is
    # at rest exactly at gain 1 and the errors there are zero
    first = [int(torch.nonzero(m.train_labels == c)[0]) for c in range(len(m.classes))]
    lab = torch.arange(len(m.classes))
    clips = m.codec.to_model(m.codec.encode(m.train_waves[first]), lab)
    m.target_band, m.target_level = class_targets(m.codec, m.train_waves[first], lab, len(m.classes), m.bands)
    toy = GainModel(clips, g=0.5)
    opt = torch.optim.Adam(toy.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        opt.zero_grad()
        m.spectrum_loss(toy, g).backward()
        opt.step()
    e_band, e_level = m._last_errors
    assert float(toy.log_g.detach().exp()) == pytest.approx(1.0, abs=0.02)
    assert float(e_level.abs().max()) < 0.3 and float(e_band.abs().max()) < 0.3         # dB
    # from too loud, the same
    toy2, m.run_band = GainModel(clips, g=2.0), None
    opt = torch.optim.Adam(toy2.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        m.spectrum_loss(toy2, g).backward()
        opt.step()
    assert float(toy2.log_g.detach().exp()) == pytest.approx(1.0, abs=0.02)


class ClipGainModel(torch.nn.Module):
    """Item j of a batch is amp_j · g_j · (a fixed clip of its class): a learnable gain per item."""

    def __init__(self, clips: torch.Tensor, amp: torch.Tensor):
        super().__init__()
        self.clips, self.amp = clips, amp
        self.log_g = torch.nn.Parameter(torch.zeros(len(amp)))
        self.null_class = len(clips)

    def forward(self, x, sigma, labels):
        gain = (self.amp * self.log_g.exp()).reshape((-1,) + (1,) * (x.dim() - 1))
        return gain * self.clips[labels]


class MixModel(torch.nn.Module):
    """D(x, sigma, label) = a(sigma) x + g · (a fixed clip of the label's class): depends on the noisy input."""

    def __init__(self, clips: torch.Tensor):
        super().__init__()
        self.clips = clips
        self.g = torch.nn.Parameter(torch.tensor(0.7))
        self.null_class = len(clips)

    def forward(self, x, sigma, labels):
        a = (0.2 / (1.0 + sigma)).reshape((-1,) + (1,) * (x.dim() - 1))
        return a * x + self.g * self.clips[labels]


@pytest.mark.parametrize("nfe", [1, 2, 3])
def test_the_matched_samples_are_drawn_as_the_consistency_sampler_draws_them(tuned, tmp_path, nfe):
    from edmsound.core.samplers import sample_consistency
    model, data = tuned
    m = SpectrumMatcher(model, data, tmp_path / "run", steps=1, progress=False, per_class=2)
    e = m.preset.edm
    from edmsound.core.schedules import karras_sigmas
    m.sigmas = [float(s) for s in karras_sigmas(nfe, e.sigma_min, e.sigma_max, e.rho)]
    C = len(m.classes)
    first = [int(torch.nonzero(m.train_labels == c)[0]) for c in range(C)]
    toy = MixModel(m.codec.to_model(m.codec.encode(m.train_waves[first]), torch.arange(C)))
    spec, labels = m.sample_last_jump(toy, torch.Generator().manual_seed(3))
    # the same draw, from the same generator, through the sampler over the whole schedule
    g = torch.Generator().manual_seed(3)
    x = torch.randn((len(labels),) + tuple(m.codec.shape), generator=g) * m.sigmas[0]
    with torch.no_grad():
        want = sample_consistency(lambda z, s: toy(z, s, labels), x, m.sigmas, generator=g)
    torch.testing.assert_close(spec.detach(), m.codec.from_model(want, labels))
    # the gradient reaches the model through the last jump only: d(out)/dg is the clip term of that jump alone
    (spec_g,) = torch.autograd.grad(m.codec.to_model(spec, labels).sum(), toy.g)
    torch.testing.assert_close(spec_g, toy.clips[labels].sum())


@pytest.mark.parametrize("push", ["clip", "mean"])
def test_the_push_moves_every_clip_by_the_same_db_or_each_by_its_share_of_the_power(tuned, tmp_path, push):
    model, data = tuned
    m = SpectrumMatcher(model, data, tmp_path / "run", steps=1, progress=False, per_class=2, push=push)
    C = len(m.classes)
    first = [int(torch.nonzero(m.train_labels == c)[0]) for c in range(C)]
    lab = torch.arange(C)
    clips = m.codec.to_model(m.codec.encode(m.train_waves[first]), lab)
    amp = torch.tensor([1.0, 1.5]).repeat(C)            # the second clip of every class the louder
    toy = ClipGainModel(clips, amp)
    with torch.no_grad():
        spec, labels = m.sample_last_jump(toy, torch.Generator().manual_seed(0))
        band, level = spectrum_stats(m.codec, spec, m.bands)
    m.target_band = 10 * torch.log10(band.reshape(C, 2, -1).mean(dim=1)) - 3.0     # every band 3 dB loud
    m.target_level = level.reshape(C, 2).mean(dim=1)                                 # the level right
    m.spectrum_loss(toy, torch.Generator().manual_seed(0)).backward()
    e_band, e_level = m._last_errors
    assert torch.allclose(e_band, torch.full_like(e_band, 3.0), atol=1e-3) and float(e_level.abs().max()) < 1e-3
    grad = toy.log_g.grad.reshape(C, 2)
    assert bool((grad > 0).all())                                        # every clip is turned down
    p = band.reshape(C, 2, -1)                                           # each clip's power in each band
    share = p / p.sum(dim=1, keepdim=True)                               # its share of its class's band power
    assert float(share[:, 1].min()) > 0.7                                # the louder clip carries most of it
    if push == "clip":           # d/dlog g of 10 log10(p + floor): p / (p + floor), the training clips' floor
        tb, _ = class_targets(m.codec, m.train_waves, m.train_labels, C, m.bands)
        floor = 1e-3 * 10 ** (tb / 10)                                  # 30 dB under the training clips' power
        torch.testing.assert_close(m.floor, floor)
        weight = (p / (p + floor[:, None])).sum(dim=2)
        assert torch.allclose(grad[:, 1], grad[:, 0], rtol=0.01)        # the same push: their spread kept
    else:                        # d/dlog g of 10 log10(mean p): each clip's share of the power
        weight = share.sum(dim=2)
        assert bool((grad[:, 1] > 2 * grad[:, 0]).all())
    torch.testing.assert_close(grad[:, 1] / grad[:, 0], weight[:, 1] / weight[:, 0], rtol=1e-3, atol=0)


def test_order_statistic_means_are_exact_for_known_sets():
    # half zeros, half ones: the smaller of two draws is 1 only if both are (1/4), the larger 0 only if both are
    v = torch.tensor([0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(order_statistic_means(v, 2), torch.tensor([0.25, 0.75], dtype=torch.float64))
    # uniform on {1..n}: E[min of 2] = sum_j j ((n - j + 1)^2 - (n - j)^2) / n^2
    n = 7
    v = torch.arange(1, n + 1, dtype=torch.float64)
    exp_min = sum(j * ((n - j + 1) ** 2 - (n - j) ** 2) for j in range(1, n + 1)) / n ** 2
    assert float(order_statistic_means(v, 2)[0]) == pytest.approx(exp_min, rel=1e-12)
    # k = 1 is the mean; the k means average to the mean; per trailing position; order of the input irrelevant
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(order_statistic_means(x, 1)[0], x.double().mean(dim=0))
    o = order_statistic_means(x[torch.randperm(50)], 5)
    torch.testing.assert_close(o.mean(dim=0), x.double().mean(dim=0))
    assert bool((o[1:] > o[:-1]).all())
    with pytest.raises(ValueError, match="k must be a whole number >= 1"):
        order_statistic_means(x, 0)


def test_the_rank_push_moves_each_clip_by_its_rank_error(tuned, tmp_path):
    model, data = tuned
    m = SpectrumMatcher(model, data, tmp_path / "run", steps=1, progress=False, per_class=2, push="rank")
    C, B = len(m.classes), m.bands.shape[0]
    assert m.rank_band.shape == (C, 2, B) and m.rank_level.shape == (C, 2)
    assert bool((m.rank_band[:, 1] >= m.rank_band[:, 0]).all())
    first = [int(torch.nonzero(m.train_labels == c)[0]) for c in range(C)]
    lab = torch.arange(C)
    clips = m.codec.to_model(m.codec.encode(m.train_waves[first]), lab)
    amp = torch.tensor([1.0, 1.5]).repeat(C)            # the second clip of every class the louder in every band
    toy = ClipGainModel(clips, amp)
    with torch.no_grad():
        spec, labels = m.sample_last_jump(toy, torch.Generator().manual_seed(0))
        band, level = spectrum_stats(m.codec, spec, m.bands)
    p = band.reshape(C, 2, -1)
    q = 10 * torch.log10(p + m.floor[:, None])
    assert bool((q[:, 1] > q[:, 0]).all())
    # targets: the quieter clip right, the louder 3 dB loud in every band; both levels right
    m.rank_band = torch.stack([q[:, 0], q[:, 1] - 3.0], dim=1)
    m.rank_level = torch.sort(level.reshape(C, 2), dim=1).values
    m.spectrum_loss(toy, torch.Generator().manual_seed(0)).backward()
    grad = toy.log_g.grad.reshape(C, 2)
    assert float(grad[:, 0].abs().max()) < 1e-6 * float(grad[:, 1].abs().max())     # the right clip is left alone
    # d/dlog g of 10 log10(p + floor) with p ∝ g^(2 / beta): (20 / (beta ln 10)) · p / (p + floor), by 3 dB, averaged
    beta = m.codec.config.beta
    expect = 3.0 * (20 / (beta * math.log(10))) * (p[:, 1] / (p[:, 1] + m.floor)).sum(dim=1) / (C * 2 * B)
    torch.testing.assert_close(grad[:, 1], expect.float(), rtol=2e-3, atol=0)


@pytest.mark.parametrize("with_guide", [False, True])
def test_guided_matching_draws_each_jump_as_the_guided_model_is_sampled(tiny_ckpt, tmp_path, with_guide):
    """The first class guided at w 3 on the first jump only: there the jump is the guided combination (against
    the null class, or the guide model's conditional estimate), everywhere else the plain conditional estimate."""
    from conftest import tune_tiny
    from edmsound.evaluation.calibrate import write_class_guidance
    from edmsound.training.export import attach_guide
    model, data = tune_tiny(tiny_ckpt, tmp_path)
    classes = json.loads((model / "config.json").read_text())["classes"]
    if with_guide:
        attach_guide(model, tiny_ckpt, note="its diffusion model")
    first = SpectrumMatcher(model, data, tmp_path / "probe", steps=1, progress=False).sigmas
    write_class_guidance(model, {classes[0]: 3.0}, {classes[0]: [first[1], 2 * first[0]]})
    m = SpectrumMatcher(model, data, tmp_path / "match", steps=1, progress=False, per_class=2, guided=True)
    rec = m.record["matched_spectrum"]["guided"]
    assert rec["scales"] == {classes[0]: 3.0} and rec["reference"] == ("guide" if with_guide else "null")
    assert (m.guide is not None) == with_guide
    labels = torch.arange(len(classes)).repeat_interleave(2)
    x = torch.randn((len(labels),) + tuple(m.codec.shape), generator=torch.Generator().manual_seed(3))
    ours = m.frozen
    for sigma, guided in ((m.sigmas[0], True), (m.sigmas[1], False)):
        t = torch.full((len(labels),), sigma)
        with torch.no_grad():
            got = m._jump(ours, x, sigma, labels)
            cond = ours(x, t, labels).float()
            ref = (m.guide(x, t, labels) if with_guide else ours(x, t, torch.full_like(labels, ours.null_class)))
        want = cond.clone()
        if guided:
            want[:2] = ref.float()[:2] + 3.0 * (cond[:2] - ref.float()[:2])
        assert not torch.allclose(want[:2], ref.float()[:2])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    write_class_guidance(model, None)
    with pytest.raises(ValueError, match="has no guidance to sample with"):
        SpectrumMatcher(model, data, tmp_path / "match2", steps=1, progress=False, guided=True)


def test_match_spectrum_runs_resumes_and_exports_a_model_that_samples_as_before(tuned, tmp_path):
    model, data = tuned
    start = json.loads((model / "info.json").read_text())["steps"]
    m = SpectrumMatcher(model, data, tmp_path / "run", steps=4, progress=False, batch_size=4, per_class=2,
                        checkpoint_every=2)
    assert m.step == start and m.total_steps == start + 4
    assert len(m.sigmas) == 3 and m.sigmas[-1] == 0.0              # the model's own 2-step schedule
    y = m.codec.encode(m.train_waves[:4])
    with torch.no_grad():                  # validation: the anchor alone, 0 for the starting model itself
        assert float(m.loss(m.frozen, y, m.train_labels[:4], torch.Generator().manual_seed(1)).max()) == 0.0
    m.preset = m.preset.replace_train(log_every=1)
    m.run()
    again = SpectrumMatcher(model, data, tmp_path / "run", steps=6, progress=False, batch_size=4, per_class=2,
                            checkpoint_every=2, resume=True, push="mean")
    assert again.step == start + 4 and again.total_steps == start + 6
    assert again.push == "clip"                                    # a resumed run keeps the push it started with
    again.preset = again.preset.replace_train(log_every=1)
    again.run()
    with open(tmp_path / "run" / "spectrum.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(start + 1, start + 7))      # kept across the resume
    assert all(math.isfinite(float(r["band_rms_db"])) for r in rows)
    out = tmp_path / "matched"
    again.export(out)
    rec = json.loads((out / "info.json").read_text())["consistency"]
    assert rec["matched_spectrum"]["from_step"] == start and rec["matched_spectrum"]["per_class"] == 2
    assert rec["matched_spectrum"]["push"] == "clip"
    assert rec["lineage"][-1] == "tuned"
    pipe = EDMSoundPipeline(out, device="cpu")
    assert pipe.samplers == ["consistency"] and pipe.valid_nfes("consistency") == [1, 2]
    gen = pipe.generate(pipe.classes[0], n=2, seed=0)
    assert gen.settings["guidance"] == 1.0 and gen.settings["nfe"] == 2 and np.isfinite(gen.waves).all()
    w0, w1 = load_file(model / "ema.safetensors"), load_file(out / "ema.safetensors")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)                   # it trained
    with pytest.raises(ValueError, match="is not the model this run started from"):
        SpectrumMatcher(out, data, tmp_path / "run", steps=6, progress=False, resume=True)


def test_match_spectrum_refuses_what_it_cannot_tune(tiny_ckpt, tuned, tmp_path, capsys):
    model, data = tuned
    with pytest.raises(ValueError, match="is not a consistency-tuned model"):
        SpectrumMatcher(tiny_ckpt, data, tmp_path / "x", steps=1, progress=False)
    from edmsound.cli import main
    for argv, msg in ((["--momentum", "1"], "the momentum must be a number in [0, 1), got 1.0"),
                      (["--per-class", "0"], "argument --per-class: must be a whole number > 0, got '0'"),
                      (["--push", "median"], "invalid choice: 'median' (choose from 'clip', 'mean', 'rank')"),
                      (["--steps", "0"], "argument --steps: must be a whole number > 0, got '0'")):
        with pytest.raises(SystemExit) as e:
            main(["match-spectrum", "--teacher", str(model), "--data", str(data), "--out", str(tmp_path / "x"),
                  "--no-progress"] + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert msg in err[-1], err
        assert not (tmp_path / "x").exists()
