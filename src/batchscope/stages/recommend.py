"""The answer in a few lines: the recommended batch size and learning rate per workload, from the cached fits only.

Reads ``results/fit/*.nc`` (no training, no torch), so it works on results copied from a cluster. By default it
reads the fits of the current config's workloads, and refuses one computed for another config (its config hash
names the whole study of its workload: :func:`batchscope.stages.fit.config_slice`); ``--all`` lists every cached fit,
labelled by its config hash. The report's summary is built from the same rows (:func:`recommend_row`) under the
same names (:data:`LABELS`).

Three times to target, each named for where it comes from:

- *from the profile*: K(B) x profiled T_iter(B), the steps the runs took times the profiled step time. Batch sizes
  are ranked by it: every size's step was timed in the same interleaved rounds, so the machine's drift falls on
  all of them alike.
- *from the fit*: the fitted model (N_iter + C_var/B)(tau_f + tau_d B) at that B.
- *measured in training*: the runs' own clock over their training steps to the target (median over seeds at the
  best lr; evaluations excluded): what the steps took, each run timed at its own moment.

b_opt is predicted twice, with the linear step time tau_f + tau_d B and with the saturating one
tau_f + tau_d max(B - b_knee, 0) (:mod:`batchscope.core.scaling`); each is also given capped at the largest batch size
known to fit in memory, which no suggestion exceeds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from batchscope import config as cfg
from batchscope.stages import Command
from batchscope.stages._common import batch_interval
from batchscope.stages.fit import REQUIRED
from batchscope.stages.fit import config_slice as fit_slice
from batchscope.store import CacheError, read_netcdf

# The names under which `recommend` and the report print each number (one place, so they agree).
LABELS = {
    "workload": "workload",
    "device_name": "device",
    "batch_size": "recommended B",
    "learning_rate": "learning rate",
    "indistinguishable": "as fast (within tolerance)",
    "predicted_b_opt": "predicted b_opt",
    "saturating_b_opt": "predicted b_opt, saturating T_iter",
    "time_from_profile_s": "time to target from the profile (s)",
    "time_from_fit_s": "time to target from the fit (s)",
    "training_time_to_target_s": "time to target measured in training (s)",
    "steps_to_target": "steps to target K",
    "largest_feasible_batch_size": "largest feasible B",
    "config_hash": "config hash",
}

__all__ = ["CacheError", "LABELS", "recommend_row", "recommendations", "study_fits"]


def _results_root(results: str | Path) -> Path:
    """The workflow's results/ tree, given it or its fit/ directory."""
    results = Path(results)
    return results.parent if results.name == "fit" and not (results / "fit").is_dir() else results


def _fit_dir(results: str | Path) -> Path:
    results = Path(results)
    return results / "fit" if (results / "fit").is_dir() else results


def _fit_stopped(results: Path, workload: str) -> str | None:
    """Why the workflow's fit of ``workload`` stopped, where its log (logs/ beside results/) ends in an error: its
    last line and the log's path. None where there is no such log or it ends otherwise."""
    log = _results_root(results).parent / "logs" / "fit_scaling" / f"{workload}.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and ("Error" in lines[-1].split(":")[0] or lines[-1].startswith("batchscope:")):
        return f"{lines[-1]} (the whole message: {log})"
    return None


def _read_fit(path: Path, config_hash: str | None = None):
    return read_netcdf(path, "fit_scaling", REQUIRED, config_hash)


def study_fits(results: str | Path, config: dict[str, Any], config_name: str = "the config") -> dict[str, Path]:
    """{workload: fit file} of the config's workloads, each checked to be computed for this config."""
    fit_dir = _fit_dir(results)
    files = {}
    for name in sorted(config["workloads"]):
        path = fit_dir / f"{name}.nc"
        if not path.is_file():
            # a results tree without a fit yet names where the workflow writes it, not the tree's top
            bare = fit_dir.name != "fit" and not any(fit_dir.glob("*.nc"))
            missing = _results_root(results) / "fit" / path.name if bare else path
            stopped = _fit_stopped(Path(results), name)
            # the log is the last run's, perhaps of another config: what it said, then what to do either way
            said = f"; the workflow's last fit of it stopped: {stopped}" if stopped else ""
            raise CacheError(f"{missing}: no fit for workload {name!r} of {config_name}{said}; run the workflow with "
                             "this config (or pass --configfile for the study you ran, or --all)")  # fmt: skip
        _read_fit(path, cfg.config_hash(fit_slice(config, name)))
        files[name] = path
    return files


