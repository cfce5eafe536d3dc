"""Coverage: the density ratio on sets whose densities are known, the weights' scaling and cap, the report from a
real (tiny) model, and the weights' round trip into training draws."""
import json

import numpy as np
import pytest

from edmsound.evaluation.coverage import coverage_features, coverage_weights, density_ratio


def test_density_ratio_sees_a_mode_the_model_drops():
    # real: two clusters, 90 % / 10 %; the model: the big one only. The rare cluster's clips must read far above 1,
    # the common cluster's near its true ratio 0.9 / 1.0
    rng = np.random.default_rng(0)
    common = rng.normal(0, 1, (900, 2))
    rare = rng.normal(8, 1, (100, 2))
    real = np.concatenate([common, rare])
    gen = rng.normal(0, 1, (1000, 2))
    r = density_ratio(real, gen, k=20, components=None)
    assert np.median(r[900:]) > 20                      # no model clip near them: (20.5/999) / (0.5/1000) = 41
    assert 0.6 < np.median(r[:900]) < 1.3               # true 0.9
    # a model that matches the data reads about 1 everywhere
    same = np.concatenate([rng.normal(0, 1, (900, 2)), rng.normal(8, 1, (100, 2))])
    r2 = density_ratio(real, same, k=40, components=None)
    assert 0.7 < np.median(r2[:900]) < 1.4 and 0.6 < np.median(r2[900:]) < 1.6


def test_density_ratio_in_principal_coordinates_ignores_noise_dimensions():
    # the mode shows in six correlated columns (as a low bark shows in several neighbouring band shares) beside eight
    # columns of independent noise, where the model is off by half a spread each: in all 14 columns those small
    # offsets add up until nearly every training clip is far from every model clip (the ratios of the common clips
    # too are inflated); on the leading principal coordinate only the missing mode stands out
    rng = np.random.default_rng(1)
    n = 600

    def clips(rare_share, offset):
        s = np.where(rng.random(n) < rare_share, 4.0, 0.0) + rng.normal(0, 0.3, n)
        return np.column_stack([s[:, None] + rng.normal(0, 0.3, (n, 6)), rng.normal(offset, 1, (n, 8))]), s > 2
    real, rare = clips(0.1, 0.0)
    gen, _ = clips(0.0, 0.5)
    lead = density_ratio(real, gen, k=20, components=1)
    full = density_ratio(real, gen, k=20, components=None)
    assert np.median(lead[rare]) > 10 * np.median(lead[~rare])
    assert 0.6 < np.median(lead[~rare]) < 1.5
    # common clips wrongly flagged as rarely made (ratio >= 2): few on the leading coordinate, a third in all columns
    assert np.mean(lead[~rare] >= 2) < 0.1 and np.mean(full[~rare] >= 2) > 0.25


