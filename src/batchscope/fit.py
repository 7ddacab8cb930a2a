"""The scaling model: T_iter(B) = tau_f + tau_d B, K(B) = N_iter + C_var / B, and T(B) = K(B) T_iter(B).

T(B) is minimised at b_opt = sqrt(C_var tau_f / (N_iter tau_d)). In McCandlish et al.'s notation
N_iter = S_min and C_var / N_iter = B_crit.

Both fits are linear in their parameters; they are solved as least squares on *relative* residuals
(each row divided by its observation), because K and T_iter span orders of magnitude across the grid and an
absolute fit would ignore the small-B end where tau_f and C_var are determined. Parameters are bounded to be
non-negative (scipy's ``lsq_linear``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from scipy.optimize import lsq_linear

from batchscope.io import netcdf_files, read_expected, same_provenance


@dataclass(frozen=True)
class LinearFit:
    intercept: float
    slope: float
    r2: float
    residuals: np.ndarray  # observed minus fitted, in the observation's units


def _relative_fit(features: np.ndarray, observed: np.ndarray) -> LinearFit:
    features, observed = np.asarray(features, float), np.asarray(observed, float)
    if len(observed) < 2:
        raise ValueError(f"need at least 2 points to fit a line, got {len(observed)}")
    design = np.column_stack([np.ones_like(features), features]) / observed[:, None]
    solution = lsq_linear(design, np.ones_like(observed), bounds=(0.0, np.inf)).x
    fitted = solution[0] + solution[1] * features
    ss_res = float(np.sum((observed - fitted) ** 2))
    ss_tot = float(np.sum((observed - observed.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return LinearFit(float(solution[0]), float(solution[1]), r2, observed - fitted)


def fit_step_time(batch_sizes: Sequence[float], t_iter: Sequence[float]) -> LinearFit:
    """T_iter(B) = tau_f + tau_d B: intercept is tau_f (s), slope tau_d (s per example)."""
    return _relative_fit(np.asarray(batch_sizes, float), np.asarray(t_iter, float))


def fit_steps(batch_sizes: Sequence[float], steps: Sequence[float]) -> LinearFit:
    """K(B) = N_iter + C_var / B: intercept is N_iter (steps), slope C_var (steps x examples)."""
    return _relative_fit(1.0 / np.asarray(batch_sizes, float), np.asarray(steps, float))


def b_opt(n_iter: float, c_var: float, tau_f: float, tau_d: float) -> float:
    """argmin over B of (N_iter + C_var/B)(tau_f + tau_d B); inf when either N_iter or tau_d is zero."""
    if n_iter <= 0 or tau_d <= 0:
        return math.inf
    return math.sqrt(c_var * tau_f / (n_iter * tau_d))


def predicted_time(b: np.ndarray | float, n_iter: float, c_var: float, tau_f: float, tau_d: float):
    b = np.asarray(b, float)
    return (n_iter + c_var / b) * (tau_f + tau_d * b)


def steps_per_batch_size(runs: pd.DataFrame) -> pd.DataFrame:
    """K(B): per batch size, the best learning rate's median steps-to-target over seeds.

    ``runs`` has columns batch_size, lr, seed, steps_to_target (NaN when censored or diverged). A censored
    run counts as infinitely many steps, so an lr whose median run never reached the target cannot win;
    a batch size where no lr's median reached it gets K = NaN and is left out of the fit.
    """
    steps = runs.assign(steps=runs["steps_to_target"].fillna(np.inf))
    per_lr = steps.groupby(["batch_size", "lr"])["steps"].median().reset_index()
    best = per_lr.loc[per_lr.groupby("batch_size")["steps"].idxmin()].set_index("batch_size")
    best.loc[~np.isfinite(best["steps"]), ["steps", "lr"]] = np.nan
    return best.rename(columns={"steps": "k", "lr": "best_lr"})[["k", "best_lr"]]


def bootstrap_steps(
    runs: pd.DataFrame, n_boot: int, rng: np.random.Generator, vectorised: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """K(B) for ``n_boot`` bootstrap replicates: seeds resampled with replacement in every (B, lr) cell.

    Returns (batch sizes, K of shape (n_boot, n_batch_sizes)). Vectorised over replicates on a
    (B, lr, seed) cube when every cell has the same number of seeds (what the workflow produces); cells of
    different sizes are resampled one by one (``vectorised=False`` forces that path).
    """
    steps = runs.assign(steps=runs["steps_to_target"].fillna(np.inf))
    batch_sizes = np.sort(steps["batch_size"].unique())
    cells = [group["steps"].to_numpy() for _, group in steps.groupby(["batch_size", "lr"])]
    lr_counts = steps.groupby("batch_size")["lr"].nunique().to_numpy()
    regular = len({len(c) for c in cells}) == 1 and len(set(lr_counts)) == 1
    if vectorised is None:
        vectorised = regular
    if vectorised and not regular:
        raise ValueError("vectorised bootstrap needs the same number of seeds in every (batch size, lr) cell")
    if vectorised:
        cube = np.stack(cells).reshape(len(batch_sizes), lr_counts[0], len(cells[0]))
        picks = rng.integers(0, cube.shape[-1], (n_boot, *cube.shape))
        resampled = np.take_along_axis(np.broadcast_to(cube, picks.shape), picks, axis=-1)
        k = np.median(resampled, axis=-1).min(axis=-1)
    else:
        k = np.empty((n_boot, len(batch_sizes)))
        for i in range(n_boot):
            parts = [g.iloc[rng.integers(0, len(g), len(g))] for _, g in runs.groupby(["batch_size", "lr"])]
            k[i] = steps_per_batch_size(pd.concat(parts))["k"].fillna(np.inf).to_numpy()
    k[~np.isfinite(k)] = np.nan
    return batch_sizes, k


# --------------------------------------------------------------------------------- reading the caches


PROFILE_VARIABLES = ("t_iter", "t_iter_median", "feasible", "peak_memory")
RUN_VARIABLES = ("steps_to_target", "reached_target", "diverged", "out_of_memory", "time_to_target", "val_metric")


def read_profiles(paths: Sequence[str | Path], expect: dict[str, str] | None = None) -> xr.Dataset:
    parts, datasets = [], []
    for path in paths:
        ds = read_expected(path, "profile_hardware", PROFILE_VARIABLES, expect)
        datasets.append(ds)
        parts.append(ds.expand_dims(profile_batch_size=[int(ds.attrs["batch_size"])]))
    same_provenance(datasets, list(paths), "profiles")
    merged = xr.concat(parts, dim="profile_batch_size", combine_attrs="drop_conflicts").sortby("profile_batch_size")
    return merged.rename({name: f"profile_{name}" for name in merged.data_vars})


def read_runs(paths: Sequence[str | Path], expect: dict[str, str] | None = None) -> xr.Dataset:
    """Concatenate training points along ``run``; ``paths`` may be point files or train_model directories."""
    parts, datasets = [], []
    files = netcdf_files(paths, "training results")
    for path in files:
        ds = read_expected(path, "train_model", RUN_VARIABLES, expect)
        datasets.append(ds)
        run = xr.Dataset(coords={f"run_{k}": ("run", [ds.attrs[k]]) for k in ("batch_size", "lr", "seed")})
        parts.append(ds.expand_dims("run").assign_coords(run.coords))
    same_provenance(datasets, files, "training results")
    merged = xr.concat(parts, dim="run", join="outer", combine_attrs="drop_conflicts")
    order = np.lexsort((merged["run_seed"].values, merged["run_lr"].values, merged["run_batch_size"].values))
    return merged.isel(run=order).assign_coords(run=np.arange(merged.sizes["run"]))


# -------------------------------------------------------------------------------------- the fit stage


def fit_scaling(profile_paths: Sequence, train_paths: Sequence, spec: dict[str, Any], workload: str,
                expect: dict[str, str] | None = None) -> xr.Dataset:  # fmt: skip
    """Aggregate a workload's profile and training caches and fit the scaling model.

    ``spec`` is :func:`batchscope.config.fit_slice`. The result holds the aggregated inputs (dims
    ``profile_batch_size``, ``run``, ``step``), K(B) and T(B) on the grid (dim ``batch_size``), the fitted
    parameters with bootstrap intervals (dim ``bootstrap``), and the recommendation. ``expect`` maps
    ``profile_hardware`` and ``train_model`` to the config hashes the inputs must carry.
    """
    profiles = read_profiles(profile_paths, expect)
    runs = read_runs(train_paths, expect)
    table = pd.DataFrame(
        {k: runs[f"run_{k}"].values for k in ("batch_size", "lr", "seed")}
        | {"steps_to_target": runs["steps_to_target"].values}
    )
    feasible = profiles["profile_feasible"].values.astype(bool) & np.isfinite(profiles["profile_t_iter_median"])
    prof_b = profiles["profile_batch_size"].values[feasible]
    prof_t = profiles["profile_t_iter_median"].values[feasible]
    timing = fit_step_time(prof_b, prof_t)
    tau_f, tau_d = timing.intercept, timing.slope

    k_table = steps_per_batch_size(table)
    grid_b = k_table.index.values.astype(int)
    t_iter_at = dict(zip(profiles["profile_batch_size"].values, profiles["profile_t_iter_median"].values, strict=True))
    t_iter_grid = np.array([t_iter_at.get(b, np.nan) for b in grid_b])
    ok = np.isfinite(k_table["k"].values)
    if ok.sum() < 2:
        raise ValueError(
            f"workload {workload!r}: the target was reached at {ok.sum()} batch size(s); K(B) needs at "
            "least 2. Lower the target or raise max_steps."
        )
    steps_fit = fit_steps(grid_b[ok], k_table["k"].values[ok])
    n_iter, c_var = steps_fit.intercept, steps_fit.slope
    best_b_pred = b_opt(n_iter, c_var, tau_f, tau_d)

    # bootstrap: seeds within each (B, lr) cell, and profile repeats within each B
    rng = np.random.default_rng(spec["fit"]["seed"])
    n_boot = spec["fit"]["bootstrap"]
    boot = {k: np.full(n_boot, np.nan) for k in ("n_iter", "c_var", "tau_f", "tau_d", "b_opt")}
    boot_b, boot_k = bootstrap_steps(table, n_boot, rng)
    reps = profiles["profile_t_iter"].values[feasible]
    picks = rng.integers(0, reps.shape[1], (n_boot, *reps.shape))
    boot_t = np.nanmedian(np.take_along_axis(np.broadcast_to(reps, picks.shape), picks, axis=-1), axis=-1)
    for i in range(n_boot):
        good = np.isfinite(boot_k[i])
        if good.sum() < 2:
            continue
        f = fit_steps(boot_b[good], boot_k[i][good])
        t = fit_step_time(prof_b, boot_t[i])
        values = (
            f.intercept,
            f.slope,
            t.intercept,
            t.slope,
            b_opt(f.intercept, f.slope, t.intercept, t.slope),
        )
        for key, value in zip(boot, values, strict=True):
            boot[key][i] = value

    t_empirical = k_table["k"].values * t_iter_grid
    measured_best = int(grid_b[np.nanargmin(t_empirical)]) if np.isfinite(t_empirical).any() else -1
    measured_time = _measured_time_to_target(runs, k_table)

    out = xr.Dataset(
        {
            "k": (
                "batch_size",
                k_table["k"].values,
                {"units": "steps", "long_name": "K(B), best lr's median"},
            ),
            "best_lr": ("batch_size", k_table["best_lr"].values, {"long_name": "learning rate minimising K"}),
            "k_fitted": ("batch_size", n_iter + c_var / grid_b, {"units": "steps"}),
            "t_iter": ("batch_size", t_iter_grid, {"units": "s", "long_name": "profiled median step time"}),
            "t_empirical": ("batch_size", t_empirical, {"units": "s", "long_name": "K(B) x T_iter(B)"}),
            "t_predicted": (
                "batch_size",
                predicted_time(grid_b, n_iter, c_var, tau_f, tau_d),
                {"units": "s", "long_name": "(N_iter + C_var/B)(tau_f + tau_d B)"},
            ),
            "time_to_target_measured": (
                "batch_size",
                measured_time,
                {"units": "s", "long_name": "median training time to target at the best lr (from the runs)"},
            ),
            "t_iter_fitted": (
                "profile_batch_size",
                tau_f + tau_d * profiles["profile_batch_size"].values,
                {"units": "s"},
            ),
            "n_iter": ((), n_iter, {"units": "steps", "long_name": "N_iter = S_min"}),
            "c_var": ((), c_var, {"units": "steps*examples"}),
            "b_crit": ((), c_var / n_iter if n_iter > 0 else math.inf, {"units": "examples"}),
            "k_r2": ((), steps_fit.r2),
            "tau_f": ((), tau_f, {"units": "s"}),
            "tau_d": ((), tau_d, {"units": "s/example"}),
            "t_iter_r2": ((), timing.r2),
            "b_opt": ((), best_b_pred, {"units": "examples", "long_name": "predicted optimal batch size"}),
            "t_at_b_opt": (
                (),
                float(predicted_time(best_b_pred, n_iter, c_var, tau_f, tau_d)),
                {"units": "s"},
            ),
            "measured_best_batch_size": ((), measured_best, {"long_name": "grid argmin of K(B) T_iter(B)"}),
            **{f"boot_{k}": ("bootstrap", v) for k, v in boot.items()},
        },
        coords={"batch_size": grid_b, "bootstrap": np.arange(n_boot)},
    )
    for key in ("n_iter", "c_var", "tau_f", "tau_d", "b_opt"):
        samples = boot[key][np.isfinite(boot[key])]
        low, high = np.quantile(samples, [0.025, 0.975]) if len(samples) else (math.nan, math.nan)
        out[f"{key}_ci"] = ("bound", [low, high], {"long_name": "95% bootstrap percentile interval"})
    out = out.assign_coords(bound=["low", "high"])
    feasible_sizes = profiles["profile_batch_size"].values[profiles["profile_feasible"].values.astype(bool)]
    out["largest_feasible_batch_size"] = ((), int(feasible_sizes.max()) if len(feasible_sizes) else -1, {
        "long_name": "largest profiled batch size that did not run out of memory (-1: none)"})  # fmt: skip
    merged = xr.merge([out, profiles, runs], combine_attrs="drop_conflicts")
    merged.attrs.update(
        workload=workload,
        device_name=profiles.attrs.get("device_name", ""),
        device_type=profiles.attrs.get("device_type", ""),
        target_metric=spec["target"]["metric"],
        target_value=spec["target"]["value"],
        # how batches reached the step (device-resident tensors or a DataLoader) and in what precision: both
        # change tau_f and tau_d, so the report says which applied
        data_path=profiles.attrs.get("data_path", "device"),
        precision=profiles.attrs.get("precision", "fp32"),
        compiled=int(profiles.attrs.get("compiled", 0)),
        metric_name=runs.attrs.get("metric_name", ""),
    )
    return merged


def _measured_time_to_target(runs: xr.Dataset, k_table: pd.DataFrame) -> np.ndarray:
    result = []
    for b, best_lr in zip(k_table.index.values, k_table["best_lr"].values, strict=True):
        mask = (runs["run_batch_size"].values == b) & (runs["run_lr"].values == best_lr)
        times = runs["time_to_target"].values[mask]
        result.append(float(np.median(times)) if mask.any() and np.isfinite(times).all() else math.nan)
    return np.asarray(result)