def recommendations(results: str | Path, config: dict[str, Any] | None = None, config_name: str = "the config",
                    everything: bool = False, current_batch_size: int | None = None
                    ) -> list[dict[str, Any]]:  # fmt: skip
    """One row per fit: the config's workloads (``config``), or every cached fit (``everything``); each compared
    with ``current_batch_size`` when given."""
    fit_dir = _fit_dir(results)
    if everything:
        paths = sorted(fit_dir.glob("*.nc"))
        if not paths:
            raise CacheError(f"{fit_dir}: no fit results (*.nc); run the workflow, or give the results directory")
        current = None
        if config is not None:
            current = {n: cfg.config_hash(fit_slice(config, n)) for n in config["workloads"]}
    else:
        if config is None:
            raise CacheError("give the study's config (--configfile FILE), or --all for every cached fit")
        paths = list(study_fits(results, config, config_name).values())
    rows, versions = [], set()
    for path in paths:
        ds = _read_fit(path)
        versions.add((ds.attrs.get("batchscope_version"), ds.attrs.get("algorithm_version")))
        row = recommend_row(ds, path, current_batch_size)
        # None: no config to compare with (--all alone, and no config/config.yaml here)
        row["current"] = True if not everything else None if current is None else (
            current.get(row["workload"]) == row["config_hash"])  # fmt: skip
        rows.append(row)
    if len(versions) > 1:
        raise CacheError(
            f"{fit_dir}: fits from different batchscope or algorithm versions {sorted(versions)}; rerun the "
            "workflow so they agree"
        )
    return rows


def recommend_row(ds, path: str | Path = "", current_batch_size: int | None = None) -> dict[str, Any]:
    """The recommendation from one workload's fit (the report's summary and sentence use it too), with what the
    answer cost and, given the batch size a user trains with now, what the recommendation saves against it."""
    best = int(ds["fastest_batch_size"])
    if best <= 0:
        raise CacheError(f"{path}: no batch size reached the target; nothing to recommend")
    at = float(ds["time_from_profile"].sel(batch_size=best))
    trained = [int(b) for b in ds["batch_size"].values]
    grid = json.loads(ds.attrs.get("grid_batch_sizes", "null")) or trained
    low, high = (float(x) for x in ds["time_from_profile_ci"].sel(batch_size=best).values)
    limit = int(ds["smallest_infeasible_batch_size"])
    return {
        "workload": ds.attrs.get("workload", Path(path).stem),
        # the adaptive study trained a bracket of the grid around the quick b_opt (the fit's batch sizes)
        "study": ds.attrs.get("study", "full"),
        "trained_batch_sizes": trained,
        "grid_batch_sizes": grid,
        "extended_batch_size": int(ds.attrs.get("extended_batch_size", -1)),
        "extension_reason": ds.attrs.get("extension_reason", ""),
        "config_hash": ds.attrs.get("config_hash", ""),
        "device": ds.attrs.get("device_type", ""),
        "device_name": ds.attrs.get("device_name", ""),
        "batch_size": best,
        "learning_rate": float(ds["best_lr"].sel(batch_size=best)),
        "indistinguishable": [int(b) for b in ds["batch_size"].values[ds["indistinguishable"].values.astype(bool)]],
        "tolerance": float(ds.attrs.get("tolerance", math.nan)),
        "predicted_b_opt": float(ds["b_opt"]),
        "b_opt_ci": [float(x) for x in ds["b_opt_ci"].values],
        "predicted_b_opt_capped": float(ds["b_opt_capped"]),
        "saturating_b_opt": float(ds["b_opt_sat"]),
        "saturating_b_opt_ci": [float(x) for x in ds["b_opt_sat_ci"].values],
        "saturating_b_opt_capped": float(ds["b_opt_sat_capped"]),
        "time_from_profile_s": at,
        "time_from_profile_ci": [low, high],
        "time_from_fit_s": float(ds["time_from_fit"].sel(batch_size=best)),
        "training_time_to_target_s": float(ds["training_time_to_target"].sel(batch_size=best)),
        "steps_to_target": float(ds["k"].sel(batch_size=best)),
        "largest_feasible_batch_size": int(ds["largest_feasible_batch_size"]),
        # null in --json: no profiled size ran out of memory
        "smallest_infeasible_batch_size": None if limit < 0 else limit,
        "memory_limit_seen": limit > 0,
        # the grid's ends, trained or not (the adaptive study trains a bracket of it: the fit predicts the rest)
        **_against(ds, min(grid), at, "smallest"),
        **_against(ds, max(grid), at, "largest"),
        "diagnostics": json.loads(ds.attrs.get("diagnostics", "[]")),
        "unreached": unreached(ds),
        # the bill (fits made without benchmark files: unknown)
        "cost_s": float(ds["total_cost_s"]) if "total_cost_s" in ds else math.nan,
        "cost_in_runs": float(ds["cost_in_runs"]) if "cost_in_runs" in ds else math.nan,
        "run_s_at_recommended": float(ds["run_s_at_recommended"]) if "run_s_at_recommended" in ds else math.nan,
        **(_against(ds, current_batch_size, at, "current") if current_batch_size is not None else {}),
    }


