"""Samplers for the EDM probability-flow ODE / SDE (Karras et al. 2022).

Conventions
-----------
* ``denoiser(x, sigma) -> D(x, sigma)``: ``x`` has shape ``(B, ...)``, ``sigma``
  shape ``(B,)`` with the dtype of ``x``; the result estimates ``E[x0 | x]``.
  Class labels / guidance are bound into this closure by the caller.
* EDM parameterisation (``alpha(t) = 1``, ``sigma(t) = t``): the probability-flow
  ODE is ``dx/dsigma = (x - D(x, sigma)) / sigma`` (EDM eq. 3 with eq. 7).
* Every sampler shares one signature (k-diffusion style)::

      sample_xxx(denoiser, x, sigmas, *, callback=None, generator=None, **options)

  ``x`` is the initial noise already multiplied by ``sigmas[0]``; ``sigmas`` is a
  1-D strictly decreasing sequence whose last entry is 0 (see
  :mod:`edmsound.schedules`).  ``callback`` (if given) is called once per step
  with ``dict(i, x, sigma, sigma_next, denoised)`` where ``x`` is the state at
  which ``denoised`` was evaluated and ``sigma`` its noise level (stochastic
  sampler: the churned state / ``sigma_hat``; the dict then also holds
  ``sigma_hat``).  ``generator`` is used by stochastic samplers only.
* Arithmetic runs in float64 if ``x`` is float64, else in float32; the denoiser
  receives the state in that dtype and its output is cast to it.  The result is
  returned in the dtype of the input ``x``.
* The final step to ``sigma = 0`` is the same for every sampler: it returns the
  denoised estimate ``D(x_{N-1}, sigma_{N-1})`` (an Euler step to 0 is exactly
  this).  Hence NFE = steps for the one-evaluation-per-step samplers and
  NFE = 2 * steps - 1 for the Heun-type ones.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Union

import numpy as np
import torch

from .schedules import get_schedule

__all__ = [
    "sample_euler",
    "sample_heun",
    "sample_edm_stochastic",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_deis",
    "sample_unipc",
    "sample_consistency",
    "SAMPLERS",
    "FEW_STEP_SAMPLERS",
    "get_sampler",
    "nfe_for_steps",
    "steps_for_nfe",
    "valid_nfes",
    "CountingDenoiser",
    "sample",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]


# ---------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------

def _state_dtype(x: torch.Tensor) -> torch.dtype:
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be a real floating-point tensor, got dtype {x.dtype}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _sigma_list(sigmas) -> List[float]:
    """Validate the noise levels and return them as Python floats (float64)."""
    if isinstance(sigmas, torch.Tensor):
        if sigmas.dim() != 1:
            raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
        sig = [float(s) for s in sigmas.detach().to("cpu", torch.float64)]
    else:
        sig = [float(s) for s in sigmas]
    if len(sig) < 2:
        raise ValueError("sigmas must contain at least one noise level followed by a final 0")
    if sig[-1] != 0.0:
        raise ValueError(f"sigmas must end with 0, got last value {sig[-1]}")
    if not all(math.isfinite(s) and s > 0.0 for s in sig[:-1]):
        raise ValueError("all sigmas except the last must be positive and finite")
    if any(a <= b for a, b in zip(sig[:-1], sig[1:])):
        raise ValueError("sigmas must be strictly decreasing")
    return sig


def _prepare(x: torch.Tensor, sigmas):
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x must have a leading, non-empty batch dimension")
    dtype = _state_dtype(x)
    return x.detach().to(dtype), _sigma_list(sigmas)


def _denoise(denoiser: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
    out = denoiser(x, sig)
    if out.shape != x.shape:
        raise ValueError(f"denoiser returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}")
    return out.to(x.dtype)


def _report(callback, i, x, sigma, sigma_next, denoised, **extra):
    if callback is not None:
        info = dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised)
        info.update(extra)
        callback(info)


def _randn_like(x: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
    """Standard normal noise shaped like ``x``.

    ``generator`` may be None (global RNG), one ``torch.Generator`` for the whole
    batch, or a sequence of ``B`` generators: then row ``b`` is drawn from
    ``generator[b]`` alone, so batched and single-sample runs agree exactly.
    """
    # drawn in float32 whatever the state's dtype, so a float64 run uses the same noise as a float32 one
    if generator is None:
        return torch.randn(x.shape, dtype=torch.float32, device=x.device).to(x.dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=torch.float32,
                           device=generator.device).to(device=x.device, dtype=x.dtype)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {x.shape[0]}")
    rows = [torch.randn(x.shape[1:], generator=g, dtype=torch.float32, device=g.device) for g in gens]
    return torch.stack(rows).to(device=x.device, dtype=x.dtype)


def _phi(k: int, z: float) -> float:
    """phi_k(z) = sum_{j>=0} z^j / (j+k)!  (phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!)/z).

    Exponential-integrator weights; a power series is used for small |z| where
    the recursion would cancel catastrophically.
    """
    if abs(z) < 0.5:
        term = 1.0 / math.factorial(k)
        total = term
        j = 0
        while abs(term) > 1e-18 * abs(total):
            j += 1
            term *= z / (j + k)
            total += term
            if j > 60:
                break
        return total
    val = math.exp(z)
    for m in range(k):
        val = (val - 1.0 / math.factorial(m)) / z
    return val


def _exp_integrator_step(x, sigma: float, sigma_next: float, coeffs) -> torch.Tensor:
    """Exact exponential-integrator update of the data-prediction ODE in lambda.

    With lambda = -log(sigma) the PF-ODE reads dx/dlambda = D - x, so
    (DPM-Solver++ eq. 9 with alpha = 1)
        x(lambda_s + h) = e^{-h} x_s + int_0^h e^{-(h-u)} D(lambda_s + u) du.
    If D is replaced by the polynomial sum_k c_k u^k the integral is exact:
        int_0^h e^{-(h-u)} u^k du = k! h^{k+1} phi_{k+1}(-h)
    (for k=0,1,2: 1-e^{-h}, h-1+e^{-h}, h^2-2h+2-2e^{-h}).
    """
    h = math.log(sigma / sigma_next)
    out = (sigma_next / sigma) * x
    for k, c in enumerate(coeffs):
        w = math.factorial(k) * h ** (k + 1) * _phi(k + 1, -h)
        out = out + w * c
    return out


# ---------------------------------------------------------------------------
# Euler / Heun / EDM stochastic
# ---------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas, *, callback=None, generator=None) -> torch.Tensor:
    """EDM Euler (Alg. 1 without the 2nd-order correction): 1 NFE per step."""
    in_dtype = x.dtype
    x, sig = _prepare(x, sigmas)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = _denoise(denoiser, x, s)
        _report(callback, i, x, s, s_next, den)
        if s_next == 0.0:
            x = den  # x + (0 - s) (x - D)/s == D exactly
        else:
            d = (x - den) / s  # EDM Alg. 1 line 4: d_i = (x_i - D(x_i; t_i)) / t_i
            x = x + (s_next - s) * d  # line 5: x_{i+1} = x_i + (t_{i+1} - t_i) d_i
    return x.to(in_dtype)


def _heun_like(denoiser, x, sigmas, callback, generator, S_churn, S_tmin, S_tmax, S_noise):
    in_dtype = x.dtype
    x, sig = _prepare(x, sigmas)
    for name, v in (("S_churn", S_churn), ("S_noise", S_noise)):
        if not (float(v) >= 0.0 and math.isfinite(float(v))):
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    n = len(sig) - 1
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        # EDM Alg. 2 line 4: gamma_i = min(S_churn/N, sqrt(2)-1) if t_i in [S_tmin, S_tmax] else 0
        gamma = min(S_churn / n, math.sqrt(2.0) - 1.0) if (S_tmin <= s <= S_tmax) else 0.0
        if gamma > 0.0:
            s_hat = s * (1.0 + gamma)  # line 6: t_hat = t_i + gamma_i t_i
            eps = _randn_like(x, generator) * S_noise  # line 5: eps ~ N(0, S_noise^2 I)
            x_hat = x + math.sqrt(s_hat ** 2 - s ** 2) * eps  # line 7: x_hat = x_i + sqrt(t_hat^2 - t_i^2) eps
        else:
            s_hat, x_hat = s, x
        den = _denoise(denoiser, x_hat, s_hat)
        if callback is not None:
            _report(callback, i, x_hat, s_hat, s_next, den, sigma_hat=s_hat)
        if s_next == 0.0:
            x = den  # Euler step to t = 0 (Alg. 1 lines 4-5 with t_{i+1} = 0) returns D exactly
            continue
        d = (x_hat - den) / s_hat  # Alg. 1 line 4 / Alg. 2 line 8
        x_next = x_hat + (s_next - s_hat) * d  # Alg. 1 line 5 / Alg. 2 line 9 (Euler predictor)
        den_next = _denoise(denoiser, x_next, s_next)
        d_next = (x_next - den_next) / s_next  # Alg. 1 line 7: d'_i
        x = x_hat + (s_next - s_hat) * (0.5 * d + 0.5 * d_next)  # Alg. 1 line 8: trapezoidal correction
    return x.to(in_dtype)


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas, *, callback=None, generator=None) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic Heun, 2nd order).

    2 NFE per step except the last step to sigma = 0, which is an Euler step:
    NFE = 2 * steps - 1.
    """
    return _heun_like(denoiser, x, sigmas, callback, None, 0.0, 0.0, math.inf, 1.0)


