"""The study as a whole: the checks that need the data, shared by ``batchscope validate`` and the workflow.

:func:`batchscope.config.validate` checks what the config file alone decides. Some sizes are only known from the
data: a factory's training set, the files in a local directory. :func:`check` reads them from each workload's
``prepare_data`` record when an up-to-date one exists, else builds the record the way ``prepare_data`` does
(:func:`record`), and checks every batch size and evaluation size against them, so a bad value is refused before
any profiling or training job starts, with the same message from ``validate`` as from the workflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchscope import config as cfg


def record(workload_spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(workload, summary) of a workload slice, built on the CPU as ``prepare_data`` builds it: the factory is
    called and its result checked. Whatever goes wrong is a :class:`batchscope.workload.WorkloadError` (or the
    data's own :class:`batchscope.data.DataError`) naming the workload and its factory, never a traceback."""
    import torch

    from batchscope.data import DataError
    from batchscope.workload import WorkloadError, build, describe

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
    from batchscope.io import CacheError, read_netcdf

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