def test_density_ratio_rejects_what_it_cannot_estimate():
    with pytest.raises(ValueError, match="at least 2 real and 1 generated"):
        density_ratio(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
        density_ratio(np.zeros((3, 3)), np.zeros((4, 3)), k=7)
    with pytest.raises(ValueError, match=r"components must be in \[1, 3\]"):
        density_ratio(np.random.rand(5, 3), np.random.rand(5, 3), k=2, components=4)


def test_weights_have_mean_one_per_class_and_respect_the_cap():
    rng = np.random.default_rng(2)
    real = np.concatenate([rng.normal(0, 1, (200, 3)), rng.normal(0, 1, (100, 3))])
    real[:20] += 10                                      # class 0's rare mode
    labels = np.r_[np.zeros(200, int), np.ones(100, int)]
    gen = rng.normal(0, 1, (300, 3))
    gl = np.r_[np.zeros(150, int), np.full(150, 1)]
    w = coverage_weights(real, labels, gen, gl, k=10, cap=4.0, components=None)
    for c in (0, 1):
        assert w[labels == c].mean() == pytest.approx(1.0)
        assert w[labels == c].max() / w[labels == c].min() <= 16 + 1e-9       # (cap) / (1 / cap)
    assert np.all(w[:20] == w[:200].max())               # the rare mode sits at the cap
    assert w[:20].min() > 4 * np.median(w[20:200])
    # a class the model made no clips of keeps weight 1
    w2 = coverage_weights(real, labels, gen[:150], gl[:150], k=10)
    assert np.all(w2[labels == 1] == 1.0)
    with pytest.raises(ValueError, match="cap must be a finite number >= 1"):
        coverage_weights(real, labels, gen, gl, cap=0.5)


def test_features_are_band_shares_and_level():
    sr = 16000
    t = np.arange(sr) / sr
    tone = 0.1 * np.sin(2 * np.pi * 1000 * t)
    f = coverage_features(np.stack([tone, 2 * tone]), sr)
    assert f.shape == (2, 13)
    np.testing.assert_allclose(f[0, :12], f[1, :12], atol=1e-9)     # shares do not change with gain
    assert f[1, 12] - f[0, 12] == pytest.approx(20 * np.log10(2), abs=1e-6)   # the level does, by 6.02 dB
    assert f[0, :12].max() > -0.1                                   # one band holds (nearly) all the power
    assert f[0, :12].min() == -40.0                                 # the floor


def test_coverage_report_and_weights_from_a_model(tiny_ckpt, tone_tree, tmp_path):
    from edmsound import measure_coverage, write_coverage_report
    from edmsound.data.weights import read_clip_weights
    res = measure_coverage(tiny_ckpt, tone_tree, n_per_class=6, seed=3, k=3, components=2, progress=False)
    md = write_coverage_report(res, tmp_path / "cov")
    weights = read_clip_weights(tmp_path / "cov" / "clip_weights.csv")
    assert sorted(weights) == sorted(f"{c}/{c}_{i}.wav" for c in ("high", "low") for i in range(4))
    for c in ("high", "low"):
        assert np.mean([weights[f"{c}/{c}_{i}.wav"] for i in range(4)]) == pytest.approx(1.0, abs=1e-5)
    summary = json.loads((tmp_path / "cov" / "coverage.json").read_text())
    assert set(summary["classes"]) == {"high", "low"} and summary["settings"]["n_per_class"] == 6
    assert summary["classes"]["low"]["generated_clips"] == 6
    assert (tmp_path / "cov" / "coverage.png").stat().st_size > 5000
    assert "| low | 4 |" in md.read_text()
    with pytest.raises(ValueError, match="'hum' is not one of the model's: high, low"):
        measure_coverage(tiny_ckpt, tone_tree, n_per_class=4, classes=["hum"], progress=False)


def test_coverage_command_feeds_consistency_tuning(tiny_ckpt, tmp_path):
    # the command line end to end: measure a few-step model's coverage, then tune it drawing by the weights
    import subprocess
    import sys
    from conftest import tune_tiny
    tuned, data = tune_tiny(tiny_ckpt, tmp_path)
    cli = [sys.executable, "-m", "edmsound.cli"]
    r = subprocess.run(cli + ["coverage", "--checkpoint", str(tuned), "--data", str(data), "--out",
                              str(tmp_path / "cov"), "--n-per-class", "5", "--k", "3", "--components", "2",
                              "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "clip_weights.csv" in r.stdout and "rarely made" in r.stdout
    r = subprocess.run(cli + ["consistency-tune", "--teacher", str(tuned), "--data", str(data), "--out",
                              str(tmp_path / "more"), "--steps", "5", "--batch-size", "4", "--clip-weights",
                              str(tmp_path / "cov" / "clip_weights.csv"), "--class-weight", "high=2",
                              "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "clip weights clip_weights.csv:" in r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 5
    info = json.loads((tmp_path / "more" / "consistency.json").read_text())
    assert info["continued_from"]["steps"] == 3
    from edmsound.core.storage import latest_checkpoint
    seg = json.loads((latest_checkpoint(tmp_path / "more") / "info.json").read_text())["segments"][-1]
    assert seg["class_weights"] == {"high": 2.0} and seg["clip_weights"]["file"] == "clip_weights.csv"
    r = subprocess.run(cli + ["coverage", "--checkpoint", str(tuned), "--data", str(data), "--out",
                              str(tmp_path / "bad"), "--classes", "hum", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: class 'hum' is not one of the model's: high, low"]
