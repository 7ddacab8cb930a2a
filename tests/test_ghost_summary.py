"""stages.ghost.summarize on synthetic training, profile, variance and Hessian caches (real NetCDF files written
by batchscope.store), against the numbers worked out by hand from those same inputs.

Each variant's learning rate is the one with the fewest median steps to target over seeds, a censored run
counting as never; where no learning rate reached the target, the one with the best median final validation
accuracy. The inputs are chosen so that a mean instead of a median, a censored run dropped instead of counted as
never, a wrong batch size or a swapped ghost size each changes the answer.
"""

import math

import numpy as np
import pytest
import xarray as xr

from batchscope import store as io
from batchscope.stages.ghost import summarize

NAN = math.nan
SEEDS = (0, 1, 2)
SPEC = {"batch_size": 256, "small_batch_size": 16, "ghost_sizes": [64, 16], "seed": 0}

# (batch size, lr) -> per seed (steps to target or NaN when censored, final val accuracy, train - val accuracy)
BASE = {
    # median steps with a censored run as never: lr 0.05 -> 120, lr 0.1 -> 95 (best). A mean of the runs that
    # reached the target would pick 0.05 (110 against 162), whose accuracies are all different.
    (16, 0.05): [(100, 0.97, 0.01), (120, 0.98, 0.01), (NAN, 0.99, 0.01)],
    (16, 0.1): [(90, 0.91, 0.02), (95, 0.95, 0.05), (300, 0.93, 0.03)],
    # not a batch size of the experiment: the fastest of all, and must not be picked up
    (64, 0.1): [(10, 0.5, 0.3), (10, 0.5, 0.3), (10, 0.5, 0.3)],
    # lr 0.4 reached the target once (380 steps, the fewest) but its median run never did: lr 0.2 wins, K = 410
    (256, 0.2): [(400, 0.88, 0.04), (420, 0.86, 0.06), (410, 0.87, 0.05)],
    (256, 0.4): [(NAN, 0.60, 0.10), (NAN, 0.62, 0.10), (380, 0.90, 0.10)],
}
GHOST = {
    64: {  # lr 0.4: 255 median steps against 305
        (256, 0.2): [(300, 0.89, 0.07), (310, 0.90, 0.07), (305, 0.88, 0.07)],
        (256, 0.4): [(250, 0.92, 0.01), (260, 0.90, 0.02), (255, 0.91, 0.03)],
    },
    16: {  # no run reached the target: lr 0.4 by median accuracy 0.83 against 0.81 (a mean would pick 0.2)
        (256, 0.2): [(NAN, 0.80, 0.10), (NAN, 0.82, 0.10), (NAN, 0.81, 0.10)],
        (256, 0.4): [(NAN, 0.83, 0.20), (NAN, 0.70, 0.30), (NAN, 0.84, 0.25)],
    },
}
STEP_TIME = {"base": 0.010, 64: 0.012, 16: 0.015}  # t_iter_median of each profile at B = 256
# (batch size, lr) -> lambda_max per seed; None: no Hessian file for that seed
BASE_HESSIAN = {(16, 0.05): [50, 50, 50], (16, 0.1): [10, 12, 11], (256, 0.2): [20, 22, None], (256, 0.4): [90] * 3}
GHOST_HESSIAN = {64: {(256, 0.2): [70] * 3, (256, 0.4): [5, 7, 6]}, 16: {(256, 0.2): [80] * 3, (256, 0.4): [8, 9, 10]}}

# worked out by hand from the tables above
VARIANTS = ["BN, B = 16", "BN, B = 256", "GBN 64, B = 256", "GBN 16, B = 256"]
EXPECTED = {
    "batch_size": [16, 256, 256, 256],
    "best_lr": [0.1, 0.2, 0.4, 0.4],
    "steps_to_target": [95, 410, 255, NAN],
    "val_accuracy": [0.93, 0.87, 0.91, 0.83],
    "gap": [0.03, 0.05, 0.02, 0.25],
    "lambda_max": [11, 21, 6, 9],  # 21: the median of the two seeds that have a Hessian file
    "step_time": [NAN, 0.010, 0.012, 0.015],
    "step_time_over_bn": [NAN, 1.0, 1.2, 1.5],
}


def write_runs(root, table):
    """One train_model directory per (batch size, seed), one file per learning rate, as the workflow lays them out."""
    slice_ = {"synthetic": "ghost summary test"}
    for (batch_size, lr), seeds in table.items():
        for seed, (steps, accuracy, gap) in zip(SEEDS, seeds, strict=True):
            ds = xr.Dataset(
                {
                    "steps_to_target": ((), float(steps)),
                    "reached_target": ((), not math.isnan(steps)),
                    "diverged": ((), False),
                    "out_of_memory": ((), False),
                    "final_val_accuracy": ((), accuracy),
                    "gap_accuracy": ((), gap),
                    "val_metric": ("step", [0.5, accuracy]),
                },
                coords={"step": [10, 20]},
                attrs={**io.provenance("train_model", slice_), "batch_size": batch_size, "lr": lr, "seed": seed},
            )
            io.write_netcdf(ds, root / f"B{batch_size}" / f"seed{seed}" / f"lr{lr:.4g}_seed{seed}.nc")
    return sorted({p.parent for p in root.rglob("*.nc")})