@torch.no_grad()
def sample_edm_stochastic(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    callback=None,
    generator: GeneratorArg = None,
    S_churn: float = 0.0,
    S_tmin: float = 0.05,
    S_tmax: float = 50.0,
    S_noise: float = 1.003,
) -> torch.Tensor:
    """EDM Algorithm 2 (stochastic Heun with "churn").

    Before each step the state is pushed from ``t_i`` up to
    ``t_hat = (1 + gamma_i) t_i`` by adding fresh noise, then a Heun step is taken
    from ``t_hat`` to ``t_{i+1}``.  ``S_churn = 0`` reproduces :func:`sample_heun`
    exactly and draws no random numbers.  ``generator`` may be a single
    ``torch.Generator`` or a list of one generator per batch element (row ``b``
    only consumes ``generator[b]``, so a batch reproduces single-sample runs).
    NFE = 2 * steps - 1 (same as Heun). The churn window and noise default to EDM's published
    settings (Karras et al. 2022, Table 5, ImageNet-64: S_tmin 0.05, S_tmax 50, S_noise 1.003; they
    use S_churn 40): steps below sigma 0.05 and above sigma 50 are not churned.
    """
    return _heun_like(denoiser, x, sigmas, callback, generator,
                      float(S_churn), float(S_tmin), float(S_tmax), float(S_noise))


