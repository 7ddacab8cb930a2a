"""NetCDF and checkpoint I/O: atomic writes and provenance attributes.

Every file is written to a temporary name in the destination directory and renamed into place, so a job
killed mid-write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import xarray as xr

from batchscope import __version__

_UMASK = os.umask(0)
os.umask(_UMASK)
ENGINE = "h5netcdf"  # explicit: xarray would prefer netCDF4 when both are installed


def config_hash(config_slice: object) -> str:
    """A stable hash of a JSON-serialisable config slice (key order does not matter)."""
    text = json.dumps(config_slice, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provenance(stage: str, config_slice: object, device: str | None = None) -> dict[str, str]:
    """Global attributes recorded in every NetCDF file a stage writes."""
    from batchscope import ALGORITHM_VERSIONS

    attrs = {
        "batchscope_version": __version__,
        "stage": stage,
        "algorithm_version": str(ALGORITHM_VERSIONS[stage]),
        "config_hash": config_hash(config_slice),
        "config_slice": json.dumps(config_slice, sort_keys=True),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python_version": platform.python_version(),
    }
    try:
        import torch

        attrs["torch_version"] = str(torch.__version__)
    except ImportError:  # the report environment may not need torch
        pass
    if device is not None:
        attrs["device"] = device
    return attrs


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine=ENGINE))


def netcdf_files(paths, what: str = "results") -> list[Path]:
    """The NetCDF files among ``paths``: a directory contributes its ``*.nc`` files (sorted), a file itself."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.nc")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no {what} in {', '.join(map(str, paths)) or '(no paths)'}")
    return files


def read_netcdf(path: str | os.PathLike) -> xr.Dataset:
    """Read a whole NetCDF file into memory and close it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"NetCDF file {path} does not exist")
    try:
        with xr.open_dataset(path, engine=ENGINE) as ds:
            return ds.load()
    except (OSError, ValueError) as err:
        raise OSError(
            f"cannot read NetCDF file {path}: {err}. Delete it and rerun the workflow to rebuild it."
        ) from err


def save_torch(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` with the same atomic-rename guarantee as :func:`write_netcdf`."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
