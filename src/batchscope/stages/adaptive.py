"""Stage ``choose_batch_sizes``: the adaptive study's batch sizes, chosen from the quick estimate.

The full grid (``study: full``) trains every batch size, learning rate and seed. The adaptive study (``study:
adaptive``) spends its training where the answer is:

- **Batch sizes.** A Snakemake checkpoint (``workflow/rules/adaptive.smk``) reads the workload's quick estimate
  (b_opt from the profile and the reference run's B_noise, capped at the largest feasible batch size) and picks a
  geometric bracket of the grid around it (:func:`~batchscope.core.selection.choose`): the grid size nearest b_opt
  (on a log scale) and ``adaptive.neighbours`` grid sizes on each side, widened until it covers the quick estimate's
  b_opt band over the run, never above the largest feasible batch size. Everything downstream (the fit, the Hessian
  stage, the bill and the report's cost table) reads the chosen sizes from the checkpoint's file. The profile still
  times every grid size: it is cheap, and the memory limit needs it.
- **Learning rates, by successive halving with a pruning bound.** One job per chosen batch size trains all its seeds
  (``train_batch_size``). Its first seed trains every learning rate, the likely best first
  (:func:`~batchscope.core.selection.lr_order`: the noise stage's reference lr index, the middle of the grid by
  default, then outward), each capped at the steps of the best run so far: a run that has taken that many steps
  without reaching the target cannot win, so it stops there, recorded as not reached (``steps_to_target`` NaN,
  ``reached_target`` false, ``pruned`` true). Each later seed, in the same job, trains the best 1/``halving_rate``
  (3) of the learning rates the seed before it trained (:func:`~batchscope.core.selection.survivors`: by the median
  steps to the target over their seeds so far, ties kept, then the unreached by their final loss), in full: K(B) is
  a median over seeds, which a per-seed bound could bias.
- **One size past the bracket, where the answer says so**: the second checkpoint, ``extend_bracket``
  (:mod:`batchscope.stages.extend`).

The choices are written to small NetCDF files (values in their variables, not in paths), read back by the workflow's
input functions (:func:`read_choice`).
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

import numpy as np
import xarray as xr

from batchscope import config as cfg
from batchscope.core.selection import choose
from batchscope.stages import Command, Rule, _common, quick

log = logging.getLogger("batchscope")


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """The grid it chooses from, the bracket's width, and what identifies its input (the quick estimate)."""
    return {
        "batch_sizes": sorted(config["grid"]["batch_sizes"]),
        "neighbours": config["adaptive"]["neighbours"],
        "inputs": {"quick_estimate": cfg.config_hash(quick.config_slice(config, workload))},
    }


def bracket_band(estimate: xr.Dataset) -> list[float]:
    """The band of b_opt the bracket must cover: the quick estimate's over the run with the linear step time,
    widened to the saturating step time's (where the two models disagree, the training decides between them).
    Unchanged where there is no linear b_opt (then the whole feasible grid is trained anyway)."""
    band = [float(x) for x in estimate["b_opt_band"].values]
    if not math.isfinite(float(estimate["b_opt"])):
        return band
    covered = [b for b in (*band, *(float(x) for x in estimate["b_opt_sat_band"].values)) if math.isfinite(b) and b > 0]
    return [min(covered), max(covered)] if covered else band


def estimate_choice(spec: dict[str, Any], quick_path: str, expect: dict[str, str] | None = None) -> xr.Dataset:
    """The checkpoint's file: per grid size whether it is trained (``chosen``) and feasible, and what decided it."""
    from batchscope.store import read_expected

    estimate = read_expected(quick_path, "quick_estimate", quick.VARIABLES + ("largest_feasible_batch_size",), expect)
    b_opt, band = float(estimate["b_opt"]), [float(x) for x in estimate["b_opt_band"].values]
    sat_band = [float(x) for x in estimate["b_opt_sat_band"].values]
    widened = bracket_band(estimate)
    largest = int(estimate["largest_feasible_batch_size"])
    choice = choose(spec["batch_sizes"], b_opt, widened, largest, spec["neighbours"])
    reason = choice.reason
    if widened != band:
        reason += (f" (the band taken to cover the saturating step time's b_opt over the run too, {sat_band[0]:.0f} to "
                   f"{sat_band[1]:.0f})")  # fmt: skip
    grid = np.asarray(sorted(spec["batch_sizes"]), dtype=np.int64)
    ds = xr.Dataset(
        {
            "chosen": ("grid_batch_size", np.isin(grid, choice.batch_sizes), {"long_name": "trained by the adaptive "
                       "study"}),
            "feasible": ("grid_batch_size", (grid <= largest) if largest > 0 else np.zeros(len(grid), bool),
                         {"long_name": "at most the largest batch size that fitted in memory"}),
            "b_opt": ((), b_opt, {"units": "examples", "long_name": "the quick estimate's b_opt (capped)"}),
            "b_opt_band": ("bound", band, {"units": "examples", "long_name": "the quick b_opt over the run"}),
            "b_opt_sat_band": ("bound", sat_band, {"units": "examples", "long_name": "the quick b_opt with the "
                               "saturating step time over the run (the bracket covers it too)"}),
            "largest_feasible_batch_size": ((), largest),
            "centre_batch_size": ((), choice.centre, {"long_name": "the feasible grid size nearest b_opt (-1: none)"}),
        },
        coords={"grid_batch_size": grid, "bound": ["low", "high"]},
    )  # fmt: skip
    ds.attrs["reason"] = reason
    return ds


def read_choice(path: str, stage: str = "choose_batch_sizes") -> list[int]:
    """The batch sizes a checkpoint chose, ``choose_batch_sizes``'s bracket or ``extend_bracket``'s bracket and
    extension (the workflow's input functions read them here)."""
    from batchscope.store import read_netcdf

    ds = read_netcdf(path, stage, VARIABLES)
    return [int(b) for b in ds["grid_batch_size"].values[ds["chosen"].values.astype(bool)]]


def run(args: argparse.Namespace) -> None:
    from batchscope import store

    spec = _common.spec(args, config_slice)
    ds = estimate_choice(spec, args.quick, _common.expect(args))
    ds.attrs.update(store.provenance("choose_batch_sizes", spec), workload=args.workload or "")
    store.write_netcdf(ds, args.out)
    chosen = ds["grid_batch_size"].values[ds["chosen"].values]
    log.info("train B = %s of the grid %s: %s", ", ".join(map(str, chosen)),
             ", ".join(map(str, ds["grid_batch_size"].values)), ds.attrs["reason"])  # fmt: skip


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", required=True, help="the workload's quick estimate (results/quick/WORKLOAD.nc)")
    _common.add_expect(parser)


VARIABLES = ("chosen", "feasible", "b_opt", "b_opt_band", "largest_feasible_batch_size")
# choose_batch_sizes 2: the bracket also covers the saturating step time's b_opt
RULES = {
    "choose_batch_sizes": Rule(version=2, config_slice=config_slice, variables=VARIABLES),
}
COMMANDS = (
    Command(
        "choose-batch-sizes",
        "the adaptive study's batch sizes: a bracket of the grid around the quick estimate's b_opt",
        run,
        _arguments,
        spec=config_slice,
    ),  # fmt: skip
)
