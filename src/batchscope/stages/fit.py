"""Stage ``fit_scaling``: read a workload's profiles and runs, fit the scaling model (:mod:`batchscope.core.scaling`)
with bootstrap intervals, decide each batch size's best learning rate once, and say what makes the answer unsure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from batchscope import config as cfg
from batchscope.core import scaling, selection
from batchscope.stages import Command, Rule, _common, adaptive, profile, train

log = logging.getLogger("batchscope")


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """The fit's settings, and what identifies its inputs (their config hashes and the grid): a fit's config hash
    then names the whole study of its workload, which is how ``recommend`` and the report tell a current fit
    from one of another config."""
    wl = config["workloads"][workload]
    spec = {
        "fit": config["fit"],
        "target": wl["target"],
        "inputs": {
            "profile_hardware": cfg.config_hash(profile.config_slice(config, workload)),
            "train_model": cfg.config_hash(train.config_slice(config, workload)),
            "batch_sizes": sorted(config["grid"]["batch_sizes"]),
            "profile_batch_sizes": cfg.profile_batch_sizes(config),
            "seeds": sorted(config["grid"]["seeds"]),
            "learning_rates": {str(b): cfg.learning_rates(wl, b) for b in sorted(config["grid"]["batch_sizes"])},
        },
    }
    if config["study"] == "adaptive":  # which sizes were trained, and how, follows from the choice's inputs
        spec["study"] = "adaptive"
        spec["inputs"]["choose_batch_sizes"] = cfg.config_hash(adaptive.config_slice(config, workload))
        spec["inputs"]["reference_lr_index"] = config["noise"]["reference_lr_index"]  # the lr order
        spec["extend"] = config["adaptive"]["extend"]  # whether a size past the bracket may be trained
        spec["halving_rate"] = config["adaptive"]["halving_rate"]  # which learning rates the later seeds trained
    return spec


# --------------------------------------------------------------------------------- reading the caches


# -------------------------------------------------------------------------------------- the fit stage

# Thresholds of the diagnostics (:func:`diagnose`): below them a fit, or the answer, is flagged with what to change.
R2_MIN_T_ITER = 0.9  # a linear T_iter(B) explains at least 90% of the step times' variance
R2_MIN_K = 0.8  # K(B) is noisier (seeds, the evaluation interval's resolution)
RESIDUAL_MAX = 0.25  # no grid point more than 25% off either fitted curve
ROUND_SPREAD_MAX = 0.10  # the profiling rounds' medians agree within 10% (relative IQR) at every batch size
MODELS_RATIO_MAX = scaling.MODELS_RATIO_MAX


def fit_scaling(profile_paths: Sequence, train_paths: Sequence, spec: dict[str, Any], workload: str,
                expect: dict[str, str] | None = None) -> xr.Dataset:  # fmt: skip
    """Aggregate a workload's profile and training caches and fit the scaling model.

    ``spec`` is :func:`config_slice`. The result holds the aggregated inputs (dims
    ``profile_batch_size``, ``run``, ``step``), K(B) and T(B) on the grid (dim ``batch_size``), the fitted
    parameters with bootstrap intervals (dim ``bootstrap``), the recommendation with the batch sizes that are
    indistinguishable from the fastest, and diagnostics. ``expect`` maps ``profile_hardware`` and
    ``train_model`` to the config hashes the inputs must carry.

    The linear T_iter is fitted on the trained grid only: the extra profiled sizes (up to the memory limit) would
    let sizes nobody trains set tau_f and tau_d. They serve the largest feasible batch size, and the saturating
    step time (:func:`batchscope.core.scaling.fit_saturating_step_time`), which is fitted on every feasible
    profiled size: its knee is what the extra sizes are there to find. Both models' b_opt (with the same K fit)
    are stored, raw and capped at the largest feasible batch size.
    """
    profiles = profile.read_profiles(profile_paths, expect)
    runs = train.read_runs(train_paths, expect)
    table = runs_table(runs, spec)
    k_table = scaling.steps_per_batch_size(table)
    grid_b = k_table.index.values.astype(int)
    missing = sorted(set(grid_b) - set(profiles["profile_batch_size"].values.tolist()))
    if missing:
        raise ValueError(f"workload {workload!r}: trained batch size {missing[0]} was not profiled")
    on_grid = profiles.sel(profile_batch_size=grid_b)
    t_iter_grid = on_grid["profile_t_iter_median"].values
    t_round = on_grid["profile_t_iter_round"].values  # (grid size, round)
    timed = on_grid["profile_feasible"].values.astype(bool) & np.isfinite(t_iter_grid)
    if timed.sum() < 2:
        raise ValueError(f"workload {workload!r}: {timed.sum()} trained batch size(s) could be timed; T_iter(B) "
                         "needs at least 2 (out of memory? see the profile)")  # fmt: skip
    timing = scaling.fit_step_time(grid_b[timed], t_iter_grid[timed])
    tau_f, tau_d = timing.intercept, timing.slope
    ok = np.isfinite(k_table["k"].values)
    if ok.sum() < 2:
        # what the runs that fell short did: advice for runs that ran out of steps is no help for runs that diverged
        short = ~np.isfinite(runs["steps_to_target"].values)
        diverged = runs["diverged"].values.astype(bool) & short if "diverged" in runs else np.zeros_like(short)
        advice = (f"{int(diverged.sum())} of the {int(short.sum())} runs short of it diverged: lower the learning "
                  "rates, or check the data for NaN or infinite values" if diverged.sum() > short.sum() / 2
                  else "Lower the target or raise max_steps")  # fmt: skip
        raise ValueError(
            f"workload {workload!r}: the target was reached at {ok.sum()} batch size(s); K(B) needs at least 2. "
            f"{advice}."
        )
    steps_fit = scaling.fit_steps(grid_b[ok], k_table["k"].values[ok])
    n_iter, c_var = steps_fit.intercept, steps_fit.slope
    best_b_pred = scaling.b_opt(n_iter, c_var, tau_f, tau_d)
    time_from_profile = k_table["k"].values * t_iter_grid

    # the saturating step time, on every profiled size that fitted in memory (grid and extra sizes)
    sizes = profiles["profile_batch_size"].values
    feasible = profiles["profile_feasible"].values.astype(bool)
    t_iter_all = profiles["profile_t_iter_median"].values
    usable = feasible & np.isfinite(t_iter_all)
    saturating = scaling.fit_saturating_if_possible(sizes[usable], t_iter_all[usable])
    sat = (saturating.tau_f, saturating.tau_d, saturating.b_knee) if saturating else (math.nan,) * 3
    b_opt_sat = scaling.b_opt_saturating(n_iter, c_var, *sat) if saturating else math.nan
    largest_feasible = int(sizes[feasible].max()) if feasible.any() else -1
    smallest_infeasible = int(sizes[~feasible].min()) if (~feasible).any() else -1

    # bootstrap: seeds within each (B, lr) cell for K, profiling rounds (the same rounds at every B) for T_iter
    rng = np.random.default_rng(spec["fit"]["seed"])
    n_boot = spec["fit"]["bootstrap"]
    boot = {k: np.full(n_boot, np.nan) for k in ("n_iter", "c_var", "tau_f", "tau_d", "b_opt", "sat_tau_f",
                                                  "sat_tau_d", "sat_b_knee", "b_opt_sat")}  # fmt: skip
    _, boot_k = scaling.bootstrap_steps(table, n_boot, rng)
    # every profiled size's rounds, resampled (paired: the same rounds at every size, grid and extra sizes alike)
    boot_t_all = scaling.round_bootstrap(profiles["profile_t_iter_round"].values, n_boot, rng,
                                         bool(profiles.attrs.get("paired_rounds", 0)))  # fmt: skip
    boot_t = boot_t_all[:, np.searchsorted(sizes, grid_b)]
    for i in range(n_boot):
        good = np.isfinite(boot_k[i])
        if good.sum() < 2:
            continue
        f = scaling.fit_steps(grid_b[good], boot_k[i][good])
        t = scaling.fit_step_time(grid_b[timed], boot_t[i][timed])
        values = (f.intercept, f.slope, t.intercept, t.slope, scaling.b_opt(f.intercept, f.slope, t.intercept, t.slope))
        if saturating and np.isfinite(boot_t_all[i][usable]).all():
            s = scaling.fit_saturating_step_time(sizes[usable], boot_t_all[i][usable])
            values += (s.tau_f, s.tau_d, s.b_knee, scaling.b_opt_saturating(f.intercept, f.slope, s.tau_f, s.tau_d,
                                                                             s.b_knee))  # fmt: skip
        else:
            values += (math.nan,) * 4
        for key, value in zip(boot, values, strict=True):
            boot[key][i] = value
    # (n_boot, grid): T(B) = K(B) T_iter(B) in each resample; a resample where no lr's median reached the
    # target at B takes infinitely long there (it must widen B's interval, not drop out of it)
    boot_time = np.where(np.isnan(boot_k), np.inf, boot_k) * boot_t
    fastest, candidates, p_fastest = scaling.fastest(grid_b, time_from_profile, boot_time, spec["fit"]["tolerance"])

    out = xr.Dataset(
        {
            "k": ("batch_size", k_table["k"].values, {"units": "steps", "long_name": "K(B), best lr's median"}),
            "best_lr": ("batch_size", k_table["best_lr"].values, {"long_name": "learning rate minimising K"}),
            "k_fitted": ("batch_size", n_iter + c_var / grid_b, {"units": "steps"}),
            "t_iter": ("batch_size", t_iter_grid, {"units": "s", "long_name": "profiled median step time"}),
            "time_from_profile": ("batch_size", time_from_profile, {"units": "s", "long_name":
                                  "time to target from the profile: K(B) x profiled T_iter(B)"}),
            "time_from_profile_ci": (("batch_size", "bound"), scaling.interval(boot_time), {"units": "s",
                                     "long_name": "95% bootstrap interval (seeds and profiling rounds)"}),
            "time_from_fit": ("batch_size", scaling.predicted_time(grid_b, n_iter, c_var, tau_f, tau_d), {"units": "s",
                              "long_name": "time to target from the fit: (N_iter + C_var/B)(tau_f + tau_d B)"}),
            "training_time_to_target": ("batch_size", _training_time_to_target(runs, k_table), {"units": "s",
                                        "long_name": "measured: the runs' own clock to the target, median over "
                                        "seeds at the best lr (training steps only, evaluations excluded)"}),
            "indistinguishable": ("batch_size", candidates, {"long_name": "time to target within fit.tolerance of "
                                  "the fastest in at least 5% of the bootstrap resamples"}),
            "p_fastest": ("batch_size", p_fastest, {"long_name": "share of bootstrap resamples in which this batch "
                          "size is the fastest"}),
            "t_iter_fitted": ("profile_batch_size", tau_f + tau_d * profiles["profile_batch_size"].values,
                              {"units": "s"}),
            "t_iter_round_spread": ("batch_size", scaling.relative_iqr(t_round), {"long_name": "relative interquartile "
                                    "range of the rounds' medians, each round's common level divided out"}),
            "n_iter": ((), n_iter, {"units": "steps", "long_name": "N_iter = S_min"}),
            "c_var": ((), c_var, {"units": "steps*examples"}),
            "b_crit": ((), c_var / n_iter if n_iter > 0 else math.inf, {"units": "examples"}),
            "k_r2": ((), steps_fit.r2),
            "k_residual_max": ((), scaling.max_relative(steps_fit.residuals, k_table["k"].values[ok]),
                               {"long_name": "largest |K - fit| / K on the grid"}),
            "tau_f": ((), tau_f, {"units": "s"}),
            "tau_d": ((), tau_d, {"units": "s/example"}),
            "t_iter_r2": ((), timing.r2),
            "t_iter_residual_max": ((), scaling.max_relative(timing.residuals, t_iter_grid[timed]),
                                    {"long_name": "largest |T_iter - fit| / T_iter on the trained grid"}),
            "b_opt": ((), best_b_pred, {"units": "examples", "long_name": "predicted optimal batch size"}),
            "time_from_fit_at_b_opt": ((), float(scaling.predicted_time(best_b_pred, n_iter, c_var, tau_f, tau_d)),
                                       {"units": "s"}),
            "sat_tau_f": ((), sat[0], {"units": "s", "long_name": "saturating T_iter: the step time below the knee"}),
            "sat_tau_d": ((), sat[1], {"units": "s/example", "long_name": "saturating T_iter: the cost per example "
                          "above the knee"}),
            "sat_b_knee": ((), sat[2], {"units": "examples", "long_name": "saturating T_iter: the knee, where the "
                           "step time starts to rise"}),
            "t_iter_sat_fitted": ("profile_batch_size", scaling.saturating_step_time(sizes, *sat), {"units": "s",
                                  "long_name": "tau_f + tau_d max(B - b_knee, 0) (saturating T_iter)"}),
            "t_iter_sat_r2": ((), saturating.r2 if saturating else math.nan, {"long_name": "R^2 of the saturating "
                              "T_iter on every feasible profiled size"}),
            "t_iter_sat_residual_max": ((), scaling.max_relative(saturating.residuals, t_iter_all[usable])
                                        if saturating else math.nan, {"long_name": "largest |T_iter - fit| / T_iter "
                                        "of the saturating T_iter on every feasible profiled size"}),
            "b_opt_sat": ((), b_opt_sat, {"units": "examples", "long_name": "predicted optimal batch size with the "
                          "saturating T_iter: argmin of (N_iter + C_var/B) T_sat(B)"}),
            "b_opt_capped": ((), _capped(best_b_pred, largest_feasible), {"units": "examples", "long_name":
                             "b_opt, at most the largest feasible batch size"}),
            "b_opt_sat_capped": ((), _capped(b_opt_sat, largest_feasible), {"units": "examples", "long_name":
                                 "b_opt_sat, at most the largest feasible batch size"}),
            "largest_feasible_batch_size": ((), largest_feasible, {"long_name": "largest profiled batch size that "
                                            "did not run out of memory (-1: none)"}),
            "smallest_infeasible_batch_size": ((), smallest_infeasible, {"long_name": "smallest profiled batch size "
                                               "that ran out of memory (-1: none did: no memory limit seen)"}),
            "fastest_batch_size": ((), fastest, {"long_name": "grid argmin of the time to target from the profile "
                                   "(-1: none reached the target)"}),
            **{f"boot_{k}": ("bootstrap", v) for k, v in boot.items()},
        },
        coords={"batch_size": grid_b, "bootstrap": np.arange(n_boot), "bound": ["low", "high"]},
    )  # fmt: skip
    for key in boot:
        out[f"{key}_ci"] = ("bound", scaling.interval(boot[key][:, None])[0], {"long_name": "95% bootstrap interval"})
    # which runs used their batch size's best learning rate: decided here once, read by every later stage
    best_at = dict(zip(grid_b, k_table["best_lr"].values, strict=True))
    runs["run_at_best_lr"] = ("run", np.array([best_at.get(b) == lr for b, lr in zip(
        runs["run_batch_size"].values, runs["run_lr"].values, strict=True)]), {"long_name":
        "the run used its batch size's best learning rate (best_lr)"})  # fmt: skip
    merged = xr.merge([out, profiles, runs], combine_attrs="drop_conflicts")
    merged.attrs.update(
        workload=workload,
        # the adaptive study trained a bracket of the grid (this file's batch_size) around the quick b_opt
        study=spec.get("study", "full"),
        grid_batch_sizes=json.dumps(sorted(spec.get("inputs", {}).get("batch_sizes", grid_b.tolist()))),
        stop_at_target=int(runs.attrs.get("stop_at_target", 0)),
        device_name=profiles.attrs.get("device_name", ""),
        device_type=profiles.attrs.get("device_type", ""),
        target_metric=spec["target"]["metric"],
        target_value=spec["target"]["value"],
        tolerance=spec["fit"]["tolerance"],
        # how batches reached the step (device-resident tensors or a DataLoader) and in what precision: both
        # change tau_f and tau_d, so the report says which applied
        data_path=profiles.attrs.get("data_path", "device"),
        precision=profiles.attrs.get("precision", "fp32"),
        compiled=int(profiles.attrs.get("compiled", 0)),
        metric_name=runs.attrs.get("metric_name", ""),
    )
    merged.attrs["diagnostics"] = json.dumps(diagnose(merged))
    return merged


FIT_B_OPTS = ("b_opt", "b_opt_sat")  # each step-time model's b_opt in a fit's file, in selection.MODELS' order


def extension_of_fit(fit_ds: xr.Dataset, feasible_grid: Sequence[int]) -> tuple[int | None, str]:
    """:func:`~batchscope.core.selection.extension` on a fit's file (:func:`fit_scaling`): its trained sizes, fastest,
    indistinguishable ones, both models' b_opt and which sizes reached the target. The second round reads the fit
    on the bracket; the fit's diagnostics, the final fit of the adaptive study."""
    b_opts = [float(fit_ds[name]) if name in fit_ds else math.nan for name in FIT_B_OPTS]
    return selection.extension(fit_ds["batch_size"].values, int(fit_ds["fastest_batch_size"]),
                               fit_ds["indistinguishable"].values, feasible_grid, b_opts,
                               np.isfinite(fit_ds["k"].values))  # fmt: skip


