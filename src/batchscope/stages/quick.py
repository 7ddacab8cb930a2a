"""Stage ``quick_estimate``: an answer from the profile and one reference run, before (or instead of) the grid.

McCandlish et al. (2018): the critical batch size B_crit = C_var / N_iter is close to the noise scale
B_noise = tr(H Sigma) / G^T H G, so b_opt = sqrt(C_var tau_f / (N_iter tau_d)) = sqrt(B_crit tau_f / tau_d) needs
only the hardware ratio tau_f / tau_d (the profile) and B_noise. The gradient-noise stage measures B_noise (and
B_simple = tr(Sigma) / |G|^2, equal to it only when H is a multiple of the identity) at snapshots of the reference
run with the two-batch estimator; both grow during training, so the estimate is a band over the run's snapshots
(the one at step 0 left out: the noise at initialisation says little about the batch size to train with). Where
G^T H G <= 0 at a snapshot, B_noise is infinite and B_simple stands in for it (:func:`stand_in`). The
point estimate is the whole run's B_crit, b_crit: the snapshots' B_noise weighted by the progress the run makes
while each holds (:func:`batchscope.core.scaling.effective_b_crit`), which is what the grid's fit of
K(B) = N_iter + C_var / B measures when B_noise changes along the run. Every run also spends the steps by which the
optimizer's updates trail full-size ones (momentum's build-up, a warm-up: :func:`batchscope.core.scaling.update_lag`)
at every batch size alike; on the grid's K(B) they join N_iter, so the point, the per-snapshot b_opt and the interval
take B_noise less their share of the reference run's steps (:func:`batchscope.core.scaling.b_crit_with_lag`). Every
b_opt is capped at the largest batch size the profile fitted in memory.

Beside it, as in the full fit, the saturating step time tau_f + tau_d max(B - b_knee, 0) fitted on every feasible
profiled size (:func:`batchscope.core.scaling.b_opt_saturating`, which depends on N_iter and C_var only through
B_crit = C_var / N_iter): on a GPU a small model's step time is flat up to a knee, where the linear model fitted on
a few small sizes sees almost no cost per example and sends b_opt far up. Where the two b_opt disagree by more than
``scaling.MODELS_RATIO_MAX``, a note says so.

Its cost is recorded beside it: the device-seconds of the jobs it needed (profile, reference run, noise), from
Snakemake's benchmark files, and the same in units of the reference run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from batchscope import config as cfg
from batchscope.stages import Command, Rule, _common, noise, profile
from batchscope.store import job_seconds, netcdf_files, read_netcdf

log = logging.getLogger("batchscope")
BOOTSTRAP = 200  # resamples of the profiling rounds for tau_f / tau_d's interval
# what the noise stage records of its measurement and of the reference run (stages/noise.py), carried over
MEASURED = ("pairs", "min_pairs", "cost_share", "run_examples", "run_steps_to_target")
RATIO_SPREAD_MAX = 4.0  # an interval of tau_f / tau_d, or of B_noise, wider than 4x (b_opt unsure by 2x) is flagged


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """The grid it fits T_iter on, the optimizer and warm-up (their update lag: scaling.update_lag) and what
    identifies its inputs (their config hashes, the reference run; the noise stage's names the reference run's
    training, so a quick estimate of another target or max_steps is another config's)."""
    wl = config["workloads"][workload]
    return {
        "batch_sizes": sorted(config["grid"]["batch_sizes"]),
        "optimizer": wl["optimizer"],
        "warmup_steps": wl["schedule"]["warmup_steps"],
        "reference": list(cfg.noise_reference(config, workload)),
        "inputs": {
            "profile_hardware": cfg.config_hash(profile.config_slice(config, workload)),
            "measure_gradient_noise": cfg.config_hash(noise.config_slice(config, workload)),
        },
    }


def _snapshots(noise_dir: str) -> xr.Dataset:
    files = [path for path in netcdf_files([noise_dir], "gradient-noise results") if path.name.startswith("snapshot")]
    rows = [read_netcdf(path, "measure_gradient_noise", noise.SNAPSHOT_VARIABLES) for path in files]
    ds = xr.concat(
        [row[["two_batch_b_noise", "two_batch_b_simple", "b_simple", "two_batch_b_noise_boot",
              "two_batch_b_simple_boot"]]
         .expand_dims(step=[row.attrs["step"]])
         .assign_coords(fraction=("step", [row.attrs["fraction"]])) for row in rows],
        dim="step",
        combine_attrs="drop",
    ).sortby("step")  # fmt: skip
    # what the measurement cost against the reference run (pairs_within_budget), where the stage recorded it
    measured = rows[0].attrs
    ds.attrs.update({key: measured[key] for key in MEASURED if key in measured})
    return ds.rename(two_batch_b_noise="b_noise", two_batch_b_simple="b_simple_two_batch",
                     b_simple="b_simple_per_example", two_batch_b_noise_boot="b_noise_boot",
                     two_batch_b_simple_boot="b_simple_boot")  # fmt: skip


def stand_in(b_noise: np.ndarray, b_simple: np.ndarray) -> np.ndarray:
    """B_noise, with B_simple in its place where B_noise is infinite and B_simple finite: G^T H G <= 0 while |G|^2
    stands clear of the noise. The loss curves down along the gradient there, so the quadratic model behind B_noise
    has no optimal step, and taken literally (perfect scaling at any batch size) it put b_opt 2x to 4x above the
    fastest size on the three studies where it happened and a full grid was run; B_simple is the same noise scale
    with H taken as a multiple of I. A B_simple <= 0 (tr(Sigma) estimated at or below 0: no noise seen) stands in
    too, and is then left out as any value <= 0 is (:func:`batchscope.core.scaling.effective_b_crit`), rather than
    count as perfect scaling, the opposite extreme. An infinite B_simple (|G|^2 not clear of the noise: no gradient
    signal) leaves it infinite. Elementwise, so a resample is judged by its own pairs as the point is by all of them."""
    swap = np.isinf(b_noise) & np.isfinite(b_simple)
    return np.where(swap, b_simple, b_noise)


def stood_in(ds: xr.Dataset) -> np.ndarray:
    """Per snapshot of a quick-estimate file, whether B_simple stood in for an infinite B_noise (:func:`stand_in`):
    the note, ``recommend --quick`` and the report's figure all read it from here."""
    return np.isinf(ds["b_noise"].values) & np.isfinite(ds["b_noise_or_simple"].values)


def estimate(spec: dict[str, Any], profile_paths: list[str], noise_dir: str) -> xr.Dataset:
    """The quick estimate's NetCDF: per snapshot B_noise, B_simple and their b_opt; the bands and the point."""
    from batchscope.core import scaling

    profiles = profile.read_profiles(profile_paths)
    sizes = profiles["profile_batch_size"].values
    feasible = profiles["profile_feasible"].values.astype(bool)
    largest = int(sizes[feasible].max()) if feasible.any() else -1
    t_median = profiles["profile_t_iter_median"].values
    grid = np.isin(sizes, spec["batch_sizes"]) & feasible  # T_iter on the grid, as the full fit
    timing = scaling.fit_step_time(sizes[grid], t_median[grid])
    timed = feasible & np.isfinite(t_median)  # the saturating step time on every feasible profiled size, as the fit
    saturating = scaling.fit_saturating_if_possible(sizes[timed], t_median[timed])
    ratio = timing.intercept / timing.slope if timing.slope > 0 else math.inf  # tau_f / tau_d, in examples

    def cap(b_opt):
        """At most the largest feasible batch size (none when nothing fitted)."""
        return np.minimum(b_opt, largest) if largest > 0 else b_opt

    ds = _snapshots(noise_dir)
    # the runs' steps beyond the local law, from the optimizer's build-up: B_crit on the grid's K(B) is B_noise's
    # less their share (scaling.b_crit_with_lag; none for AdamW without warm-up, or a run that never got there)
    lag = scaling.update_lag(spec.get("optimizer", {}), spec.get("warmup_steps", 0))
    end = float(ds.attrs.get("run_steps_to_target", math.nan))
    b_ref = spec["reference"][0]

    def on_the_grid(values):
        return scaling.b_crit_with_lag(values, end, b_ref, lag)

    # the snapshots' critical batch size: B_noise, with B_simple where G^T H G <= 0 (stand_in)
    ds["b_noise_or_simple"] = ("step", stand_in(ds["b_noise"].values, ds["b_simple_two_batch"].values),
                               {"units": "examples", "long_name": "B_noise, or B_simple where G^T H G <= 0 "
                                "(B_noise infinite, B_simple finite)"})  # fmt: skip
    sources = {"b_noise": "b_noise_or_simple", "b_simple_two_batch": "b_simple_two_batch",
               "b_simple_per_example": "b_simple_per_example"}  # fmt: skip
    crit = {name: on_the_grid(ds[source].values) for name, source in sources.items()}
    for name, values in crit.items():
        source = sources[name]
        uncapped = np.sqrt(np.where(values > 0, values, np.nan) * ratio)
        ds[f"b_opt_{name}"] = ("step", cap(uncapped),
                               {"units": "examples", "long_name": f"sqrt({source} tau_f / tau_d), capped"})  # fmt: skip
    later = ds["step"].values > 0  # after the initial weights (a small fraction of a short run can pick step 0)
    steps = ds["step"].values[later]
    b_noise, b_opt = ds["b_noise_or_simple"].values[later], ds["b_opt_b_noise"].values[later]
    usable = np.isfinite(b_noise) & (b_noise > 0)
    # the band: an infinite value (B_noise and B_simple both: no gradient signal) counts, as it does in b_crit, so
    # that a run infinite at two of three snapshots does not read as one value ("278 to 278")
    band = [float(b_noise[usable].min()), float(b_noise[b_noise > 0].max())] if usable.any() else [math.nan] * 2
    opt_band = [float(np.nanmin(b_opt)), float(np.nanmax(b_opt))] if usable.any() else [math.nan] * 2
    # the run's B_crit counts the steps to the target (recorded by the noise stage where the run reached it)
    reached = end if math.isfinite(end) else None
    b_noise_mean = float(scaling.effective_b_crit(steps, b_noise, b_ref, reached)) if len(steps) else math.nan
    b_crit = float(on_the_grid(b_noise_mean))
    point = float(cap(math.sqrt(b_crit * ratio) if b_crit > 0 else math.nan))
    ds["b_crit_band"] = ("bound", band, {"units": "examples", "long_name": "b_noise_or_simple over the run "
                                         "(after step 0)"})  # fmt: skip
    ds["b_noise_mean"] = ((), b_noise_mean, {"units": "examples", "long_name": "the run's b_noise_or_simple "
                                             "weighted by the progress of each stretch "
                                             "(scaling.effective_b_crit)"})  # fmt: skip
    ds["update_lag"] = ((), lag, {"units": "steps", "long_name": "the optimizer's build-up, in steps "
                                  "(scaling.update_lag)"})  # fmt: skip
    ds["b_crit"] = ((), b_crit, {"units": "examples", "long_name": "B_crit on the grid's K(B): b_noise_mean less "
                                 "the update lag's share of the steps (scaling.b_crit_with_lag)"})  # fmt: skip
    ds["b_opt_band"] = ("bound", opt_band, {"units": "examples", "long_name": "b_opt over the run, capped"})
    ds["b_opt"] = ((), point, {"units": "examples", "long_name": "sqrt(b_crit tau_f / tau_d), capped"})
    sat = (saturating.tau_f, saturating.tau_d, saturating.b_knee) if saturating else (math.nan,) * 3
    b_opt_sat = np.array([scaling.b_opt_saturating(1.0, b, *sat) if saturating and b > 0 else math.nan
                          for b in crit["b_noise"]])  # fmt: skip
    ds["b_opt_sat_b_noise"] = (
        "step",
        cap(b_opt_sat),
        {"units": "examples", "long_name": "argmin of (1 + b_noise_or_simple/B) T_sat(B), capped"},
    )
    later_sat = ds["b_opt_sat_b_noise"].values[later]  # as the linear band: B_noise = inf counts, capped
    some_sat = usable.any() and np.isfinite(later_sat).any()
    point_sat = float(cap(scaling.b_opt_saturating(1.0, b_crit, *sat) if saturating and b_crit > 0 else math.nan))
    ds["b_opt_sat"] = ((), point_sat, {"units": "examples", "long_name": "argmin of (1 + b_crit/B) T_sat(B), "
                                       "capped"})  # fmt: skip
    ds["b_opt_sat_band"] = ("bound", [float(np.nanmin(later_sat)), float(np.nanmax(later_sat))] if some_sat
                            else [math.nan] * 2, {"units": "examples", "long_name": "b_opt with the saturating step "
                            "time over the run, capped"})  # fmt: skip
    for name, value, units in (("sat_tau_f", sat[0], "s"), ("sat_tau_d", sat[1], "s per example"),
                               ("sat_b_knee", sat[2], "examples")):  # fmt: skip
        ds[name] = ((), value, {"units": units})
    # how well the profile pins tau_f / tau_d: the fit's bootstrap over the profiling rounds (paired when one job
    # timed every size), as the full fit's; b_opt moves with its square root
    t_round = profiles["profile_t_iter_round"].values[grid]
    boot = scaling.round_bootstrap(t_round, BOOTSTRAP, np.random.default_rng(0), bool(profiles.attrs["paired_rounds"]))
    fits = [scaling.fit_step_time(sizes[grid], row) for row in boot if np.isfinite(row).all()]
    ratios = np.array([f.intercept / f.slope if f.slope > 0 else np.inf for f in fits])
    ratio_ci = scaling.interval(ratios[:, None])[0]
    ds["tau_ratio"] = ((), ratio, {"units": "examples", "long_name": "tau_f / tau_d"})
    ds["tau_ratio_ci"] = ("bound", ratio_ci, {"long_name": "95% bootstrap interval over the profiling rounds"})
    # how well the reference run pins B_crit down: each snapshot's B_noise from its pairs resampled, and b_crit
    # recomputed per resample (a resample's snapshot with B_noise <= 0 left out, as the point's)
    boot = stand_in(ds["b_noise_boot"].values[later], ds["b_simple_boot"].values[later])  # (snapshots, resamples)
    # no usable point, no interval: a resample judges its own snapshots usable, and could otherwise give one
    crit_boot = (on_the_grid(scaling.effective_b_crit(steps, boot, b_ref, reached)) if usable.any()
                 else np.full(ds.sizes["resample"], np.nan))  # fmt: skip
    ds["b_crit_ci"] = ("bound", scaling.interval(crit_boot[:, None])[0],
                       {"units": "examples", "long_name": "b_crit's 95% interval over the noise pairs "
                        "resampled"})  # fmt: skip
    # b_opt's interval: both sources resampled together (independent, so paired by index)
    ratios = ratios if len(ratios) else np.array([np.nan])
    paired = ratios[np.arange(len(crit_boot)) % len(ratios)]
    # a resampled B_crit <= 0 (no noise to average away) is b_opt 0, also where tau_f / tau_d is infinite
    b_opt_boot = np.sqrt(np.where(crit_boot > 0, crit_boot * paired, np.where(np.isnan(crit_boot), np.nan, 0.0)))
    b_opt_ci = scaling.interval(b_opt_boot[:, None])[0]
    ds["b_opt_ci"] = ("bound", cap(b_opt_ci),
                      {"units": "examples", "long_name": "b_opt's 95% interval over the profiling rounds and the "
                       "noise pairs, resampled; capped"})  # fmt: skip
    notes = []
    if not np.isfinite(ratio_ci).all() or ratio_ci[1] > RATIO_SPREAD_MAX * ratio_ci[0]:
        notes.append(f"the profile does not pin tau_f / tau_d down (95% interval {ratio_ci[0]:.3g} to "
                     f"{ratio_ci[1]:.3g} examples), so b_opt is unsure by the square root of that; profile more "
                     "rounds (profile.rounds) or more batch sizes, or on a quieter machine")  # fmt: skip
    low, high = ds["b_crit_ci"].values
    if usable.any() and not (np.isfinite([low, high]).all() and low > 0 and high <= RATIO_SPREAD_MAX * low):
        notes.append(f"the reference run's B_noise is unsure (b_crit's 95% interval {low:.3g} to {high:.3g}, from "
                     "the two-batch estimator's pairs), so b_opt is unsure by the square root of "
                     "that; raise noise.pairs, or noise.budget where it held the pairs below that")  # fmt: skip
    capped = [name for name, value in (("linear", point), ("saturating", point_sat))
              if largest > 0 and np.isfinite(value) and value >= largest]  # fmt: skip
    which = "b_opt" if len(capped) != 1 else f"b_opt with the {capped[0]} step time"
    if capped and not feasible.all():
        notes.append(f"{which} is capped at the largest feasible batch size {largest}: the optimum may lie beyond what "
                     "fits in memory")  # fmt: skip
    elif capped:
        notes.append(
            f"{which} is capped at the largest batch size profiled, {largest}, which fitted in memory: "
            "profile larger ones (profile.extra_batch_sizes) to see whether the optimum lies beyond"
        )
    # where B_simple stood in for B_noise (stand_in)
    concave = later & stood_in(ds)
    if concave.any():
        at = ", ".join(str(int(step)) for step in ds["step"].values[concave])
        simple = ", ".join(f"{value:.3g}" for value in ds["b_simple_two_batch"].values[concave])
        notes.append(f"G^T H G <= 0 at step {at} of the reference run (of {int(later.sum())} snapshots after step 0): "
                     "the loss curves down along the gradient there, so B_noise (infinite) has no optimal step "
                     f"behind it, and B_simple ({simple}) stands in for it there. B_simple takes the curvature as "
                     "the same in every direction: check b_opt against study: adaptive, or measure more snapshots "
                     "(noise.snapshot_fractions)")  # fmt: skip
    if "run_steps_to_target" in ds.attrs and not math.isfinite(end):
        steps_done = ds.attrs["run_examples"] / b_ref
        notes.append(f"the reference run (B = {b_ref}, lr {spec['reference'][1]:g}) never reached the target in its "
                     f"{steps_done:.0f} steps (it ran out of steps, or diverged): its B_noise is measured along a run "
                     "that stopped short of it, while the grid's K(B) counts the steps to it, where B_noise is often "
                     "larger; give the reference run what reaches the target (another learning rate, "
                     "noise.reference_lr_index; noise.reference_batch_size; the workload's max_steps or its "
                     "target)")  # fmt: skip
    share = ds.attrs.get("cost_share", math.nan)
    if share > 1:
        floor = ds.attrs.get("min_pairs") == ds.attrs["pairs"]
        notes.append(f"the gradient-noise measurement cost {share:.1f}x the reference run's own example-gradients "
                     f"({ds.attrs['pairs']} pairs per snapshot, "
                     + ("the floor noise.min_pairs" if floor else "as noise.budget and noise.pairs allow")
                     + f", on a run of {ds.attrs['run_examples']}): the run is short against the two-batch "
                     "estimator's batches; a lower noise.min_pairs, a smaller noise.eval_size (or noise.b_big, "
                     "where set) or fewer noise.snapshot_fractions cost less")  # fmt: skip
    ratio_models = scaling.models_ratio(point, point_sat)
    if ratio_models > scaling.MODELS_RATIO_MAX:
        apart = _common.times_apart(ratio_models)
        notes.append(f"the step-time model decides: b_opt is {point:.0f} with the linear step time (fitted on the "
                     f"grid's sizes) and {point_sat:.0f} with the saturating one (knee at B = {sat[2]:.0f}, fitted "
                     f"on every feasible profiled size), {apart} apart; the full grid's timing decides between "
                     "them")  # fmt: skip
    ds.attrs["diagnostics"] = json.dumps(notes)
    grid_sizes = np.asarray(spec["batch_sizes"], float)
    nearest = int(grid_sizes[np.argmin(np.abs(np.log(grid_sizes / point)))]) if np.isfinite(point) else -1
    ds["nearest_grid_batch_size"] = ((), nearest, {"long_name": "the grid's batch size nearest b_opt (log scale)"})
    ds["tau_f"] = ((), timing.intercept, {"units": "s"})
    ds["tau_d"] = ((), timing.slope, {"units": "s per example"})
    ds["largest_feasible_batch_size"] = ((), largest)
    # -1: no profiled size ran out of memory (a size above the largest profiled is then unknown, not infeasible)
    ds["smallest_infeasible_batch_size"] = ((), int(sizes[~feasible].min()) if (~feasible).any() else -1)
    ds = ds.assign_coords(bound=["low", "high"])
    ds.attrs.update(reference_batch_size=spec["reference"][0], reference_lr=spec["reference"][1],
                    reference_seed=spec["reference"][2])  # fmt: skip
    # with noise.enabled the noise job is the whole stage (per-example B_simple, step 0, the variance law), shared
    # with the report: its bill, counted here, is more than the two-batch B_noise alone costs (noise.enabled: false)
    ds.attrs["noise_job_whole_stage"] = int((Path(noise_dir) / "variance.nc").exists())
    return ds


def add_cost(ds: xr.Dataset, benchmarks: dict[str, list[str]]) -> xr.Dataset:
    """The device-seconds of each job the estimate needed (``{rule: [benchmark files]}``; a job holds its device
    for its wall time), and their sum in units of the reference run."""
    seconds = {rule: sum(job_seconds(path) for path in paths) for rule, paths in benchmarks.items()}
    ds = ds.assign_coords(job=list(seconds))
    ds["cost_s"] = ("job", list(seconds.values()), {"units": "device-seconds", "long_name": "the jobs' wall time"})
    reference = seconds.get("train_reference", math.nan)
    total = float(sum(seconds.values()))
    ds["total_cost_s"] = ((), total, {"units": "device-seconds"})
    ds["cost_in_reference_runs"] = ((), total / reference if reference > 0 else math.nan)
    return ds


def reference_job_seconds(ds: xr.Dataset) -> float:
    """The reference run's job in a quick-estimate file's bill (its wall seconds, the process start included): the
    unit of the quick estimate's and the branches' costs. NaN where the bill has no such job."""
    return float(ds["cost_s"].sel(job="train_reference")) if "train_reference" in ds["job"].values else math.nan


def run(args: argparse.Namespace) -> None:
    from batchscope import store

    spec = _common.spec(args, config_slice)
    ds = estimate(spec, args.profiles, args.noise)
    ds = add_cost(ds, _common.pairs(args.benchmarks, "--benchmarks"))
    ds.attrs.update(store.provenance("quick_estimate", spec), workload=args.workload or "")
    store.write_netcdf(ds, args.out)
    low, high = ds["b_opt_band"].values
    log.info("b_opt %.0f (band %.0f to %.0f over the run), B_noise %s; cost %.1f device-s = %.2f reference runs",
             float(ds["b_opt"]), low, high, ds["b_crit_band"].values.round(1), float(ds["total_cost_s"]),
             float(ds["cost_in_reference_runs"]))  # fmt: skip


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profiles", nargs="+", required=True)
    parser.add_argument("--noise", required=True, help="the measure_gradient_noise directory of the reference run")
    parser.add_argument("--benchmarks", nargs="*", default=[], help="RULE=FILE: the benchmark files of the jobs the "
                        "estimate needed (its cost)")  # fmt: skip


VARIABLES = (
    "b_noise",
    "b_noise_or_simple",
    "b_crit",
    "b_noise_mean",
    "update_lag",
    "b_opt",
    "b_opt_sat",
    "b_opt_sat_band",
    "b_opt_band",
    "b_crit_band",
    "tau_f",
    "tau_d",
    "total_cost_s",
    "smallest_infeasible_batch_size",
)
# 3: b_opt_ci from the noise pairs resampled as well as the profiling rounds; b_crit_ci
# 4: b_opt_sat (the saturating step time); the cap note tells memory from the largest size profiled
# 5: the point from b_crit, the snapshots' B_noise weighted by progress, rather than the median snapshot's
# 6: a note where G^T H G <= 0 at a snapshot (B_noise infinite, B_simple not); B_crit less the update lag's share
# 7: the smallest profiled size out of memory (recommend --quick --current-batch-size); "after step 0" by the step
# 8: a note where the reference run never reached the target; 9: b_crit_band counts an infinite B_noise;
# 10: B_simple stands in for B_noise where G^T H G <= 0 (stand_in), in the point, the bands and the interval
RULES = {"quick_estimate": Rule(version=10, config_slice=config_slice, variables=VARIABLES)}
COMMANDS = (
    Command(
        "quick-estimate",
        "b_opt from the profile and the reference run's gradient noise",
        run,
        _arguments,
        spec=config_slice,
    ),  # fmt: skip
)
