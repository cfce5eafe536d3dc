"""Sampler and schedule tests on an analytic problem (Gaussian mixture, exact denoiser).

No trained network is involved: for mixture data the optimal denoiser is known in
closed form (edmsound.core.analytic.GaussianMixture), so
  * sample statistics can be compared with the true mixture parameters, and
  * trajectories can be compared with a tight-tolerance solve_ivp solution of the
    probability-flow ODE started from the same noise.
Main setting = EDMSound's noise range (sigma_data ~ 0.2, sigma in [1e-4, 3], rho = 9);
the standard EDM range (data scale ~1, sigma in [0.002, 80], rho = 7) is used as a
second setting for the convergence-order checks.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from edmsound.core import samplers as S
from edmsound.core.schedules import SCHEDULES, get_schedule, karras_sigmas, loglinear_sigmas
from edmsound.core.analytic import GaussianMixture, edm_mixture, edmsound_mixture, reference_solution

SETTINGS = {
    "edmsound": dict(mixture=edmsound_mixture, sigma_min=1e-4, sigma_max=3.0, rho=9.0),
    "edm": dict(mixture=edm_mixture, sigma_min=0.002, sigma_max=80.0, rho=7.0),
}
DETERMINISTIC = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "deis", "unipc"]
N_PATH = 256  # trajectories compared with the reference ODE solution


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # The per-op thread hand-off dominates these small tensor ops on a loaded
    # 2-core machine (5 ms vs 0.01 ms per op); restore the setting afterwards.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@functools.lru_cache(maxsize=None)
def _mixture(setting: str) -> GaussianMixture:
    return SETTINGS[setting]["mixture"]()


@functools.lru_cache(maxsize=None)
def _paths(setting: str):
    """Unit noise z (N_PATH, 2) and the reference output D(x_ode(sigma_min), sigma_min)."""
    cfg = SETTINGS[setting]
    z = torch.randn(N_PATH, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1234))
    ref = reference_solution(_mixture(setting), z * cfg["sigma_max"], cfg["sigma_max"], cfg["sigma_min"],
                             rtol=1e-10, atol=1e-12, method="DOP853")
    return z, ref


def _run(setting: str, name: str, steps: int, **options) -> torch.Tensor:
    cfg = SETTINGS[setting]
    z, _ = _paths(setting)
    sigmas = karras_sigmas(steps, cfg["sigma_min"], cfg["sigma_max"], cfg["rho"])
    return S.get_sampler(name)(_mixture(setting).denoiser, z * cfg["sigma_max"], sigmas, **options)


def _errors(setting: str, name: str, steps: int, **options) -> torch.Tensor:
    """Per-trajectory Euclidean error vs the reference solution."""
    _, ref = _paths(setting)
    return (_run(setting, name, steps, **options) - ref).norm(dim=1)


def _rms(e: torch.Tensor) -> float:
    return float(e.pow(2).mean().sqrt())


# ---------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("n", [1, 2, 5, 18, 51])
def test_schedule_shape_endpoints_monotone(schedule, n):
    s = get_schedule(schedule)(n, 1e-4, 3.0, 9.0)
    assert s.dtype == torch.float64 and s.shape == (n + 1,)
    assert s[0].item() == 3.0
    assert s[-1].item() == 0.0
    if n > 1:
        assert s[n - 1].item() == pytest.approx(1e-4, rel=1e-12)
    assert bool((s[:-1] > s[1:]).all()), "noise levels must be strictly decreasing"
    assert bool((s[:-1] > 0).all())


def test_karras_matches_eq5_and_rho_effect():
    n, lo, hi = 12, 0.002, 80.0
    i = np.arange(n)
    for rho in (1.0, 7.0, 9.0):
        expect = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        np.testing.assert_allclose(karras_sigmas(n, lo, hi, rho)[:-1].numpy(), expect, rtol=1e-10)
    # rho = 1 is uniform spacing in sigma
    lin = karras_sigmas(n, lo, hi, 1.0)[:-1]
    np.testing.assert_allclose(np.diff(lin.numpy()), (lo - hi) / (n - 1), rtol=1e-9)
    # larger rho puts every interior level lower (more resolution near sigma_min)
    s7, s9 = karras_sigmas(n, lo, hi, 7.0), karras_sigmas(n, lo, hi, 9.0)
    assert bool((s9[1:n - 1] < s7[1:n - 1]).all())
    assert s9[0] == s7[0] and s9[n - 1] == s7[n - 1]


def test_loglinear_is_geometric():
    s = loglinear_sigmas(10, 1e-4, 3.0)[:-1]
    ratios = (s[1:] / s[:-1]).numpy()
    np.testing.assert_allclose(ratios, (1e-4 / 3.0) ** (1 / 9), rtol=1e-10)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("args, match", [
    ((0, 0.1, 1.0), "n must be >= 1"),
    ((-2, 0.1, 1.0), "n must be >= 1"),
    ((2.5, 0.1, 1.0), "integer"),
    ((5, 0.0, 1.0), "sigma_min must be > 0"),
    ((5, -1.0, 1.0), "sigma_min must be > 0"),
    ((5, 1.0, 1.0), "sigma_min < sigma_max"),
    ((5, 2.0, 1.0), "sigma_min < sigma_max"),
    ((5, 0.1, float("inf")), "finite"),
])
def test_schedule_validation(schedule, args, match):
    with pytest.raises(ValueError, match=match):
        get_schedule(schedule)(*args)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_schedule("cosine")
    for name in SCHEDULES:
        assert name in str(err.value)


# ---------------------------------------------------------------------------
# registry, NFE accounting, API contract
# ---------------------------------------------------------------------------

def test_registry_contents():
    assert set(S.SAMPLERS) == {"euler", "heun", "edm_stochastic", "dpmpp_2m", "dpmpp_3m", "deis", "unipc"}
    for name, fn in S.SAMPLERS.items():
        assert S.get_sampler(name) is fn


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_nfe_counting_exact_for_every_valid_budget(name):
    gmm = edmsound_mixture()
    noise = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    budgets = S.valid_nfes(name, max_nfe=20)
    if name in ("heun", "edm_stochastic"):
        assert budgets == list(range(1, 21, 2))
    else:
        assert budgets == list(range(1, 21))
    for nfe in budgets:
        own = S.CountingDenoiser(gmm.denoiser)
        opts = dict(S_churn=5.0, generator=torch.Generator().manual_seed(nfe)) if name == "edm_stochastic" else {}
        x, used = S.sample(name, own, noise, nfe=nfe, sigma_min=1e-4, sigma_max=3.0, rho=9.0, **opts)
        assert used == nfe and own.count == nfe, (name, nfe, used, own.count)
        assert x.shape == noise.shape and bool(torch.isfinite(x).all())
        steps = S.steps_for_nfe(name, nfe)
        assert S.nfe_for_steps(name, steps) == nfe


def test_counting_denoiser_counts_calls_not_samples():
    c = S.CountingDenoiser(lambda x, s: x)
    c(torch.zeros(100, 3), torch.ones(100))
    c(torch.zeros(1, 3), torch.ones(1))
    assert c.count == 2
    c.reset()
    assert c.count == 0


@pytest.mark.parametrize("name", ["heun", "edm_stochastic"])
@pytest.mark.parametrize("nfe", [2, 4, 10, 20])
def test_even_heun_budget_rejected_with_nearest_valid(name, nfe):
    expected = f"{name} cannot spend exactly {nfe} evaluations; nearest valid budgets: {nfe - 1}, {nfe + 1}"
    with pytest.raises(ValueError) as err:
        S.steps_for_nfe(name, nfe)
    assert expected in str(err.value)
    with pytest.raises(ValueError, match="nearest valid budgets"):
        S.sample(name, edmsound_mixture().denoiser, torch.randn(2, 2), nfe=nfe,
                 sigma_min=1e-4, sigma_max=3.0, rho=9.0)


@pytest.mark.parametrize("name", list(S.SAMPLERS))
@pytest.mark.parametrize("nfe", [0, -3, 2.5])
def test_nonpositive_or_fractional_budget_rejected(name, nfe):
    with pytest.raises(ValueError):
        S.steps_for_nfe(name, nfe)


def test_unknown_sampler_lists_valid_names():
    for call in (lambda: S.get_sampler("ddim"), lambda: S.steps_for_nfe("ddim", 5),
                 lambda: S.sample("ddim", lambda x, s: x, torch.randn(1, 2), nfe=5,
                                  sigma_min=0.1, sigma_max=1.0, rho=7.0)):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert "unknown sampler 'ddim'" in msg
        for name in S.SAMPLERS:
            assert name in msg


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_callback_once_per_step_and_noise_scaling(name):
    gmm = edmsound_mixture()
    noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen = []
    x, _ = S.sample(name, gmm.denoiser, noise, nfe=9, sigma_min=1e-4, sigma_max=3.0, rho=9.0,
                    callback=seen.append)
    steps = S.steps_for_nfe(name, 9)
    sig = karras_sigmas(steps, 1e-4, 3.0, 9.0).tolist()
    assert [d["i"] for d in seen] == list(range(steps))
    assert [d["sigma"] for d in seen] == pytest.approx(sig[:-1], rel=1e-12)
    assert [d["sigma_next"] for d in seen] == pytest.approx(sig[1:], rel=1e-12)
    assert torch.equal(seen[0]["x"], noise * 3.0)  # sample() scales unit noise by sigmas[0]
    assert torch.equal(seen[-1]["denoised"], x)  # last step to sigma = 0 returns D
    for d in seen:
        assert d["denoised"].shape == noise.shape


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_low_precision_input_computed_in_float32(name):
    gmm = edmsound_mixture()
    got = []

    def den(x, sigma):
        got.append((x.dtype, sigma.dtype, tuple(sigma.shape)))
        return gmm.denoiser(x, sigma).to(torch.float16)  # output dtype must not matter

    noise = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref, _ = S.sample(name, gmm.denoiser, noise, nfe=15, sigma_min=1e-4, sigma_max=3.0, rho=9.0)
    x16, _ = S.sample(name, den, noise.to(torch.float16), nfe=15, sigma_min=1e-4, sigma_max=3.0, rho=9.0)
    assert x16.dtype == torch.float16
    assert set(got) == {(torch.float32, torch.float32, (16,))}
    assert (x16.double() - ref).abs().max() < 5e-3  # fp16 in/out rounding, not accumulated error


@pytest.mark.parametrize("bad", [
    torch.tensor([3.0, 1.0, 0.5]),  # no final zero
    torch.tensor([1.0, 3.0, 0.0]),  # increasing
    torch.tensor([3.0, 3.0, 0.0]),  # repeated
    torch.tensor([0.0]),  # nothing to do
    torch.tensor([[3.0, 0.0]]),  # not 1-D
])
def test_invalid_sigmas_rejected(bad):
    with pytest.raises(ValueError):
        S.sample_euler(lambda x, s: x, torch.randn(2, 2), bad)


def test_option_validation():
    gmm, x, sig = edmsound_mixture(), torch.randn(2, 2), karras_sigmas(5, 1e-4, 3.0, 9.0)
    with pytest.raises(ValueError):
        S.sample_deis(gmm.denoiser, x, sig, order=4)
    with pytest.raises(ValueError):
        S.sample_unipc(gmm.denoiser, x, sig, variant="bh3")
    with pytest.raises(ValueError):
        S.sample_edm_stochastic(gmm.denoiser, x, sig, S_churn=-1.0)
    with pytest.raises(TypeError):
        S.sample_euler(gmm.denoiser, x, sig, order=2)  # unknown option
    with pytest.raises(ValueError, match="generators"):
        S.sample_edm_stochastic(gmm.denoiser, x, sig, S_churn=5.0,
                                generator=[torch.Generator() for _ in range(3)])


# ---------------------------------------------------------------------------
# the analytic problem itself
# ---------------------------------------------------------------------------

def test_mixture_denoiser_is_tweedie_posterior_mean():
    """D(x, s) = x + s^2 grad log p(x; s) with p the noisy mixture density (autograd)."""
    gmm = edmsound_mixture()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.4
    for s in (1e-3, 0.05, 0.3, 3.0):
        xr = x.clone().requires_grad_(True)
        var = gmm.variances[None] + s ** 2
        logn = -0.5 * (((xr[:, None] - gmm.means[None]) ** 2) / var + torch.log(2 * math.pi * var)).sum(-1)
        logp = torch.logsumexp(torch.log(gmm.weights) + logn, dim=1).sum()
        (grad,) = torch.autograd.grad(logp, xr)
        sig = torch.full((64,), s, dtype=torch.float64)
        torch.testing.assert_close(gmm.denoiser(x, sig), x + s ** 2 * grad, rtol=1e-9, atol=1e-12)
        # per-sample sigma path agrees with the shared-sigma fast path
        sig_var = sig.clone()
        sig_var[0] = s * 1.5
        torch.testing.assert_close(gmm.denoiser(x, sig_var)[1:], gmm.denoiser(x, sig)[1:], rtol=1e-10, atol=1e-13)


def test_mixture_sampling_moments():
    gmm = edmsound_mixture()
    x = gmm.sample(200_000, torch.Generator().manual_seed(4))
    torch.testing.assert_close(x.mean(0), gmm.mean, atol=4.5 * gmm.sigma_data / math.sqrt(2e5), rtol=0)
    torch.testing.assert_close(x.var(0), gmm.variance, rtol=0.02, atol=0)
    assert 0.18 < gmm.sigma_data < 0.22  # EDMSound data scale


def test_reference_solution_is_converged():
    gmm = edmsound_mixture()
    z = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 3.0
    a = reference_solution(gmm, z, 3.0, 1e-4, rtol=1e-10, atol=1e-12, method="DOP853")
    b = reference_solution(gmm, z, 3.0, 1e-4, rtol=1e-12, atol=1e-14, method="RK45", chunk=4)
    assert (a - b).abs().max() < 1e-8
    assert (a - gmm.means[gmm.classify(a)]).norm(dim=1).max() < 0.3  # lands in a mode


# ---------------------------------------------------------------------------
# sample statistics vs the true mixture
# ---------------------------------------------------------------------------

N_STAT = 20_000


@functools.lru_cache(maxsize=None)
def _stat_init() -> torch.Tensor:
    """Unit-scale initial states x_T / sigma_max drawn from the EXACT noisy marginal
    p(x; sigma_max) = p_data * N(0, sigma_max^2): then the exact PF-ODE maps them to
    p_data exactly, so any deviation is sampler error or Monte-Carlo noise (no
    prior-mismatch bias from using N(0, sigma_max^2) at sigma_max = 3 = 15 sigma_data)."""
    gmm = edmsound_mixture()
    return gmm.sample_noisy(N_STAT, 3.0, torch.Generator().manual_seed(6)) / 3.0


@pytest.mark.parametrize("name, nfe, options", [
    ("euler", 101, {}),  # first order: needs twice the budget for a comparable bias
    ("heun", 51, {}),
    ("edm_stochastic", 51, {"S_churn": 10.0}),
    ("dpmpp_2m", 51, {}),
    ("dpmpp_3m", 51, {}),
    ("deis", 51, {}),
    ("unipc", 51, {}),
])
def test_sample_statistics_match_mixture(name, nfe, options):
    """Tolerance = 4.5 standard errors (Monte-Carlo) + a discretisation allowance.

    Standard errors: weight sqrt(pi(1-pi)/n); mean s_k/sqrt(n_k); variance
    s_k^2 sqrt(2/(n_k-1)).  4.5 SE gives a false-alarm probability < 1e-5 per
    check.  Allowance: 0.01 on weights, 10% of the component std on means, 10%
    of the variance: at these budgets only ~7 steps fall in the decade
    sigma in [0.05, 0.5] where the modes form, and the measured biases are
    <= ~7% (Euler at 101, Heun at 51); gross sampler errors (wrong coefficient,
    sign, scaling, mode collapse) give O(1) deviations.  Components are >= 9
    stds apart, so assignment by the Bayes rule is wrong with prob. < 1e-5.
    """
    gmm = edmsound_mixture()
    if name == "edm_stochastic":
        options = dict(options, generator=torch.Generator().manual_seed(7))
    x, used = S.sample(name, gmm.denoiser, _stat_init(), nfe=nfe, sigma_min=1e-4, sigma_max=3.0, rho=9.0,
                       **options)
    assert used == nfe
    labels = gmm.classify(x)
    n = x.shape[0]
    for k in range(gmm.n_components):
        pi, mu, var = float(gmm.weights[k]), gmm.means[k], gmm.variances[k]
        xk = x[labels == k]
        nk = xk.shape[0]
        w_err = abs(nk / n - pi)
        assert w_err < 4.5 * math.sqrt(pi * (1 - pi) / n) + 0.01, (name, k, nk / n, pi)
        m_err = (xk.mean(0) - mu).abs()
        assert bool((m_err < 4.5 * (var / nk).sqrt() + 0.1 * var.sqrt()).all()), (name, k, xk.mean(0), mu)
        v_rel = (xk.var(0) / var - 1).abs()
        assert bool((v_rel < 4.5 * math.sqrt(2 / (nk - 1)) + 0.1).all()), (name, k, xk.var(0), var)
    # whole-distribution moments as well
    assert bool(((x.mean(0) - gmm.mean).abs() < 0.05 * gmm.sigma_data).all())
    assert bool(((x.var(0) / gmm.variance - 1).abs() < 0.05).all())


# ---------------------------------------------------------------------------
# trajectories vs the reference ODE solution
# ---------------------------------------------------------------------------

ORDER = {"euler": 1, "heun": 2, "dpmpp_2m": 2, "dpmpp_3m": 3, "deis": 3, "unipc": 3}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_high_nfe_matches_reference_ode(name):
    """At NFE 101 the output equals the reference ODE solution to a small fraction of sigma_data."""
    setting = "edmsound"
    steps = S.steps_for_nfe(name, 101)
    e = _errors(setting, name, steps)
    sd = _mixture(setting).sigma_data
    tol = {1: 0.025, 2: 0.005, 3: 0.0015}[ORDER[name]] * sd
    assert _rms(e) < tol, (name, _rms(e), tol)
    assert float(e.max()) < 10 * tol


def test_deis_order1_is_euler_and_unipc_variants_differ():
    a = _run("edmsound", "deis", 12, order=1)
    b = _run("edmsound", "euler", 12)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    c = _run("edmsound", "unipc", 12, variant="bh1")
    d = _run("edmsound", "unipc", 12, variant="bh2")
    assert (c - d).abs().max() > 1e-6


CONV_CASES = [
    ("euler", {}, 1),
    ("heun", {}, 2),
    ("dpmpp_2m", {}, 2),
    ("deis", {"order": 2}, 2),
    ("unipc", {"order": 1}, 2),  # UniP-1 + UniC-1
    ("dpmpp_3m", {}, 3),
    ("deis", {"order": 3}, 3),
    ("unipc", {"order": 2, "variant": "bh2"}, 3),  # UniP-2 + UniC-2
    ("unipc", {"order": 2, "variant": "bh1"}, 3),
    ("unipc", {"order": 3}, 4),
]
CONV_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in o.items())}".rstrip("-") for n, o, _ in CONV_CASES]


def _alternating_sigmas(intervals: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Karras-type schedule whose steps in the ramp variable alternate 2/3 and 4/3 of
    the uniform spacing, so consecutive step ratios stay far from 1 (about 2 and 1/2)
    at every resolution.  This exercises the variable-step coefficients of the
    multistep methods, which a smooth schedule (ratios -> 1) cannot distinguish."""
    ramp = np.concatenate([[0.0], np.cumsum(np.tile([2 / 3, 4 / 3], intervals // 2) / intervals)])
    ramp[-1] = 1.0
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    s[0], s[-1] = sigma_max, sigma_min
    return torch.tensor(np.append(s, 0.0), dtype=torch.float64)


@pytest.mark.parametrize("setting, schedule, intervals", [
    ("edmsound", "karras", [16, 32, 64, 128]),
    ("edm", "karras", [16, 32, 64, 128]),
    ("edmsound", "alternating", [16, 32, 64, 128, 256]),
])
@pytest.mark.parametrize("name, options, order", CONV_CASES, ids=CONV_IDS)
def test_convergence_order(setting, schedule, intervals, name, options, order):
    """Median trajectory error vs the number of sigma_max -> sigma_min intervals (doubling).

    The median (not RMS) is used because the few trajectories that start near a
    boundary between modes have huge Lipschitz constants and reach the asymptotic
    regime much later; the typical trajectory shows the order cleanly.  The
    Karras step counts (intervals + 1) are valid budgets: NFE = intervals + 1
    (Heun: 2 intervals + 1), so each doubling doubles the NFE up to +-1.
    Criteria (error ratio per doubling = 2^order asymptotically):
      order 1: every ratio in [1.6, 2.6], fitted slope in [0.8, 1.25];
      order 2: every ratio > 3, finest ratio in [3.4, 4.8], slope in [1.7, 2.6];
      order 3: every ratio > 4.5 (more than any 2nd-order method), finest > 6.5, slope > 2.5;
      order 4: every ratio > 6.5 (more than any 2nd-order method), slope > 3.3
               (the per-doubling ratios are still irregular at these step counts).
    """
    cfg = SETTINGS[setting]
    _, ref = _paths(setting)
    z, _ = _paths(setting)
    fn = S.get_sampler(name)
    errs = []
    for m in intervals:
        if schedule == "karras":
            sigmas = karras_sigmas(m + 1, cfg["sigma_min"], cfg["sigma_max"], cfg["rho"])
        else:
            sigmas = _alternating_sigmas(m, cfg["sigma_min"], cfg["sigma_max"], cfg["rho"])
        out = fn(_mixture(setting).denoiser, z * cfg["sigma_max"], sigmas, **options)
        errs.append(float((out - ref).norm(dim=1).median()))
    errs = np.array(errs)
    ratios = errs[:-1] / errs[1:]
    slope = -np.polyfit(np.log(intervals), np.log(errs), 1)[0]
    info = (setting, schedule, name, options, errs, ratios, slope)
    if order == 1:
        assert bool(((ratios > 1.6) & (ratios < 2.6)).all()), info
        assert 0.8 < slope < 1.25, info
    elif order == 2:
        assert bool((ratios > 3.0).all()), info
        assert 3.4 < ratios[-1] < 4.8, info
        assert 1.7 < slope < 2.6, info
    elif order == 3:
        assert bool((ratios > 4.5).all()), info
        assert ratios[-1] > 6.5, info
        assert slope > 2.5, info
    else:
        assert bool((ratios > 6.5).all()), info
        assert slope > 3.3, info
    assert errs[-1] < 2e-3 * _mixture(setting).sigma_data * (10 if order == 1 else 1), info


def test_nfe10_multistep_beat_heun_and_euler():
    """Budget of 10 evaluations in the EDMSound setting.

    Heun cannot spend 10: it is compared at 9 (nearest valid budget <= 10, 5 steps,
    also the benchmark's convention) and must also lose at 11.  All multistep
    samplers beat Heun by a wide margin.  DPM-Solver++(2M), DEIS and UniPC also beat
    Euler; DPM-Solver++(3M) does NOT on this problem (h = 0.7-1.9 per step in
    lambda, too large for quadratic extrapolation) so only the Heun comparison is
    asserted for it.
    """
    setting = "edmsound"
    rms = {name: _rms(_errors(setting, name, S.steps_for_nfe(name, 10)))
           for name in ("euler", "dpmpp_2m", "dpmpp_3m", "deis", "unipc")}
    heun9 = _rms(_errors(setting, "heun", S.steps_for_nfe("heun", 9)))
    heun11 = _rms(_errors(setting, "heun", S.steps_for_nfe("heun", 11)))
    for name in ("dpmpp_2m", "dpmpp_3m", "deis", "unipc"):   # (3M's last step is 2nd order: 2.9x, not 3x)
        assert rms[name] < heun9 / (2.5 if name == "dpmpp_3m" else 3), (name, rms[name], heun9)
        assert rms[name] < heun11, (name, rms[name], heun11)
    for name in ("dpmpp_2m", "deis", "unipc"):
        assert rms[name] < 0.8 * rms["euler"], (name, rms[name], rms["euler"])


# ---------------------------------------------------------------------------
# EDM stochastic sampler
# ---------------------------------------------------------------------------

def test_edm_stochastic_without_churn_is_heun():
    sig = karras_sigmas(12, 1e-4, 3.0, 9.0)
    gmm = edmsound_mixture()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * 3.0
    h = S.sample_heun(gmm.denoiser, x, sig)
    assert torch.equal(S.sample_edm_stochastic(gmm.denoiser, x, sig), h)
    assert torch.equal(S.sample_edm_stochastic(gmm.denoiser, x, sig, S_churn=0.0,
                                               generator=torch.Generator().manual_seed(0)), h)
    # churn restricted to a sigma range containing no level: also exactly Heun
    assert torch.equal(S.sample_edm_stochastic(gmm.denoiser, x, sig, S_churn=20.0, S_tmin=5.0, S_tmax=10.0), h)
    # churn switched on really changes the result
    assert (S.sample_edm_stochastic(gmm.denoiser, x, sig, S_churn=20.0,
                                    generator=torch.Generator().manual_seed(0)) - h).abs().max() > 1e-3


def test_edm_stochastic_per_sample_generators_reproduce_single_runs():
    sig = karras_sigmas(10, 1e-4, 3.0, 9.0)
    gmm = edmsound_mixture()
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 3.0
    seeds = [11, 12, 13, 14]
    opts = dict(S_churn=20.0, S_tmin=1e-3, S_tmax=2.0, S_noise=1.003)
    batch = S.sample_edm_stochastic(gmm.denoiser, x, sig, generator=[torch.Generator().manual_seed(s) for s in seeds],
                                    **opts)
    singles = torch.cat([
        S.sample_edm_stochastic(gmm.denoiser, x[i:i + 1], sig, generator=[torch.Generator().manual_seed(s)], **opts)
        for i, s in enumerate(seeds)])
    torch.testing.assert_close(batch, singles, rtol=0, atol=1e-12)
    # a bare Generator for a single sample draws the same numbers as a 1-element list
    single_gen = S.sample_edm_stochastic(gmm.denoiser, x[:1], sig, generator=torch.Generator().manual_seed(11), **opts)
    torch.testing.assert_close(single_gen, singles[:1], rtol=0, atol=1e-12)
    # same seeds reproduce, different seeds differ
    again = S.sample_edm_stochastic(gmm.denoiser, x, sig, generator=[torch.Generator().manual_seed(s) for s in seeds],
                                    **opts)
    assert torch.equal(again, batch)
    other = S.sample_edm_stochastic(gmm.denoiser, x, sig,
                                    generator=[torch.Generator().manual_seed(s + 100) for s in seeds], **opts)
    assert (other - batch).abs().max() > 1e-4


# ---------------------------------------------------------------------------
# low NFE: multistep samplers of order 3 must not diverge on the last steps
# ---------------------------------------------------------------------------

def _mode_flips(name: str, nfe: int, sigma_max: float, rho: float, **options) -> int:
    """Trajectories (of 64) whose end lands in another mixture mode than the exact ODE solution's."""
    gmm = edmsound_mixture()
    z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(77))
    ref = reference_solution(gmm, z * sigma_max, sigma_max, 1e-4, rtol=1e-10, atol=1e-12, method="DOP853")
    out, _ = S.sample(name, gmm.denoiser, z, nfe=nfe, sigma_min=1e-4, sigma_max=sigma_max, rho=rho, **options)
    return int((gmm.classify(out) != gmm.classify(ref)).sum())


@pytest.mark.parametrize("sigma_max,rho", [(3.0, 9.0), (15.0, 2.5)])     # the earlier shipped and the current schedule
@pytest.mark.parametrize("nfe", [4, 5, 6, 8, 10])
@pytest.mark.parametrize("name,options,baseline", [("dpmpp_3m", {}, "dpmpp_2m"), ("unipc", {"order": 3}, "dpmpp_2m"),
                                                   ("deis", {"order": 3}, "euler")])
def test_order3_multistep_no_more_mode_flips_than_their_2nd_or_1st_order_kin(name, options, baseline, nfe, sigma_max,
                                                                             rho):
    """Trajectories ending in another mode than the exact ODE's: DPM-Solver++(3M) and UniPC-3 no more than
    DPM-Solver++(2M); DEIS-3 (a polynomial in sigma) no more than Euler, its 1st-order case."""
    base = _mode_flips(baseline, nfe, sigma_max, rho)
    got = _mode_flips(name, nfe, sigma_max, rho, **options)
    assert got <= base + 2, (name, nfe, got, base)


def test_lower_order_final_is_what_removes_the_divergence():
    """Without lower-order final steps, order 3 at NFE 6 on the rho 2.5 schedule flips more trajectories;
    the option changes nothing at NFE >= 20 (15 steps or more)."""
    for name, opts in (("dpmpp_3m", {}), ("unipc", {"order": 3})):
        bad = _mode_flips(name, 6, 15.0, 2.5, lower_order_final=False, **opts)
        good = _mode_flips(name, 6, 15.0, 2.5, **opts)
        assert bad >= good + 4, (name, bad, good)
    gmm = edmsound_mixture()
    z = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for name, opts in (("dpmpp_3m", {}), ("unipc", {"order": 3}), ("deis", {}), ("dpmpp_2m", {})):
        a, _ = S.sample(name, gmm.denoiser, z, nfe=20, sigma_min=1e-4, sigma_max=3.0, rho=9.0, **opts)
        b, _ = S.sample(name, gmm.denoiser, z, nfe=20, sigma_min=1e-4, sigma_max=3.0, rho=9.0,
                        lower_order_final=not opts.get("lower_order_final", name != "dpmpp_2m"), **opts)
        assert torch.equal(a, b), name


def test_churn_noise_does_not_depend_on_the_state_dtype():
    gmm = edmsound_mixture()
    sig = karras_sigmas(6, 1e-3, 3.0, 7.0)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(5))
    outs = []
    for dtype in (torch.float32, torch.float64):
        x = (z * 3.0).to(dtype)
        outs.append(S.sample_edm_stochastic(gmm.denoiser, x, sig.to(dtype), S_churn=10.0, S_tmin=0.0, S_tmax=100.0,
                                            generator=torch.Generator().manual_seed(9)).double())
    assert (outs[0] - outs[1]).abs().max() < 1e-4                  # the same noise; only rounding differs


def test_edm_stochastic_default_window_leaves_first_and_last_steps_alone():
    gmm = edmsound_mixture()
    sig = karras_sigmas(8, 0.002, 80.0, 7.0)
    z = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen = []
    S.sample_edm_stochastic(gmm.denoiser, z * 80.0, sig, S_churn=40.0, callback=seen.append,
                            generator=torch.Generator().manual_seed(0))
    churned = [d["sigma_hat"] > float(sig[d["i"]]) + 1e-12 for d in seen]
    assert not churned[0] and not churned[-1] and any(churned)      # sigma 80 > S_tmax 50; last below 0.05


def test_dpmpp_2m_lower_order_final_is_an_option_that_does_not_help_here():
    """The reference code's rule for 2nd-order solvers (last step 1st order), measured: no fewer mode flips at
    NFE 4-10 on either schedule, more on the shipped one at NFE 4 (so it is off by default)."""
    for sigma_max, rho in ((3.0, 9.0), (15.0, 2.5)):
        for nfe in (4, 6, 10):
            assert _mode_flips("dpmpp_2m", nfe, sigma_max, rho, lower_order_final=True) >= \
                _mode_flips("dpmpp_2m", nfe, sigma_max, rho)
    assert _mode_flips("dpmpp_2m", 4, 15.0, 2.5, lower_order_final=True) > _mode_flips("dpmpp_2m", 4, 15.0, 2.5)