def runs_table(runs: xr.Dataset, spec: dict[str, Any]) -> pd.DataFrame:
    """The runs (:func:`train.read_runs`) that K(B) is taken from (:func:`scaling.steps_per_batch_size`), one row
    each: in the adaptive study, successive halving's survivors (:func:`halving_survivors`)."""
    table = pd.DataFrame(
        {k: runs[f"run_{k}"].values for k in ("batch_size", "lr", "seed")}
        | {"steps_to_target": runs["steps_to_target"].values}
    )
    return halving_survivors(table) if spec.get("study") == "adaptive" else table


def halving_survivors(table: pd.DataFrame) -> pd.DataFrame:
    """The adaptive study's runs that K(B) is taken from: at each batch size, the learning rates trained at every
    seed (successive halving's last round). The others ran at fewer seeds; their runs against the survivors' median
    over every seed would favour them by the luck of fewer seeds. Where every learning rate has
    the same seeds (none was halved away) nothing is dropped."""
    seeds = table.groupby(["batch_size", "lr"])["seed"].transform("nunique")
    return table[seeds == seeds.groupby(table["batch_size"]).transform("max")]


def _capped(b_opt: float, largest_feasible: int) -> float:
    """b_opt, at most the largest batch size known to fit in memory (NaN stays NaN)."""
    return min(b_opt, float(largest_feasible)) if largest_feasible > 0 and not math.isnan(b_opt) else b_opt


