"""The Ghost BatchNorm experiment's stages: ``ghost_variance`` (:mod:`batchscope.measure.ghost`: the variance of
ghost-batch means against g) and ``summarize_ghost``: at the large physical batch, each ghost size against plain
BatchNorm at the same batch and at the small batch (validation accuracy, generalization gap, steps to target,
lambda_max when the Hessian stage ran, and the profiled step time). The ghost variants' training, profiling and
Hessian jobs run the ``train``, ``profile`` and ``hessian`` commands on :func:`ghost_train_slice` and
:func:`ghost_profile_slice`, under those rules' versions.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from batchscope import config as cfg
from batchscope.core import scaling
from batchscope.stages import Command, Rule, _common, profile, train
from batchscope.store import netcdf_files, read_netcdf

log = logging.getLogger("batchscope")


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """The variance experiment and the summary: the ghost settings and the workload's model."""
    settings = {k: v for k, v in config["ghost"].items() if k not in ("enabled", "workload")}
    return {**settings, "workload": cfg.workload_slice(config, workload), **cfg.execution(config)}


def ghost_train_slice(config: dict[str, Any], workload: str, ghost_size: int) -> dict[str, Any]:
    return {**train.config_slice(config, workload), "workload": cfg.ghost_workload(config, workload, ghost_size)}


def ghost_profile_slice(config: dict[str, Any], workload: str, ghost_size: int) -> dict[str, Any]:
    return {**profile.config_slice(config, workload), "workload": cfg.ghost_workload(config, workload, ghost_size)}


def _variant(runs: xr.Dataset, name: str, batch_size: int, hessian: dict | None) -> dict[str, Any]:
    """A variant's numbers at its best learning rate (fewest median steps to target), medians over seeds."""
    table = pd.DataFrame({k: runs[f"run_{k}"].values for k in ("batch_size", "lr", "seed")})
    table["steps_to_target"] = runs["steps_to_target"].values
    table = table[table["batch_size"] == batch_size]
    best = scaling.steps_per_batch_size(table)
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
    base = train.read_runs(base_runs)
    base_lambda = _lambda_max(base_hessian) if base_hessian else None
    rows = [
        _variant(base, f"BN, B = {spec['small_batch_size']}", spec["small_batch_size"], base_lambda),
        _variant(base, f"BN, B = {spec['batch_size']}", spec["batch_size"], base_lambda),
    ]
    step_times = [np.nan, float(read_netcdf(base_profile)["t_iter_median"])]
    for size in sorted(ghost_runs, reverse=True):
        lambdas = _lambda_max(ghost_hessian[size]) if ghost_hessian else None
        name = f"GBN {size}, B = {spec['batch_size']}"
        rows.append(_variant(train.read_runs(ghost_runs[size]), name, spec["batch_size"], lambdas))
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


def _by_ghost_size(pairs: list[str]) -> dict[int, list[str]]:
    """``SIZE=PATH`` arguments grouped by ghost size."""
    grouped = _common.pairs(pairs, "ghost sizes")
    bad = [size for size in grouped if not size.isdigit()]
    if bad:
        raise SystemExit(f"expected GHOST_SIZE=PATH, got ghost size {bad[0]!r}")
    return {int(size): paths for size, paths in grouped.items()}


def run_variance(args: argparse.Namespace) -> None:
    from batchscope import store
    from batchscope.measure.ghost import variance_experiment

    spec = _common.spec(args, config_slice)
    device = _common.runtime(spec)
    ds = variance_experiment({**spec, "groups": spec["variance_groups"]}, device, data_file=args.data)
    ds.attrs.update(store.provenance("ghost_variance", spec, device=str(device)))
    store.write_netcdf(ds, args.out)
    ratios = dict(zip(ds["groups"].values.tolist(), ds["ratio_mean"].values.round(2), strict=True))
    log.info("variance ratio by g: %s", ratios)


def run_summary(args: argparse.Namespace) -> None:
    from batchscope import store

    spec = _common.spec(args, config_slice)
    ds = summarize(
        spec,
        args.base_runs,
        _by_ghost_size(args.ghost_runs),
        args.base_profile,
        {size: paths[0] for size, paths in _by_ghost_size(args.ghost_profiles).items()},
        args.variance,
        args.base_hessian,
        _by_ghost_size(args.ghost_hessian) if args.ghost_hessian else None,
    )
    ds.attrs.update(store.provenance("summarize_ghost", spec))
    store.write_netcdf(ds, args.out)
    log.info("\n%s", ds[["val_accuracy", "gap", "steps_to_target", "lambda_max", "step_time_over_bn"]].to_dataframe())


def _variance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True)


def _summary_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-runs", nargs="+", required=True, help="the workload's train_model directories")
    parser.add_argument("--ghost-runs", nargs="+", required=True, help="GHOST_SIZE=DIR for each ghost training dir")
    parser.add_argument("--base-profile", required=True, help="the workload's profile at the large batch")
    parser.add_argument("--ghost-profiles", nargs="+", required=True, help="GHOST_SIZE=FILE")
    parser.add_argument("--variance", required=True)
    parser.add_argument("--base-hessian", nargs="*", default=[])
    parser.add_argument("--ghost-hessian", nargs="*", default=[], help="GHOST_SIZE=DIR")


RULES = {
    "ghost_variance": Rule(version=1, config_slice=config_slice),
    "summarize_ghost": Rule(version=1, config_slice=config_slice, variables=("val_accuracy", "steps_to_target")),
}
COMMANDS = (
    Command(
        "ghost-variance",
        "Ghost BatchNorm: variance of ghost-batch means vs g",
        run_variance,
        _variance_arguments,
        spec=config_slice,
    ),  # fmt: skip
    Command(
        "ghost-summary",
        "Ghost BatchNorm: the variants side by side",
        run_summary,
        _summary_arguments,
        spec=config_slice,
    ),  # fmt: skip
)
