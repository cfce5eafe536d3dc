"""The matching EQ: its gain curve, its exact action on the codec's spectrogram, and the pipeline applying it."""
import json

import numpy as np
import pytest
import torch

from edmsound.core.codec import make_codec
from edmsound.core.presets import CodecConfig
from edmsound.core.spectral_eq import MAX_GAIN_DB, ClassEQ, apply_to_spec, bin_freqs, curve_db

SR = 16000


def _codec(freq_scale=None):
    cfg = CodecConfig(sample_rate=SR, clip_seconds=0.512, n_fft=510, hop_length=128, frames_multiple=1)
    if freq_scale is not None:
        import dataclasses
        cfg = dataclasses.replace(cfg, freq_scale=tuple(freq_scale(cfg.num_bins)))
    return make_codec(cfg)


def test_curve_is_exact_at_centres_linear_in_log_frequency_and_flat_beyond():
    c, g = [100.0, 400.0, 1600.0], [-6.0, 3.0, 9.0]
    assert np.allclose(curve_db(c, g, c), g)
    assert np.isclose(curve_db(c, g, [200.0])[0], -1.5)           # geometric midpoint: the mean of the two gains
    assert np.allclose(curve_db(c, g, [0.0, 10.0, 99.0]), -6.0)
    assert np.allclose(curve_db(c, g, [5000.0, 8000.0]), 9.0)


@pytest.mark.parametrize("centres, gains, what", [([100, 200], [1.0], "one gain per centre"),
                                                  ([200, 100], [1.0, 2.0], "increasing"),
                                                  ([0, 100], [1.0, 2.0], "positive"),
                                                  ([100, 200], [1.0, float("nan")], "finite")])
def test_curve_rejects_bad_tables(centres, gains, what):
    with pytest.raises(ValueError, match=what):
        curve_db(centres, gains, [100.0])


@pytest.mark.parametrize("freq_scale", [None, lambda n: np.linspace(0.5, 3.0, n)])
def test_gain_on_the_spectrogram_filters_the_clip(freq_scale):
    """Two bin-centred sines through encode -> EQ -> decode come back scaled by the curve at their frequencies,
    with or without the codec's own per-bin gains; a flat curve is an exact gain."""
    codec = _codec(freq_scale)
    n = codec.num_samples
    t = np.arange(n) / SR
    k1, k2 = 20, 150                                   # STFT bins; both frequencies are whole cycles of the clip
    f1, f2 = k1 * SR / 510, k2 * SR / 510
    f1, f2 = round(f1 * n / SR) * SR / n, round(f2 * n / SR) * SR / n
    x = 0.3 * np.sin(2 * np.pi * f1 * t) + 0.2 * np.sin(2 * np.pi * f2 * t)
    spec = codec.encode(torch.from_numpy(x)[None].double())
    freqs = bin_freqs(codec)
    flat = codec.decode(apply_to_spec(codec, spec, np.full(len(freqs), 6.0)), length=n)[0].numpy()
    assert np.allclose(flat, x * 10 ** 0.3, atol=1e-9)
    gains = curve_db([f1, f2], [-6.0, 9.0], freqs)
    y = codec.decode(apply_to_spec(codec, spec, gains), length=n)[0].numpy()
    X, Y = np.abs(np.fft.rfft(x)), np.abs(np.fft.rfft(y))
    b1, b2 = round(f1 * n / SR), round(f2 * n / SR)
    assert 20 * np.log10(Y[b1] / X[b1]) == pytest.approx(-6.0, abs=0.1)
    assert 20 * np.log10(Y[b2] / X[b2]) == pytest.approx(9.0, abs=0.1)


