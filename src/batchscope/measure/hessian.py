"""Curvature of one trained checkpoint (:func:`analyze`): the top-k eigenvalues (Lanczos), the trace (Hutchinson,
with its standard error) and the eigenvalue density (stochastic Lanczos quadrature) of the training loss on a
fixed evaluation set, with the number of Hessian-vector products and the wall time of each.

Sharpness depends on the parametrization (Dinh et al. 2017): compare it only within one model.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import xarray as xr

from batchscope.config import AUTO_EVAL_SIZE
from batchscope.core import hessian
from batchscope.workloads.base import Workload, analysis_data, evaluation_set


def eval_size(spec: dict[str, Any], n: int) -> int:
    """hessian.eval_size, or when it is null at most :data:`batchscope.config.AUTO_EVAL_SIZE` of the ``n``
    analysis examples, so the analysis's cost does not grow with the data set."""
    return spec["eval_size"] or min(AUTO_EVAL_SIZE, n)


def analyze(checkpoint: dict[str, Any], workload: Workload, spec: dict[str, Any], device: torch.device) -> xr.Dataset:
    """Curvature of one checkpoint, whose weights are loaded into ``workload.model`` (built from the
    checkpoint's workload spec). ``spec`` is :func:`batchscope.config.hessian_slice`.

    A checkpoint with non-finite weights (a diverged run) gets NaN results and ``skipped = "diverged"``.
    """
    model = workload.model
    model.load_state_dict(checkpoint["state_dict"])
    x, y = analysis_data(workload, device)
    x, y = evaluation_set(x, y, eval_size(spec, len(x)), spec["seed"], "hessian.eval_size")
    op = hessian.HessianOperator(model, workload.loss, x, y, chunk_size=spec["chunk_size"], mode=spec["mode"],
                                 cache_mb=spec["cache_mb"])  # fmt: skip
    k, runs, steps, points = spec["top_k"], spec["slq_runs"], spec["slq_steps"], spec["density_points"]
    common = {"seed": spec["seed"], "dtype": op.dtype, "device": device}
    loss_value = op.loss_value() if bool(torch.isfinite(op.point).all()) else math.nan
    finite = math.isfinite(loss_value)
    results: dict[str, Any] = {"skipped": "" if finite else "diverged"}
    if finite:
        start = time.perf_counter()
        top = hessian.top_eigenvalues(op, op.dim, k, tol=spec["tol"], **common)
        results["time_top"] = time.perf_counter() - start
        start = time.perf_counter()
        trace = hessian.hutchinson(op.matvec, op.dim, spec["hutchinson_probes"], **common)
        results["time_trace"] = time.perf_counter() - start
        start = time.perf_counter()
        density = hessian.slq(op.matvec, op.dim, runs, steps, **common)
        results["time_slq"] = time.perf_counter() - start
        grid = density.grid(points)
        values = density.density(grid, spec["density_sigma"] * (grid[-1] - grid[0]))
        eigenvalues = np.full(k, np.nan)
        eigenvalues[: len(top.values)] = top.values
        results.update(
            eigenvalues=eigenvalues, converged=top.converged, n_hvp_top=top.n_matvec, trace=trace.value,
            trace_se=trace.standard_error, n_hvp_trace=trace.n_matvec, n_hvp_slq=density.n_matvec,
            slq_nodes=density.nodes, slq_weights=density.weights, density=values, density_grid=grid,
            loss=loss_value, grad_norm=float(torch.linalg.vector_norm(op.gradient())),
        )  # fmt: skip
    else:
        nan = math.nan
        results.update(
            eigenvalues=np.full(k, nan), converged=False, n_hvp_top=0, trace=nan, trace_se=nan, n_hvp_trace=0,
            n_hvp_slq=0, slq_nodes=np.full((runs, steps), nan), slq_weights=np.full((runs, steps), nan),
            density=np.full(points, nan), density_grid=np.full(points, nan), loss=nan, grad_norm=nan,
            time_top=nan, time_trace=nan, time_slq=nan,
        )  # fmt: skip
    ds = xr.Dataset(
        {
            "eigenvalues": (
                "rank",
                results["eigenvalues"],
                {"long_name": "top-k Hessian eigenvalues, descending"},
            ),
            "lambda_max": (
                (),
                results["eigenvalues"][0],
                {"long_name": "largest Hessian eigenvalue (sharpness)"},
            ),
            "top_converged": (
                (),
                results["converged"],
                {
                    "long_name": "Lanczos from two start vectors: each met its "
                    "error bound and they agree within tol (batchscope.core.hessian.merge_starts)"
                },
            ),
            "trace": ((), results["trace"], {"long_name": "Hutchinson estimate of tr(H)"}),
            "trace_se": ((), results["trace_se"], {"long_name": "standard error of trace"}),
            "density": ("density_point", results["density"], {"long_name": "SLQ eigenvalue density"}),
            "density_grid": ("density_point", results["density_grid"], {"long_name": "eigenvalue"}),
            "slq_nodes": (("slq_run", "slq_step"), results["slq_nodes"]),
            "slq_weights": (("slq_run", "slq_step"), results["slq_weights"]),
            "loss": ((), results["loss"], {"long_name": "training loss on the evaluation set"}),
            "grad_norm": ((), results["grad_norm"], {"long_name": "norm of the full gradient"}),
            **{
                f"n_hvp_{part}": ((), results[f"n_hvp_{part}"], {"long_name": "Hessian-vector products"})
                for part in ("top", "trace", "slq")
            },
            **{f"time_{part}": ((), results[f"time_{part}"], {"units": "s"}) for part in ("top", "trace", "slq")},
        },
        coords={"rank": np.arange(1, k + 1)},
    )
    ds.attrs.update(
        batch_size=checkpoint["batch_size"], lr=checkpoint["lr"], seed=checkpoint["seed"], mode=spec["mode"],
        eval_size=len(x), chunk_size=spec["chunk_size"] or len(x), hvp_method=op.method, n_params=op.dim,
        cached_chunks=op.cached_chunks, n_chunks=len(op.chunks),
        dtype=str(op.dtype).removeprefix("torch."), skipped=results["skipped"],
        density_sigma=spec["density_sigma"],
    )  # fmt: skip
    return ds