def diagnose(ds: xr.Dataset) -> list[str]:
    """What makes the answer unsure, each with what to change in the config. Empty when nothing does."""
    notes = []
    b = ds["batch_size"].values
    lowest, highest = int(b.min()), int(b.max())
    r2, worst = float(ds["t_iter_r2"]), float(ds["t_iter_residual_max"])
    if not r2 >= R2_MIN_T_ITER or worst > RESIDUAL_MAX:
        sat_worst = float(ds["t_iter_sat_residual_max"]) if "t_iter_sat_residual_max" in ds else math.nan
        saturates = (f"; the saturating T_iter fits within {100 * sat_worst:.0f}%, with b_opt "
                     f"{float(ds['b_opt_sat']):.0f}" if sat_worst <= RESIDUAL_MAX else "")  # fmt: skip
        notes.append(f"poor T_iter fit: R^2 = {r2:.2f} (want >= {R2_MIN_T_ITER}), largest residual "
                     f"{100 * worst:.0f}% (want <= {100 * RESIDUAL_MAX:.0f}%): the step time is not linear in B on "
                     f"this device (it saturates{saturates}), or the machine was busy; raise profile.rounds, or "
                     "profile on an idle machine")  # fmt: skip
    spread = ds["t_iter_round_spread"].values
    if np.nanmax(spread, initial=0) > ROUND_SPREAD_MAX:
        at = int(b[np.nanargmax(spread)])
        notes.append(f"noisy timing: the profiling rounds' medians spread {100 * np.nanmax(spread):.0f}% at B = {at} "
                     f"(want <= {100 * ROUND_SPREAD_MAX:.0f}%): another program competed for the device; raise "
                     "profile.rounds or profile.min_repeat_time, or rerun on an idle machine")  # fmt: skip
    r2, worst = float(ds["k_r2"]), float(ds["k_residual_max"])
    k = ds["k"].values[np.isfinite(ds["k"].values)]
    if len(k) > 1 and np.all(k == k[0]):  # R^2 is 0/0 here: say what happened instead
        notes.append(
            f"K(B) is {k[0]:.0f} steps at every batch size that reached the target: the steps to target do not "
            "resolve B (the target is reached by the first evaluations); make the target harder (a higher accuracy, "
            "a lower loss), or lower eval_interval"
        )
    elif not r2 >= R2_MIN_K or worst > RESIDUAL_MAX:
        notes.append(
            f"poor K fit: R^2 = {r2:.2f} (want >= {R2_MIN_K}), largest residual {100 * worst:.0f}% (want <= "
            f"{100 * RESIDUAL_MAX:.0f}%): add "
            "seeds (grid.seeds), or lower eval_interval (the resolution of the steps to target)"
        )
    edges = _lr_on_edge(ds)
    for side, sizes in edges.items():
        if sizes:
            notes.append(
                f"best learning rate on the edge of its grid: the {side} lr won at B = "
                f"{', '.join(map(str, sizes))}; extend the workload's learning_rates (or lr_scaling.base_lrs) "
                f"{'upward' if side == 'largest' else 'downward'}, or K(B) there is overestimated"
            )
    grid = json.loads(ds.attrs.get("grid_batch_sizes", "[]")) or b.tolist()
    adaptive_study = ds.attrs.get("study") == "adaptive"
    trained = "the trained sizes" if adaptive_study else "the grid"
    fastest_only = "the fastest trained size" if adaptive_study else "the grid's fastest"
    fastest = int(ds["fastest_batch_size"])
    limit = int(ds["smallest_infeasible_batch_size"]) if "smallest_infeasible_batch_size" in ds else -1
    # the adaptive study: the extend_bracket checkpoint's rule on the sizes trained in the end (the grid has more)
    past_trained = None
    if adaptive_study and len(b) >= 2:
        largest = int(ds["largest_feasible_batch_size"])
        feasible = [g for g in grid if largest <= 0 or g <= largest]
        past_trained, evidence = extension_of_fit(ds, feasible)
        if past_trained is not None:
            notes.append(f"the adaptive study's trained sizes ({', '.join(map(str, b))}) may not hold the optimum: "
                         f"{evidence}; train the grid's next size {past_trained} too, or run study: full")  # fmt: skip
    for edge, where, direction in ((lowest, "smallest", "downward"), (highest, "largest", "upward")):
        # an edge only the fastest can point past (the indistinguishable sizes need not be contiguous)
        if edge != fastest or len(b) < 2:
            continue
        if adaptive_study and any(g < edge if direction == "downward" else g > edge for g in grid):
            continue  # the trained sizes' edge, not the grid's: the rule above
        # the grid's edge, either study, by the same rule: an edge as fast as its inner neighbour has the optimum
        # between them; one that beats it beyond noise points past itself. A size past the grid's edge stands in
        # for the one the user would add
        next_size = edge // 2 if direction == "downward" else edge * 2
        past, _ = selection.extension(b.tolist(), fastest, ds["indistinguishable"].values, [*grid, next_size])
        if past is None:
            continue
        beats = f"the grid's {where} batch size {edge} is the fastest, beating its neighbour beyond noise"
        if direction == "upward" and 0 < limit <= next_size:  # the next size up ran out of memory
            notes.append(f"{beats}, and larger sizes run out of memory (at B = {limit}): the device, not the "
                         f"grid, bounds the answer; use {edge}")  # fmt: skip
        elif next_size >= 1:
            notes.append(f"{beats}: the optimum may lie beyond it; extend grid.batch_sizes {direction}")
    b_opt_value = float(ds["b_opt"])
    low, high = ds["b_opt_ci"].values
    if past_trained is None:  # where the adaptive note above names the size to train, it stands for these two
        if not lowest <= b_opt_value <= highest:
            notes.append(
                f"predicted b_opt = {b_opt_value:.0f} lies outside {trained} ({lowest} to {highest}); add batch "
                f"sizes {'below' if b_opt_value < lowest else 'above'} it, or trust {fastest_only} only"
            )
        elif np.isfinite([low, high]).all() and (low < lowest or high > highest):
            notes.append(
                f"b_opt's 95% interval ({_common.batch_interval(low, high)}) reaches beyond {trained} ({lowest} to "
                f"{highest}): the prediction is unsure there; add seeds or batch sizes"
            )
    notes += _memory_notes(ds)
    notes += _model_notes(ds)
    return notes


