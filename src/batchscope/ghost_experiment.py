"""The Ghost BatchNorm experiment: does normalizing over ghost batches bring small-batch behaviour back at a large
physical batch, and what does it cost per step?

- :func:`variance_experiment`: Monte Carlo Var(ghost-batch mean) / Var(physical-batch mean) of real activations
  (the input of the network's first normalization layer, averaged over space), against g.
- :func:`summarize`: at the large physical batch, each ghost size against plain BatchNorm at the same batch and
  at the small batch: validation accuracy, generalization gap, steps to target, lambda_max (when the Hessian
  stage ran) and the profiled step time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn

from batchscope import ghost
from batchscope.fit import read_runs, steps_per_batch_size
from batchscope.io import netcdf_files, read_netcdf
from batchscope.workload import analysis_data
from batchscope.workload import build as build_workload


@torch.no_grad()
def first_norm_inputs(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Per example and channel, the spatial mean of what the first normalization layer receives."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("the model has no normalization layer: set the workload's model norm to 'batch'")
    captured = {}
    handle = norms[0].register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    model.eval()
    try:
        model(x)
    finally:
        handle.remove()
    values = captured["x"]
    return values.flatten(2).mean(-1).cpu().numpy() if values.dim() > 2 else values.cpu().numpy()


def variance_experiment(spec: dict[str, Any], device, data_file: str | None = None) -> xr.Dataset:
    """Var(ghost-batch mean) / Var(physical-batch mean) for g in ``spec['groups']`` at ``spec['batch_size']``.

    The activations come from the workload's model at initialization (seed ``spec['seed']``) on the training
    set; batches are drawn without replacement, as training draws them, so the expectation is
    g (N - m) / (N - B) (:func:`batchscope.ghost.expected_ratio`), not g, when B is close to N.
    """
    wl_spec = {**spec["workload"], "model": {**spec["workload"]["model"], "norm": "batch"}}
    wl_spec["model"].pop("ghost_batch_size", None)
    workload = build_workload(wl_spec, device, seed=spec["seed"], data_file=data_file)
    values = first_norm_inputs(workload.model, analysis_data(workload, device)[0])
    rng = np.random.default_rng(spec["seed"])
    batch, population = spec["batch_size"], len(values)
    groups = [g for g in spec["groups"] if batch % g == 0]
    ratio = np.empty((len(groups), values.shape[1]))
    error = np.empty_like(ratio)
    for i, g in enumerate(groups):
        ratio[i], error[i] = ghost.mean_variance_ratio(values, batch, batch // g, spec["draws"], rng)
    return xr.Dataset(
        {
            "ratio": (("groups", "channel"), ratio, {"long_name": "Var(ghost-batch mean) / Var(batch mean)"}),
            "ratio_se": (("groups", "channel"), error, {"long_name": "bootstrap standard error"}),
            "ratio_mean": ("groups", ratio.mean(axis=1), {"long_name": "ratio averaged over channels"}),
            "expected": (
                "groups",
                [ghost.expected_ratio(batch, batch // g, population) for g in groups],
                {"long_name": "g (N - m) / (N - B): draws without replacement"},
            ),  # fmt: skip
            "expected_iid": ("groups", np.asarray(groups, float), {"long_name": "g: i.i.d. draws"}),
        },
        coords={"groups": np.asarray(groups), "ghost_size": ("groups", [batch // g for g in groups])},
        attrs={"batch_size": batch, "population": population, "draws": spec["draws"]},
    )


def _variant(runs: xr.Dataset, name: str, batch_size: int, hessian: dict | None) -> dict[str, Any]:
    """A variant's numbers at its best learning rate (fewest median steps to target), medians over seeds."""
    table = pd.DataFrame({k: runs[f"run_{k}"].values for k in ("batch_size", "lr", "seed")})
    table["steps_to_target"] = runs["steps_to_target"].values
    table = table[table["batch_size"] == batch_size]
    best = steps_per_batch_size(table)
    best_lr = float(best["best_lr"].iloc[0]) if len(best) else np.nan
    if np.isnan(best_lr):  # no lr reached the target: report the lr with the best final validation accuracy
        accuracy = pd.Series(runs["final_val_accuracy"].values[table.index], index=table["lr"].values)
        best_lr = float(accuracy.groupby(level=0).median().idxmax())
    mask = (runs["run_batch_size"].values == batch_size) & (runs["run_lr"].values == best_lr)
    seeds = runs["run_seed"].values[mask]
    row = {
        "variant": name,
        "batch_size": batch_size,
        "best_lr": best_lr,
        "steps_to_target": float(best["k"].iloc[0]) if len(best) else np.nan,
        "val_accuracy": float(np.median(runs["final_val_accuracy"].values[mask])),
        "gap": float(np.median(runs["gap_accuracy"].values[mask])),
        "lambda_max": np.nan,
    }
    if hessian:
        values = [hessian.get((batch_size, best_lr, seed), np.nan) for seed in seeds]
        row["lambda_max"] = float(np.nanmedian(values)) if np.isfinite(values).any() else np.nan
    return row


