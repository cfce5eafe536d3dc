"""Metrics against closed forms and hand-made answers: FAD, KID, top-k, mAP@10, IS analogue, diversity."""
import numpy as np
import pytest
from scipy.stats import ortho_group

from edmsound.evaluation import metrics as M


def _closed_form_commuting(mu1, a, mu2, b):
    """FD of N(mu1, Q diag(a) Q^T) and N(mu2, Q diag(b) Q^T): ||dmu||^2 + sum (sqrt a - sqrt b)^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def test_frechet_distance_closed_form_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 6
    q = ortho_group.rvs(d, random_state=1)
    a, b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    got = M.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_closed_form_commuting(mu1, a, mu2, b), rel=1e-8)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_closed_form_2x2_non_commuting():
    # for 2x2: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2)))
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 1.5]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    p = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(p) + 2 * np.sqrt(np.linalg.det(p)))
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


def test_fad_from_samples_approaches_closed_form_and_is_zero_for_identical_sets():
    rng = np.random.default_rng(3)
    d, n = 4, 40_000
    a, b = np.array([1.0, 0.5, 2.0, 0.3]), np.array([0.4, 1.5, 1.0, 0.3])
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, -0.5, 0.2])
    x = mu1 + rng.standard_normal((n, d)) * np.sqrt(a)
    y = mu2 + rng.standard_normal((n, d)) * np.sqrt(b)
    want = _closed_form_commuting(mu1, a, mu2, b)
    assert M.fad(x, y) == pytest.approx(want, rel=0.03)
    assert M.fad(x, x) == pytest.approx(0.0, abs=1e-9)
    assert M.fad(x, y) > 0.5


def test_frechet_distance_falls_back_to_eigen_form_when_sqrtm_fails(monkeypatch):
    rng = np.random.default_rng(5)
    q = ortho_group.rvs(5, random_state=2)
    a, b = rng.uniform(0.1, 2.0, 5), rng.uniform(0.1, 2.0, 5)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    calls = []

    def broken(m, *args, **kw):
        calls.append(1)
        return np.full(m.shape, np.nan)
    monkeypatch.setattr(M.scipy.linalg, "sqrtm", broken)
    got = M.frechet_distance(np.zeros(5), s1, np.ones(5), s2)
    assert len(calls) == 2                                   # plain, then with eps * I, then the eigen form
    assert got == pytest.approx(_closed_form_commuting(np.zeros(5), a, np.ones(5), b), rel=1e-8)


def test_fad_is_finite_when_covariances_are_singular():
    # fewer samples than dimensions (the per-class case): rank-deficient covariances, still a real number
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 64)), rng.standard_normal((25, 64)) + 0.5
    v = M.fad(x, y)
    assert np.isfinite(v) and v > 0
    assert M.fad(x, x) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        M.fad(x, y[:, :10])
    with pytest.raises(ValueError, match="at least 2"):
        M.fad(x[:1], y)


def test_imq_kernel_values():
    x = np.zeros((1, 3))
    y = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0]])          # ||x-y||^2 = 0 and 16 = 2 * gamma^2
    np.testing.assert_allclose(M.imq_kernel(x, y, gamma2=8.0), [[1.0, 0.5]])


def test_mmd2_unbiased_matches_the_formula_by_hand():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((5, 2)), rng.standard_normal((4, 2)) + 1
    k = lambda u, v: 1.0 / (1.0 + np.sum((u - v) ** 2) / 16.0)
    sxx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    syy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    sxy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert M.mmd2_unbiased(x, y) == pytest.approx(sxx + syy - 2 * sxy, rel=1e-12)


def test_kid_near_zero_for_one_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((600, 8)), rng.standard_normal((600, 8))
    same = M.kid(x, y, subsets=50, seed=0)
    assert same["subset_size"] == 300 and same["std"] > 0
    assert abs(same["mean"]) <= 2 * same["std"]
    shifted = M.kid(x, y + 1.0, subsets=50, seed=0)
    assert shifted["mean"] > 10 * shifted["std"] and shifted["mean"] > 20 * abs(same["mean"])


def test_top_k_and_map_at_10_on_hand_made_scores():
    scores = np.array([[0.9, 0.05, 0.05],     # true 0: rank 1
                       [0.5, 0.3, 0.2],       # true 1: rank 2
                       [0.6, 0.3, 0.1],       # true 2: rank 3
                       [0.2, 0.2, 0.6]])      # true 1: tie with class 0 -> lower index first -> rank 3
    labels = np.array([0, 1, 2, 1])
    np.testing.assert_array_equal(M.class_ranks(scores, labels), [0, 1, 2, 2])
    assert M.top_k_accuracy(scores, labels, 1) == pytest.approx(0.25)
    assert M.top_k_accuracy(scores, labels, 2) == pytest.approx(0.5)
    assert M.top_k_accuracy(scores, labels, 3) == pytest.approx(1.0)
    assert M.map_at_k(scores, labels, 10) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 3) / 4)
    assert M.map_at_k(scores, labels, 2) == pytest.approx((1 + 1 / 2) / 4)     # ranks beyond k count 0
    with pytest.raises(ValueError, match="positive integer"):
        M.top_k_accuracy(scores, labels, 0)
    with pytest.raises(ValueError, match="labels must be in"):
        M.top_k_accuracy(scores, np.array([0, 1, 3, 1]), 1)


def test_map_at_10_with_more_than_ten_classes():
    s = np.tile(-np.arange(12, dtype=float), (3, 1))      # class j ranked j+1
    labels = np.array([0, 9, 11])
    assert M.map_at_k(s, labels, 10) == pytest.approx((1 + 1 / 10 + 0) / 3)


def test_inception_score_limits():
    k = 5
    const = np.tile(np.array([0.1, 0.2, 0.3, 0.15, 0.25]), (40, 1))
    assert M.inception_score(const) == pytest.approx(1.0, abs=1e-9)
    confident = np.eye(k)[np.arange(40) % k]
    assert M.inception_score(confident) == pytest.approx(k, rel=1e-6)
    half = np.eye(k)[np.arange(40) % 2]           # confident but only 2 of 5 classes
    assert M.inception_score(half) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError, match="probability distributions"):
        M.inception_score(np.full((3, 2), 0.7))


def test_diversity():
    e = np.eye(4)                                   # orthogonal: cosine distance 1 for every pair
    assert M.mean_pairwise_cosine_distance(e) == pytest.approx(1.0)
    assert M.mean_pairwise_cosine_distance(np.ones((5, 3))) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(M.mean_pairwise_cosine_distance(np.ones((1, 3))))
    r = M.diversity_ratio(np.vstack([np.eye(3)[:1]] * 3 + [np.eye(3)[1:2]]), np.eye(3))
    # generated: 3 identical + 1 orthogonal -> 3 of 6 pairs at distance 1 -> 0.5; real: 1
    assert r["generated"] == pytest.approx(0.5) and r["ratio"] == pytest.approx(0.5)


def test_rms_level_and_level_gap():
    t = np.arange(16000) / 16000
    sine = np.sin(2 * np.pi * 440 * t)
    lv = M.rms_dbfs(np.stack([sine, 0.5 * sine, np.zeros_like(sine)]))
    assert lv[0] == pytest.approx(-3.0103, abs=1e-3)                   # full-scale sine: 1/sqrt(2)
    assert lv[0] - lv[1] == pytest.approx(6.0206, abs=1e-3)            # half the amplitude: 6 dB down
    assert lv[2] == -120.0                                             # silence is floored, not -inf
    real = np.stack([sine, 0.5 * sine])
    assert M.level_gap_db(0.1 * real, real) == pytest.approx(-20.0, abs=1e-6)
    assert M.level_gap_db(real, real) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        M.rms_dbfs(np.zeros((0, 10)))
