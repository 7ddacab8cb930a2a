"""Caches you can trust: damaged, incomplete or foreign NetCDF files are refused with the file named."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from batchscope import config as cfg
from batchscope import store as io
from batchscope.engine import profiling as profile
from batchscope.engine.training import train
from batchscope.stages import fit as stage_fit
from batchscope.stages import profile as stage_profile
from batchscope.stages import train as stage_train
from batchscope.stages.fit import fit_scaling
from batchscope.stages.report import check_inputs
from batchscope.store import CacheError, read_netcdf, write_netcdf

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Real profile and training caches of a tiny digits study, with the provenance the workflow writes."""
    root = tmp_path_factory.mktemp("caches")
    config = cfg.validate({
        "device": "cpu", "grid": {"batch_sizes": [32, 128]}, "profile": {"warmup": 1, "repeats": 3,
                                                                          "min_repeat_time": 0.001},
        "workloads": {"w": {"dataset": {"name": "digits"}, "model": {"name": "mlp", "widths": [16]},
                            "target": {"metric": "val_accuracy", "value": 0.8}, "max_steps": 200,
                            "learning_rates": [0.1]}},
    })  # fmt: skip
    p_spec, t_spec = stage_profile.config_slice(config, "w"), stage_train.config_slice(config, "w")
    profiles, runs = [], []
    timed = profile.profile(p_spec, [32, 128], CPU)
    for b in (32, 128):
        ds = timed[b]
        ds.attrs.update(io.provenance("profile_hardware", p_spec, device="cpu"))
        profiles.append(write_netcdf(ds, root / f"profile/B{b}.nc"))
        ds, _ = train(t_spec, b, 0.1, 0, CPU)
        ds.attrs.update(io.provenance("train_model", t_spec, device="cpu"))
        runs.append(write_netcdf(ds, root / f"train/B{b}/lr0.1_seed0.nc"))
    expect = {"profile_hardware": cfg.config_hash(p_spec), "train_model": cfg.config_hash(t_spec)}
    fit_spec = stage_fit.config_slice(config, "w")
    return {"root": root, "profiles": profiles, "runs": runs, "expect": expect, "fit_spec": fit_spec}


def test_intact_caches_fit(caches):
    ds = fit_scaling(caches["profiles"], caches["runs"], caches["fit_spec"], "w", caches["expect"])
    assert ds.sizes["run"] == 2 and ds.sizes["profile_batch_size"] == 2