def test_only_the_masked_bins_change():
    codec = _codec()
    spec = codec.encode(torch.randn(2, codec.num_samples, generator=torch.Generator().manual_seed(0)))
    F, T = spec.shape[-2:]
    todo = np.zeros((F, T), bool)
    todo[:, T // 2:] = True
    out = apply_to_spec(codec, spec, np.full(F, -12.0), todo)
    assert torch.equal(out[..., : T // 2], spec[..., : T // 2])
    assert torch.allclose(out[..., T // 2:], spec[..., T // 2:] * 10 ** (-12 / 20 * 0.5))


def test_class_eq_round_trip_and_checks():
    eq = ClassEQ((100.0, 1000.0), {"a": (1.0, -2.0)}, {"seed": 1})
    back = ClassEQ.from_dict(json.loads(json.dumps(eq.to_dict())), ["a", "b"])
    assert back == eq
    assert back.curve("b", [100.0]) is None
    with pytest.raises(ValueError, match="does not have: zz"):
        ClassEQ.from_dict({"centres_hz": [100.0], "gains_db": {"zz": [1.0]}}, ["a"])
    with pytest.raises(ValueError, match="beyond"):
        ClassEQ((100.0,), {"a": (MAX_GAIN_DB + 1,)})
    with pytest.raises(ValueError, match="centres_hz and gains_db"):
        ClassEQ.from_dict({"gains_db": {"a": [1.0]}})


@pytest.fixture
def eq_ckpt(tiny_ckpt, tmp_path):
    """A copy of the tiny model whose first class has a flat +6 dB matching EQ."""
    from conftest import copy_model
    d, cfg = copy_model(tiny_ckpt, tmp_path / "eq-model", lambda cfg: cfg.update(
        class_eq={"centres_hz": [100.0, 1000.0], "gains_db": {cfg["classes"][0]: [6.0, 6.0]}}))
    return d, cfg["classes"][0], cfg["classes"][1]


def test_pipeline_applies_the_class_eq_and_records_it(eq_ckpt):
    from edmsound.core.pipeline import EDMSoundPipeline
    d, cls, other = eq_ckpt
    pipe = EDMSoundPipeline(d, device="cpu", bf16=False)
    on = pipe.generate(cls, n=2, sampler="euler", nfe=4, seed=3)
    off = pipe.generate(cls, n=2, sampler="euler", nfe=4, seed=3, eq=False)
    assert np.allclose(on.waves, off.waves * 10 ** 0.3, atol=1e-5)
    assert on.settings["matching_eq"] is True and off.settings["matching_eq"] is False
    plain = pipe.generate(other, n=1, sampler="euler", nfe=4, seed=3)
    assert "matching_eq" not in plain.settings
    with pytest.raises(ValueError, match="eq must be True"):
        pipe.generate(cls, n=1, sampler="euler", nfe=4, eq="yes")


def test_a_regenerated_region_is_equalised_and_the_rest_kept(eq_ckpt):
    from edmsound.core.pipeline import EDMSoundPipeline
    d, cls, _ = eq_ckpt
    pipe = EDMSoundPipeline(d, device="cpu", bf16=False)
    src = pipe.generate(cls, n=1, sampler="euler", nfe=4, seed=1, eq=False).waves[0]
    dur = len(src) / pipe.sample_rate
    on = pipe.regenerate(src, cls, 0.6 * dur, 0.8 * dur, sampler="euler", nfe=4, seed=2)
    off = pipe.regenerate(src, cls, 0.6 * dur, 0.8 * dur, sampler="euler", nfe=4, seed=2, eq=False)
    kept = int((0.6 * dur) * pipe.sample_rate) - pipe.codec.config.n_fft
    assert np.allclose(on.waves[0, :kept], src[:kept], atol=1e-5)            # the source, untouched
    a, b = int(0.65 * dur * pipe.sample_rate), int(0.75 * dur * pipe.sample_rate)
    assert np.allclose(on.waves[0, a:b], off.waves[0, a:b] * 10 ** 0.3, atol=1e-4)


def test_generate_command_says_whether_the_eq_was_on(eq_ckpt, tmp_path, capsys):
    from edmsound.cli import main
    d, cls, _ = eq_ckpt
    for flag, word, value in (([], "on", True), (["--no-eq"], "off", False)):
        out = tmp_path / word
        main(["generate", "--checkpoint", str(d), "--class", cls, "--sampler", "euler", "--nfe", "2",
              "--out", str(out), "--no-figures", "--precision", "fp32", *flag])
        assert f"matching EQ {word}" in capsys.readouterr().out
        sidecar = json.loads(next(out.glob("*.json")).read_text())
        assert sidecar["matching_eq"] is value
