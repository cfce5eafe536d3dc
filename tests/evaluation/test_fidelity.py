"""Encoder-free fidelity measures against known answers: a known gain gives a known level, loudness, peak and
band gap; a known filter gives a known gap in its band and none elsewhere."""
import math

import numpy as np
import pytest

from edmsound.evaluation import fidelity as F
from edmsound.data.synth import synthesize

SR = 16000


@pytest.fixture(scope="module")
def real_set():
    return np.stack([synthesize(c, s, SR, 1.0) for c in ("dog_bark", "rain", "keyboard") for s in range(4)]).astype(np.float64)


def test_band_edges_are_log_spaced_up_to_nyquist():
    e = F.band_edges(SR, 12, 50.0)
    assert len(e) == 13 and e[0] == pytest.approx(50.0) and e[-1] == pytest.approx(8000.0)
    r = e[1:] / e[:-1]
    assert np.allclose(r, r[0])
    with pytest.raises(ValueError):
        F.band_edges(SR, 12, 9000.0)


def test_band_power_sums_to_the_signal_power_above_f_lo():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, SR))
    # white noise: the bands together hold the share of the spectrum from 50 Hz to Nyquist
    total = F.band_power(x, SR, 12, 50.0).sum()
    assert total == pytest.approx(np.mean(x ** 2) / 2 * (8000 - 50) / 8000, rel=0.02)


@pytest.mark.parametrize("gain_db", [-10.0, -3.0, 6.0])
def test_a_known_gain_gives_the_same_known_gap_everywhere(real_set, gain_db):
    g = 10 ** (gain_db / 20)
    quiet = real_set * g
    assert F.level_gap_db(quiet, real_set) == pytest.approx(gain_db, abs=1e-9)
    gaps = F.band_gap_db(quiet, real_set, SR)
    assert np.allclose(gaps, gain_db, atol=1e-9)
    lv, ref = F.clip_levels(quiet, SR), F.clip_levels(real_set, SR)
    row = F.compare(lv, ref, F.clip_band_power(quiet, SR), F.clip_band_power(real_set, SR))
    assert row["lufs_gap"] == pytest.approx(gain_db, abs=1e-6)
    assert row["true_peak_gap"] == pytest.approx(gain_db, abs=1e-6)
    assert row["level_gap_db"] == pytest.approx(gain_db, abs=1e-9)
    assert row["band_gap_worst_db"] == pytest.approx(gain_db, abs=1e-9)


def test_a_known_filter_gives_its_gain_in_its_band_only(real_set):
    edges = F.band_edges(SR, 12, 50.0)
    k = 8                                             # one band in the upper mids
    X = np.fft.rfft(real_set, axis=1)
    f = np.fft.rfftfreq(real_set.shape[1], 1 / SR)
    X[:, (f >= edges[k]) & (f < edges[k + 1])] *= 10 ** (-12 / 20)      # a -12 dB band-stop "EQ cut"
    dull = np.fft.irfft(X, n=real_set.shape[1], axis=1)
    gaps = F.band_gap_db(dull, real_set, SR)
    assert gaps[k] == pytest.approx(-12.0, abs=1e-6)
    others = np.delete(gaps, k)
    assert np.max(np.abs(others)) < 1e-6
    row = F.compare(F.clip_levels(dull, SR), F.clip_levels(real_set, SR), F.clip_band_power(dull, SR),
                    F.clip_band_power(real_set, SR))
    assert row["band_gap_worst_band"] == k and row["band_gap_worst_db"] == pytest.approx(-12.0, abs=1e-6)
    assert row["level_gap_db"] < 0


def test_a_low_pass_shows_up_in_the_top_bands(real_set):
    from scipy.signal import butter, sosfiltfilt
    sos = butter(6, 2000, fs=SR, output="sos")
    gaps = F.band_gap_db(sosfiltfilt(sos, real_set, axis=1), real_set, SR)
    edges = F.band_edges(SR)
    assert np.all(np.abs(gaps[edges[1:] < 1000]) < 0.5)
    assert np.all(gaps[edges[:-1] > 4000] < -30)


def test_identical_sets_have_no_gap_and_bad_sets_are_refused(real_set):
    assert np.allclose(F.band_gap_db(real_set, real_set, SR), 0.0)
    assert F.level_gap_db(real_set, real_set) == 0.0
    with pytest.raises(ValueError):
        F.band_power(np.zeros(10), SR)
    with pytest.raises(ValueError):
        F.band_power(np.full((2, 100), np.nan), SR)