def runs_reached(ds, batch_size: int) -> tuple[int, int]:
    """(runs that reached the target, runs) at ``batch_size`` in a fit's merged runs: a run reached it where it
    recorded steps to the target (what ``reached_target`` records)."""
    here = ds["run_batch_size"].values == batch_size
    return int(np.isfinite(ds["steps_to_target"].values[here]).sum()), int(here.sum())


def unreached(ds) -> list[dict[str, int]]:
    """The trained batch sizes without a K(B): no learning rate's median seed reached the target (its runs ran out
    of steps, diverged or were pruned), each with how many of its runs did reach it. Sizes out of memory, in the
    profile or in every run, are not among them: they are listed as out of memory."""
    limit = int(ds["smallest_infeasible_batch_size"])
    oom = ds["out_of_memory"].values.astype(bool) if "out_of_memory" in ds else np.zeros(ds.sizes["run"], bool)
    rows = []
    for b, k in zip(ds["batch_size"].values, ds["k"].values, strict=True):
        here = ds["run_batch_size"].values == b
        if math.isfinite(float(k)) or 0 < limit <= b or oom[here].all():
            continue
        reached, runs = runs_reached(ds, int(b))
        rows.append({"batch_size": int(b), "runs_reached": reached, "runs": runs})
    return rows


def format_unreached(rows: list[dict[str, int]]) -> str:
    """``unreached`` in words: "B = 16 (0 of 6 runs reached it), 32 (1 of 6)"."""
    parts = [f"{row['batch_size']} ({row['runs_reached']} of {row['runs']}{' runs reached it' if i == 0 else ''})"
             for i, row in enumerate(rows)]  # fmt: skip
    return "B = " + ", ".join(parts)


def time_at(ds, batch_size: int) -> tuple[float, str]:
    """Time to target at ``batch_size`` and where it comes from: measured (K x T_iter from the profile) where the
    study trained it; inf where it trained it and no learning rate reached the target, or where the profile ran
    out of memory at or below it; else predicted by the fit's model T(B) = K(B) T_iter(B), which says so when the
    size lies beyond the trained ones."""
    from batchscope.core import scaling
    from batchscope.stages.train import ran_out_of_steps

    trained = [int(b) for b in ds["batch_size"].values]
    limit = int(ds["smallest_infeasible_batch_size"])
    measured = float(ds["time_from_profile"].sel(batch_size=batch_size)) if batch_size in trained else math.nan
    if math.isfinite(measured):
        return measured, "profile"
    if 0 < limit <= batch_size:
        return math.inf, f"out of memory in the profile at B = {limit}"
    if batch_size in trained:  # no learning rate's median seed reached the target (diverged, censored, pruned)
        reached, runs = runs_reached(ds, batch_size)
        if reached:
            return math.inf, (f"only {reached} of {runs} training runs reached the target, none on a learning rate's "
                              "median seed")  # fmt: skip
        return math.inf, "never reached the target in training"
    # steps to the target fall with B (K = N_iter + C_var / B, C_var >= 0), and every size has the same max_steps:
    # below the nearest trained size above, if its runs ran out of steps short of the target (not diverged, pruned
    # or out of memory: those say nothing of the steps a smaller batch needs), none gets there
    above = min((b for b in trained if b > batch_size), default=None)
    if (above is not None and not math.isfinite(float(ds["k"].sel(batch_size=above)))
            and ran_out_of_steps(ds)[ds["run_batch_size"].values == above].any()):  # fmt: skip
        return math.inf, (f"the next trained B = {above} ran out of steps short of the target, and a smaller "
                          "batch needs more")  # fmt: skip
    params = (float(ds[k]) for k in ("n_iter", "c_var", "tau_f", "tau_d"))
    value = float(scaling.predicted_time(batch_size, *params))
    if min(trained) <= batch_size <= max(trained):
        return value, "fit"
    return value, f"fit, extrapolated beyond the trained B = {min(trained)} to {max(trained)}"


