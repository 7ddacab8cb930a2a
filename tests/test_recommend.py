"""`batchscope recommend` on a fixture results directory built from a known scaling model."""

import json

import numpy as np
import pytest
import xarray as xr

from batchscope import cli, fit
from batchscope.io import provenance, write_netcdf
from batchscope.recommend import CacheError, recommendations
from tests.test_fit import _write_synthetic_caches

N_ITER, C_VAR, TAU_F, TAU_D = 40.0, 2400.0, 2.5e-4, 1.1e-6


class _NoNoise:
    def standard_normal(self, size=None):
        return np.zeros(size) if size is not None else 0.0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    profiles, runs = _write_synthetic_caches(root / "caches", N_ITER, C_VAR, TAU_F, TAU_D, _NoNoise())
    spec = {"fit": {"bootstrap": 20, "seed": 0}, "target": {"metric": "val_accuracy", "value": 0.9}}
    ds = fit.fit_scaling(profiles, runs, spec, "synthetic")
    ds.attrs.update(provenance("fit_scaling", spec))
    write_netcdf(ds, root / "fit" / "synthetic.nc")
    return root


def measured_time(b):
    """K(B) T_iter(B) of the noise-free fixture: steps are whole numbers (rounded), step time is exact."""
    return np.round(N_ITER + C_VAR / b) * (TAU_F + TAU_D * b)


def test_recommendation_numbers(results):
    (row,) = recommendations(results)
    grid = [8, 16, 32, 64, 128, 256, 512]
    best = min(grid, key=measured_time)
    assert row["batch_size"] == best == 128 and row["learning_rate"] == 0.1
    assert row["measured_time_to_target_s"] == pytest.approx(measured_time(best), rel=1e-9)
    assert row["smallest_slowdown"] == pytest.approx(measured_time(8) / measured_time(best), rel=1e-9)
    assert row["largest_slowdown"] == pytest.approx(measured_time(512) / measured_time(best), rel=1e-9)
    assert row["predicted_b_opt"] == pytest.approx(fit.b_opt(N_ITER, C_VAR, TAU_F, TAU_D), rel=0.01)
    assert row["steps_to_target"] == np.round(N_ITER + C_VAR / 128)
    assert row["device_name"] == "synthetic"


def test_cli_text_and_json(results, capsys):
    assert cli.main(["recommend", str(results)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("synthetic on cpu (synthetic): batch size 128 at learning rate 0.1")
    assert cli.main(["recommend", str(results / "fit"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["batch_size"] == 128 and rows[0]["smallest_batch_size"] == 8


def test_missing_and_inconsistent_caches(results, tmp_path):
    with pytest.raises(SystemExit, match="no fit results"):
        cli.main(["recommend", str(tmp_path)])
    stray = tmp_path / "fit"
    write_netcdf(xr.Dataset({"x": ((), 1.0)}, attrs={"stage": "train_model"}), stray / "stray.nc")
    with pytest.raises(CacheError, match="stray.nc: not a fit_scaling result"):
        recommendations(tmp_path)
    mixed = tmp_path / "mixed"
    for name, version in (("a", "1"), ("b", "2")):
        ds = xr.open_dataset(results / "fit" / "synthetic.nc", engine="h5netcdf").load()
        ds.attrs.update(workload=name, algorithm_version=version)
        write_netcdf(ds, mixed / "fit" / f"{name}.nc")
    with pytest.raises(CacheError, match="different batchscope or algorithm versions"):
        recommendations(mixed)
