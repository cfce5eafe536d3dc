"""Clip level measures against closed forms: BS.1770 loudness of sines, true peak between samples, and the
opt-in normalisation policy."""
import math

import numpy as np
import pytest

from edmsound.audio import loudness as L

SR = 16000


def sine(freq, amp=1.0, phase=0.0, seconds=1.0, sr=SR):
    n = np.arange(int(sr * seconds))
    return amp * np.sin(2 * np.pi * freq * n / sr + phase)


def test_loudness_of_a_sine_is_its_level_minus_3_dB_and_follows_gain_exactly():
    # BS.1770: a full-scale ~1 kHz sine in one channel reads -3.01 LUFS (K-weighting is ~0 dB there)
    x = sine(997, 0.5)
    assert L.integrated_lufs(x, SR) == pytest.approx(20 * math.log10(0.5) - 3.01, abs=0.15)
    for g_db in (-20.0, -6.0, 3.0):
        y = x * 10 ** (g_db / 20)
        assert L.integrated_lufs(y, SR) - L.integrated_lufs(x, SR) == pytest.approx(g_db, abs=1e-6)


def test_k_weighting_lowers_bass_and_raises_treble():
    lo, mid, hi = (L.integrated_lufs(sine(f, 0.5), SR) for f in (60, 997, 6000))
    assert lo < mid - 0.5          # high-pass stage of the K filter
    assert hi > mid + 2.0          # +4 dB shelf above ~1.5 kHz


def test_silence_and_short_clips():
    assert L.integrated_lufs(np.zeros(SR), SR) == L.SILENCE_LUFS
    m = L.measure(np.zeros(SR), SR)
    assert m.true_peak_dbtp == L.SILENCE_DB and m.rms_dbfs == L.SILENCE_DB
    short = sine(997, 0.5, seconds=0.2)           # shorter than one 400 ms block: measured as one block
    assert L.integrated_lufs(short, SR) == pytest.approx(L.integrated_lufs(sine(997, 0.5), SR), abs=0.1)


def test_true_peak_finds_the_peak_between_samples():
    # a sine at fs/4 sampled 45 degrees off its crests: every sample is at 0.707, the waveform reaches 1.0
    x = sine(SR / 4, 1.0, math.pi / 4) * np.hanning(SR) ** 0.05     # soft edges, no Gibbs at the ends
    assert L.sample_peak_dbfs(x) == pytest.approx(-3.01, abs=0.02)
    assert L.true_peak_dbtp(x, SR) == pytest.approx(0.0, abs=0.1)
    assert L.oversampling_factor(16000) == 12 and L.oversampling_factor(48000) == 4


def test_rms_of_a_sine():
    assert L.rms_dbfs(sine(440, 1.0)) == pytest.approx(-3.0103, abs=1e-3)


@pytest.mark.parametrize("bad", [np.zeros((2, 10)), np.array([]), np.array([0.0, np.nan])])
def test_bad_clips_are_refused(bad):
    with pytest.raises(ValueError):
        L.measure(bad, SR)


def test_peak_normalisation_hits_the_target_exactly():
    x = sine(440, 0.05)
    y, rep = L.normalize(x, SR, "peak", -1.0)
    assert L.sample_peak_dbfs(y) == pytest.approx(-1.0, abs=1e-9)
    assert rep.gain_db == pytest.approx(-1.0 - 20 * math.log10(0.05), abs=1e-9)
    assert rep.after.lufs - rep.before.lufs == pytest.approx(rep.gain_db, abs=1e-6)
    assert rep.limited_by is None


def test_loudness_normalisation_hits_the_target_or_stops_at_the_true_peak_ceiling():
    x = sine(997, 0.01)
    y, rep = L.normalize(x, SR, "lufs", -20.0)
    assert L.integrated_lufs(y, SR) == pytest.approx(-20.0, abs=1e-6) and rep.limited_by is None
    # a click train: very peaky, so -6 LUFS would need a true peak far above 0 dBTP
    clicks = np.zeros(SR)
    clicks[::4000] = 0.1
    y, rep = L.normalize(clicks, SR, "lufs", -6.0, ceiling_dbtp=-1.0)
    assert rep.limited_by == "true_peak"
    assert rep.after.true_peak_dbtp == pytest.approx(-1.0, abs=1e-6)
    assert rep.after.lufs < -6.0
    d = rep.to_dict()
    assert d["mode"] == "lufs" and d["target"] == -6.0 and d["before"]["lufs"] < d["after"]["lufs"]


def test_silence_is_left_alone():
    y, rep = L.normalize(np.zeros(100), SR, "peak", -1.0)
    assert rep.gain_db == 0.0 and not y.any()


@pytest.mark.parametrize("mode,target,msg", [("loud", -1, "'off', 'peak' or 'lufs'"), ("peak", 3, "[-60, 0] dBFS"),
                                             ("lufs", -2, "[-60, -5] LUFS"), ("peak", "x", "a number"),
                                             ("lufs", float("nan"), "LUFS")])
def test_bad_targets_say_what_is_allowed(mode, target, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        L.check_target(mode, target)
    assert L.check_target("off", None) == (None, None)


def test_description_says_when_the_file_clips():
    from edmsound.audio.loudness import describe, measure
    sr = 16000
    t = np.arange(sr) / sr
    hot = (1.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)          # +3.5 dB over full scale
    text = describe(measure(hot, sr).to_dict())
    assert "+3.5 dB over full scale: clipped in a 16- or 24-bit file" in text and "32-bit float WAV" in text
    kept = describe(measure(hot, sr).to_dict(), keeps_overs=True)
    assert "+3.5 dB over full scale: kept in the 32-bit float file" in kept and "clipped" not in kept
    safe = describe(measure(0.5 * hot, sr).to_dict())                      # -2.5 dBFS peak
    assert "full scale" not in safe and "true peak" in safe