def _against(ds, batch_size: int, at: float, key: str) -> dict[str, Any]:
    """A batch size's time to target beside the recommended one's (``at``, from the profile): its slowdown and what
    the recommended size saves per training run, under ``key``_* names. A time the fit predicts is set beside the
    fit's own time at the recommended size: near the optimum the two sources differ by more than the sizes do, and
    a size in the as-fast set read as faster than the recommended one."""
    value, source = time_at(ds, batch_size)
    if source.startswith("fit"):
        at = float(ds["time_from_fit"].sel(batch_size=int(ds["fastest_batch_size"])))
    return {f"{key}_batch_size": batch_size, f"{key}_time_s": value, f"{key}_source": source,
            f"{key}_slowdown": value / at, f"{key}_saving_s": value - at}  # fmt: skip


def slowdown(row: dict[str, Any], key: str) -> str:
    """``key``'s batch size against the recommended one: how much longer it takes, what the recommended size saves
    per training run, and where its time comes from. ``recommend`` prints it and the report's answer table shows it
    (one phrasing of the row)."""
    b, ratio = row[f"{key}_batch_size"], row[f"{key}_slowdown"]
    if b == row["batch_size"]:
        return f"B = {b} is the recommended size"
    if not math.isfinite(ratio):
        return f"B = {b} does not reach the target ({row[f'{key}_source']})"
    if ratio < 1:  # by the fit's prediction, beside the fit's own time at the recommended size: its optimum is nearer
        return (
            f"B = {b} takes {ratio:.2f}x as long by the {row[f'{key}_source']}: the fit's own b_opt "
            f"{row['predicted_b_opt']:.0f} lies nearer it; the recommended size is the fastest measured"
        )
    return (f"B = {b} takes {ratio:.2f}x as long: the recommended size saves {row[f'{key}_saving_s']:.3g} s per "
            f"training run (from the {row[f'{key}_source']})")  # fmt: skip


def _bill(row: dict[str, Any]) -> str:
    """What the study's answer cost, in device-seconds and in training runs at the recommended size (unknown where
    the fit had no benchmark files, e.g. a results directory copied without them)."""
    if not math.isfinite(row["cost_s"]):
        return "unknown (a job without its Snakemake benchmark file: one run with --touch, or by hand)"
    runs = (f", {_count(row['cost_in_runs'])} training runs at B = {row['batch_size']} "
            f"({row['run_s_at_recommended']:.3g} s each)" if math.isfinite(row["cost_in_runs"]) else "")  # fmt: skip
    return f"{row['cost_s']:.4g} device-seconds{runs}"


def _count(value: float) -> str:
    """A count of runs: three significant digits, whole from 999.5 up (1080, not 1.08e+03; 1000, not 1e+03)."""
    return f"{value:.0f}" if abs(value) >= 999.5 else f"{value:.3g}"


def _b_opt(value: float, interval: list[float], capped: float) -> str:
    if math.isnan(value):
        return "none (needs 3 feasible profiled sizes)"
    low, high = interval
    text = f"{value:.0f}" + (f" (95% interval {batch_interval(low, high)})" if math.isfinite(low) else "")
    return text + (f", capped at {capped:.0f}" if capped < value else "")


def _memory(row: dict[str, Any]) -> str:
    largest = row["largest_feasible_batch_size"]
    if row["memory_limit_seen"]:
        return f"largest feasible B {largest} (out of memory at B = {row['smallest_infeasible_batch_size']})"
    return f"largest feasible B {largest} (no memory limit seen up to B = {largest}, the largest profiled)"


