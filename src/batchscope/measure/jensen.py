"""The Jensen-bias experiment on linear regression (:mod:`batchscope.core.jensen`) as a NetCDF dataset, and the
dataset both Jensen experiments write. No torch: the workflow's ``measure_jensen_linreg`` job never imports it."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from batchscope.core.jensen import JensenResult, jensen_linreg, linreg_covariance


def jensen_dataset(result: JensenResult) -> xr.Dataset:
    return xr.Dataset(
        {
            "relative_bias": ("m", result.relative_bias, {"long_name": "tr(E[H_m^-1] H) / k - 1"}),
            "relative_bias_se": ("m", result.relative_bias_se),
            "min_eigenvalue": ("m", result.min_eigenvalue, {"long_name": "smallest eigenvalue of E[H_m^-1] - H^-1"}),
            "analytic": ("m", result.analytic, {"long_name": "(p + 1) / (m - p - 1)"}),
        },
        coords={"m": result.m},
    )


def measure_jensen_linreg(spec: dict[str, Any]) -> xr.Dataset:
    """Linear regression, x ~ N(0, Sigma) in p dimensions: Monte Carlo against the inverse-Wishart mean."""
    covariance = linreg_covariance(spec["dim"], spec["condition_number"], spec["seed"])
    result = jensen_linreg(covariance, spec["sizes"], spec["draws"], np.random.default_rng(spec["seed"]))
    ds = jensen_dataset(result)
    ds.attrs.update(dim=spec["dim"], draws=spec["draws"], condition_number=spec["condition_number"])
    return ds