def test_level_gap_standard_error_is_welch_and_covers_the_true_gap():
    rng = np.random.default_rng(3)
    a, b = rng.normal(-20, 4, 64), rng.normal(-22, 6, 200)
    expect = np.sqrt(np.var(a, ddof=1) / 64 + np.var(b, ddof=1) / 200)
    assert F.level_gap_se_db(a, b) == pytest.approx(expect, rel=1e-12)
    assert np.isnan(F.level_gap_se_db(a[:1], b))
    # per-clip levels of spread 4 and 6 dB: a ±1.96 SE interval holds the true 2 dB gap in about 95 % of draws
    hits = 0
    for _ in range(2000):
        a, b = rng.normal(-20, 4, 64), rng.normal(-22, 6, 200)
        gap, se = a.mean() - b.mean(), F.level_gap_se_db(a, b)
        hits += abs(gap - 2.0) <= 1.96 * se
    assert 0.93 <= hits / 2000 <= 0.97


def test_compare_reports_the_level_gap_with_its_standard_error(real_set):
    lv, ref = F.clip_levels(real_set * 0.5, SR), F.clip_levels(real_set, SR)
    row = F.compare(lv, ref, F.clip_band_power(real_set * 0.5, SR), F.clip_band_power(real_set, SR))
    assert row["level_gap_se_db"] == pytest.approx(F.level_gap_se_db(lv["rms"], ref["rms"]))
    assert row["level_gap_se_db"] > 0


def test_clip_band_powers_average_to_the_set_band_power(real_set):
    per = F.clip_band_power(real_set, SR)
    assert per.shape == (len(real_set), 12) and np.all(per >= 0)
    assert np.allclose(per.mean(axis=0), F.band_power(real_set, SR), rtol=1e-12)
    assert np.allclose(per[3], F.band_power(real_set[3:4], SR), rtol=1e-12)


def test_band_gap_standard_error_by_the_delta_method(real_set):
    a, b = F.clip_band_power(real_set * 0.5, SR), F.clip_band_power(real_set, SR)
    n = len(real_set)
    rel = b.std(axis=0, ddof=1) / (b.mean(axis=0) * np.sqrt(n))       # a gain does not change a relative spread
    expect = 10 / np.log(10) * np.sqrt(2) * rel
    assert np.allclose(F.band_gap_se_db(a, b), expect, rtol=1e-10)
    # a set of identical clips has no spread: only the other set's error is left
    same = np.repeat(b[:1], 5, axis=0)
    assert np.allclose(F.band_gap_se_db(same, same), 0.0)
    assert np.allclose(F.band_gap_se_db(same, b), 10 / np.log(10) * rel, rtol=1e-10)
    assert np.all(np.isnan(F.band_gap_se_db(b[:1], b)))
    with pytest.raises(ValueError, match="2-D"):
        F.band_gap_se_db(b.mean(axis=0), b)


def test_band_gap_standard_error_covers_the_true_gap():
    # skewed per-clip powers (gamma, as a band's power over clips of one class): a ±1.96 SE interval holds the
    # true gap of 10 log10(2) dB in about 95 % of draws
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(1000):
        a, b = rng.gamma(1.0, 2.0, (64, 4)), rng.gamma(1.0, 1.0, (200, 4))
        gap = 10 * np.log10(a.mean(axis=0) / b.mean(axis=0))
        hits += np.mean(np.abs(gap - 10 * np.log10(2.0)) <= 1.96 * F.band_gap_se_db(a, b))
    assert 0.92 <= hits / 1000 <= 0.97


def test_compare_reports_band_standard_errors_from_per_clip_powers(real_set):
    lv, ref = F.clip_levels(real_set * 0.5, SR), F.clip_levels(real_set, SR)
    a, b = F.clip_band_power(real_set * 0.5, SR), F.clip_band_power(real_set, SR)
    row = F.compare(lv, ref, a, b)
    assert np.allclose(row["band_gap_db"], 20 * np.log10(0.5), atol=1e-9)
    assert np.allclose(row["band_gap_se_db"], F.band_gap_se_db(a, b))
    assert row["band_gap_worst_se_db"] == row["band_gap_se_db"][row["band_gap_worst_band"]] > 0
    with pytest.raises(ValueError, match="2-D"):                   # averaged powers carry no spread to judge by
        F.compare(lv, ref, a.mean(axis=0), b.mean(axis=0))


def test_band_misses_counts_gaps_beyond_the_limit_and_those_clear_of_their_error():
    rows = [{"band_gap_db": [0.0, -5.0, 4.5, 9.0], "band_gap_se_db": [1.0, 0.4, 0.1, 3.0]},
            {"band_gap_db": [-4.0, 6.0], "band_gap_se_db": [0.1, 0.5]}]
    m = F.band_misses(rows, 4.0)
    # beyond ±4: -5 (1.0 past, 2 SE = 0.8: clear), 4.5 (0.5 past, 0.2: clear), 9 (5 past, 6: not), 6 (2 past, 1: clear)
    assert m == {"limit": 4.0, "k": 2.0, "total": 6, "beyond": 4, "clear": 3}
    assert F.band_misses(rows, 4.0, k=3.0)["clear"] == 2
    assert F.misses_text(m) == "4 of 6 class-bands beyond ±4 dB, 3 of them by more than 2 standard errors"
    assert F.band_misses([{"band_gap_db": [5.0]}], 4.0)["clear"] is None          # no errors known
    assert F.misses_text(F.band_misses([{"band_gap_db": [5.0]}], 4.0)) == "1 of 1 class-bands beyond ±4 dB"
    assert F.band_misses([{"band_gap_db": [3.0]}], 4.0) == {"limit": 4.0, "k": 2.0, "total": 1, "beyond": 0,
                                                           "clear": 0}