# ---------------------------------------------------------------------------
# DPM-Solver++ multistep (Lu et al. 2022), data prediction, lambda = -log sigma
# ---------------------------------------------------------------------------

LOWER_ORDER_FINAL_BELOW = 15    # steps; as in the official DPM-Solver / UniPC code


def _final_order(order: int, i: int, n_nonzero: int, lower_order_final: bool) -> int:
    """The order step ``i`` may use: with ``lower_order_final`` and fewer than 15 steps, at most one more
    than the steps left (the last nonzero step 2nd order, the one before 3rd), so the last steps, the
    largest in lambda on short schedules, do not extrapolate a cubic from far-away evaluations (the
    ``lower_order_final`` of the DPM-Solver++ and UniPC reference code, one order higher: on a mixture
    with an exact ODE solution this flipped fewer trajectories at NFE 4-10 than lowering to 1st order)."""
    if lower_order_final and n_nonzero < LOWER_ORDER_FINAL_BELOW:
        return max(1, min(order, n_nonzero - i + 1))
    return order


def _nonzero_steps(sig) -> int:
    return len(sig) - 1 - (1 if sig[-1] == 0.0 else 0)


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas, *, callback=None, generator=None,
                    lower_order_final: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), 1 NFE per step.

    First step is first order (DPM-Solver++(1) == DDIM == EDM Euler); the last
    step to sigma = 0 returns the denoised estimate. ``lower_order_final`` (off by
    default) makes the last nonzero step 1st order on schedules of under 15 steps (the reference code's
    rule); on the mixture ODE it did not reduce mode flips at NFE 4-10, so it stays off.
    """
    in_dtype = x.dtype
    x, sig = _prepare(x, sigmas)
    n_nz = _nonzero_steps(sig)
    den_prev, h_prev = None, None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = _denoise(denoiser, x, s)
        _report(callback, i, x, s, s_next, den)
        if s_next == 0.0:
            x = den  # lambda -> inf: the 1st-order update reduces to x = D
            break
        h = math.log(s / s_next)  # h_i = lambda_{i+1} - lambda_i
        if den_prev is None or (lower_order_final and n_nz < LOWER_ORDER_FINAL_BELOW and i == n_nz - 1):
            d_eff = den
        else:
            # Alg. 2: r_i = h_{i-1}/h_i, D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}
            r = h_prev / h
            d_eff = (1.0 + 0.5 / r) * den - (0.5 / r) * den_prev
        # Alg. 2 / eq. (DPM-Solver++ 1st-order form): x_{i+1} = (s_{i+1}/s_i) x_i - (e^{-h_i} - 1) D_i
        x = (s_next / s) * x - math.expm1(-h) * d_eff
        den_prev, h_prev = den, h
    return x.to(in_dtype)


@torch.no_grad()
def sample_dpmpp_3m(denoiser: Denoiser, x: torch.Tensor, sigmas, *, callback=None, generator=None,
                    lower_order_final: bool = True) -> torch.Tensor:
    """Deterministic DPM-Solver++(3M), 1 NFE per step.

    The data prediction is extrapolated by the polynomial through the last three
    evaluations (as a function of lambda = -log sigma) and the exponential
    integral is taken exactly (DPM-Solver++ eq. 9 / the phi_2, phi_3 terms of the
    3rd-order multistep update).  Steps 1 and 2 use orders 1 and 2; the last
    step to sigma = 0 returns the denoised estimate. With ``lower_order_final``
    (default) and fewer than 15 steps, the last nonzero step is 2nd order, which keeps
    4-10 evaluation schedules from diverging.
    """
    in_dtype = x.dtype
    x, sig = _prepare(x, sigmas)
    n_nz = _nonzero_steps(sig)
    hist = []  # [(lambda_j, D_j)], newest last
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = _denoise(denoiser, x, s)
        _report(callback, i, x, s, s_next, den)
        if s_next == 0.0:
            x = den
            break
        lam = -math.log(s)
        hist.append((lam, den))
        hist = hist[-3:]
        p = min(len(hist), _final_order(3, i, n_nz, lower_order_final))
        if p == 1:
            coeffs = [den]  # DPM-Solver++(1)
        elif p == 2:
            (l1, d1), _ = hist[-2:]
            h1 = lam - l1
            coeffs = [den, (den - d1) / h1]  # linear in u = lambda - lambda_i (2nd order)
        else:
            (l2, d2), (l1, d1), _ = hist
            h1, h2 = lam - l1, l1 - l2
            f01 = (den - d1) / h1  # divided differences (Newton form)
            f12 = (d1 - d2) / h2
            f012 = (f01 - f12) / (h1 + h2)
            # P(u) = D_i + f01 u + f012 u (u + h1) = D_i + (f01 + h1 f012) u + f012 u^2
            coeffs = [den, f01 + h1 * f012, f012]
        x = _exp_integrator_step(x, s, s_next, coeffs)
    return x.to(in_dtype)


# ---------------------------------------------------------------------------
# DEIS (Zhang & Chen 2022): rhoAB-DEIS in the EDM parameterisation
# ---------------------------------------------------------------------------

def _lagrange_weights(nodes: Sequence[float], a: float, b: float) -> List[float]:
    """Closed-form integrals over [a, b] of the Lagrange basis polynomials on ``nodes``.

    Computed in the normalised variable u = (t - a)/(b - a) for conditioning;
    each basis polynomial is expanded to monomials and integrated exactly.
    """
    H = b - a
    u = [(t - a) / H for t in nodes]
    P = np.polynomial.polynomial
    weights = []
    for j, uj in enumerate(u):
        others = [um for m, um in enumerate(u) if m != j]
        coef = P.polyfromroots(others) if others else np.array([1.0])
        denom = float(np.prod([uj - um for um in others])) if others else 1.0
        integ = P.polyint(coef / denom)
        weights.append(H * float(P.polyval(1.0, integ) - P.polyval(0.0, integ)))
    return weights


@torch.no_grad()
def sample_deis(denoiser: Denoiser, x: torch.Tensor, sigmas, *, callback=None, generator=None,
                order: int = 3, lower_order_final: bool = True) -> torch.Tensor:
    """rhoAB-DEIS (Zhang & Chen 2022, Sec. 4 / eq. 15) with alpha = 1, rho = sigma.

    In the EDM parameterisation the PF-ODE is dx/dsigma = eps(x, sigma) with
    eps = (x - D)/sigma, so the exponential integrator is a plain Adams-Bashforth
    method in sigma: eps is replaced by the Lagrange polynomial through the last
    ``order`` evaluations and integrated exactly over [sigma_i, sigma_{i+1}]:
        x_{i+1} = x_i + sum_j C_ij eps_{i-j},  C_ij = int_{sigma_i}^{sigma_{i+1}} l_j(sigma) dsigma.
    Lower orders are used while the history fills; order 1 equals Euler; the
    last step to sigma = 0 returns the denoised estimate.  1 NFE per step. With
    ``lower_order_final`` (default) and fewer than 15 steps the last nonzero step
    uses at most order 2.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"deis order must be 1, 2 or 3, got {order!r}")
    in_dtype = x.dtype
    x, sig = _prepare(x, sigmas)
    n_nz = _nonzero_steps(sig)
    hist = []  # [(sigma_j, eps_j)], newest last
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = _denoise(denoiser, x, s)
        _report(callback, i, x, s, s_next, den)
        if s_next == 0.0:
            x = den
            break
        eps = (x - den) / s
        hist.append((s, eps))
        hist = hist[-order:]
        use = hist[-min(len(hist), _final_order(order, i, n_nz, lower_order_final)):]
        nodes = [t for t, _ in use]
        w = _lagrange_weights(nodes, s, s_next)
        for wj, (_, e) in zip(w, use):
            x = x + wj * e
    return x.to(in_dtype)


