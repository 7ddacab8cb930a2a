"""The answer in one line: the recommended batch size and learning rate per workload, from the cached fits only.

Reads ``results/fit/*.nc`` (no training, no torch), so it works on results copied from a cluster. For each
workload: the grid's best batch size (the argmin of the measured K(B) T_iter(B)) with its best learning rate, the
predicted b_opt, the predicted and measured time to target there, and how much slower the grid's smallest and
largest batch sizes were.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from batchscope.io import CacheError, read_netcdf

REQUIRED = (
    "b_opt",
    "k",
    "best_lr",
    "t_empirical",
    "t_predicted",
    "measured_best_batch_size",
    "time_to_target_measured",
)


__all__ = ["CacheError", "recommend_row", "recommendations"]


def recommendations(results: str | Path) -> list[dict[str, Any]]:
    results = Path(results)
    fit_dir = results / "fit" if (results / "fit").is_dir() else results
    files = sorted(fit_dir.glob("*.nc"))
    if not files:
        raise CacheError(f"{fit_dir}: no fit results (*.nc); run the workflow, or give the results directory")
    rows, versions = [], set()
    for path in files:
        try:
            ds = read_netcdf(path)
        except OSError as err:
            raise CacheError(str(err)) from err
        missing = [name for name in REQUIRED if name not in ds]
        if ds.attrs.get("stage") != "fit_scaling" or missing:
            raise CacheError(
                f"{path}: not a fit_scaling result (stage {ds.attrs.get('stage')!r}, missing {missing}); "
                "delete it and rerun the workflow"
            )
        versions.add((ds.attrs.get("batchscope_version"), ds.attrs.get("algorithm_version")))
        rows.append(recommend_row(ds, path))
    if len(versions) > 1:
        raise CacheError(
            f"{fit_dir}: fits from different batchscope or algorithm versions {sorted(versions)}; rerun the "
            "workflow so they agree"
        )
    return rows


def recommend_row(ds, path: str | Path = "") -> dict[str, Any]:
    """The recommendation from one workload's fit (the report's summary and sentence use it too)."""
    best = int(ds["measured_best_batch_size"])
    if best <= 0:
        raise CacheError(f"{path}: no batch size reached the target; nothing to recommend")
    measured = ds["t_empirical"]
    smallest, largest = int(ds["batch_size"].min()), int(ds["batch_size"].max())
    at = float(measured.sel(batch_size=best))

    def slowdown(b: int) -> float:
        value = float(measured.sel(batch_size=b))
        return value / at if math.isfinite(value) else math.inf

    return {
        "workload": ds.attrs.get("workload", Path(path).stem),
        "device": ds.attrs.get("device_type", ""),
        "device_name": ds.attrs.get("device_name", ""),
        "batch_size": best,
        "learning_rate": float(ds["best_lr"].sel(batch_size=best)),
        "predicted_b_opt": float(ds["b_opt"]),
        "b_opt_ci": [float(x) for x in ds["b_opt_ci"].values] if "b_opt_ci" in ds else None,
        "predicted_time_to_target_s": float(ds["t_predicted"].sel(batch_size=best)),
        "measured_time_to_target_s": at,
        "training_time_to_target_s": float(ds["time_to_target_measured"].sel(batch_size=best)),
        "steps_to_target": float(ds["k"].sel(batch_size=best)),
        "smallest_batch_size": smallest,
        "smallest_slowdown": slowdown(smallest),
        "largest_batch_size": largest,
        "largest_slowdown": slowdown(largest),
    }


def _slowdown(ratio: float) -> str:
    # inf: that batch size never reached the target (diverged, out of memory or censored at every lr)
    return f"{ratio:.2f}x" if math.isfinite(ratio) else "never reached the target (see the report's failed points)"


def format_line(row: dict[str, Any]) -> str:
    return (
        f"{row['workload']} on {row['device']} ({row['device_name']}): batch size {row['batch_size']} at learning "
        f"rate {row['learning_rate']:g} (predicted b_opt {row['predicted_b_opt']:.0f}); time to target "
        f"{row['measured_time_to_target_s']:.3g} s measured, {row['predicted_time_to_target_s']:.3g} s predicted; "
        f"B = {row['smallest_batch_size']}: {_slowdown(row['smallest_slowdown'])} slower, "
        f"B = {row['largest_batch_size']}: {_slowdown(row['largest_slowdown'])}"
    )


def main(results: str, as_json: bool) -> str:
    rows = recommendations(results)
    if as_json:  # strict JSON has no Infinity/NaN: a batch size that never reached the target is null
        clean = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
        return json.dumps(clean, indent=2)
    return "\n".join(format_line(row) for row in rows)