def format_row(row: dict[str, Any]) -> str:
    best = row["batch_size"]
    same = ", ".join(map(str, row["indistinguishable"]))
    t_low, t_high = row["time_from_profile_ci"]
    labels = {False: " [not the current config's]", None: " [no config given to compare with]"}
    label = labels.get(row.get("current"), "")
    lines = [
        f"{row['workload']} on {row['device']} ({row['device_name']}), config {row['config_hash']}{label}:",
        f"  batch size {best} at learning rate {row['learning_rate']:g}; as fast within "
        f"{100 * row['tolerance']:.0f}% (bootstrap over seeds and profiling rounds): B = {same}",
        f"  predicted b_opt {_b_opt(row['predicted_b_opt'], row['b_opt_ci'], row['predicted_b_opt_capped'])} with the "
        f"linear T_iter, {_b_opt(row['saturating_b_opt'], row['saturating_b_opt_ci'], row['saturating_b_opt_capped'])}"
        f" with the saturating T_iter; {_memory(row)}",
        f"  time to target at B = {best}: {row['time_from_profile_s']:.3g} s from the profile (K x T_iter, 95% "
        f"interval {t_low:.3g} to {t_high:.3g}; batch sizes are ranked by this), {row['time_from_fit_s']:.3g} s from "
        f"the fit, {row['training_time_to_target_s']:.3g} s measured in training (the runs' own clock over "
        "their training steps)",
        f"  the grid's smallest: {slowdown(row, 'smallest')}",
        f"  the grid's largest: {slowdown(row, 'largest')}",
    ]
    lines += [f"  {line}" for line in adaptive_lines(row)]
    if row["unreached"]:
        lines.append(
            f"  no learning rate reached the target on its median seed at {format_unreached(row['unreached'])}"
        )
    lines.append(f"  this answer cost {_bill(row)}")
    if "current_batch_size" in row:
        lines.append(f"  against your {slowdown(row, 'current')}")
    lines += [f"  warning: {note}" for note in row["diagnostics"]]
    return "\n".join(lines)


def adaptive_lines(row: dict[str, Any]) -> list[str]:
    """The adaptive study's sizes and its second round, in words (none for the full grid): ``recommend`` prints them,
    the report's recommendation says them."""
    if row["study"] != "adaptive":
        return []
    lines = [f"adaptive study: trained B = {', '.join(map(str, row['trained_batch_sizes']))} of the grid "
             f"{', '.join(map(str, row['grid_batch_sizes']))}, around the quick estimate's b_opt"]  # fmt: skip
    if row["extension_reason"]:
        reason = row["extension_reason"]
        lines.append(f"second round: {reason if row['extended_batch_size'] > 0 else f'nothing added ({reason})'}")
    return lines