# ---------------------------------------------------------------------------
# UniPC (Zhao et al. 2023): UniP-p predictor + UniC corrector, data prediction
# ---------------------------------------------------------------------------

def _unipc_coefficients(rks: Sequence[float], b: Sequence[float]) -> List[float]:
    """Solve the UniPC order conditions sum_k a_k r_k^(m-1) = b_m, m = 1..len(rks).

    With a single unknown the condition only has to hold to leading order in h
    and UniPC fixes a_1 = 1/2 (the choice that makes B(h), bh1 vs bh2, matter);
    larger systems are solved exactly.
    """
    if len(rks) == 1:
        return [0.5]
    R = np.array([[rk ** m for rk in rks] for m in range(len(rks))], dtype=np.float64)
    return [float(v) for v in np.linalg.solve(R, np.array(b, dtype=np.float64))]


@torch.no_grad()
def sample_unipc(denoiser: Denoiser, x: torch.Tensor, sigmas, *, callback=None, generator=None,
                 order: int = 2, variant: str = "bh2", lower_order_final: bool = True) -> torch.Tensor:
    """UniPC multistep sampler (data prediction, B(h) variant ``bh1`` or ``bh2``).

    Step i -> i+1 (lambda = -log sigma, h = lambda_{i+1} - lambda_i, p = current order):
      predictor UniP-p (UniPC Alg. 1 / eq. 8 in data-prediction form)
        x~_{i+1} = (s_{i+1}/s_i) x_i + (1 - e^{-h}) D_i - B(h) sum_{k<p} a_k D1_k
        with D1_k = (D_{i-k} - D_i)/r_k,  r_k = (lambda_{i-k} - lambda_i)/h;
      one model evaluation D_{i+1} = D(x~_{i+1}, s_{i+1});
      corrector UniC-p (eq. 6) re-uses it:
        x_{i+1} = (s_{i+1}/s_i) x_i + (1 - e^{-h}) D_i - B(h) (sum_{k<p} c_k D1_k + c_p (D_{i+1} - D_i)).
    The coefficient vectors solve R a = b with R_{mk} = r_k^m and
    b_m = m! h phi_{m+1}(-h) * (-1) / B(h) (order conditions, UniPC Thm. 3.1).
    D_{i+1} (evaluated at the predicted point) is kept for the next step, so each
    step costs exactly one NFE.  No corrector is applied at the last nonzero sigma
    (its result would be discarded), and the final step to sigma = 0 returns D.
    With ``lower_order_final`` (default, as in the official UniPC code) and fewer
    than 15 steps, the last nonzero step uses at most order 2.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
    in_dtype = x.dtype
    x, sig = _prepare(x, sigmas)
    n = len(sig) - 1
    n_nz = _nonzero_steps(sig)
    x_eval = x  # point at which the current D was evaluated (the predictor output)
    den = _denoise(denoiser, x, sig[0])
    hist = []  # [(lambda_j, D_j)], newest last
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        _report(callback, i, x_eval, s, s_next, den)
        if s_next == 0.0:
            x = den
            break
        lam = -math.log(s)
        hist.append((lam, den))
        hist = hist[-order:]
        p = min(len(hist), _final_order(order, i, n_nz, lower_order_final))
        h = math.log(s / s_next)
        hh = -h
        B = hh if variant == "bh1" else math.expm1(hh)
        # b_m = m! * hh * phi_{m+1}(hh) / B(h), m = 1..p
        b = [math.factorial(m) * hh * _phi(m + 1, hh) / B for m in range(1, p + 1)]
        prev = hist[-p:-1][::-1] if p > 1 else []  # (lambda_{i-1}, D_{i-1}), (lambda_{i-2}, D_{i-2}), ...
        rks = [(lk - lam) / h for lk, _ in prev]
        d1s = [(dk - den) / rk for (_, dk), rk in zip(prev, rks)]
        x_lin = (s_next / s) * x - math.expm1(hh) * den  # DPM-Solver++(1) / DDIM part
        if d1s:
            a = _unipc_coefficients(rks, b[: p - 1])
            corr = sum(float(ak) * dk for ak, dk in zip(a, d1s))
            x_pred = x_lin - B * corr  # UniP-p
        else:
            x_pred = x_lin  # UniP-1 == DDIM
        den_next = _denoise(denoiser, x_pred, s_next)
        if sig[i + 2] != 0.0:
            c = _unipc_coefficients(rks + [1.0], b[:p])
            corr = sum(float(ck) * dk for ck, dk in zip(c[:-1], d1s))
            corr = corr + float(c[-1]) * (den_next - den)
            x = x_lin - B * corr  # UniC-p
        else:
            x = x_pred
        x_eval, den = x_pred, den_next
    return x.to(in_dtype)


# ---------------------------------------------------------------------------
# few-step models
# ---------------------------------------------------------------------------

@torch.no_grad()
def sample_consistency(denoiser: Denoiser, x: torch.Tensor, sigmas, *, callback=None,
                       generator=None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, "Consistency Models", Alg. 1): the model maps a noisy
    state straight to a clean estimate; every later level re-noises that estimate with fresh noise and maps it
    again. 1 NFE per step. Meant for consistency-tuned models (``edmsound consistency-tune``): a diffusion
    model's one-shot estimate at high noise is the blurry mean, not a sample."""
    in_dtype = x.dtype
    x, sig = _prepare(x, sigmas)
    den = x
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = _denoise(denoiser, x, s)
        _report(callback, i, x, s, s_next, den)
        x = den if s_next == 0.0 else den + s_next * _randn_like(den, generator)
    return x.to(in_dtype)