def _lambda_max(paths: Sequence[str | Path]) -> dict[tuple[int, float, int], float]:
    out = {}
    for file in netcdf_files(paths, "Hessian results"):
        ds = read_netcdf(file)
        out[(int(ds.attrs["batch_size"]), float(ds.attrs["lr"]), int(ds.attrs["seed"]))] = float(ds["lambda_max"])
    return out


def summarize(
    spec: dict[str, Any],
    base_runs: Sequence[str | Path],
    ghost_runs: dict[int, Sequence[str | Path]],
    base_profile: str | Path,
    ghost_profiles: dict[int, str | Path],
    variance: str | Path,
    base_hessian: Sequence[str | Path] = (),
    ghost_hessian: dict[int, Sequence[str | Path]] | None = None,
) -> xr.Dataset:
    """One row per variant: BN at the small batch, BN at the large batch, GBN at each ghost size (large batch)."""
    base = read_runs(base_runs)
    base_lambda = _lambda_max(base_hessian) if base_hessian else None
    rows = [
        _variant(base, f"BN, B = {spec['small_batch_size']}", spec["small_batch_size"], base_lambda),
        _variant(base, f"BN, B = {spec['batch_size']}", spec["batch_size"], base_lambda),
    ]
    step_times = [np.nan, float(read_netcdf(base_profile)["t_iter_median"])]
    for size in sorted(ghost_runs, reverse=True):
        lambdas = _lambda_max(ghost_hessian[size]) if ghost_hessian else None
        rows.append(_variant(read_runs(ghost_runs[size]), f"GBN {size}, B = {spec['batch_size']}", spec["batch_size"],
                             lambdas))  # fmt: skip
        step_times.append(float(read_netcdf(ghost_profiles[size])["t_iter_median"]))
    table = pd.DataFrame(rows)
    ghost_sizes = [np.nan, np.nan, *sorted(ghost_runs, reverse=True)]
    ds = xr.Dataset(
        {
            name: ("variant", table[name].to_numpy())
            for name in ("batch_size", "best_lr", "steps_to_target", "val_accuracy", "gap", "lambda_max")
        },
        coords={"variant": table["variant"].to_numpy(), "ghost_size": ("variant", np.asarray(ghost_sizes, float))},
    )
    ds["step_time"] = ("variant", np.asarray(step_times), {"units": "s", "long_name": "profiled T_iter"})
    ds["step_time_over_bn"] = ("variant", np.asarray(step_times) / step_times[1],
                               {"long_name": "step time / BatchNorm's at the same batch"})  # fmt: skip
    ds["gap"].attrs["long_name"] = "train minus val accuracy, median over seeds"
    variance_ds = read_netcdf(variance).rename({"ghost_size": "variance_ghost_size"})
    merged = xr.merge([ds, variance_ds.rename({name: f"variance_{name}" for name in variance_ds.data_vars})],
                      combine_attrs="drop_conflicts")  # fmt: skip
    merged.attrs.update(batch_size=spec["batch_size"], small_batch_size=spec["small_batch_size"])
    return merged
