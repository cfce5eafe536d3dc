"""Analytic test problem for samplers: a Gaussian mixture with an exact denoiser.

For data x0 ~ sum_k pi_k N(mu_k, diag(s_k^2)) and x = x0 + sigma * n, the noisy
marginal is the mixture with variances s_k^2 + sigma^2 and the optimal
denoiser is

    D(x, sigma) = sum_k r_k(x, sigma) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
    r_k proportional to pi_k N(x; mu_k, diag(s_k^2 + sigma^2)).

``reference_solution`` integrates the probability-flow ODE
dx/dsigma = (x - D(x, sigma)) / sigma with scipy's adaptive high-order solvers.
Shared by ``tests/core/test_samplers.py`` and ``benchmarks/samplers_analytic.py``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["GaussianMixture", "ClassConditionalMixture", "reference_solution", "edmsound_mixture", "edm_mixture"]


class GaussianMixture:
    """Mixture of diagonal Gaussians in R^d with an exact (float64) denoiser."""

    def __init__(self, weights: Sequence[float], means, variances):
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.dim() == 1:
            mu = mu[:, None]
        var = torch.as_tensor(variances, dtype=torch.float64)
        if var.dim() == 1:  # isotropic: one variance per component
            var = var[:, None].expand_as(mu)
        var = var.expand_as(mu).clone()
        if w.numel() != mu.shape[0]:
            raise ValueError("weights and means disagree on the number of components")
        if (w <= 0).any() or (var <= 0).any():
            raise ValueError("weights and variances must be positive")
        self.weights = w / w.sum()
        self.means = mu
        self.variances = var

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def scaled(self, c: float) -> "GaussianMixture":
        """The same mixture with data multiplied by ``c``."""
        return GaussianMixture(self.weights, self.means * c, self.variances * c * c)

    # -- moments ---------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def variance(self) -> torch.Tensor:
        """Per-coordinate variance of the mixture."""
        second = (self.weights[:, None] * (self.variances + self.means ** 2)).sum(0)
        return second - self.mean ** 2

    @property
    def sigma_data(self) -> float:
        """RMS standard deviation over coordinates."""
        return float(self.variance.mean().sqrt())

    # -- densities -------------------------------------------------------
    def log_responsibilities(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log r_k(x, sigma), shape (B, K); ``sigma`` scalar or shape (B,)."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        sig = sig.reshape(-1, 1, 1) if sig.dim() > 0 else sig
        var = self.variances[None] + sig ** 2  # (B|1, K, d)
        diff = x[:, None, :] - self.means[None]
        logn = -0.5 * ((diff ** 2) / var + torch.log(2 * math.pi * var)).sum(-1)
        logp = torch.log(self.weights)[None] + logn
        return logp - torch.logsumexp(logp, dim=1, keepdim=True)

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact D(x, sigma) = E[x0 | x]; computed in float64, returned in x.dtype."""
        shape, dtype = x.shape, x.dtype
        x64 = x.reshape(shape[0], -1).to(torch.float64)
        if x64.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} features per sample, got {x64.shape[1]}")
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        if sig.numel() == 1 or bool((sig == sig[0]).all()):
            out = self._denoise_shared_sigma(x64, float(sig[0]))
        else:
            sig = sig.reshape(-1, 1, 1)
            r = self.log_responsibilities(x64, sig.reshape(-1)).exp()  # (B, K)
            gain = self.variances[None] / (self.variances[None] + sig ** 2)  # (B, K, d)
            post = self.means[None] + gain * (x64[:, None, :] - self.means[None])
            out = (r[:, :, None] * post).sum(1)
        return out.reshape(shape).to(dtype)

    def _denoise_shared_sigma(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Same formula for one sigma shared by the batch, written with (B,d)x(d,K)
        products instead of (B,K,d) temporaries (much faster for big batches)."""
        mu = self.means.to(x.device)
        var = self.variances.to(x.device) + sigma * sigma  # (K, d)
        inv = 1.0 / var
        # sum_d (x - mu)^2 / var = x^2 @ inv^T - 2 x @ (mu inv)^T + sum_d mu^2 inv
        quad = (x * x) @ inv.T - 2.0 * (x @ (mu * inv).T) + (mu * mu * inv).sum(1)
        logp = torch.log(self.weights.to(x.device)) - 0.5 * (quad + torch.log(2 * math.pi * var).sum(1))
        r = torch.softmax(logp, dim=1)  # (B, K)
        gain = self.variances.to(x.device) * inv  # (K, d)
        # sum_k r_k (mu_k + g_k (x - mu_k)) = r @ ((1 - g) mu) + x * (r @ g)
        return r @ ((1.0 - gain) * mu) + x * (r @ gain)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Most probable component of each clean sample (Bayes rule at sigma = 0)."""
        return self.log_responsibilities(x, 0.0).argmax(1)

    # -- sampling --------------------------------------------------------
    def sample(self, n: int, generator: Optional[torch.Generator] = None, return_labels: bool = False):
        """n exact samples (float64, shape (n, d))."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[labels] + self.variances[labels].sqrt() * z
        return (x, labels) if return_labels else x

    def sample_noisy(self, n: int, sigma: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n exact samples of the noisy marginal p(x; sigma) = p_data * N(0, sigma^2 I)."""
        x0 = self.sample(n, generator)
        return x0 + sigma * torch.randn(x0.shape, dtype=torch.float64, generator=generator)


class ClassConditionalMixture:
    """Exact class-conditional denoiser: class c has data ``mixtures[c]``, the null class (label
    ``null_class`` = number of classes) the prior-weighted mixture of all classes. Called like a
    trained ``EDMPrecond``: ``model(x, sigma, labels) -> D(x, sigma, c)`` per sample (x: (B, d))."""

    def __init__(self, mixtures: Sequence[GaussianMixture], priors: Sequence[float]):
        pri = torch.as_tensor(priors, dtype=torch.float64)
        if len(mixtures) != pri.numel():
            raise ValueError("one prior per class")
        self.classes = list(mixtures)
        self.null_class = len(mixtures)
        pri = pri / pri.sum()
        self.unconditional = GaussianMixture(
            torch.cat([m.weights * p for m, p in zip(self.classes, pri)]),
            torch.cat([m.means for m in self.classes]), torch.cat([m.variances for m in self.classes]))

    def __call__(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        labels = (torch.full((x.shape[0],), self.null_class) if labels is None
                  else torch.as_tensor(labels).reshape(-1).expand(x.shape[0]))
        out = torch.empty_like(x)
        for c in labels.unique().tolist():
            m = labels == c
            mix = self.unconditional if c == self.null_class else self.classes[c]
            out[m] = mix.denoiser(x[m], sig[m])
        return out


def edmsound_mixture() -> GaussianMixture:
    """2-D, 3-component mixture with sigma_data ~ 0.2 (EDMSound scale).

    Component means are >= 0.47 apart and standard deviations <= 0.05, so the
    components overlap by less than ~1e-5 (Bayes misclassification rate).
    """
    return GaussianMixture(
        weights=[0.5, 0.3, 0.2],
        means=[[-0.25, -0.10], [0.25, -0.10], [0.00, 0.30]],
        variances=[[0.05 ** 2, 0.04 ** 2], [0.04 ** 2, 0.05 ** 2], [0.045 ** 2, 0.045 ** 2]],
    )


def edm_mixture() -> GaussianMixture:
    """The same mixture scaled to unit-ish data scale (standard EDM, sigma_max = 80)."""
    return edmsound_mixture().scaled(5.0)


def reference_solution(
    mixture: GaussianMixture,
    x_init: torch.Tensor,
    sigma_max: float,
    sigma_min: float,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    method: str = "DOP853",
    denoise_final: bool = True,
    chunk: int = 64,
) -> torch.Tensor:
    """Integrate the PF-ODE dx/dsigma = (x - D(x, sigma))/sigma from sigma_max to sigma_min.

    The ODE is integrated in the variable t = log(sigma) (dx/dt = x - D), which is
    the same trajectory but keeps the step sizes uniform over the five decades
    of sigma.  Points are integrated in chunks of ``chunk`` so that scipy's RMS
    error norm does not dilute the per-point tolerance much.

    With ``denoise_final`` the result is D(x(sigma_min), sigma_min): this is
    exactly how every sampler in :mod:`edmsound.samplers` takes its last step
    (sigma_min -> 0), so sampler outputs are directly comparable.
    """
    from scipy.integrate import solve_ivp

    x0 = torch.as_tensor(x_init, dtype=torch.float64)
    shape = x0.shape
    flat = x0.reshape(shape[0], -1)
    out = torch.empty_like(flat)
    t0, t1 = math.log(sigma_max), math.log(sigma_min)
    for start in range(0, flat.shape[0], chunk):
        block = flat[start:start + chunk]
        nb = block.shape[0]

        def rhs(t, y, nb=nb):
            x = torch.from_numpy(y).reshape(nb, -1)
            sig = torch.full((nb,), math.exp(t), dtype=torch.float64)
            return (x - mixture.denoiser(x, sig)).reshape(-1).numpy()

        sol = solve_ivp(rhs, (t0, t1), block.reshape(-1).numpy().copy(), method=method,
                        rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        out[start:start + nb] = torch.from_numpy(sol.y[:, -1]).reshape(nb, -1)
    if denoise_final:
        out = mixture.denoiser(out, torch.full((out.shape[0],), float(sigma_min), dtype=torch.float64))
    return out.reshape(shape)