def _memory_notes(ds: xr.Dataset) -> list[str]:
    """b_opt (of either step-time model) above the largest batch size known to fit: the recommendation is capped
    there (``b_opt_capped``, ``b_opt_sat_capped``)."""
    feasible = int(ds["largest_feasible_batch_size"])
    if feasible <= 0:
        return []
    above = [(float(ds[name]), model) for name, model in (("b_opt", "linear"), ("b_opt_sat", "saturating"))
             if name in ds and float(ds[name]) > feasible]  # fmt: skip
    if not above:
        return []
    which = " and ".join(f"{value:.0f} ({model} T_iter)" for value, model in above)
    what = f"predicted b_opt = {which} {'is' if len(above) == 1 else 'are'}"
    limit = int(ds["smallest_infeasible_batch_size"]) if "smallest_infeasible_batch_size" in ds else -1
    if limit > 0:  # a memory limit was actually seen
        return [f"{what} above the largest batch size that fits in memory ({feasible}; out of memory at B = {limit}): "
                f"use at most {feasible} (or gradient accumulation, whose steps cost more)"]  # fmt: skip
    return [f"{what} above the largest profiled batch size ({feasible}), and no memory limit was seen up to it: "
            f"the suggestion is capped at {feasible}; add larger sizes to profile.extra_batch_sizes to find where "
            "memory runs out"]  # fmt: skip


