"""Figures and the summary for the study report.

The notebook ``workflow/notebooks/report.ipynb`` only calls these functions, so every figure can also be
drawn (and tested) without Jupyter. :func:`render` executes the notebook with papermill and converts it to a
self-contained HTML page (figures embedded, code hidden) with nbconvert.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr

from batchscope.stages._common import batch_interval
from batchscope.stages.quick import reference_job_seconds, stood_in
from batchscope.stages.recommend import LABELS, adaptive_lines, recommend_row, slowdown, unreached
from batchscope.store import atomic_write, job_seconds, read_netcdf


def load_fits(paths: Sequence[str | Path]) -> dict[str, xr.Dataset]:
    fits = {}
    for path in paths:
        ds = read_netcdf(path)
        fits[ds.attrs["workload"]] = ds
    return fits


def _log2_axis(ax, axis: str = "x") -> None:
    getattr(ax, f"set_{axis}scale")("log", base=2)


def _mark_b_opt(ax, ds: xr.Dataset) -> None:
    b = float(ds["b_opt"])
    if math.isfinite(b):
        ax.axvline(b, color="0.3", ls="--", lw=1, label=f"predicted b_opt = {b:.0f}")
        low, high = ds["b_opt_ci"].values
        if np.isfinite([low, high]).all():
            # drawn over the plotted sizes only (and b_opt): an interval that runs to billions (tau_d near zero in a
            # bootstrap resample) would otherwise stretch the axis and squeeze the curves into a corner
            sizes = ds["batch_size"].values
            edge_low, edge_high = min(sizes.min(), b) / 2, max(sizes.max(), b) * 2
            ax.axvspan(max(low, edge_low), min(high, edge_high), color="0.5", alpha=0.12, lw=0)


def plot_step_time(ds: xr.Dataset) -> plt.Figure:
    """T_iter(B) with the linear fit tau_f + tau_d B (on the trained grid) and the saturating one
    tau_f + tau_d max(B - b_knee, 0) (on every feasible profiled size), and both fits' relative residuals."""
    fig, (ax, res) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 1])
    b = ds["profile_batch_size"].values
    reps = ds["profile_t_iter_round"].to_dataframe().reset_index()  # one point per interleaved round
    reps["t_iter_ms"] = 1e3 * reps["profile_t_iter_round"]
    sns.stripplot(
        data=reps,
        x="profile_batch_size",
        y="t_iter_ms",
        native_scale=True,
        ax=ax,
        color="C0",
        alpha=0.35,
        size=3,
        jitter=False,
    )
    ax.plot(b, 1e3 * ds["profile_t_iter_median"].values, "o", color="C0", label="median over rounds (dots: rounds)")
    grid = np.geomspace(b.min(), b.max(), 200)
    tau_f, tau_d = float(ds["tau_f"]), float(ds["tau_d"])
    ax.plot(
        grid,
        1e3 * (tau_f + tau_d * grid),
        color="C1",
        label=f"linear tau_f + tau_d B, on the trained grid:\ntau_f = {1e3 * tau_f:.3g} ms, tau_d = "
        f"{1e6 * tau_d:.3g} us, R^2 = {float(ds['t_iter_r2']):.3f}",
    )
    sat = float(ds["sat_tau_f"]), float(ds["sat_tau_d"]), float(ds["sat_b_knee"])
    if np.isfinite(sat).all():
        ax.plot(grid, 1e3 * (sat[0] + sat[1] * np.maximum(grid - sat[2], 0)), color="C2", ls="--",
                label=f"saturating tau_f + tau_d max(B - b_knee, 0), on every feasible size:\ntau_f = "
                f"{1e3 * sat[0]:.3g} ms, tau_d = {1e6 * sat[1]:.3g} us, b_knee = {sat[2]:.0f}, R^2 = "
                f"{float(ds['t_iter_sat_r2']):.3f}")  # fmt: skip
    infeasible = b[~ds["profile_feasible"].values.astype(bool)]
    for i, x in enumerate(infeasible):
        ax.axvline(x, color="purple", lw=1, ls=":", label="out of memory" if i == 0 else None)
    _log2_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel("time per step (ms)")
    ax.legend(fontsize=7)
    rel = ds["profile_t_iter_median"].values / ds["t_iter_fitted"].values - 1
    res.axhline(0, color="0.5", lw=1)
    res.plot(b, 100 * rel, "o-", color="C1", label="linear")
    if np.isfinite(sat).all():
        rel_sat = ds["profile_t_iter_median"].values / ds["t_iter_sat_fitted"].values - 1
        res.plot(b, 100 * rel_sat, "s--", color="C2", mfc="none", label="saturating")
        res.legend(fontsize=7)
    res.set_ylabel("residual (%)")
    res.set_xlabel("batch size B")
    fig.suptitle(f"{ds.attrs['workload']}: step time T_iter(B) on {ds.attrs.get('device_name', '?')}")
    fig.tight_layout()
    return fig


