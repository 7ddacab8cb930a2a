"""The Hessian-spectrum stage: curvature of every trained checkpoint, and its aggregate per workload.

Per checkpoint (:func:`analyze`): the top-k eigenvalues (Lanczos), the trace (Hutchinson, with its standard
error) and the eigenvalue density (stochastic Lanczos quadrature) of the training loss on a fixed evaluation
set, with the number of Hessian-vector products and the wall time of each. Per workload (:func:`aggregate`):
lambda_max and trace against the batch size at each batch size's best learning rate, and how sharpness relates
to the batch size and to the generalization gap (Spearman's rho), the comparison of Keskar et al. 2017.

Sharpness depends on the parametrization (Dinh et al. 2017): compare it only within one model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from batchscope import hessian
from batchscope.config import AUTO_EVAL_SIZE
from batchscope.io import netcdf_files, read_expected, same_provenance
from batchscope.workload import Workload, analysis_data
from batchscope.workload import build as build_workload


def evaluation_set(x: torch.Tensor, y: torch.Tensor, spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``eval_size`` training examples of a fixed permutation; when eval_size is null, at most
    :data:`batchscope.config.AUTO_EVAL_SIZE` of them, so the analysis's cost does not grow with the data set."""
    n = len(x)
    size = spec["eval_size"] or min(AUTO_EVAL_SIZE, n)
    if size > n:
        raise ValueError(f"hessian.eval_size: {size} exceeds the {n} training examples")
    if size == n:
        return x, y
    order = torch.randperm(n, generator=torch.Generator().manual_seed(spec["seed"]))[:size].to(x.device)
    return x[order], y[order]


def analyze(checkpoint: dict[str, Any], workload: Workload, spec: dict[str, Any], device: torch.device) -> xr.Dataset:
    """Curvature of one checkpoint, whose weights are loaded into ``workload.model`` (built from the
    checkpoint's workload spec). ``spec`` is :func:`batchscope.config.hessian_slice`.

    A checkpoint with non-finite weights (a diverged run) gets NaN results and ``skipped = "diverged"``.
    """
    model = workload.model
    model.load_state_dict(checkpoint["state_dict"])
    x, y = evaluation_set(*analysis_data(workload, device), spec)
    op = hessian.HessianOperator(model, workload.loss, x, y, chunk_size=spec["chunk_size"], mode=spec["mode"])
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
                    "error bound and they agree within tol (batchscope.hessian.merge_starts)"
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
        dtype=str(op.dtype).removeprefix("torch."), skipped=results["skipped"],
        density_sigma=spec["density_sigma"],
    )  # fmt: skip
    return ds


def aggregate(hessian_paths: Sequence[str | Path], fit_path: str | Path, workload: str,
              expect: dict[str, str] | None = None) -> xr.Dataset:  # fmt: skip
    """Concatenate a workload's per-checkpoint results and relate sharpness to batch size and generalization.

    ``hessian_paths`` are analyze_hessian output directories (or files); ``fit_path`` the workload's
    fit_scaling result, which holds every run's generalization gap and, computed there once, each batch size's
    best learning rate (``best_lr``) and which runs used it (``run_at_best_lr``). ``expect``: stage -> config
    hash the inputs must carry (the workflow's).
    """
    parts, datasets = [], []
    files = netcdf_files(hessian_paths, "Hessian results")
    for path in files:
        ds = read_expected(path, "analyze_hessian", ("lambda_max", "trace", "density"), expect)
        datasets.append(ds)
        keys = {f"run_{k}": ("run", [ds.attrs[k]]) for k in ("batch_size", "lr", "seed")}
        parts.append(ds.drop_vars(["slq_nodes", "slq_weights"]).expand_dims("run").assign_coords(keys))
    same_provenance(datasets, files, "Hessian results")
    runs = xr.concat(parts, dim="run", combine_attrs="drop_conflicts")
    order = np.lexsort((runs["run_seed"].values, runs["run_lr"].values, runs["run_batch_size"].values))
    runs = runs.isel(run=order).assign_coords(run=np.arange(runs.sizes["run"]))

    fit = read_expected(fit_path, "fit_scaling", ("best_lr", "run_at_best_lr", "gap_accuracy", "gap_loss"), expect)
    keys_of = ("run_batch_size", "run_lr", "run_seed")
    trained = list(zip(*(fit[k].values for k in keys_of), strict=True))
    gap_name = "gap_accuracy" if np.isfinite(fit["gap_accuracy"].values).any() else "gap_loss"
    gap_of = dict(zip(trained, fit[gap_name].values, strict=True))
    best_of = dict(zip(trained, fit["run_at_best_lr"].values.astype(bool), strict=True))
    keys = list(zip(*(runs[k].values for k in keys_of), strict=True))
    runs["gap"] = ("run", np.array([gap_of.get(key, np.nan) for key in keys]), {"long_name": gap_name})
    at_best = np.array([best_of.get(key, False) for key in keys])
    runs["at_best_lr"] = ("run", at_best, {"long_name": "the run used its batch size's best learning rate"})
    stop_at_target = int(fit.attrs.get("stop_at_target", 0))

    grid_b = fit["batch_size"].values
    per_b = {name: np.full((len(grid_b), 3), np.nan) for name in ("lambda_max", "trace")}
    for i, b in enumerate(grid_b):
        mask = at_best & (runs["run_batch_size"].values == b)
        for name in per_b:
            values = runs[name].values[mask]
            values = values[np.isfinite(values)]
            if len(values):
                per_b[name][i] = [np.median(values), values.min(), values.max()]
    out = xr.Dataset(
        {
            f"{name}_at_best_lr": (
                ("batch_size", "summary"),
                table,
                {"long_name": f"{name}, seeds at the best lr"},
            )
            for name, table in per_b.items()
        },
        coords={"batch_size": grid_b, "summary": ["median", "min", "max"]},
    )
    best = at_best & np.isfinite(runs["lambda_max"].values)
    b_rho, b_p = _spearman(runs["run_batch_size"].values[best], runs["lambda_max"].values[best])
    gap_ok = best & np.isfinite(runs["gap"].values)
    g_rho, g_p = _spearman(runs["lambda_max"].values[gap_ok], runs["gap"].values[gap_ok])
    out["rho_batch_size_sharpness"] = ((), b_rho, {"long_name": "Spearman rho(B, lambda_max), best-lr runs"})
    out["p_batch_size_sharpness"] = ((), b_p)
    out["rho_sharpness_gap"] = (
        (),
        g_rho,
        {"long_name": f"Spearman rho(lambda_max, {gap_name}), best-lr runs"},
    )
    out["p_sharpness_gap"] = ((), g_p)
    out["n_runs_compared"] = ((), int(best.sum()))
    out["larger_batch_sharper"] = ((), bool(b_rho > 0 and b_p < 0.05))
    merged = xr.merge([out, runs], combine_attrs="drop_conflicts")
    merged.attrs.update(workload=workload, gap_metric=gap_name, stop_at_target=stop_at_target)
    return merged