def test_a_truncated_file_is_named(caches, tmp_path):
    damaged = tmp_path / "B32.nc"
    data = caches["profiles"][0].read_bytes()
    damaged.write_bytes(data[: len(data) // 2])  # bytes cut off, as by a full disk or an interrupted copy
    with pytest.raises(CacheError, match=rf"cannot read NetCDF file {damaged}.*Delete it and rerun the workflow"):
        fit_scaling([damaged, caches["profiles"][1]], caches["runs"], caches["fit_spec"], "w", caches["expect"])


def test_a_file_missing_a_variable_is_named(caches, tmp_path):
    ds = read_netcdf(caches["runs"][0]).drop_vars("steps_to_target")
    path = write_netcdf(ds, tmp_path / "lr0.1_seed0.nc")
    with pytest.raises(CacheError, match=rf"{path}: variable 'steps_to_target' is missing"):
        fit_scaling(caches["profiles"], [path, caches["runs"][1]], caches["fit_spec"], "w", caches["expect"])


def test_a_file_of_another_stage_is_named(caches):
    with pytest.raises(CacheError, match=r"written by stage 'profile_hardware', expected a 'train_model' result"):
        fit_scaling(caches["profiles"], [caches["profiles"][0]], caches["fit_spec"], "w", caches["expect"])


def test_a_file_from_another_config_is_named(caches):
    expect = {**caches["expect"], "train_model": "0123456789abcdef"}
    with pytest.raises(CacheError, match=r"lr0.1_seed0.nc: computed for another config .*'0123456789abcdef'"):
        fit_scaling(caches["profiles"], caches["runs"], caches["fit_spec"], "w", expect)


def test_files_of_two_configs_are_not_mixed(caches, tmp_path):
    """Without expected hashes (a stage run by hand) the inputs must still agree with each other."""
    ds = read_netcdf(caches["runs"][1])
    ds.attrs["config_hash"] = "ffffffffffffffff"
    other = write_netcdf(ds, tmp_path / "B128" / "lr0.1_seed0.nc")
    with pytest.raises(CacheError, match=r"computed for different configs"):
        fit_scaling(caches["profiles"], [caches["runs"][0], other], caches["fit_spec"], "w")


def test_an_old_algorithm_version_is_named(caches, tmp_path):
    ds = read_netcdf(caches["profiles"][0])
    ds.attrs["algorithm_version"] = "0"
    path = write_netcdf(ds, tmp_path / "B32.nc")
    with pytest.raises(CacheError, match=r"version '0' of the profile_hardware algorithm; this batchscope has"):
        read_netcdf(path, "profile_hardware")


def test_the_report_refuses_damaged_inputs_before_drawing(caches, tmp_path, repo, venv_env):
    fit = fit_scaling(caches["profiles"], caches["runs"], caches["fit_spec"], "w", caches["expect"])
    fit.attrs.update(io.provenance("fit_scaling", caches["fit_spec"]))
    good = write_netcdf(fit, tmp_path / "fit" / "w.nc")
    check_inputs([good], expect={"fit_scaling": {"w": cfg.config_hash(caches["fit_spec"])}})
    broken = write_netcdf(fit.drop_vars("b_opt"), tmp_path / "broken" / "w.nc")
    with pytest.raises(CacheError, match=rf"{broken}: variable 'b_opt' is missing"):
        check_inputs([broken])
    with pytest.raises(CacheError, match="computed for another config"):
        check_inputs([good], expect={"fit_scaling": {"w": "0123456789abcdef"}})
    # through the command line: a clear message, exit status 2, and no report written
    out = tmp_path / "report.html"
    result = subprocess.run(
        [sys.executable, "-m", "batchscope", "report", "--fits", str(broken), "--notebook",
         str(repo / "workflow/notebooks/report.ipynb"), "--out", str(out), "--figures", str(tmp_path / "figs")],
        capture_output=True, text=True, env=venv_env,
    )  # fmt: skip
    assert result.returncode == 2 and "variable 'b_opt' is missing" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_expect_must_be_json(caches, tmp_path, venv_env):
    result = subprocess.run(
        [sys.executable, "-m", "batchscope", "fit", "--spec", json.dumps(caches["fit_spec"]), "--workload", "w",
         "--profiles", *map(str, caches["profiles"]), "--runs", *map(str, caches["runs"]), "--expect", "{nope",
         "--out", str(tmp_path / "fit.nc")],
        capture_output=True, text=True, env=venv_env,
    )  # fmt: skip
    assert result.returncode == 2 and "--expect: '{nope' is not JSON" in result.stderr


def test_profiles_of_two_devices_are_refused(caches, tmp_path):
    """device: auto gives one config hash on a laptop and on a GPU node: the fit refuses to mix their files."""
    ds = read_netcdf(caches["profiles"][0])
    ds.attrs.update(device="cuda:0", device_name="NVIDIA H100 80GB HBM3")
    other = write_netcdf(ds, tmp_path / "B32.nc")
    with pytest.raises(CacheError, match=r"were computed on different devices"):
        fit_scaling([other, caches["profiles"][1]], caches["runs"], caches["fit_spec"], "w", caches["expect"])


def test_the_parse_time_record_is_read_only_when_current(tmp_path):
    """study.cached_record: the prepare_data record's sizes when it was made for this workload slice, else None
    (then the workflow builds the record afresh), and a damaged file is not an error here."""
    import xarray as xr

    from batchscope.stages import prepare as study

    spec = {"name": "w", "factory": "batchscope.workloads:builtin", "dataset": {"name": "digits"}}
    record = xr.Dataset({"x": ("i", np.arange(3.0))}, attrs={"n_train": 1437, "input_shape": "[64]"})
    record.attrs.update(io.provenance("prepare_data", {"workload": spec}))
    path = write_netcdf(record, tmp_path / "w.nc")
    summary = study.cached_record(path, spec)
    assert summary["n_train"] == 1437 and summary["input_shape"] == [64]
    assert study.cached_record(path, {**spec, "dataset": {"name": "digits", "seed": 1}}) is None
    assert study.cached_record(tmp_path / "absent.nc", spec) is None
    (tmp_path / "bad.nc").write_bytes(path.read_bytes()[:100])
    assert study.cached_record(tmp_path / "bad.nc", spec) is None
