"""NetCDF and checkpoint I/O: atomic writes and provenance attributes.

Every file is written to a temporary name in the destination directory and renamed into place, so a job
killed mid-write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import xarray as xr

from batchscope import __version__
from batchscope.config import config_hash
from batchscope.faults import kill_point

# HDF5's file locks fail on many cluster filesystems (NFS, Lustre without flock) with "unable to lock file". Every
# file here has one writer, which writes a temporary name and renames it, and readers only open finished files,
# so the locks protect nothing: off unless the user set the variable (it must be set before HDF5 loads).
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
_UMASK = os.umask(0)
os.umask(_UMASK)
# The netCDF-C library (netCDF4): a point file of a training run reads in 15 ms against 95 ms through h5netcdf's
# Python layer over h5py (measured here on 40 run files; the fit, the Hessian aggregate and the report each read
# every point of the grid), and writes 4.7x faster. Both write the same NetCDF-4 files, and each reads the other's.
ENGINE = "netcdf4"


def provenance(stage: str, config_slice: object, device: str | None = None) -> dict[str, str]:
    """Global attributes recorded in every NetCDF file a stage writes."""
    from batchscope.stages import rule  # the stage table holds each rule's version

    attrs = {
        "batchscope_version": __version__,
        "stage": stage,
        "algorithm_version": str(rule(stage).version),
        "config_hash": config_hash(config_slice),
        "config_slice": json.dumps(config_slice, sort_keys=True),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python_version": platform.python_version(),
    }
    # torch's version where the job used torch: a stage that computes without it (the fit, the quick estimate, the
    # choice, the aggregates) would otherwise pay torch's import (1.6 s) only to record a version it never ran
    torch = sys.modules.get("torch")
    if torch is not None:
        attrs["torch_version"] = str(torch.__version__)
    if device is not None:
        attrs["device"] = device
        attrs.update(numerics())
    return attrs


def numerics() -> dict[str, int]:
    """The numerics in force (set by :func:`batchscope.engine.runtime.setup`), recorded in every file a computing
    stage writes."""
    import torch

    return {
        "deterministic": int(torch.are_deterministic_algorithms_enabled()),
        "tf32": int(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_benchmark": int(torch.backends.cudnn.benchmark),
    }


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to ``path`` atomically (temporary file in the same directory, then rename).

    Encodings inherited from files that were read (e.g. an integer dtype) are dropped, so a variable that
    now holds NaN is written as float.
    """
    ds = ds.copy()
    for variable in ds.variables.values():
        variable.encoding = {}

    def write(tmp: str) -> None:
        ds.to_netcdf(tmp, engine=ENGINE)
        kill_point("netcdf_write", ds.attrs.get("stage"))  # tests: a kill between the write and the rename

    return atomic_write(path, write)