def write_hessian(root, table):
    for (batch_size, lr), values in table.items():
        for seed, value in zip(SEEDS, values, strict=True):
            if value is not None:
                ds = xr.Dataset({"lambda_max": ((), float(value))},
                                attrs={"batch_size": batch_size, "lr": lr, "seed": seed})  # fmt: skip
                io.write_netcdf(ds, root / f"seed{seed}" / f"B{batch_size}_lr{lr:.4g}.nc")
    return sorted({p.parent for p in root.rglob("*.nc")})


def write_profile(path, t_iter):
    io.write_netcdf(xr.Dataset({"t_iter_median": ((), t_iter)}, attrs={"batch_size": 256}), path)
    return path


def write_variance(path):
    groups = np.array([1, 4, 16])
    ratio = np.array([[1.0, 1.1, 0.9], [4.2, 3.8, 4.0], [15.0, 17.0, 16.0]])
    ds = xr.Dataset(
        {
            "ratio": (("groups", "channel"), ratio),
            "ratio_se": (("groups", "channel"), np.full((3, 3), 0.1)),
            "ratio_mean": ("groups", ratio.mean(axis=1)),
            "expected": ("groups", [1.0, 4.0, 16.0]),
            "expected_iid": ("groups", groups.astype(float)),
        },
        coords={"groups": groups, "ghost_size": ("groups", 256 // groups)},
        attrs={"batch_size": 256, "population": 1437, "draws": 50},
    )
    io.write_netcdf(ds, path)
    return path


@pytest.fixture
def inputs(tmp_path):
    ghost_runs, ghost_profiles, ghost_hessian = {}, {}, {}
    for size in (16, 64):  # ascending: the summary orders them itself
        ghost_runs[size] = write_runs(tmp_path / f"G{size}" / "train", GHOST[size])
        ghost_profiles[size] = write_profile(tmp_path / f"G{size}" / "profile.nc", STEP_TIME[size])
        ghost_hessian[size] = write_hessian(tmp_path / f"G{size}" / "hessian", GHOST_HESSIAN[size])
    return {
        "base_runs": write_runs(tmp_path / "train", BASE),
        "ghost_runs": ghost_runs,
        "base_profile": write_profile(tmp_path / "profile_B256.nc", STEP_TIME["base"]),
        "ghost_profiles": ghost_profiles,
        "variance": write_variance(tmp_path / "variance.nc"),
        "base_hessian": write_hessian(tmp_path / "hessian", BASE_HESSIAN),
        "ghost_hessian": ghost_hessian,
    }


def test_summary_picks_each_variants_best_lr_and_reports_its_numbers(inputs, tmp_path):
    ds = summarize(SPEC, **inputs)
    # through the writer and back, as the stage stores it
    ds = io.read_netcdf(io.write_netcdf(ds, tmp_path / "summary.nc"))
    assert ds["variant"].values.tolist() == VARIANTS
    np.testing.assert_array_equal(ds["ghost_size"].values, [NAN, NAN, 64, 16])
    for name, expected in EXPECTED.items():
        np.testing.assert_allclose(ds[name].values, expected, rtol=1e-12, equal_nan=True, err_msg=name)
    assert ds.attrs["batch_size"] == 256 and ds.attrs["small_batch_size"] == 16
    # the variance experiment, carried over under its own names
    variance = io.read_netcdf(inputs["variance"])
    np.testing.assert_array_equal(ds["variance_ratio_mean"].values, variance["ratio_mean"].values)
    np.testing.assert_array_equal(ds["variance_ghost_size"].values, [256, 64, 16])
    np.testing.assert_array_equal(ds["variance_expected"].values, [1.0, 4.0, 16.0])


def test_summary_without_hessian_results_has_no_lambda_max(inputs):
    """lambda_max is NaN when the Hessian stage did not run; every other number as before."""
    ds = summarize(SPEC, **{k: v for k, v in inputs.items() if k not in ("base_hessian", "ghost_hessian")})
    assert np.isnan(ds["lambda_max"].values).all()
    for name in ("best_lr", "steps_to_target", "val_accuracy", "gap", "step_time_over_bn"):
        np.testing.assert_allclose(ds[name].values, EXPECTED[name], rtol=1e-12, equal_nan=True, err_msg=name)
