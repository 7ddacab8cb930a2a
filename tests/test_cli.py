"""Every stage by hand through the command line (the workflow passes --spec; people pass --config)."""

import json

import numpy as np
import pytest

from batchscope import cli
from batchscope import config as cfg
from batchscope.stages import train as stage_train
from batchscope.store import read_netcdf


@pytest.fixture(scope="module")
def by_hand(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    config = str(repo / "config/test/tiny.yaml")
    common = ["--config", config, "--workload", "tiny_mlp"]
    assert cli.main(["prepare-data", *common, "--out", str(out / "data.nc")]) == 0
    for b in (16, 64, 256):
        data = ["--data", str(out / "data.nc"), "--batch-size", str(b)]
        assert cli.main(["profile", *common, *data, "--out", str(out / f"p{b}.nc")]) == 0
        args = [
            "train",
            *common,
            *data,
            "--lrs",
            "0.03",
            "0.1",
            "--seeds",
            "0",
            "1",
            "--out",
            str(out / f"B{b}"),
        ]
        assert cli.main(args) == 0
    profiles = [str(out / f"p{b}.nc") for b in (16, 64, 256)]
    runs = [str(out / f"B{b}") for b in (16, 64, 256)]
    args = ["fit", *common, "--profiles", *profiles, "--runs", *runs, "--out", str(out / "fit.nc")]
    assert cli.main(args) == 0
    return out


def test_stages_by_hand_produce_the_caches(by_hand):
    assert sorted(p.name for p in (by_hand / "B64").iterdir()) == [
        "lr0.03_seed0.nc",
        "lr0.03_seed0.pt",
        "lr0.03_seed1.nc",
        "lr0.03_seed1.pt",
        "lr0.1_seed0.nc",
        "lr0.1_seed0.pt",
        "lr0.1_seed1.nc",
        "lr0.1_seed1.pt",
    ]
    fit = read_netcdf(by_hand / "fit.nc")
    assert fit.sizes["run"] == 3 * 2 * 2 and fit.attrs["workload"] == "tiny_mlp"
    assert np.isfinite(fit["b_opt"]) and fit.attrs["stage"] == "fit_scaling"


def test_by_hand_equals_the_workflow_spec(by_hand, repo, tmp_path):
    """--config/--workload and the workflow's --spec JSON give bitwise-equal training results."""

    spec = json.dumps(stage_train.config_slice(cfg.load(repo / "config/test/tiny.yaml"), "tiny_mlp"))
    args = [
        "train",
        "--spec",
        spec,
        "--data",
        str(by_hand / "data.nc"),
        "--batch-size",
        "64",
        "--lrs",
        "0.1",
        "--seeds",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(args) == 0
    a, b = read_netcdf(tmp_path / "lr0.1_seed1.nc"), read_netcdf(by_hand / "B64/lr0.1_seed1.nc")
    np.testing.assert_array_equal(a["val_metric"].values, b["val_metric"].values)
    assert a.attrs["config_hash"] == b.attrs["config_hash"]


def test_validate_command(repo, capsys, tmp_path):
    assert cli.main(["validate", str(repo / "config/config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "72 training run(s)" in out and "at most" not in out  # 8 batch sizes x 3 lrs x 3 seeds
    # the grid bounds what the chosen bracket trains: 7 batch sizes x 3 lrs x 2 seeds
    assert cli.main(["validate", str(repo / "config/test/adaptive.yaml")]) == 0
    assert "at most 42 training run(s) (study: adaptive)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text((repo / "config/test/tiny.yaml").read_text().replace("threads: 1", "threads: -2"))
    assert cli.main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "threads: -2 is invalid" in err and err.startswith("batchscope: values the config schema refuses:")


def test_unknown_workload_is_named(repo):
    with pytest.raises(SystemExit, match="'nope' is not in"):
        cli.main(
            [
                "prepare-data",
                "--config",
                str(repo / "config/test/tiny.yaml"),
                "--workload",
                "nope",
                "--out",
                "/dev/null",
            ]
        )
