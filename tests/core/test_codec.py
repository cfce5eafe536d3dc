import json

import numpy as np
import pytest
import torch

from edmsound.core.codec import SpectrogramCodec
from edmsound.core.presets import PRESETS, CodecConfig


@pytest.mark.parametrize("name", list(PRESETS))
def test_round_trip_float32(name):
    cfg = PRESETS[name].codec
    codec = SpectrogramCodec(cfg)
    g = torch.Generator().manual_seed(0)
    # noise plus a decaying tone: broadband and peaky content
    n = codec.num_samples
    t = torch.arange(n) / cfg.sample_rate
    wave = 0.1 * torch.randn(3, n, generator=g) + 0.5 * torch.sin(2 * torch.pi * 440 * t) * torch.exp(-3 * t)
    spec = codec.encode(wave)
    assert spec.shape == (3, *codec.shape) and spec.dtype == torch.float32
    back = codec.decode(spec)
    assert back.shape == wave.shape
    rel = (back - wave).norm() / wave.norm()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("name", list(PRESETS))
def test_shape_divisible_by_unet(name):
    p = PRESETS[name]
    _, F, T = SpectrogramCodec(p.codec).shape
    f = p.net.downsample_factor
    assert F % f == 0 and T % f == 0
    assert p.codec.num_samples >= round(p.codec.clip_seconds * p.codec.sample_rate)


def test_paper_shapes():
    c = PRESETS["paper-dcase"].codec
    assert (c.num_bins, c.num_frames) == (256, 352)   # n_fft 510, hop 256, 4 s at 22.05 kHz
    assert PRESETS["paper-sc09"].codec.num_bins == 256


def test_compression_is_alpha_mag_beta_with_phase():
    cfg = CodecConfig(sample_rate=8000, clip_seconds=0.25, n_fft=62, hop_length=31, frames_multiple=1,
                      alpha=0.3, beta=0.5)
    codec = SpectrogramCodec(cfg)
    wave = torch.randn(1, codec.num_samples, dtype=torch.float64)
    X = torch.stft(wave, 62, 31, window=torch.hann_window(62, dtype=torch.float64), return_complex=True)
    spec = codec.encode(wave)
    Y = torch.complex(spec[:, 0], spec[:, 1])
    np.testing.assert_allclose(Y.abs(), 0.3 * X.abs() ** 0.5, rtol=1e-9, atol=1e-12)
    mask = X.abs() > 1e-6
    np.testing.assert_allclose(torch.angle(Y)[mask], torch.angle(X)[mask], atol=1e-7)


def test_numpy_and_1d_input_and_length_fitting():
    codec = SpectrogramCodec(PRESETS["tiny"].codec)
    short = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    spec = codec.encode(short)
    assert spec.shape == (1, *codec.shape)
    back = codec.decode(spec)[0].numpy()
    np.testing.assert_allclose(back[:100], short, atol=1e-5)
    assert np.abs(back[100:]).max() < 1e-5       # zero padding survives the round trip


def test_invalid_configs_rejected():
    with pytest.raises(ValueError, match="hop_length"):
        SpectrogramCodec(CodecConfig(n_fft=62, hop_length=40))
    with pytest.raises(ValueError, match="beta"):
        SpectrogramCodec(CodecConfig(beta=1.5))
    with pytest.raises(ValueError, match=r"\(B, 2, F, T\)"):
        SpectrogramCodec(PRESETS["tiny"].codec).decode(torch.zeros(1, 3, 32, 64))


def test_any_length_and_circular_spectrograms_decode_exactly():
    """Long clips are one spectrogram of many windows; a loop's ring of frames decodes to one period of a
    periodic wave, so played back to back it has no seam."""
    codec = SpectrogramCodec(PRESETS["tiny"].codec)
    hop = codec.config.hop_length
    rng = np.random.default_rng(0)
    long = (0.1 * rng.standard_normal(37 * hop + 11)).astype(np.float32)
    spec = codec.encode(long, fit=False)
    assert spec.shape[-1] == codec.frames_for(len(long)) == 38
    back = codec.decode(spec, length=len(long))[0].numpy()
    assert np.abs(back - long).max() < 1e-5
    T = 20
    period = (0.1 * rng.standard_normal(T * hop)).astype(np.float32)
    ring = codec.encode(np.tile(period, 4), fit=False)[..., T:2 * T]     # frames of one period, away from edges
    one = codec.decode_loop(ring)[0].numpy()
    assert one.shape == (T * hop,) and np.abs(one - period).max() < 1e-5
    # a ring made of frames that do not come from a periodic wave still tiles without a jump at the wrap
    noisy = ring + 0.05 * torch.randn(ring.shape, generator=torch.Generator().manual_seed(1))
    w = codec.decode_loop(noisy)[0].numpy()
    tiled = np.tile(w, 2)
    plain = np.tile(codec.decode(noisy, length=T * hop)[0].numpy(), 2)
    mid = slice(T * hop - 2 * hop, T * hop + 2 * hop)
    # the circular inverse at the wrap is the inverse of the frames that surround it
    ring3 = codec.decode(torch.cat([noisy, noisy, noisy], -1), length=3 * T * hop)[0].numpy()
    assert np.abs(tiled[mid] - ring3[T * hop:][mid]).max() < 1e-5
    assert np.abs(plain[mid] - ring3[T * hop:][mid]).max() > 1e-3    # a plain inverse, tiled, jumps at the wrap
    with pytest.raises(ValueError, match="at least"):
        codec.decode_loop(ring[..., :1])