def run_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per training run."""
    names = [
        "steps_to_target",
        "reached_target",
        "diverged",
        "out_of_memory",
        "time_to_target",
        "final_train_accuracy",
        "final_val_accuracy",
        "gap_accuracy",
        "gap_loss",
        "step_time_median",
    ]
    table = pd.DataFrame({name: ds[name].values for name in names})
    # the adaptive study's pruned runs (stopped at the best run's steps); a full grid's runs are never pruned
    table["pruned"] = ds["pruned"].values.astype(bool) if "pruned" in ds else False
    for key in ("batch_size", "lr", "seed"):
        table[key] = ds[f"run_{key}"].values
    return table


def _lr_rank_labels(runs: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """Each run's learning rate as its position in its batch size's lr grid (a grid scaled per B has different
    values at every B, but the positions line up): a label per run, and the labels from the smallest lr up."""
    rank = runs.groupby("batch_size")["lr"].rank(method="dense")
    n = int(rank.max()) if rank.notna().any() else 0

    def label(r: int) -> str:
        where = " (smallest)" if r == 1 and n > 1 else " (largest)" if r == n and n > 1 else ""
        return f"lr rank {r} of {n}{where}"

    return rank.map(lambda r: label(int(r)) if pd.notna(r) else "lr unknown"), [label(r) for r in range(1, n + 1)]


def plot_steps(ds: xr.Dataset) -> plt.Figure:
    """Steps to target per learning rate, K(B) (best lr), and the fit N_iter + C_var / B.

    Learning rates are coloured by their rank in their batch size's grid, not by value: with a grid scaled per B,
    one colour per value is a long legend of near-identical colours. The values are in :func:`run_table`."""
    runs = run_table(ds)
    metric = ds.attrs["target_metric"]
    cap = float(runs["steps_to_target"].max()) if runs["reached_target"].any() else 1.0
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    runs["lr_rank"], rank_order = _lr_rank_labels(runs)
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(rank_order)))  # 0.85: no pale yellow
    reached = runs[runs["reached_target"].astype(bool)]
    present = set(reached["lr_rank"])
    sns.lineplot(
        data=reached,
        x="batch_size",
        y="steps_to_target",
        hue="lr_rank",
        hue_order=[label for label in rank_order if label in present],
        palette=dict(zip(rank_order, map(tuple, colours), strict=True)),
        estimator="median",
        errorbar=("pi", 100),
        marker="o",
        ax=ax,
        legend="full",
        alpha=0.8,
    )
    # runs without a step count, drawn above the curves, one marker per reason
    failed = runs[~runs["reached_target"].astype(bool)]
    diverged, oom = failed["diverged"].astype(bool), failed["out_of_memory"].astype(bool)
    pruned = failed["pruned"].astype(bool) & ~diverged & ~oom
    for mask, marker, color, label in (
        (diverged, "x", "red", "diverged (NaN/inf or 100x loss)"),
        (oom, "v", "purple", "out of memory"),
        (pruned, "s", "0.5", "pruned: stopped at the best run's steps"),
        (~diverged & ~oom & ~pruned, "o", "0.5", "not reached in max_steps"),
    ):
        if mask.any():
            ax.plot(failed["batch_size"][mask], np.full(int(mask.sum()), cap * 1.3), marker, color=color,
                    mfc="none" if marker in "os" else color, label=label)  # fmt: skip
    b = ds["batch_size"].values
    ax.plot(b, ds["k"].values, "s", color="black", ms=7, mfc="none", label="K(B): best lr, median over seeds")
    grid = np.geomspace(b.min(), b.max(), 200)
    n_iter, c_var = float(ds["n_iter"]), float(ds["c_var"])
    ax.plot(
        grid,
        n_iter + c_var / grid,
        color="black",
        label=f"N_iter + C_var/B: N_iter = {n_iter:.0f}, B_crit = {float(ds['b_crit']):.0f}",
    )
    _log2_axis(ax)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel(f"steps to {metric} {ds.attrs['target_value']}")
    ax.legend(fontsize=7, title="learning rate: rank in its B's grid\n(the lr values per B: run table)",
              title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    ax.set_title(f"{ds.attrs['workload']}: steps to target K(B)")
    fig.tight_layout()
    return fig


def failures(fits: dict[str, xr.Dataset]) -> pd.DataFrame:
    """Every point that is a result rather than a number: profiled batch sizes out of memory, training runs
    that diverged or ran out of memory, and trained batch sizes without a K(B) (no learning rate's median seed
    reached the target: recommend.unreached). Empty when there were none. (The largest feasible batch size is a
    column of :func:`summary`.)"""
    rows = []
    for name, ds in fits.items():
        feasible = ds["profile_feasible"].values.astype(bool)
        for b in ds["profile_batch_size"].values[~feasible]:
            rows.append({"workload": name, "stage": "profile", "batch size": int(b), "lr": np.nan, "seed": np.nan,
                         "what": "out of memory"})  # fmt: skip
        runs = run_table(ds)
        for _, run in runs[runs["diverged"].astype(bool) | runs["out_of_memory"].astype(bool)].iterrows():
            rows.append({"workload": name, "stage": "train", "batch size": int(run["batch_size"]), "lr": run["lr"],
                         "seed": int(run["seed"]),
                         "what": "out of memory" if run["out_of_memory"] else "diverged"})  # fmt: skip
        for size in unreached(ds):
            rows.append({"workload": name, "stage": "train", "batch size": size["batch_size"], "lr": np.nan,
                         "seed": np.nan, "what": f"target not reached on any learning rate's median seed "
                         f"({size['runs_reached']} of {size['runs']} runs reached it)"})  # fmt: skip
    table = pd.DataFrame(rows, columns=["workload", "stage", "batch size", "lr", "seed", "what"])
    return table.astype({"seed": "Int64"})  # a seed is a whole number; rows without one (a batch size's) stay empty


def plot_total_time(ds: xr.Dataset) -> plt.Figure:
    """T(B) = K(B) T_iter(B) from the profile with its bootstrap interval, the runs' own clock, the fitted model,
    b_opt, and the batch sizes indistinguishable from the fastest."""
    fig, ax = plt.subplots(figsize=(9.0, 4.2))  # wider than the others: the legend sits right of the axes
    b = ds["batch_size"].values
    t = ds["time_from_profile"].values
    low, high = ds["time_from_profile_ci"].sel(bound="low").values, ds["time_from_profile_ci"].sel(bound="high").values
    ax.errorbar(b, t, yerr=[np.clip(t - low, 0, None), np.clip(high - t, 0, None)], fmt="o", color="C0", capsize=3,
                label="from the profile: K(B) x T_iter(B), 95% interval")  # fmt: skip
    ax.plot(b, ds["training_time_to_target"].values, "^", color="C2", alpha=0.7,
            label="measured in training (the runs' own clock over their training steps)")  # fmt: skip
    grid = np.geomspace(b.min(), b.max(), 200)
    pred = (float(ds["n_iter"]) + float(ds["c_var"]) / grid) * (float(ds["tau_f"]) + float(ds["tau_d"]) * grid)
    ax.plot(grid, pred, color="C1", label="from the fit: (N_iter + C_var/B)(tau_f + tau_d B)")
    _mark_b_opt(ax, ds)
    same = ds["indistinguishable"].values.astype(bool)
    if same.any():
        ax.plot(b[same], t[same], "o", ms=13, mfc="none", color="red", lw=0,
                label=f"as fast within {100 * ds.attrs.get('tolerance', 0):.0f}% (bootstrap)")  # fmt: skip
    best = int(ds["fastest_batch_size"])
    if best > 0:
        ax.plot([best], [float(ds["time_from_profile"].sel(batch_size=best))], "*", color="red", ms=14,
                label=f"recommended B = {best} (fastest from the profile)")  # fmt: skip
    _log2_axis(ax)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("time to target (s)")
    # outside the axes: inside, wherever it goes, it can cover measured points
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{ds.attrs['workload']}: total time T(B)")
    fig.tight_layout()
    return fig


def plot_curves(ds: xr.Dataset) -> plt.Figure:
    """Validation metric against step at each batch size's best learning rate, one line per seed."""
    keep = np.flatnonzero(ds["run_at_best_lr"].values)  # decided once, in the fit
    curves = ds["val_metric"].isel(run=keep).to_dataframe().reset_index().dropna(subset=["val_metric"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if len(curves):
        sns.lineplot(
            data=curves,
            x="step",
            y="val_metric",
            hue="run_batch_size",
            units="run",
            estimator=None,
            palette="rocket_r",
            hue_norm=matplotlib.colors.LogNorm(),
            ax=ax,
            lw=1,
        )
    ax.axhline(ds.attrs["target_value"], color="0.4", ls="--", lw=1, label="target")
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ds.attrs["target_metric"])
    ax.legend(title="B (best lr)", fontsize=7)
    ax.set_title(f"{ds.attrs['workload']}: validation curves")
    fig.tight_layout()
    return fig


def plot_gap(ds: xr.Dataset) -> plt.Figure:
    """Generalization gap (train minus validation accuracy, or val minus train loss) against B."""
    runs = run_table(ds)
    runs = runs[ds["run_at_best_lr"].values.astype(bool)]  # decided once, in the fit
    column = "gap_accuracy" if runs["gap_accuracy"].notna().any() else "gap_loss"
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    sns.pointplot(
        data=runs,
        x="batch_size",
        y=column,
        native_scale=True,
        errorbar=("pi", 100),
        ax=ax,
        color="C3",
        capsize=0.1,
    )
    _log2_axis(ax)
    ax.set_xlabel("batch size B (best lr)")
    ax.set_ylabel("train - val accuracy" if column == "gap_accuracy" else "val - train loss")
    ax.set_title(f"{ds.attrs['workload']}: generalization gap at the end of training")
    fig.tight_layout()
    return fig


def plot_sharpness(ds: xr.Dataset) -> plt.Figure:
    """lambda_max and trace against B at each batch size's best learning rate (median, range over seeds)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    b = ds["batch_size"].values
    for ax, name, label in zip(axes, ("lambda_max", "trace"), ("lambda_max (top eigenvalue)", "trace tr(H)"),
                               strict=True):  # fmt: skip
        table = ds[f"{name}_at_best_lr"]
        median, low, high = (table.sel(summary=s).values for s in ("median", "min", "max"))
        ax.fill_between(b, low, high, color="C4", alpha=0.2, lw=0, label="range over seeds")
        ax.plot(b, median, "o-", color="C4", label="median over seeds")
        _log2_axis(ax)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B (best lr)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{ds.attrs['workload']}: sharpness against batch size (Spearman rho(B, lambda_max) = "
        f"{float(ds['rho_batch_size_sharpness']):.2f})"
    )
    fig.tight_layout()
    return fig


def plot_density(ds: xr.Dataset) -> plt.Figure:
    """SLQ eigenvalue densities at the smallest and the largest batch size (best lr, every seed)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    sizes = ds["batch_size"].values
    for color, b in (("C0", sizes.min()), ("C3", sizes.max())):
        runs = np.flatnonzero((ds["run_batch_size"].values == b) & ds["at_best_lr"].values.astype(bool))
        for j, run in enumerate(runs):
            grid, density = ds["density_grid"].values[run], ds["density"].values[run]
            if np.isfinite(density).any():
                ax.plot(grid, np.maximum(density, 1e-12), color=color, lw=1, alpha=0.8,
                        label=f"B = {b}" if j == 0 else None)  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ, Gaussian-broadened)")
    ax.legend(fontsize=8)
    ax.set_title(f"{ds.attrs['workload']}: Hessian eigenvalue density, smallest vs largest batch")
    fig.tight_layout()
    return fig