def _model_notes(ds: xr.Dataset) -> list[str]:
    """The answer depends on the step-time model: the linear and the saturating T_iter's b_opt (each capped at the
    largest feasible batch size) more than MODELS_RATIO_MAX apart. Both models are judged on the same sizes,
    every feasible profiled one (the linear fit saw only the trained grid's)."""
    if "b_opt_sat_capped" not in ds:
        return []
    linear, saturating = float(ds["b_opt_capped"]), float(ds["b_opt_sat_capped"])
    ratio = scaling.models_ratio(linear, saturating)
    if not ratio > MODELS_RATIO_MAX:  # NaN (either unknown) included
        return []
    seen = ds["profile_feasible"].values.astype(bool) & np.isfinite(ds["profile_t_iter_median"].values)
    observed = ds["profile_t_iter_median"].values[seen]
    r2_lin, worst_lin = scaling.goodness(observed, ds["t_iter_fitted"].values[seen])
    r2_sat, worst_sat = scaling.goodness(observed, ds["t_iter_sat_fitted"].values[seen])
    better = "saturating" if worst_sat < worst_lin else "linear"
    knee = float(ds["sat_b_knee"])
    apart = _common.times_apart(ratio)
    return [f"the step-time model decides b_opt: {linear:.0f} with the linear T_iter, {saturating:.0f} with the "
            f"saturating one (flat up to B = {knee:.0f}), {apart} apart (want <= {MODELS_RATIO_MAX}x). On the "
            f"{int(seen.sum())} feasible profiled sizes the {better} model fits better: largest residual "
            f"{100 * worst_lin:.0f}% linear vs {100 * worst_sat:.0f}% saturating, R^2 {r2_lin:.3f} vs {r2_sat:.3f}. "
            f"Profile more batch sizes near the knee (profile.extra_batch_sizes around {knee:.0f}, or grid.batch_sizes "
            "to train there); the grid's fastest (measured) does not depend on either model"]  # fmt: skip


