"""The Jensen bias of an inverted noisy curvature estimate on linear regression, where it has a closed form.

E[H_m^-1] is not H^-1: the inverse is convex, so a minibatch estimate H_m = X_m^T X_m / m of H = Sigma inverts to
a biased estimate of Sigma^-1. For Gaussian rows the bias is the inverse-Wishart mean's, (p + 1)/(m - p - 1).
NumPy only (no torch): the workflow's linear-regression job runs without torch's import. The same measurement on
a trained model's Hessian is :func:`batchscope.core.noise.jensen_subspace`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def linreg_covariance(dim: int, condition_number: float, seed: int) -> np.ndarray:
    """The input covariance of ``linreg``: log-spaced eigenvalues from 1 down to 1/condition, random basis."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eigenvalues = np.logspace(0, -np.log10(condition_number), dim)
    return (basis * eigenvalues) @ basis.T


def inverse_wishart_bias(p: int, m: int) -> float:
    """(E[H_m^-1] - H^-1) / H^-1 for H_m = X_m^T X_m / m, x ~ N(0, Sigma) in p dimensions: (p + 1)/(m - p - 1)."""
    if m <= p + 1:
        raise ValueError(f"the inverse-Wishart mean needs m > p + 1, got m={m}, p={p}")
    return (p + 1) / (m - p - 1)


@dataclass
class JensenResult:
    m: np.ndarray
    relative_bias: np.ndarray  # tr(E[H_m^-1] H) / k - 1
    relative_bias_se: np.ndarray
    min_eigenvalue: np.ndarray  # of E[H_m^-1] - H^-1 (>= 0 up to Monte Carlo error: Jensen)
    analytic: np.ndarray  # (p + 1)/(m - p - 1) where it applies, else NaN


def jensen_linreg(covariance: np.ndarray, sizes: list[int], draws: int, rng: np.random.Generator) -> JensenResult:
    """Monte Carlo E[H_m^-1] for H_m = X_m^T X_m / m with rows x ~ N(0, Sigma), against H^-1 = Sigma^-1."""
    p = len(covariance)
    chol = np.linalg.cholesky(covariance)
    exact_inverse = np.linalg.inv(covariance)
    out = {k: [] for k in ("bias", "se", "min_eig", "analytic")}
    for m in sizes:
        x = rng.standard_normal((draws, m, p)) @ chol.T
        inverses = np.linalg.inv(np.einsum("dmi,dmj->dij", x, x) / m)
        per_draw = np.einsum("dij,ji->d", inverses, covariance) / p - 1  # tr(H_m^-1 Sigma)/p - 1
        out["bias"].append(per_draw.mean())
        out["se"].append(per_draw.std(ddof=1) / math.sqrt(draws))
        out["min_eig"].append(np.linalg.eigvalsh(inverses.mean(0) - exact_inverse).min())
        out["analytic"].append(inverse_wishart_bias(p, m) if m > p + 1 else math.nan)
    return JensenResult(np.asarray(sizes), *(np.asarray(out[k]) for k in ("bias", "se", "min_eig", "analytic")))
