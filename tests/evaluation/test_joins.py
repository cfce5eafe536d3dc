import numpy as np
import pytest

from edmsound.evaluation.joins import MEASURES, join_scores, reference_scores, summarize, within

SR = 16000


def _sine(freq, seconds=2.0, amp=0.5, sr=SR):
    t = np.arange(int(sr * seconds)) / sr
    return amp * np.sin(2 * np.pi * freq * t)


def test_stationary_sine_scores_zero_anywhere():
    x = _sine(440.0)
    pos = [700, 4000, 8001, 16000, 31000]
    s = join_scores(x, SR, pos)
    assert set(s) == set(MEASURES)
    assert s["flux_db"].shape == (5,) and s["level_step_db"].shape == (5,)
    assert np.all(s["flux_db"] < 0.05)
    assert np.all(s["level_step_db"] < 0.05)


def test_switch_between_two_sines_gives_large_flux():
    a, b = _sine(440.0, 1.0), _sine(2500.0, 1.0)
    x = np.concatenate([a, b])
    sw = join_scores(x, SR, [SR])
    inside = join_scores(x, SR, [SR // 2, SR + SR // 2])
    assert sw["flux_db"][0] > 5.0
    assert np.all(inside["flux_db"] < 0.05)
    assert sw["level_step_db"][0] < 0.1            # same amplitude: a spectral change, not a level change


@pytest.mark.parametrize("db", [12.0, -12.0])
def test_gain_step_gives_its_level_step(db):
    x = _sine(1000.0, amp=0.1)
    x[SR:] *= 10 ** (db / 20)
    s = join_scores(x, SR, [SR])
    assert abs(s["level_step_db"][0] - 12.0) < 0.5
    assert join_scores(x, SR, [SR // 2])["level_step_db"][0] < 0.05


def test_silence_and_floors():
    x = np.zeros(SR)
    s = join_scores(x, SR, [SR // 2])
    assert s["flux_db"][0] == 0.0 and s["level_step_db"][0] == 0.0
    # a sound 90 dB below full scale next to silence is below the floor: no step
    y = np.zeros(SR)
    y[SR // 2:] = 10 ** (-90 / 20) * np.sin(2 * np.pi * 500 * np.arange(SR // 2) / SR)
    s = join_scores(y, SR, [SR // 2])
    assert s["level_step_db"][0] == 0.0 and s["flux_db"][0] == 0.0


def test_white_noise_reference_is_small():
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.1, (16, SR))
    ref = reference_scores(noise, SR, per_clip=8, seed=1)
    assert ref["flux_db"].shape == (128,) and ref["level_step_db"].shape == (128,)
    assert np.percentile(ref["flux_db"], 95) < 4.0          # estimation noise of two short spectra only
    assert np.percentile(ref["level_step_db"], 95) < 1.0
    # reproducible, and positions stay away from the edges (no error for 1-s clips)
    again = reference_scores(noise, SR, per_clip=8, seed=1)
    np.testing.assert_array_equal(ref["flux_db"], again["flux_db"])
    # a splice of two sines is far outside the noise's own changes
    x = np.concatenate([_sine(440.0, 1.0), _sine(2500.0, 1.0)])
    w = within(join_scores(x, SR, [SR]), ref)
    assert w["flux_db"]["fraction"] == 0.0


def test_reference_scores_skips_short_clips_and_takes_lists():
    rng = np.random.default_rng(1)
    clips = [rng.normal(0, 0.1, SR), rng.normal(0, 0.1, 1000)]         # the second is too short
    ref = reference_scores(clips, SR, per_clip=4)
    assert ref["flux_db"].shape == (4,)
    with pytest.raises(ValueError, match="long enough"):
        reference_scores([rng.normal(0, 0.1, 1000)], SR)


def test_within_fractions_on_hand_made_arrays():
    ref = {"flux_db": np.arange(1, 101, dtype=float), "level_step_db": np.zeros(10)}
    scores = {"flux_db": np.array([1.0, 50.0, 95.0, 95.05, 96.0, 200.0]), "level_step_db": np.array([0.0, 0.1]),
              "other": np.array([1.0])}
    w = within(scores, ref, q=95)
    assert w["flux_db"]["p95"] == pytest.approx(np.percentile(np.arange(1, 101), 95))     # 95.05
    assert w["flux_db"]["fraction"] == pytest.approx(4 / 6)
    assert w["flux_db"]["n"] == 6
    assert w["level_step_db"]["p95"] == 0.0
    assert w["level_step_db"]["fraction"] == 0.5
    assert "other" not in w
    w50 = within({"flux_db": np.array([10.0, 60.0])}, ref, q=50)
    assert w50["flux_db"]["p50"] == pytest.approx(50.5) and w50["flux_db"]["fraction"] == 0.5
    with pytest.raises(ValueError):
        within(scores, ref, q=120)


def test_summarize():
    s = summarize({"flux_db": np.arange(101, dtype=float)})
    assert s["flux_db"] == {"median": 50.0, "p95": 95.0, "n": 101}


def test_bad_positions_and_waves():
    x = _sine(440.0, 1.0)
    with pytest.raises(ValueError, match="edges"):
        join_scores(x, SR, [100])
    with pytest.raises(ValueError, match="edges"):
        join_scores(x, SR, [len(x) - 10])
    with pytest.raises(ValueError):
        join_scores(np.zeros((2, 100)), SR, [50])
    assert join_scores(x, SR, [])["flux_db"].shape == (0,)