def _lr_on_edge(ds: xr.Dataset) -> dict[str, list[int]]:
    """Batch sizes (among those indistinguishable from the fastest) whose best lr is the smallest or largest
    learning rate trained at that batch size."""
    edges: dict[str, list[int]] = {"smallest": [], "largest": []}
    for b, lr, chosen in zip(ds["batch_size"].values, ds["best_lr"].values, ds["indistinguishable"].values,
                             strict=True):  # fmt: skip
        tried = np.unique(ds["run_lr"].values[ds["run_batch_size"].values == b])
        if not chosen or not np.isfinite(lr) or len(tried) < 2:
            continue
        if lr == tried.min():
            edges["smallest"].append(int(b))
        elif lr == tried.max():
            edges["largest"].append(int(b))
    return edges


def _training_time_to_target(runs: xr.Dataset, k_table: pd.DataFrame) -> np.ndarray:
    result = []
    for b, best_lr in zip(k_table.index.values, k_table["best_lr"].values, strict=True):
        mask = (runs["run_batch_size"].values == b) & (runs["run_lr"].values == best_lr)
        # as K: a seed that never reached the target counts as never, so the median stays finite while most did
        times = np.where(np.isnan(runs["time_to_target"].values[mask]), np.inf, runs["time_to_target"].values[mask])
        median = float(np.median(times)) if mask.any() else math.nan
        result.append(median if math.isfinite(median) else math.nan)
    return np.asarray(result)


