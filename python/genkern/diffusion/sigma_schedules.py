"""Inference sigma ramps between a largest and a smallest sigma (docs/math.md 5.4), as diffusers'
_convert_to_karras, _convert_to_exponential and _convert_to_beta compute them (float64 numpy), and ComfyUI's
"simple" schedule (every (T / N)-th training sigma). The samplers append their final sigma themselves."""

from __future__ import annotations

import math

import numpy as np

SIGMA_SCHEDULES = ("karras", "exponential", "beta")  # diffusers' use_karras_sigmas, use_exponential_sigmas, ...
KARRAS_RHO = 7.0
BETA_ALPHA = BETA_BETA = 0.6  # diffusers' defaults for use_beta_sigmas


def karras(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. (2022), eq. 5: (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Log-uniform: exp(linspace(log sigma_max, log sigma_min, n))."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta(sigma_min: float, sigma_max: float, n: int, a: float = BETA_ALPHA, b: float = BETA_BETA) -> np.ndarray:
    """Beta sampling (Lee et al. 2024): sigma_min + ppf(1 - i/(n-1); a, b) (sigma_max - sigma_min), ppf the
    Beta(a, b) quantile (scipy's, as diffusers; scipy is needed for this schedule only)."""
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - scipy comes with the test extra
        raise ImportError("the beta sigma schedule needs scipy (pip install scipy)") from None
    ppf = [stats.beta.ppf(u, a, b) for u in 1 - np.linspace(0, 1, n)]
    return np.array([sigma_min + p * (sigma_max - sigma_min) for p in ppf])


def ramp(kind: str, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """The n sigmas of schedule `kind` (a SIGMA_SCHEDULES name), sigma_max first."""
    return {"karras": karras, "exponential": exponential, "beta": beta}[kind](sigma_min, sigma_max, n)


def simple(train_sigmas: np.ndarray, n: int) -> np.ndarray:
    """ComfyUI's "simple" schedule: the training sigmas (ascending, one per timestep) at T - 1 - floor(i T / n)
    for i < n, largest first."""
    T = len(train_sigmas)
    step = T / n
    return np.array([train_sigmas[-(1 + int(i * step))] for i in range(n)])