def test_spectral_centroid_of_sines_noise_and_silence():
    sr, n = 16000, 16000
    t = np.arange(n) / sr
    sine = np.sin(2 * np.pi * 1000 * t)                         # whole cycles: all power in the 1 kHz bin
    pair = np.sin(2 * np.pi * 500 * t) + np.sin(2 * np.pi * 3000 * t)          # equal power: the mean frequency
    weighted = np.sin(2 * np.pi * 500 * t) + 0.5 * np.sin(2 * np.pi * 3000 * t)  # power 1 : 1/4
    noise = np.random.default_rng(0).standard_normal(n)
    c = F.spectral_centroid_hz(np.stack([sine, 0.01 * sine, pair, weighted, noise, np.zeros(n)]), sr)
    np.testing.assert_allclose(c[:4], [1000, 1000, 1750, (500 + 0.25 * 3000) / 1.25], rtol=1e-9)
    assert abs(c[4] - sr / 4) < 0.02 * sr / 4                   # flat spectrum: the middle of 0 … Nyquist
    assert np.isnan(c[5])


def test_compare_reads_brightness_by_percentile(real_set):
    """Centroid gaps are quantile by quantile: a set whose every clip is an octave higher is +100 % at every
    percentile; a set missing only its brightest clips is low at the 90th percentile and not at the 10th."""
    sr, n = 16000, 8000
    t = np.arange(n) / sr
    freqs = 2.0 * np.round(np.geomspace(200, 3200, 40) / 2)        # on the 2-Hz bin grid: no leakage
    ref = np.stack([np.sin(2 * np.pi * f * t) for f in freqs])
    up = np.stack([np.sin(2 * np.pi * 2 * f * t) for f in freqs])
    dull_tail = np.stack([np.sin(2 * np.pi * min(f, 1000) * t) for f in freqs])
    bands = F.clip_band_power(ref, sr)
    lv = F.clip_levels(ref, sr)
    row = F.compare(F.clip_levels(up, sr), lv, F.clip_band_power(up, sr), bands)
    for q in ("p10", "median", "p90"):
        assert row[f"centroid_gap_{q}"] == pytest.approx(100.0, rel=1e-6)
    assert len(row["centroid_quantiles_hz"]) == len(F.CENTROID_QUANTILES)
    tail = F.compare(F.clip_levels(dull_tail, sr), lv, F.clip_band_power(dull_tail, sr), bands)
    assert tail["centroid_gap_p10"] == pytest.approx(0.0, abs=1e-6) and tail["centroid_gap_p90"] < -50
    assert F.compare(lv, lv, bands, bands)["centroid_gap_median"] == 0.0


def test_over_full_scale_counts_the_clips_a_fixed_point_file_clips(real_set):
    assert F.over_full_scale_share([0.5, 0.999, 1.0001, 3.0]) == pytest.approx(0.5)
    # read back from a 16-bit file, a clipped clip peaks at the largest 16-bit sample (or -1.0): that counts
    from edmsound.audio.io import to_pcm16
    back = to_pcm16(np.array([[0.2, 1.7, -0.3], [0.2, -1.2, 0.3], [0.2, 0.99, -0.99]])) / 32768.0
    assert F.over_full_scale_share(np.abs(back).max(axis=1)) == pytest.approx(2 / 3)
    peaks = np.abs(real_set).max(axis=1)
    hot = real_set / peaks[:, None] * np.where(np.arange(len(real_set)) % 3 == 0, 1.25, 0.9)[:, None]
    lv, ref = F.clip_levels(hot, SR), F.clip_levels(real_set, SR)
    assert np.allclose(lv["peak"], np.where(np.arange(len(real_set)) % 3 == 0, 1.25, 0.9))
    row = F.compare(lv, ref, F.clip_band_power(hot, SR), F.clip_band_power(real_set, SR))
    assert row["over_full_scale"] == pytest.approx(4 / 12)                  # every third of 12 clips
    assert F.compare(ref, ref, F.clip_band_power(real_set, SR), F.clip_band_power(real_set, SR))[
        "over_full_scale"] == 0.0                                          # synthesized clips peak at most 0.95
    with pytest.raises(ValueError):
        F.over_full_scale_share([])
