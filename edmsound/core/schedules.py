"""Noise-level (sigma) discretisations for sampling.

Every schedule returns a float64 1-D tensor of length ``n + 1``: ``n`` strictly
decreasing noise levels from ``sigma_max`` down to ``sigma_min`` followed by a
final ``0`` (the clean-data end point).  A sampler that takes ``n`` steps walks
``sigmas[0] -> sigmas[1] -> ... -> sigmas[n] = 0``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

__all__ = ["karras_sigmas", "loglinear_sigmas", "SCHEDULES", "get_schedule"]


def _check_args(n: int, sigma_min: float, sigma_max: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            n_int = int(n)
        except (TypeError, ValueError):
            raise ValueError(f"number of noise levels n must be an integer, got {n!r}") from None
        if n_int != n:
            raise ValueError(f"number of noise levels n must be an integer, got {n!r}")
        n = n_int
    if n < 1:
        raise ValueError(f"number of noise levels n must be >= 1, got {n}")
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value}")
    if not float(sigma_min) > 0.0:
        raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
    if not float(sigma_min) < float(sigma_max):
        raise ValueError(f"need sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM time-step discretisation (Karras et al. 2022, eq. 5).

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for ``i = 0 .. n-1``, then ``sigma_n = 0``.  Larger ``rho`` concentrates
    the steps near ``sigma_min``.  With ``n == 1`` the single level is ``sigma_max``.
    """
    _check_args(n, sigma_min, sigma_max)
    n = int(n)
    rho = float(rho)
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a positive finite number, got {rho}")
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    inv_max = float(sigma_max) ** (1.0 / rho)
    inv_min = float(sigma_min) ** (1.0 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    # pin the end points exactly (pow/root round trip is not exact)
    sigmas[0] = float(sigma_max)
    if n > 1:
        sigmas[-1] = float(sigma_min)
    return _append_zero(sigmas)


def loglinear_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float | None = None) -> torch.Tensor:
    """Geometrically spaced noise levels (uniform in log sigma), then a final 0.

    ``rho`` is accepted (and ignored) so every schedule shares one call signature.
    """
    _check_args(n, sigma_min, sigma_max)
    n = int(n)
    if n == 1:
        sigmas = torch.tensor([float(sigma_max)], dtype=torch.float64)
    else:
        sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))
        sigmas[0] = float(sigma_max)
        sigmas[-1] = float(sigma_min)
    return _append_zero(sigmas)


SCHEDULES: Dict[str, Callable[..., torch.Tensor]] = {
    "karras": karras_sigmas,
    "loglinear": loglinear_sigmas,
}


def get_schedule(name: str) -> Callable[..., torch.Tensor]:
    """Look up a schedule by name; raises ``ValueError`` listing the valid names."""
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(sorted(SCHEDULES))}") from None