def quick_rows(results: str | Path, config: dict[str, Any],
               current_batch_size: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The quick estimates of the config's workloads (``results/quick``), each checked to be this config's; with
    ``current_batch_size``, its predicted time to target against b_opt's (:func:`quick_against`)."""
    from batchscope.core import scaling
    from batchscope.stages.quick import VARIABLES, reference_job_seconds, stood_in
    from batchscope.stages.quick import config_slice as quick_slice

    rows = []
    for name in sorted(config["workloads"]):
        path = Path(results) / "quick" / f"{name}.nc"
        if not path.is_file():
            raise CacheError(f"{path}: no quick estimate for workload {name!r}; run `snakemake quick` with this config")
        ds = read_netcdf(path, "quick_estimate", VARIABLES, cfg.config_hash(quick_slice(config, name)))
        rows.append({
            "workload": name,
            "b_opt": float(ds["b_opt"]),
            "b_opt_sat": float(ds["b_opt_sat"]),
            "b_knee": float(ds["sat_b_knee"]),
            "b_opt_band": [float(x) for x in ds["b_opt_band"].values],
            "b_opt_ci": [float(x) for x in ds["b_opt_ci"].values] if "b_opt_ci" in ds else [math.nan] * 2,
            "best_b_range": list(scaling.quick_best_range(float(ds["b_opt"]), int(ds["largest_feasible_batch_size"]))),
            "diagnostics": json.loads(ds.attrs.get("diagnostics", "[]")),
            "b_crit_band": [float(x) for x in ds["b_crit_band"].values],
            # where B_simple stood in for an infinite B_noise (quick.stand_in), after step 0
            "b_simple_stood_in": bool((stood_in(ds) & (ds["step"].values > 0)).any()),
            "b_crit": float(ds["b_crit"]),
            "b_noise_mean": float(ds["b_noise_mean"]),
            "update_lag": float(ds["update_lag"]),
            "steps_to_target": float(ds.attrs.get("run_steps_to_target", math.nan)),
            "nearest_grid_batch_size": int(ds["nearest_grid_batch_size"]),
            "largest_feasible_batch_size": int(ds["largest_feasible_batch_size"]),
            "cost_s": float(ds["total_cost_s"]),
            "cost_in_reference_runs": float(ds["cost_in_reference_runs"]),
            # the unit: the reference run's job, its process start included (the answer's bill counts runs by their
            # own clock: on runs of a tenth of a second the two units are far apart)
            "reference_job_s": reference_job_seconds(ds),
            "noise_job_whole_stage": bool(ds.attrs.get("noise_job_whole_stage", 0)),
            "reference": f"B={ds.attrs['reference_batch_size']} lr={ds.attrs['reference_lr']:g}",
            **(quick_against(ds, current_batch_size) if current_batch_size is not None else {}),
        })  # fmt: skip
    return rows


def quick_against(ds, batch_size: int) -> dict[str, Any]:
    """The quick estimate's time to target at ``batch_size`` over its time at b_opt, from K(B) = S_min (1 + b_crit /
    B) and T_iter(B) = tau_f + tau_d B (S_min, unknown without a grid, cancels); inf at or above a size the profile
    ran out of memory at; said to be extrapolated above the largest size profiled."""
    from batchscope.core import scaling

    b_opt, limit = float(ds["b_opt"]), int(ds["smallest_infeasible_batch_size"])
    largest = int(ds["largest_feasible_batch_size"])
    params = (1.0, float(ds["b_crit"]), float(ds["tau_f"]), float(ds["tau_d"]))
    ratio = float(scaling.predicted_time(batch_size, *params) / scaling.predicted_time(b_opt, *params))
    source = "predicted from the quick B_crit and the profile"
    if 0 < limit <= batch_size:
        ratio, source = math.inf, f"out of memory in the profile at B = {limit}"
    elif not math.isfinite(ratio):
        source = "no prediction: the quick estimate has no finite b_crit and b_opt"
    elif batch_size > largest:
        source += f", extrapolated beyond the largest size profiled, {largest}"
    return {"current_batch_size": batch_size, "current_slowdown": ratio, "current_source": source}


def _knee(b_knee: float) -> str:
    return f"flat up to B = {b_knee:.0f}" if b_knee >= 1 else "no knee: one line through every feasible profiled size"


def format_quick(row: dict[str, Any]) -> str:
    low, high = row["b_opt_band"]
    c_low, c_high = row["b_crit_band"]
    c_high_text = f"{c_high:.3g}" if math.isfinite(c_high) or math.isnan(c_high) else "infinite"
    stood_in = ", with B_simple where G^T H G <= 0" if row.get("b_simple_stood_in") else ""
    lag = (
        f" (B_noise's progress-weighted mean {row['b_noise_mean']:.3g}, less the optimizer's build-up: "
        f"{row['update_lag']:.3g} of the reference run's {row['steps_to_target']:.0f} steps)"
        if row["update_lag"] > 0 and math.isfinite(row["steps_to_target"])
        else ""
    )
    job_s = row.get("reference_job_s", math.nan)
    about = [f"a reference run: its job's {job_s:.3g} s, the process start included"] if math.isfinite(job_s) else []
    if row["noise_job_whole_stage"]:
        about.append("its gradient-noise job ran the whole noise stage, noise.enabled: true; with it off the job "
                     "measures the two-batch B_noise alone, for less")  # fmt: skip
    bill = f" ({'; '.join(about)})" if about else ""
    return (f"{row['workload']} (quick estimate: the profile and one reference run, {row['reference']}):\n"
            f"  b_opt {row['b_opt']:.0f} from the run's B_crit {row['b_crit']:.3g}{lag}; over the run {low:.0f} to "
            f"{high:.0f} (B_noise {c_low:.3g} to {c_high_text}{stood_in}); "
            f"the grid's nearest: B = {row['nearest_grid_batch_size']}; largest feasible B "
            f"{row['largest_feasible_batch_size']}\n"
            + (f"  with the saturating step time ({_knee(row['b_knee'])}): b_opt {row['b_opt_sat']:.0f}\n"
               if math.isfinite(row["b_opt_sat"]) else "")
            + f"  b_opt's 95% interval over the profile's rounds and the noise pairs: "
            f"{batch_interval(*row['b_opt_ci'])}\n"
            + _model_range(row) +
            f"  it cost {row['cost_s']:.4g} device-seconds, {_count(row['cost_in_reference_runs'])} reference "
            f"runs{bill}" + _quick_current(row)
            + "".join(f"\n  warning: {note}" for note in row["diagnostics"]))  # fmt: skip


def _model_range(row: dict[str, Any]) -> str:
    """How far to trust the quick b_opt: its interval is the measurement's noise; the model's own error is wider."""
    from batchscope.core.scaling import QUICK_BEST_OVER_B_OPT

    low, high = row["best_b_range"]
    if not math.isfinite(low):
        return ""
    return (
        f"  how far to trust it: that interval is the measurement's noise alone. B_noise stands in for the "
        f"critical batch size, and on the budget benchmark's workloads the full grid's fastest B lay between "
        f"{QUICK_BEST_OVER_B_OPT[0]:g} and {QUICK_BEST_OVER_B_OPT[1]:g} times the quick b_opt: here B = "
        f"{low:.0f} to {high:.0f}. `study: adaptive` measures the answer on a bracket of sizes around b_opt\n"
    )


def _quick_current(row: dict[str, Any]) -> str:
    if "current_batch_size" not in row:
        return ""
    b, ratio = row["current_batch_size"], row["current_slowdown"]
    if not math.isfinite(ratio):
        return f"\n  against your B = {b}: {row['current_source']}"
    return (f"\n  against your B = {b}: {ratio:.2f}x the time to target at b_opt {row['b_opt']:.0f} "
            f"({row['current_source']})")  # fmt: skip


def _strict(value: Any) -> Any:
    """Strict JSON has no Infinity/NaN: a batch size that never reached the target, a missing bound, is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def main(results: str, config_file: str | None, everything: bool, as_json: bool, current_batch_size: int | None = None,
         quick: bool = False) -> str:  # fmt: skip
    # the config names the study; its factories need not be importable where the results are read
    config = cfg.load(config_file, importable=False) if config_file is not None else None
    if quick:
        if config is None:
            raise CacheError("--quick reads the config's quick estimates: give --configfile FILE")
        rows = quick_rows(_results_root(results), config, current_batch_size)
        fmt = format_quick
    else:
        rows = recommendations(results, config, str(config_file), everything, current_batch_size)
        fmt = format_row
    if as_json:
        return json.dumps(_strict(rows), indent=2, allow_nan=False)
    return "\n".join(fmt(row) for row in rows)


def run(args: argparse.Namespace) -> None:
    config_file = args.configfile
    if config_file is None and Path(cfg.DEFAULT_CONFIG).is_file():
        config_file = cfg.DEFAULT_CONFIG  # as snakemake: the default study when no config is named
    if config_file is None and not args.all:
        raise SystemExit(f"batchscope recommend: no {cfg.DEFAULT_CONFIG} here; give --configfile FILE (the "
                         "study you ran) or --all")  # fmt: skip
    try:
        print(main(args.results, config_file, args.all, args.json, args.current_batch_size, args.quick))
    except CacheError as err:
        raise SystemExit(f"batchscope recommend: {err}") from None


def _batch_size(text: str) -> int:
    """A batch size from the command line: a positive whole number, else argparse's error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of examples") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a batch size (at least 1)")
    return value


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="?", default="results", help="a results directory (or its fit/ directory)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--configfile", help=f"the study's config, as given to snakemake (default: "
                        f"{cfg.DEFAULT_CONFIG}, as snakemake's)")  # fmt: skip
    parser.add_argument("--all", action="store_true", help="every cached fit, labelled by config hash")
    parser.add_argument("--current-batch-size", type=_batch_size, metavar="B", help="the batch size you train with "
                        "now: what the recommendation saves against it")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the quick estimates (snakemake quick): b_opt from the "
                        "profile and one reference run")  # fmt: skip


COMMANDS = (
    Command("recommend", "the recommended batch size and learning rate, from the cached fits", run, _arguments),
)