def add_bill(ds: xr.Dataset, benchmarks: dict[str, list[str]]) -> xr.Dataset:
    """What the answer cost: the device-seconds of the jobs it needed (``{rule: [Snakemake benchmark files]}``; a
    job holds its device for its wall time), in total and in units of one training run at the recommended batch
    size (the median wall time of its best-lr runs). NaN where a job's time is unknown (run with --touch)."""
    from batchscope.store import job_seconds

    seconds = {rule: float(sum(job_seconds(path) for path in paths)) for rule, paths in benchmarks.items()}
    ds = ds.assign_coords(job=list(seconds))
    ds["cost_s"] = ("job", list(seconds.values()), {"units": "device-seconds", "long_name": "the jobs' wall time"})
    total = float(sum(seconds.values())) if seconds else math.nan
    ds["total_cost_s"] = ((), total, {"units": "device-seconds", "long_name": "what the answer cost"})
    best = int(ds["fastest_batch_size"])
    at_best = (ds["run_batch_size"].values == best) & ds["run_at_best_lr"].values.astype(bool)
    run_s = float(np.median(ds["wall_time"].values[at_best])) if at_best.any() else math.nan
    ds["run_s_at_recommended"] = ((), run_s, {"units": "s", "long_name": "one training run at the recommended B"})
    ds["cost_in_runs"] = ((), total / run_s if run_s > 0 else math.nan,
                          {"long_name": "the answer's cost in training runs at the recommended B"})  # fmt: skip
    return ds


