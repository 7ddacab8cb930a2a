"""Stage ``profile_hardware``: time the training step of one workload at every batch size, in interleaved rounds
(the timing itself is :mod:`batchscope.engine.profiling`); one NetCDF per batch size."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xarray as xr

from batchscope import config as cfg
from batchscope.stages import Command, Rule, _common
from batchscope.store import read_expected, same_device, same_provenance

log = logging.getLogger("batchscope")

# what a profile file holds for the fit and the report
VARIABLES = ("t_iter", "t_iter_round", "t_iter_median", "feasible", "peak_memory")


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """The step and how it is timed: not the target, not the grid (sizes are in the paths), not the extra sizes."""
    wl = config["workloads"][workload]
    return {
        "workload": cfg.workload_slice(config, workload),
        "optimizer": wl["optimizer"],
        "schedule": wl["schedule"],
        "profile": {k: v for k, v in config["profile"].items() if k != "extra_batch_sizes"},
        **cfg.execution(config),
    }


def read_profiles(paths: Sequence[str | Path], expect: dict[str, str] | None = None) -> xr.Dataset:
    """A workload's profiles, one per batch size, as one Dataset (dim ``profile_batch_size``); the fit and the quick
    estimate read them."""
    parts, datasets = [], []
    for path in paths:
        ds = read_expected(path, "profile_hardware", VARIABLES, expect)
        datasets.append(ds)
        parts.append(ds.expand_dims(profile_batch_size=[int(ds.attrs["batch_size"])]))
    same_provenance(datasets, list(paths), "profiles")
    same_device(datasets, list(paths), "profiles")
    merged = xr.concat(parts, dim="profile_batch_size", combine_attrs="drop_conflicts").sortby("profile_batch_size")
    # round r of every file is one stretch of time only when one job timed them all (profile_hardware does)
    together = {ds.attrs.get("profiled_together") for ds in datasets}
    merged.attrs["paired_rounds"] = int(len(together) == 1 and None not in together)
    return merged.rename({name: f"profile_{name}" for name in merged.data_vars})


def run(args: argparse.Namespace) -> None:
    """Every batch size of a workload in one process, in interleaved rounds; one NetCDF per batch size."""
    from batchscope import store
    from batchscope.engine.profiling import profile

    spec = _common.spec(args, config_slice)
    device = _common.runtime(spec)
    if len(args.out) != len(args.batch_size):
        raise SystemExit(f"profile: {len(args.batch_size)} batch sizes but {len(args.out)} --out files")
    results = profile(spec, args.batch_size, device, data_file=args.data)
    for batch_size, out in zip(args.batch_size, args.out, strict=True):
        ds = results[batch_size]
        ds.attrs.update(store.provenance("profile_hardware", spec, device=str(device)))
        store.write_netcdf(ds, out)
        log.info("B=%d: median step %.3g ms over %d rounds, feasible=%s", batch_size,
                 1e3 * float(ds["t_iter_median"]), ds.sizes["round"], bool(ds["feasible"]))  # fmt: skip


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, nargs="+", required=True)


RULES = {"profile_hardware": Rule(version=2, config_slice=config_slice, variables=VARIABLES)}
COMMANDS = (
    Command(
        "profile",
        "time the training step at batch sizes, in interleaved rounds",
        run,
        _arguments,
        spec=config_slice,
        outputs="+",
    ),  # fmt: skip
)
