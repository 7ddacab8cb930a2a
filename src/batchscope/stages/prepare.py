"""Stage ``prepare_data``: check each workload's factory once and keep its record; and the study's checks that
need the data, shared by ``batchscope validate`` and the workflow.

:func:`batchscope.config.validate` checks what the config file alone decides. Some sizes are only known from the
data: a factory's training set, the files in a local directory. :func:`check` reads them from each workload's
``prepare_data`` record when an up-to-date one exists, else builds the record the way ``prepare_data`` does
(:func:`record`), and checks every batch size and evaluation size against them, so a bad value is refused before
any profiling or training job starts, with the same message from ``validate`` as from the workflow.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from batchscope import config as cfg
from batchscope.stages import Command, Rule, _common

log = logging.getLogger("batchscope")


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    return {"workload": cfg.workload_slice(config, workload)}


def record(workload_spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(workload, summary) of a workload slice, built on the CPU as ``prepare_data`` builds it: the factory is
    called and its result checked. Whatever goes wrong is a :class:`batchscope.workloads.base.WorkloadError` (or the
    data's own :class:`batchscope.workloads.data.DataError`) naming the workload and its factory, never a traceback."""
    import torch

    from batchscope.workloads.base import WorkloadError, build, describe
    from batchscope.workloads.data import DataError

    where = f"workloads.{workload_spec['name']}"
    try:
        workload = build(workload_spec, torch.device("cpu"))
        return workload, describe(workload)
    except (WorkloadError, DataError) as err:
        raise type(err)(f"{where}: {err}") from err
    except Exception as err:  # the user's factory raised: its message, with where it came from
        raise WorkloadError(
            f"{where}.factory: {workload_spec['factory']!r} raised {type(err).__name__}: {err}"
        ) from err


def cached_record(path: str | Path, workload_spec: dict[str, Any]) -> dict[str, Any] | None:
    """The summary a ``prepare_data`` file keeps, when it exists and was made for this workload slice and by
    this version of the stage. Only its attributes are read: for a built-in dataset the file is the whole data
    cache (hundreds of MB for CIFAR-10), and this runs at every Snakemake start."""
    from batchscope.store import CacheError, read_netcdf

    try:
        expected = cfg.config_hash({"workload": workload_spec})
        attrs = read_netcdf(path, "prepare_data", (), expected, attrs_only=True).attrs
    except CacheError:
        return None  # absent, unreadable, stale or another config's: prepare_data will rebuild it
    return {k: json.loads(v) if isinstance(v, str) and v.startswith("[") else v for k, v in attrs.items()}


def train_sizes(config: dict[str, Any], results: str | Path | None = "results") -> dict[str, int]:
    """Every workload's training-set size: from the config where it decides it, else from the workload's
    ``prepare_data`` record under ``results`` (when current), else from building the record now."""
    sizes = cfg.static_train_sizes(config)
    for name in config["workloads"]:
        if name in sizes:
            continue
        spec = cfg.workload_slice(config, name)
        summary = cached_record(Path(results) / "data" / f"{name}.nc", spec) if results is not None else None
        if summary is None:
            summary = record(spec)[1]
        sizes[name] = int(summary["n_train"])
    return sizes


def check(config: dict[str, Any], results: str | Path | None = "results") -> dict[str, int]:
    """Refuse (:class:`batchscope.config.ConfigError`, naming the key and value) a size the data cannot give;
    returns the training-set sizes it checked against."""
    sizes = train_sizes(config, results)
    cfg.check_sizes(config, sizes)
    return sizes


def run_validate(args: argparse.Namespace) -> None:
    """The workflow's own checks: the config file, then the sizes only the data know."""
    config = cfg.load(args.config)
    sizes = check(config, args.results)
    n_runs = sum(len(cfg.train_points(config, w)) for w in config["workloads"])
    examples = ", ".join(f"{name} {n}" for name, n in sorted(sizes.items()))
    # the adaptive study trains a bracket of the grid, chosen after the quick estimate: the grid is its upper bound
    runs = (
        f"at most {n_runs} training run(s) (study: adaptive)"
        if config["study"] == "adaptive"
        else (f"{n_runs} training run(s)")
    )
    print(f"{args.config}: valid; {len(config['workloads'])} workload(s), {runs}; "
          f"training examples: {examples}")  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Check the workload's factory once, before any training, and keep a record of it. For the built-in
    datasets the record is also the data cache every later job reads."""
    import xarray as xr

    from batchscope import store
    from batchscope.workloads.base import builtin_dataset

    spec = _common.spec(args, config_slice)
    wl_spec = spec["workload"]
    _, summary = record(wl_spec)  # what `batchscope validate` and the workflow's parse-time check build
    # the built-in factory has just built its dataset; the cache is that object (copied: the factory's is shared)
    builtin = wl_spec["factory"] == cfg.BUILTIN_FACTORY
    ds = builtin_dataset(wl_spec["dataset"]).copy() if builtin else xr.Dataset()
    ds.attrs.update(store.provenance("prepare_data", spec), **{k: json.dumps(v) if isinstance(v, list) else v
                                                              for k, v in summary.items()})  # fmt: skip
    store.write_netcdf(ds, args.out)
    log.info("wrote %s: %s", args.out, summary)


def _validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config")
    parser.add_argument("--results", default="results", help="where prepare_data records are reused from "
                        "(default: results)")  # fmt: skip


RULES = {"prepare_data": Rule(version=1, config_slice=config_slice)}
COMMANDS = (
    Command(
        "validate",
        "validate a config file and its data (the workflow's checks) and summarise",
        run_validate,
        _validate_arguments,
    ),  # fmt: skip
    Command("prepare-data", "check a workload's factory; cache a built-in dataset as NetCDF", run, spec=config_slice),
)