def run(args: argparse.Namespace) -> None:
    from batchscope import store

    if args.workload is None:  # it names the output's workload, even with --spec
        raise SystemExit("fit: --workload is required")
    spec = _common.spec(args, config_slice)
    ds = fit_scaling(args.profiles, args.runs, spec, args.workload, _common.expect(args))
    ds = add_bill(ds, _common.pairs(args.benchmarks, "--benchmarks"))
    if args.choice:  # the adaptive study: why these sizes were trained, for recommend and the report
        choice = store.read_netcdf(args.choice)
        second = "extended_batch_size" in choice  # the second round's file (adaptive.extend), else the bracket's
        ds.attrs.update(bracket_reason=choice.attrs.get("bracket_reason" if second else "reason", ""),
                        extended_batch_size=int(choice["extended_batch_size"]) if second else -1,
                        extension_reason=choice.attrs.get("reason", "") if second else "")  # fmt: skip
    ds.attrs.update(store.provenance("fit_scaling", spec))
    store.write_netcdf(ds, args.out)
    log.info("%s: b_opt=%.1f (saturating T_iter: %.1f), fastest B from the profile=%d, B_crit=%.1f, largest "
             "feasible B=%d", args.workload, float(ds["b_opt"]), float(ds["b_opt_sat"]), int(ds["fastest_batch_size"]),
             float(ds["b_crit"]), int(ds["largest_feasible_batch_size"]))  # fmt: skip


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profiles", nargs="+", required=True)
    parser.add_argument("--runs", nargs="+", required=True, help="train_model output directories")
    parser.add_argument("--benchmarks", nargs="*", default=[], help="RULE=FILE: the benchmark files of the jobs the "
                        "answer needed (its cost)")  # fmt: skip
    parser.add_argument("--choice", help="the adaptive study: the file of the checkpoint that chose the trained sizes")
    _common.add_expect(parser)


# what `recommend` reads of a fit, and what the report reads besides
REQUIRED = (
    "b_opt",
    "b_opt_ci",
    "k",
    "best_lr",
    "time_from_profile",
    "time_from_profile_ci",
    "time_from_fit",
    "fastest_batch_size",
    "training_time_to_target",
    "indistinguishable",
    "b_opt_sat",
    "b_opt_sat_ci",
    "b_opt_capped",
    "b_opt_sat_capped",
    "largest_feasible_batch_size",
    "smallest_infeasible_batch_size",
)
VARIABLES = (*REQUIRED, "run_at_best_lr", "tau_f", "tau_d", "n_iter", "c_var", "b_crit", "t_iter_r2",
             "steps_to_target", "sat_tau_f", "sat_tau_d", "sat_b_knee", "t_iter_sat_fitted", "t_iter_sat_r2",
             "t_iter_sat_residual_max")  # fmt: skip
# 5: the adaptive study's irregular cells resampled cell by cell (other draws of the same bootstrap)
# 6: the adaptive study's note names the next size past a fastest edge as fast as its neighbour where every step-time
# model's b_opt lies past that edge (selection.extension)
RULES = {"fit_scaling": Rule(version=6, config_slice=config_slice, variables=VARIABLES)}
COMMANDS = (Command("fit", "fit the scaling model of one workload", run, _arguments, spec=config_slice),)