def _spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import spearmanr  # imported here: scipy.stats costs ~0.5 s, analysis jobs never need it

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)


def reproduction_sentence(ds: xr.Dataset) -> str:
    """Whether this run reproduced "larger batch -> sharper minimum", with the evidence."""
    rho, p, n = (
        float(ds["rho_batch_size_sharpness"]),
        float(ds["p_batch_size_sharpness"]),
        int(ds["n_runs_compared"]),
    )
    verdict = "reproduced" if bool(ds["larger_batch_sharper"]) else "did not reproduce"
    gap_rho = float(ds["rho_sharpness_gap"])
    sentence = (
        f'For {ds.attrs["workload"]}, this run {verdict} "larger batch -> sharper minimum": Spearman\'s rho '
        f"between the batch size and lambda_max is {rho:.2f} (p = {p:.2g}, {n} runs at each batch size's "
        f"best learning rate); between lambda_max and the generalization gap it is {gap_rho:.2f}."
    )
    if ds.attrs.get("stop_at_target"):
        sentence += (
            " The checkpoints were taken when each run first reached the target (stop_at_target: true), at "
            "equal validation accuracy rather than at convergence as in Keskar et al.; set stop_at_target: "
            "false to measure the minima that training converges to."
        )
    return sentence


def edge_of_stability(step_size: float, spec: dict[str, Any], device: torch.device, data_file: str | None = None
                      ) -> xr.Dataset:  # fmt: skip
    """Full-batch gradient descent on the squared loss, tracking lambda_max against 2 / step size.

    Cohen et al. (2021): under gradient descent with step size eta, sharpness rises (progressive sharpening)
    until it reaches 2/eta, the stability limit of a quadratic, and then hovers there while the loss keeps
    falling, non-monotonically. ``spec`` is the ``edge_of_stability`` config section: ``examples`` (the first
    that many training examples), ``steps``, ``interval`` (steps between lambda_max measurements), ``seed``.
    Integer (class) targets are one-hot over the model's outputs; the loss is 0.5 |f(x) - target|^2 averaged
    over examples. The workload (``spec["workload"]``) comes from its factory, seeded with ``spec["seed"]``.
    """
    workload = build_workload(spec["workload"], device, seed=spec["seed"], data_file=data_file)
    x, y = (t[: spec["examples"]] for t in analysis_data(workload, device))
    model = workload.model

    def squared_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        classes = not target.is_floating_point()
        goal = nn.functional.one_hot(target, out.shape[-1]).to(out.dtype) if classes else target
        return 0.5 * ((out.reshape(len(out), -1) - goal.reshape(len(out), -1)) ** 2).sum(1).mean()

    optimizer = torch.optim.SGD(model.parameters(), lr=step_size)
    steps, sharpness_values, losses = [], [], []
    for step in range(spec["steps"] + 1):
        if step % spec["interval"] == 0:
            op = hessian.HessianOperator(model, squared_loss, x, y)
            value = op.loss_value()
            if not math.isfinite(value):
                break
            # one start: lambda_max only, measured every `interval` steps along a path it follows closely
            top = hessian.top_eigenvalues(op, op.dim, 1, tol=1e-3, seed=spec["seed"], device=device, starts=1)
            steps.append(step)
            sharpness_values.append(float(top.values[0]))
            losses.append(value)
        if step < spec["steps"]:
            optimizer.zero_grad(set_to_none=True)
            squared_loss(model(x), y).backward()
            optimizer.step()
    ds = xr.Dataset(
        {
            "lambda_max": ("step", np.asarray(sharpness_values), {"long_name": "largest Hessian eigenvalue"}),
            "loss": ("step", np.asarray(losses), {"long_name": "full-batch squared loss"}),
            "stability_limit": ((), 2.0 / step_size, {"long_name": "2 / step size"}),
        },
        coords={"step": np.asarray(steps, dtype=np.int64)},
    )
    expected = spec["steps"] // spec["interval"] + 1
    ds.attrs.update(step_size=step_size, examples=len(x), diverged=int(len(steps) < expected))
    return ds