def plot_sharpness_gap(ds: xr.Dataset) -> plt.Figure:
    """Generalization gap against lambda_max, one point per best-lr run, coloured by batch size."""
    best = ds["at_best_lr"].values.astype(bool)
    table = pd.DataFrame(
        {
            "lambda_max": ds["lambda_max"].values[best],
            "gap": ds["gap"].values[best],
            "batch size": ds["run_batch_size"].values[best],
        }  # fmt: skip
    )
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    sns.scatterplot(data=table, x="lambda_max", y="gap", hue="batch size", palette="rocket_r",
                    hue_norm=matplotlib.colors.LogNorm(), ax=ax)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("lambda_max")
    ax.set_ylabel(ds.attrs.get("gap_metric", "gap").replace("gap_accuracy", "train - val accuracy"))
    ax.set_title(
        f"{ds.attrs['workload']}: generalization gap vs sharpness (Spearman rho = {float(ds['rho_sharpness_gap']):.2f})"
    )
    fig.tight_layout()
    return fig


def plot_edge_of_stability(runs: Sequence[xr.Dataset]) -> plt.Figure:
    """lambda_max during full-batch gradient descent, one line per step size, with its limit 2/eta dashed."""
    fig, (ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, ds in enumerate(sorted(runs, key=lambda d: d.attrs["step_size"])):
        color = f"C{i}"
        eta = ds.attrs["step_size"]
        ax.plot(ds["step"], ds["lambda_max"], color=color, label=f"eta = {eta:g}")
        ax.axhline(float(ds["stability_limit"]), color=color, ls="--", lw=1)
        loss_ax.plot(ds["step"], ds["loss"], color=color, label=f"eta = {eta:g}")
    ax.set_xlabel("gradient descent step")
    ax.set_ylabel("lambda_max (dashed: 2 / eta)")
    ax.legend(fontsize=8)
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("gradient descent step")
    loss_ax.set_ylabel("full-batch squared loss")
    fig.suptitle("Edge of stability: sharpness under full-batch gradient descent")
    fig.tight_layout()
    return fig


def plot_ghost_variance(ds: xr.Dataset) -> plt.Figure:
    """Var(ghost-batch mean) / Var(batch mean) against g: measured on activations, y = g, and with the finite-
    population correction for batches drawn without replacement."""
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    g = ds["groups"].values
    se = np.sqrt((ds["variance_ratio_se"].values ** 2).mean(axis=1) / ds.sizes["channel"])
    ax.errorbar(g, ds["variance_ratio_mean"].values, yerr=2 * se, fmt="o", color="C0", capsize=3,
                label="measured (mean over channels, 2 SE)")  # fmt: skip
    ax.plot(g, g, color="0.4", ls="--", label="y = g (i.i.d. draws)")
    ax.plot(g, ds["variance_expected"].values, color="C1",
            label=f"g (N - m) / (N - B): without replacement, N = {ds.attrs.get('population', '?')}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ghost batches per physical batch, g = B / m")
    ax.set_ylabel("Var(ghost-batch mean) / Var(batch mean)")
    ax.legend(fontsize=7)
    ax.set_title(f"Ghost BatchNorm noise at B = {ds.attrs['batch_size']} (first normalization layer's input)")
    fig.tight_layout()
    return fig


def plot_ghost_variants(ds: xr.Dataset) -> plt.Figure:
    """Accuracy, gap, sharpness and step-time cost of each variant."""
    panels = [("val_accuracy", "validation accuracy"), ("gap", "train - val accuracy"),
              ("lambda_max", "lambda_max"), ("step_time_over_bn", "step time / BN at the same B")]  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
    names = [str(v) for v in ds["variant"].values]
    for ax, (name, label) in zip(axes, panels, strict=True):
        values = ds[name].values
        ax.bar(range(len(names)), np.nan_to_num(values), color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(label)
        finite = values[np.isfinite(values)]
        if name == "val_accuracy" and len(finite):
            ax.set_ylim(finite.min() - 0.02, min(1.0, finite.max() + 0.01))
    fig.suptitle(f"Ghost BatchNorm at B = {ds.attrs['batch_size']} against BatchNorm (each at its best lr)")
    fig.tight_layout()
    return fig


def ghost_table(ds: xr.Dataset) -> pd.DataFrame:
    columns = ["best_lr", "steps_to_target", "val_accuracy", "gap", "lambda_max", "step_time", "step_time_over_bn"]
    table = ds[columns].to_dataframe()[columns]
    table["step_time"] = 1e3 * table["step_time"]
    return table.rename(columns={"step_time": "step time (ms)"})


def load_noise(paths: Sequence[str | Path]) -> dict[str, dict[str, xr.Dataset]]:
    """{workload: {"snapshots": ..., "variance": ..., "jensen": ...}} plus {"linreg": {"jensen": ...}}, keyed by the
    files' own ``workload`` and ``experiment`` attributes (never by a file or folder name)."""
    out: dict[str, dict[str, xr.Dataset]] = {}
    for path in map(Path, paths):
        if path.is_dir():
            snapshots = [read_netcdf(f) for f in sorted(path.glob("snapshot*.nc"))]
            table = xr.concat([s.expand_dims(step=[s.attrs["step"]]) for s in snapshots], dim="step",
                              combine_attrs="drop_conflicts")  # fmt: skip
            # a run that stopped early maps several snapshot fractions to the same kept step: one row per step
            table = table.drop_duplicates("step", keep="first").sortby("step")
            variance = read_netcdf(path / "variance.nc")
            out.setdefault(variance.attrs["workload"], {}).update(snapshots=table, variance=variance)
        else:
            ds = read_netcdf(path)
            key = "linreg" if ds.attrs.get("experiment") == "linreg" else ds.attrs["workload"]
            out.setdefault(key, {})["jensen"] = ds
    return out


def load_branch(paths: Sequence[str | Path]) -> dict[str, xr.Dataset]:
    """The branched critical batch sizes, per workload (their own ``workload`` attribute) over the snapshot step."""
    by_workload: dict[str, list[xr.Dataset]] = {}
    for ds in map(read_netcdf, paths):
        by_workload.setdefault(ds.attrs["workload"], []).append(ds)
    return {name: xr.concat([d[["critical_batch_size", "critical_upper", "critical_ci"]]
                             .assign(smallest_branch=int(d["branch_batch_size"].min()))
                             .expand_dims(step=[d.attrs["step"]])
                             for d in parts], dim="step", combine_attrs="drop").sortby("step")
            for name, parts in by_workload.items()}  # fmt: skip


def _finish_critical(ax: plt.Axes, branch: xr.Dataset | None, fit: xr.Dataset | None, title: str) -> None:
    """What the two critical-batch figures share: the branched curve (where measured), the fit's B_crit, the axes."""
    if branch is not None:
        _draw_branch(ax, branch)
    if fit is not None:
        b_crit = float(fit["b_crit"])
        ax.axhline(b_crit, color="C3", lw=1, label=f"B_crit from the K(B) fit = {b_crit:.0f}")
    ax.set_yscale("log")
    ax.set_xlabel("step of the reference run")
    ax.set_ylabel("examples")
    ax.legend(fontsize=7)
    ax.set_title(title)


def at_the_smallest_branch(branch: xr.Dataset) -> np.ndarray:
    """Per snapshot: the critical batch size is the smallest branch's, whose loss nothing smaller was compared with,
    so the local critical batch size may lie below it (an upper bound, not a bracket)."""
    return branch["critical_batch_size"].values == branch["smallest_branch"].values


def _draw_branch(ax: plt.Axes, branch: xr.Dataset) -> None:
    """The branched local critical batch size per snapshot, a bar up to the next branch, its seeds' interval."""
    low = branch["critical_batch_size"].values.astype(float)
    high = np.where(branch["critical_upper"].values > 0, branch["critical_upper"].values, low)
    ax.errorbar(branch["step"].values, low, yerr=[np.zeros_like(low), high - low], fmt="D", color="C4",
                capsize=3, label="local critical B by branching, up to the next branch")  # fmt: skip
    below = at_the_smallest_branch(branch)
    if below.any():  # no smaller branch to compare with: the truth may lie below it
        ax.plot(branch["step"].values[below], low[below], "v", color="C4", ms=9,
                label="at the smallest branch: at most this")  # fmt: skip
    ci = branch["critical_ci"].values  # (step, bound); NaN with one seed
    if np.isfinite(ci).any():
        ax.vlines(branch["step"].values, ci[:, 0], ci[:, 1], color="C4", lw=6, alpha=0.25,
                  label="its 95% interval over the branch seeds")  # fmt: skip


def plot_noise_scale(snapshots: xr.Dataset, fit: xr.Dataset | None, name: str,
                     branch: xr.Dataset | None = None) -> plt.Figure:  # fmt: skip
    """B_simple and B_noise along the reference run, the branched local critical batch size with its bracket (when
    measured), against B_crit from the K(B) fit."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    steps = snapshots["step"].values
    ax.plot(steps, snapshots["b_simple"].values, "o-", label="B_simple, per-example gradients")
    ax.plot(steps, snapshots["two_batch_b_simple"].values, "s--", label="B_simple, two-batch estimator")
    if "two_batch_b_noise" in snapshots:
        ax.plot(steps, snapshots["two_batch_b_noise"].values, "^-", label="B_noise = tr(H Sigma) / G^T H G, two-batch")
    _finish_critical(ax, branch, fit, f"{name}: gradient noise scale along training "
                     f"({snapshots.attrs.get('reference', '')})")  # fmt: skip
    fig.tight_layout()
    return fig


_TWO_BATCH_ONLY = "per-example gradients are undefined with BatchNorm in train mode; two-batch estimator only"


def noise_table(snapshots: xr.Dataset, fit: xr.Dataset | None) -> pd.DataFrame:
    """One row per snapshot step: loss, B_simple (per example and two-batch), and B_crit from the K(B) fit.

    When the per-example values are all NaN (BatchNorm in train mode, see :mod:`batchscope.measure.noise`), their
    columns are left out, the B_crit / B_simple ratio uses the two-batch estimate, and a ``note`` column (and
    ``attrs["note"]``) says why."""
    table = pd.DataFrame({"step": snapshots["step"].values, "loss": snapshots["loss"].values,
                          "B_simple (per example)": snapshots["b_simple"].values,
                          "B_simple (two-batch)": snapshots["two_batch_b_simple"].values})  # fmt: skip
    if "two_batch_b_noise" in snapshots:
        table["B_noise (two-batch)"] = snapshots["two_batch_b_noise"].values
    # two snapshots at one step (a run that stopped early) are the same weights: keep one row
    table = table.drop_duplicates(subset="step", keep="first").sort_values("step").reset_index(drop=True)
    two_batch_only = len(table) > 0 and bool(table["B_simple (per example)"].isna().all())
    if two_batch_only:
        table = table.drop(columns="B_simple (per example)")
    if fit is not None:
        b_crit = float(fit["b_crit"])
        table["B_crit (K fit)"] = b_crit
        if two_batch_only:
            table["B_crit / B_simple (two-batch)"] = b_crit / table["B_simple (two-batch)"]
        else:
            table["B_crit / B_simple"] = b_crit / table["B_simple (per example)"]
    if two_batch_only:
        table["note"] = _TWO_BATCH_ONLY
        table.attrs["note"] = _TWO_BATCH_ONLY
    return table


def plot_variance_law(variance: xr.Dataset, name: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    b = variance["batch_size"].values
    n = variance.attrs["population"]
    ax.plot(b, variance["mean_sq_error"].values, "o", label="E|g_B - G|^2 (draws without replacement)")
    ax.plot(b, variance["mean_sq_error"].values * (n - 1) / (n - b), "s", mfc="none",
            label="divided by (N - B)/(N - 1)")  # fmt: skip
    if np.isfinite(variance["predicted"].values).all():
        ax.plot(b, variance["predicted"].values, color="0.4", lw=1, label="tr(Sigma)(N - B)/(B(N - 1))")
    low, high = variance["slope_ci"].values
    low_c, high_c = variance["slope_corrected_ci"].values
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("squared error of the minibatch gradient")
    ax.legend(fontsize=7)
    ax.set_title(
        f"{name}: variance law: slope {float(variance['slope']):.3f} [{low:.3f}, {high:.3f}], corrected "
        f"{float(variance['slope_corrected']):.3f} [{low_c:.3f}, {high_c:.3f}]",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_jensen(results: dict[str, xr.Dataset]) -> plt.Figure:
    """Relative bias tr(E[H_m^-1] H)/k - 1 against m: linear regression with its analytic curve, trained models."""
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (name, ds) in zip(axes[0], results.items(), strict=True):
        m = ds["m"].values
        ax.errorbar(m, ds["relative_bias"].values, yerr=2 * ds["relative_bias_se"].values, fmt="o", capsize=3,
                    label="Monte Carlo (2 SE)")  # fmt: skip
        if np.isfinite(ds["analytic"].values).any():
            grid = np.linspace(m.min(), m.max(), 200)
            p = ds.attrs["dim"]
            ax.plot(grid, (p + 1) / (grid - p - 1), color="C1", label="(p + 1)/(m - p - 1)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("minibatch size m")
        ax.set_ylabel("relative bias of E[H_m^-1]")
        ax.set_title("linear regression" if name == "linreg" else f"{name} (top-{ds.attrs.get('subspace_dim')} "
                     f"subspace, damping {ds.attrs.get('damping')})", fontsize=9)  # fmt: skip
        ax.legend(fontsize=7)
    fig.suptitle("Jensen: E[H_m^-1] overestimates H^-1, the more so the smaller the minibatch")
    fig.tight_layout()
    return fig


HESSIAN_FIGURES = {"sharpness": plot_sharpness, "density": plot_density, "sharpness_gap": plot_sharpness_gap}


FIGURES = {
    "step_time": plot_step_time,
    "steps_to_target": plot_steps,
    "total_time": plot_total_time,
    "curves": plot_curves,
    "generalization_gap": plot_gap,
}


def summary(fits: dict[str, xr.Dataset]) -> pd.DataFrame:
    """The recommendation table: one row per workload, the numbers of :func:`batchscope.stages.recommend.recommend_row`
    under the names ``recommend`` prints them with (:data:`batchscope.stages.recommend.LABELS`), then the fit."""
    rows = []
    for name, ds in fits.items():
        row = recommend_row(ds, name)
        b_low, b_high = row["b_opt_ci"]
        shown = {LABELS[key]: row[key] for key in LABELS if key not in ("indistinguishable", "config_hash")}
        shown[LABELS["workload"]] = name
        shown[LABELS["indistinguishable"]] = ", ".join(map(str, row["indistinguishable"]))
        rows.append(
            {
                **shown,
                "b_opt 95% interval": batch_interval(b_low, b_high),
                "data path": ds.attrs.get("data_path", "device")
                + (f", {ds.attrs['precision']}" if ds.attrs.get("precision", "fp32") != "fp32" else "")
                + (", compiled" if ds.attrs.get("compiled") else ""),
                "B_crit": float(ds["b_crit"]),
                "N_iter": float(ds["n_iter"]),
                "tau_f (ms)": 1e3 * float(ds["tau_f"]),
                "tau_d (us)": 1e6 * float(ds["tau_d"]),
                "R^2 T_iter": float(ds["t_iter_r2"]),
                "b_knee (saturating T_iter)": float(ds["sat_b_knee"]),
                "R^2 T_iter saturating": float(ds["t_iter_sat_r2"]),
                "R^2 K": float(ds["k_r2"]),
                LABELS["config_hash"]: row["config_hash"],
            }
        )
    return pd.DataFrame(rows)


def diagnostics(fits: dict[str, xr.Dataset], quick: dict[str, xr.Dataset] | None = None) -> pd.DataFrame:
    """Every warning of every fit (:func:`batchscope.stages.fit.diagnose`), the same lines ``recommend`` prints, then
    every quick estimate's (``recommend --quick``'s), marked as the quick estimate's."""
    quick = quick or {}
    rows = []
    for name in sorted(set(fits) | set(quick)):  # a workload's warnings together, the fit's first
        notes = recommend_row(fits[name])["diagnostics"] if name in fits else []
        if name in quick:
            notes += [f"the quick estimate: {note}" for note in json.loads(quick[name].attrs.get("diagnostics", "[]"))]
        rows += [{"workload": name, "warning": note} for note in notes]
    return pd.DataFrame(rows, columns=["workload", "warning"])


def recommendation(ds: xr.Dataset) -> str:
    """One paragraph: the recommended batch size, the ones as fast, b_opt, and the three times to target."""
    row = recommend_row(ds)
    low, high = row["b_opt_ci"]
    return (
        f"On {row['device']} ({row['device_name']}), for {row['workload']}: batch size {row['batch_size']} at "
        f"learning rate {row['learning_rate']:g} (K = {row['steps_to_target']:.0f} steps); as fast within "
        f"{100 * row['tolerance']:.0f}%: B = {', '.join(map(str, row['indistinguishable']))}. Predicted b_opt = "
        f"{row['predicted_b_opt']:.0f} (95% interval {batch_interval(low, high)}) with the linear step time, "
        f"{_saturating_sentence(row)}; {_memory_sentence(row)}. Time to target at B = "
        f"{row['batch_size']}: {row['time_from_profile_s']:.3g} s from the profile (K x T_iter; batch sizes are "
        f"ranked by this), {row['time_from_fit_s']:.3g} s from the fit, {row['training_time_to_target_s']:.3g} s "
        "measured in training (the runs' own clock over their training steps, evaluations excluded)."
        + "".join(f" {line[0].upper()}{line[1:]}." for line in adaptive_lines(row))
    )


def _saturating_sentence(row: dict) -> str:
    value = row["saturating_b_opt"]
    if math.isnan(value):
        return "none with the saturating step time (it needs 3 feasible profiled sizes)"
    low, high = row["saturating_b_opt_ci"]
    interval = f" (95% interval {batch_interval(low, high)})" if math.isfinite(low) else ""
    return f"{value:.0f}{interval} with the saturating one (flat up to a knee, then linear)"


def _memory_sentence(row: dict) -> str:
    largest, capped = row["largest_feasible_batch_size"], []
    for key, model in (("predicted_b_opt", "linear"), ("saturating_b_opt", "saturating")):
        if row[key] > largest:
            capped.append(model)
    where = (f"out of memory at B = {row['smallest_infeasible_batch_size']}" if row["memory_limit_seen"] else
             "no memory limit seen up to it")  # fmt: skip
    text = f"the largest feasible batch size is {largest} ({where})"
    if capped:
        text += f", so the {' and the '.join(capped)} b_opt {'is' if len(capped) == 1 else 'are'} capped at {largest}"
    return text


# The stages that analyse (rather than produce the answer): the budget is their share of the compute.
# measure_gradient_noise is not among them: its B_noise along the reference run is the quick estimate's input (and,
# in the adaptive study, what chooses the batch sizes to train), as the reference run is; its variance law, about
# a tenth of its time, is analysis.
ANALYSIS_RULES = (
    "analyze_hessian",
    "aggregate_hessian",
    "measure_jensen_bias",
    "measure_jensen_linreg",
    "edge_of_stability",
    "ghost_variance",
    "analyze_ghost_hessian",
    "train_ghost",
    "profile_ghost",
    "summarize_ghost",
)  # fmt: skip  (the Ghost BN experiment too)


def stage_costs(benchmarks: dict[str, Sequence[str | Path]]) -> pd.DataFrame:
    """Each stage's jobs, wall seconds and share of the study's job time, from Snakemake's benchmark files
    (``{rule: [files]}``; the ``s`` column is a job's wall-clock seconds). A missing file (a job run with
    --touch, or by hand) counts as unknown, not as zero."""
    rows = []
    for rule, paths in benchmarks.items():
        seconds = [job_seconds(p) for p in paths]
        rows.append({"stage": rule, "kind": "analysis" if rule in ANALYSIS_RULES else "answer",
                     "jobs": len(paths), "seconds": float(np.nansum(seconds)),
                     "unknown": int(np.isnan(seconds).sum())})  # fmt: skip
    table = pd.DataFrame(rows, columns=["stage", "kind", "jobs", "seconds", "unknown"])
    total = table["seconds"].sum()
    table["share"] = table["seconds"] / total if total > 0 else math.nan
    return table


def load_quick(paths: Sequence[str | Path]) -> dict[str, xr.Dataset]:
    """The quick estimates, keyed by their own ``workload`` attribute."""
    return {ds.attrs["workload"]: ds for ds in map(read_netcdf, paths)}


def answer_table(fits: dict[str, xr.Dataset], quick: dict[str, xr.Dataset], branch: dict[str, xr.Dataset] | None = None,
                 branch_cost: dict[str, float] | None = None) -> pd.DataFrame:  # fmt: skip
    """Per workload, the study's answer (the full grid's, or the adaptive study's with the sizes it trained), the
    quick estimate and the branched critical batch size (where measured) side by side, each with what it cost."""
    branch, branch_cost = branch or {}, branch_cost or {}
    rows = []
    for name in sorted(set(fits) | set(quick) | set(branch)):
        row: dict = {"workload": name}
        if name in fits:
            rec = recommend_row(fits[name])
            study = "adaptive" if rec["study"] == "adaptive" else "grid"
            row.update({f"{study}: recommended B": rec["batch_size"],
                        f"{study}: as fast": ", ".join(map(str, rec["indistinguishable"]))})  # fmt: skip
            if study == "adaptive":
                row["adaptive: trained B"] = ", ".join(map(str, rec["trained_batch_sizes"]))
            for end in ("smallest", "largest"):
                row[f"{study}: against the grid's {end} B"] = slowdown(rec, end)
            row.update({f"{study}: cost (device-s)": rec["cost_s"],
                        f"{study}: cost (training runs)": rec["cost_in_runs"]})  # fmt: skip
        if name in quick:
            q = quick[name]
            low, high = q["b_opt_band"].values
            row.update({"quick: b_opt": float(q["b_opt"]), "quick: B_crit": float(q["b_crit"]),
                        "quick: b_opt, saturating step time": float(q["b_opt_sat"]),
                        "quick: b_opt over the run": f"{low:.0f} to {high:.0f}",
                        "quick: where the fastest B has lain": _best_range(q),
                        "quick: nearest grid B": int(q["nearest_grid_batch_size"]),
                        "quick: cost (device-s)": float(q["total_cost_s"]),
                        "quick: cost (reference runs)": float(q["cost_in_reference_runs"])})  # fmt: skip
        if name in fits and name in quick:
            row[f"quick cost / {study} cost"] = row["quick: cost (device-s)"] / row[f"{study}: cost (device-s)"]
        if name in branch:
            sizes, below = branch[name]["critical_batch_size"].values, at_the_smallest_branch(branch[name])
            row["branching: local critical B over the run"] = ", ".join(
                f"<= {int(v)}" if at_most else str(int(v)) for v, at_most in zip(sizes, below, strict=True)
            )
            cost = branch_cost.get(name, math.nan)
            row["branching: cost (device-s)"] = cost
            if name in quick and math.isfinite(reference_job_seconds(quick[name])):
                row["branching: cost (reference runs)"] = cost / reference_job_seconds(quick[name])
        rows.append(row)
    return pd.DataFrame(rows)


def _best_range(quick: xr.Dataset) -> str:
    """The range around the quick b_opt where the full grid's fastest batch size lay on the budget benchmark's
    workloads (scaling.quick_best_range): the model's error, beside the interval's measurement noise."""
    from batchscope.core.scaling import quick_best_range

    low, high = quick_best_range(float(quick["b_opt"]), int(quick["largest_feasible_batch_size"]))
    return f"{low:.0f} to {high:.0f}" if math.isfinite(low) else "unknown"


def plot_critical_batch(quick: xr.Dataset, fit: xr.Dataset | None, name: str,
                        branch: xr.Dataset | None = None) -> plt.Figure:  # fmt: skip
    """The three answers' critical batch size along the reference run: the quick estimate's B_noise per snapshot (with
    B_simple where it stood in) and its b_crit, the branched local critical batch size with its bracket and interval
    (where measured), and B_crit from the K(B) fit of the trained grid."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    steps = quick["step"].values
    # what b_crit is made of: B_noise, with B_simple where it stood in (G^T H G <= 0: B_noise infinite), drawn open
    used = quick["b_noise_or_simple"].values
    ax.plot(steps, used, "^-", color="C2", label="B_noise along the reference run (quick)")
    swapped = stood_in(quick)
    if swapped.any():
        ax.plot(steps[swapped], used[swapped], "^", color="white", markeredgecolor="C2", ms=8, zorder=3,
                label="B_simple in its place, where G^T H G <= 0")  # fmt: skip
    ax.axhline(float(quick["b_crit"]), color="C2", ls="--", lw=1,
               label=f"the quick estimate's b_crit = {float(quick['b_crit']):.0f}")  # fmt: skip
    _finish_critical(ax, branch, fit, f"{name}: the critical batch size, three ways")
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, figures_dir: str | Path, name: str) -> Path:
    """Save ``fig`` as PNG (atomically) and close it; the report embeds the saved file."""
    path = atomic_write(Path(figures_dir) / f"{name}.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def provenance_table(fits: dict[str, xr.Dataset]) -> pd.DataFrame:
    keys = ["batchscope_version", "algorithm_version", "config_hash", "torch_version", "created", "host"]
    return pd.DataFrame(
        [
            {
                "workload": name,
                "device": ds.attrs.get("device_name", ""),
                **{k: ds.attrs.get(k, "") for k in keys},
            }
            for name, ds in fits.items()
        ]
    )


def load_hessian(paths: Sequence[str | Path]) -> dict[str, xr.Dataset]:
    return {ds.attrs["workload"]: ds for ds in map(read_netcdf, paths)}