def test_magnitude_representation_keeps_magnitudes_and_recovers_a_phase_by_griffin_lim():
    """The baseline codec: one channel of compressed magnitude; decoding finds a phase consistent with it, more
    so with more iterations, but is not exact (the complex codec is)."""
    import dataclasses
    from edmsound.core.codec import MagnitudeCodec, make_codec
    cfg = dataclasses.replace(PRESETS["tiny"].codec, representation="magnitude")
    codec = make_codec(cfg)
    assert isinstance(codec, MagnitudeCodec) and codec.shape[0] == 1
    n = codec.num_samples
    t = torch.arange(n) / cfg.sample_rate
    g = torch.Generator().manual_seed(0)
    wave = (0.4 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.randn(n, generator=g)) * torch.exp(-4 * t)
    spec = codec.encode(wave[None])
    X = torch.stft(wave[None], cfg.n_fft, cfg.hop_length, window=torch.hann_window(cfg.n_fft), center=True,
                   return_complex=True)
    torch.testing.assert_close(codec.magnitude(spec), X.abs(), rtol=1e-4, atol=1e-6)

    def convergence(iters):
        c = make_codec(dataclasses.replace(cfg, griffin_lim_iters=iters))
        back = c.decode(spec)
        Y = torch.stft(back, cfg.n_fft, cfg.hop_length, window=torch.hann_window(cfg.n_fft), center=True,
                       return_complex=True)
        return float((Y.abs() - X.abs()).norm() / X.abs().norm()), float((back - wave).norm() / wave.norm())
    sc4, _ = convergence(4)
    sc64, wave_err = convergence(64)
    assert sc64 < 0.5 * sc4 and sc64 < 0.15, (sc4, sc64)
    assert wave_err > 1e-2                          # not the same waveform: the phase is a new one
    complex_err = (SpectrogramCodec(PRESETS["tiny"].codec).decode(SpectrogramCodec(PRESETS["tiny"].codec)
                                                                 .encode(wave[None])) - wave).norm() / wave.norm()
    assert complex_err < 1e-5
    with pytest.raises(ValueError, match="unknown representation 'wavelet'; valid: complex, magnitude, mel"):
        make_codec(dataclasses.replace(cfg, representation="wavelet"))
    # the log-mel cascade: same model shape, one channel; its round trip loses more than the magnitude codec's
    mel = make_codec(dataclasses.replace(cfg, representation="mel"))
    ms = mel.encode(wave[None])
    assert ms.shape == spec.shape and torch.isfinite(ms).all()
    back = mel.decode(ms)
    Y = torch.stft(back, cfg.n_fft, cfg.hop_length, window=torch.hann_window(cfg.n_fft), center=True,
                   return_complex=True)
    sc_mel = float((Y.abs() - X.abs()).norm() / X.abs().norm())
    assert sc64 < sc_mel < 1.0, (sc64, sc_mel)