def netcdf_files(paths, what: str = "results") -> list[Path]:
    """The NetCDF files among ``paths``: a directory contributes its ``*.nc`` files (sorted), a file itself."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.nc")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no {what} in {', '.join(map(str, paths)) or '(no paths)'}")
    return files


class CacheError(OSError, ValueError):
    """A cached result is unreadable, incomplete, or not the one the current config asks for; the message names
    the file and what to do. (An OSError for callers that catch I/O failures, a ValueError as bad input.)"""


class VersionError(CacheError):
    """A cached result computed by another version of its stage's algorithm: the workflow reruns the stage (the
    version is among its params)."""


def read_netcdf(
    path: str | os.PathLike,
    stage: str | None = None,
    variables: tuple[str, ...] = (),
    config_hash: str | None = None,
    attrs_only: bool = False,
) -> xr.Dataset:
    """Read a whole NetCDF file into memory and close it, refusing a file that cannot be what the caller needs.

    With ``stage``: the file must have been written by that stage, with this library's algorithm version for
    it; ``variables`` must be present; with ``config_hash``: it must have been computed for that config slice.
    ``attrs_only``: the same checks, returning an empty Dataset with the file's attributes (no variable is read:
    for a data cache of hundreds of MB, when only its record is wanted).
    """
    from batchscope.stages import rule  # the stage table holds each rule's version

    rebuild = "delete it and rerun the workflow to rebuild it"
    if not Path(path).is_file():
        raise CacheError(f"NetCDF file {path} does not exist; rerun the workflow to build it")
    try:
        with xr.open_dataset(path, engine=ENGINE) as ds:
            names = set(ds.variables)
            ds = xr.Dataset(attrs=dict(ds.attrs)) if attrs_only else ds.load()
    except (OSError, ValueError) as err:
        raise CacheError(f"cannot read NetCDF file {path} (truncated or corrupted?): {err}. {rebuild[0].upper()}"
                         f"{rebuild[1:]}.") from err  # fmt: skip
    if stage is not None:
        found = ds.attrs.get("stage")
        if found != stage:
            raise CacheError(f"{path}: written by stage {found!r}, expected a {stage!r} result; {rebuild}")
        version = str(rule(stage).version)
        if str(ds.attrs.get("algorithm_version")) != version:
            raise VersionError(
                f"{path}: computed by version {ds.attrs.get('algorithm_version')!r} of the {stage} algorithm; this "
                f"batchscope has version {version}: {rebuild}"
            )
    missing = [name for name in variables if name not in names]
    if missing:
        raise CacheError(f"{path}: variable {missing[0]!r} is missing (a wrong or damaged file); {rebuild}")
    if config_hash is not None and ds.attrs.get("config_hash") != config_hash:
        raise CacheError(
            f"{path}: computed for another config (config_hash {ds.attrs.get('config_hash')!r}, the current config "
            f"gives {config_hash!r}); {rebuild}, or restore the config it was made with"
        )
    return ds


def read_expected(path, stage: str, variables: tuple[str, ...], expect: dict[str, str] | None) -> xr.Dataset:
    """With ``expect`` (stage -> config hash, what the workflow passes): :func:`read_netcdf` with every check;
    without (a stage run by hand, synthetic test caches): a plain read."""
    if expect is None:
        return read_netcdf(path)
    return read_netcdf(path, stage, variables, expect.get(stage))


def same_device(datasets: list[xr.Dataset], paths: list, what: str) -> None:
    """Refuse to aggregate files computed on different kinds of device (cpu and cuda) or different GPU models:
    with ``device: auto`` one config gives the same hash on a laptop and on a GPU node, and a fit of CPU profiles
    with GPU training times would be silently wrong."""
    seen: dict[tuple, object] = {}
    for ds, path in zip(datasets, paths, strict=True):
        kind = str(ds.attrs.get("device", "")).split(":")[0]
        seen.setdefault((kind, ds.attrs.get("device_name", "")), path)
    if len(seen) > 1:
        (k1, p1), (k2, p2) = list(seen.items())[:2]
        raise CacheError(f"{what}: {p1} (device {k1[0]} {k1[1]}) and {p2} (device {k2[0]} {k2[1]}) were computed "
                         "on different devices; delete the stale ones (or give each device its own config, "
                         "e.g. device: cpu / cuda) and rerun")  # fmt: skip


def same_provenance(datasets: list[xr.Dataset], paths: list, what: str) -> None:
    """Refuse to aggregate files whose config hashes differ (results of two configs mixed in one directory)."""
    hashes = {}
    for ds, path in zip(datasets, paths, strict=True):
        hashes.setdefault(ds.attrs.get("config_hash"), path)
    if len(hashes) > 1:
        (h1, p1), (h2, p2) = list(hashes.items())[:2]
        raise CacheError(
            f"{what}: {p1} (config_hash {h1}) and {p2} (config_hash {h2}) were computed for different configs; "
            "delete the stale one and rerun the workflow"
        )


def job_seconds(path: str | os.PathLike) -> float:
    """A job's wall-clock seconds from its Snakemake benchmark file (the ``s`` column of its last row); NaN when
    there is none (a job run with --touch, or by hand): unknown, not zero."""
    if not Path(path).is_file():
        return math.nan
    with open(path, encoding="utf-8") as handle:
        header, *rows = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
    return float(rows[-1][header.index("s")]) if rows else math.nan


def save_torch(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` with the same atomic-rename guarantee as :func:`write_netcdf`."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
