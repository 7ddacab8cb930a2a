"""Helpers shared by the tests that run Snakemake."""

import subprocess
from pathlib import Path

import numpy as np
import torch

from batchscope.store import read_netcdf

TINY = "config/test/tiny.yaml"


def snakemake(repo, workdir, *args, env, configfile=None, check=True):
    # --configfile takes several values: it goes last so it cannot swallow a target
    cmd = [
        "snakemake",
        "-s",
        str(repo / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        "2",
        *args,
        "--configfile",
        str(configfile or repo / TINY),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


# timing-dependent variables (wall clock, and the fit quantities computed from it); everything else must match
TIMING = {"t_iter", "t_iter_round", "t_iter_median", "t_iter_q25", "t_iter_q75", "peak_memory", "step_memory",
          "steps_per_repeat", "step_time", "step_time_median", "time_to_target", "train_time", "wall_time",
          "time_top", "time_trace", "time_slq", "step_time_over_bn", "first_step_time"}  # fmt: skip


def _deterministic(path: Path) -> dict:
    ds = read_netcdf(path)
    return {name: ds[name].values for name in ds.data_vars if name not in TIMING and not name.startswith("boot")}


def compare_results(reference: Path, other: Path, workload_fits: list[str]) -> int:
    """Every deterministic variable of every cache under ``reference``/results equals ``other``'s, every
    checkpoint's weights too; returns the number of NetCDF files compared. Fits, ghost summaries, quick estimates
    and the report depend on timings throughout and are compared through their timing-free part (K(B), best lr;
    the noise scales) only."""
    skip = ("results/fit/", "results/benchmarks/", "results/report/", "results/ghost/", "results/quick/",
            "results/reuse/")  # the last: analyses kept for reuse, a cache rather than a result  # fmt: skip
    files = [p for p in sorted((reference / "results").rglob("*.nc")) if not any(s in str(p) for s in skip)]
    for path in files:
        name_in_run = path.relative_to(reference)
        mine, theirs = _deterministic(path), _deterministic(other / name_in_run)
        assert mine.keys() == theirs.keys(), path
        for name, value in mine.items():
            if value.dtype.kind == "f":
                np.testing.assert_allclose(theirs[name], value, rtol=1e-6, atol=1e-9, equal_nan=True,
                                           err_msg=f"{name_in_run}: {name}")  # fmt: skip
            else:
                np.testing.assert_array_equal(theirs[name], value, err_msg=f"{name_in_run}: {name}")
    for workload in workload_fits:
        for name in ("k", "best_lr"):
            a, b = (read_netcdf(d / f"results/fit/{workload}.nc")[name].values for d in (reference, other))
            np.testing.assert_array_equal(a, b, err_msg=f"fit {workload}: {name}")
    for path in sorted((reference / "results/quick").glob("*.nc")):
        for name in ("b_noise", "b_simple_two_batch", "b_crit_band"):
            a, b = (read_netcdf(d / path.relative_to(reference))[name].values for d in (reference, other))
            np.testing.assert_allclose(b, a, rtol=1e-6, equal_nan=True, err_msg=f"{path.name}: {name}")
    for path in sorted((reference / "results").rglob("*.pt")):
        mine = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        theirs = torch.load(other / path.relative_to(reference), map_location="cpu", weights_only=False)["state_dict"]
        for key, value in mine.items():
            assert torch.equal(value, theirs[key]), f"{path.relative_to(reference)}: {key}"
    return len(files)