def test_per_bin_gains_multiply_both_channels_and_decode_exactly():
    import dataclasses
    base = PRESETS["tiny"].codec
    gains = tuple(float(g) for g in np.linspace(0.5, 3.0, base.num_bins))
    plain, scaled = SpectrogramCodec(base), SpectrogramCodec(dataclasses.replace(base, freq_scale=gains))
    wave = torch.randn(2, plain.num_samples, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a, b = plain.encode(wave), scaled.encode(wave)
    np.testing.assert_allclose(b, a * torch.tensor(gains, dtype=torch.float64)[None, None, :, None], rtol=1e-12)
    np.testing.assert_allclose(scaled.to_complex(b), plain.to_complex(a), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(scaled.decode(b), wave, atol=1e-12)
    np.testing.assert_allclose(scaled.magnitude_db(b), plain.magnitude_db(a), atol=1e-9)


def _red_noise(clips: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise falling with frequency: white noise through a one-pole low-pass, the white noise itself)."""
    white = torch.randn(clips, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    red = torch.zeros_like(white)
    for i in range(1, n):
        red[:, i] = 0.9 * red[:, i - 1] + white[:, i]
    return red, white


def test_whitening_gains_give_every_bin_the_target_rms_within_their_limits():
    import dataclasses
    from edmsound.core.codec import whitening_scale
    base = PRESETS["tiny"].codec
    codec = SpectrogramCodec(base)
    waves = 0.05 * _red_noise(16, codec.num_samples)[0]
    gains = whitening_scale(codec, waves, target_rms=0.2, limits=(0.25, 4.0))
    assert len(gains) == base.num_bins and gains[-1] > gains[1] > 0      # quiet high bins are lifted
    spec = SpectrogramCodec(dataclasses.replace(base, freq_scale=gains)).encode(waves)
    rms = spec.pow(2).mean(dim=(0, 1, 3)).sqrt().numpy()
    inside = (np.array(gains) > 0.25) & (np.array(gains) < 4.0)
    assert inside.sum() > base.num_bins // 2
    np.testing.assert_allclose(rms[inside], 0.2, rtol=1e-4)               # gains are rounded to 5 decimals
    tight = whitening_scale(codec, waves, target_rms=0.2, limits=(0.9, 1.1))
    assert min(tight) == 0.9 or max(tight) == 1.1
    assert all(0.9 <= v <= 1.1 for v in tight)


def test_per_bin_gains_are_checked_and_kept_in_the_preset():
    import dataclasses
    from edmsound.core.codec import make_codec
    from edmsound.core.presets import Preset
    base = PRESETS["tiny"].codec
    with pytest.raises(ValueError, match="one gain per frequency bin"):
        SpectrogramCodec(dataclasses.replace(base, freq_scale=(1.0, 2.0)))
    with pytest.raises(ValueError, match="finite and > 0"):
        SpectrogramCodec(dataclasses.replace(base, freq_scale=(0.0,) * base.num_bins))
    with pytest.raises(ValueError, match="complex representation only"):
        make_codec(dataclasses.replace(base, representation="magnitude", freq_scale=(1.0,) * base.num_bins))
    gains = tuple(1.0 + i / 100 for i in range(base.num_bins))
    p = dataclasses.replace(PRESETS["tiny"], codec=dataclasses.replace(base, freq_scale=gains))
    back = Preset.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p and back.codec.freq_scale == gains


def test_class_gains_scale_each_class_state_and_invert_exactly():
    import dataclasses
    base = PRESETS["tiny"].codec
    F = base.num_bins
    table = (tuple([2.0] * F), tuple(float(g) for g in np.linspace(0.5, 3.0, F)))
    codec = SpectrogramCodec(dataclasses.replace(base, class_scale=table))
    wave = torch.randn(3, codec.num_samples, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    spec = codec.encode(wave)
    # encoding and decoding are class-free: the gains belong to the diffusion state only
    np.testing.assert_allclose(spec, SpectrogramCodec(base).encode(wave), rtol=1e-12)
    labels = torch.tensor([0, 1, 1])
    state = codec.to_model(spec, labels)
    np.testing.assert_allclose(state[0], 2.0 * spec[0], rtol=1e-12)
    np.testing.assert_allclose(state[1], spec[1] * torch.tensor(table[1], dtype=torch.float64)[None, :, None],
                               rtol=1e-12)
    np.testing.assert_allclose(codec.from_model(state, labels), spec, rtol=1e-12)
    np.testing.assert_allclose(codec.to_model(spec, 1), codec.to_model(spec, torch.tensor([1, 1, 1])))
    with pytest.raises(ValueError, match="class index out of range"):
        codec.to_model(spec, torch.tensor([0, 1, 2]))
    # without a table the state is the spectrogram itself
    assert SpectrogramCodec(base).to_model(spec, labels) is spec


def test_class_whitening_gains_give_every_class_and_bin_the_target_rms():
    import dataclasses
    from edmsound.core.codec import class_whitening_scale, make_codec
    from edmsound.core.presets import Preset
    base = PRESETS["tiny"].codec
    codec = SpectrogramCodec(base)
    red, white = _red_noise(24, codec.num_samples)
    waves = torch.cat([0.05 * red[:12], 0.02 * white[12:]])        # class 0 falls with frequency, class 1 is flat
    labels = torch.tensor([0] * 12 + [1] * 12)
    table = class_whitening_scale(codec, waves, labels, num_classes=3, target_rms=0.2)
    assert len(table) == 3 and all(len(row) == base.num_bins for row in table)
    assert table[2] == (1.0,) * base.num_bins                          # a class without clips keeps gain 1
    assert table[0][-1] > table[0][1] and abs(table[1][-1] / table[1][1] - 1) < 0.5
    scaled = make_codec(dataclasses.replace(base, class_scale=table))
    for c in (0, 1):
        state = scaled.to_model(scaled.encode(waves[labels == c]), c)
        rms = state.pow(2).mean(dim=(0, 1, 3)).sqrt().numpy()
        inside = (np.array(table[c]) > 0.25) & (np.array(table[c]) < 4.0)
        assert inside.sum() > base.num_bins // 2
        np.testing.assert_allclose(rms[inside], 0.2, rtol=1e-4)
    with pytest.raises(ValueError, match="one label per clip"):
        class_whitening_scale(codec, waves, labels[:3], num_classes=2, target_rms=0.2)
    with pytest.raises(ValueError, match="one gain per class and frequency bin"):
        SpectrogramCodec(dataclasses.replace(base, class_scale=((1.0, 2.0),)))
    with pytest.raises(ValueError, match="finite and > 0"):
        SpectrogramCodec(dataclasses.replace(base, class_scale=((float("nan"),) * base.num_bins,)))
    p = dataclasses.replace(PRESETS["tiny"], codec=dataclasses.replace(base, class_scale=table))
    back = Preset.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p and back.codec.class_scale == table