# ---------------------------------------------------------------------------
# registry and NFE accounting
# ---------------------------------------------------------------------------

SAMPLERS: Dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "edm_stochastic": sample_edm_stochastic,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "deis": sample_deis,
    "unipc": sample_unipc,
}

# samplers for models trained to jump far (consistency models), kept apart from the ODE/SDE solvers above that
# every diffusion model can use; a model that needs one names it in its preset (``student_sampler``)
FEW_STEP_SAMPLERS: Dict[str, Callable[..., torch.Tensor]] = {
    "consistency": sample_consistency,
}

# samplers that spend two evaluations per step except the last (Euler) one
_HEUN_LIKE = frozenset({"heun", "edm_stochastic"})


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """Look up a sampler function by registry name (the solvers, then the few-step samplers)."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        pass
    try:
        return FEW_STEP_SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)} "
                         f"(consistency models: {', '.join(FEW_STEP_SAMPLERS)})") from None


def _as_positive_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        iv = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if iv != value:
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return iv


def nfe_for_steps(name: str, steps: int) -> int:
    """Number of denoiser evaluations ``name`` spends for ``steps`` steps."""
    get_sampler(name)
    steps = _as_positive_int(steps, "steps")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return 2 * steps - 1 if name in _HEUN_LIKE else steps


def _is_valid_nfe(name: str, nfe: int) -> bool:
    return nfe >= 1 and (nfe % 2 == 1 if name in _HEUN_LIKE else True)


def valid_nfes(name: str, max_nfe: int = 100) -> List[int]:
    """All budgets in 1..max_nfe that ``name`` can spend exactly."""
    get_sampler(name)
    return [n for n in range(1, int(max_nfe) + 1) if _is_valid_nfe(name, n)]


def steps_for_nfe(name: str, nfe: int) -> int:
    """Number of steps for which ``name`` spends exactly ``nfe`` evaluations.

    Raises ``ValueError`` naming the nearest valid budgets when impossible.
    """
    get_sampler(name)
    nfe = _as_positive_int(nfe, "nfe")
    if nfe < 1:
        raise ValueError(f"{name} needs a budget of at least 1 evaluation, got nfe={nfe}; "
                         f"nearest valid budget: 1")
    if not _is_valid_nfe(name, nfe):
        lower = next(n for n in range(nfe - 1, 0, -1) if _is_valid_nfe(name, n))
        upper = next(n for n in range(nfe + 1, nfe + 4) if _is_valid_nfe(name, n))
        raise ValueError(f"{name} cannot spend exactly {nfe} evaluations; "
                         f"nearest valid budgets: {lower}, {upper}")
    return (nfe + 1) // 2 if name in _HEUN_LIKE else nfe


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (one call = one evaluation, any batch size)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.count = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.denoiser(x, sigma)

    def reset(self) -> None:
        self.count = 0


def sample(
    name: str,
    denoiser: Denoiser,
    noise: torch.Tensor,
    *,
    nfe: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    schedule: str = "karras",
    callback=None,
    generator: GeneratorArg = None,
    **options,
):
    """Run sampler ``name`` with a budget of exactly ``nfe`` denoiser evaluations.

    ``noise`` is unit-variance Gaussian noise; it is scaled by ``sigmas[0]``
    (= ``sigma_max``).  Returns ``(x0, evaluations_used)``.
    """
    fn = get_sampler(name)
    steps = steps_for_nfe(name, nfe)
    sigmas = get_schedule(schedule)(steps, sigma_min, sigma_max, rho)
    counter = CountingDenoiser(denoiser)
    x = noise * float(sigmas[0])
    out = fn(counter, x, sigmas, callback=callback, generator=generator, **options)
    if counter.count != nfe:
        raise RuntimeError(f"{name} used {counter.count} evaluations, expected {nfe}")
    return out, counter.count
