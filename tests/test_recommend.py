"""`batchscope recommend` on a fixture results directory built from a known scaling model."""

import json
import math

import numpy as np
import pytest
import xarray as xr

from batchscope import cli
from batchscope.core import scaling
from batchscope.stages import fit
from batchscope.stages.recommend import (
    CacheError,
    format_row,
    format_unreached,
    recommend_row,
    recommendations,
    study_fits,
)
from batchscope.store import ENGINE, provenance, write_netcdf
from tests.test_fit import SPEC, _NoNoise, _write_synthetic_caches

N_ITER, C_VAR, TAU_F, TAU_D = 40.0, 2400.0, 2.5e-4, 1.1e-6


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    profiles, runs = _write_synthetic_caches(root / "caches", N_ITER, C_VAR, TAU_F, TAU_D, _NoNoise())
    ds = fit.fit_scaling(profiles, runs, SPEC, "synthetic")
    ds.attrs.update(provenance("fit_scaling", SPEC))
    write_netcdf(ds, root / "fit" / "synthetic.nc")
    return root


def measured_time(b):
    """K(B) T_iter(B) of the noise-free fixture: steps are whole numbers (rounded), step time is exact."""
    return np.round(N_ITER + C_VAR / b) * (TAU_F + TAU_D * b)


def test_recommendation_numbers(results):
    (row,) = recommendations(results, everything=True)
    grid = [8, 16, 32, 64, 128, 256, 512]
    best = min(grid, key=measured_time)
    assert row["batch_size"] == best == 128 and row["learning_rate"] == 0.1
    assert row["time_from_profile_s"] == pytest.approx(measured_time(best), rel=1e-9)
    # the runs' own clock (the fixture stores K x T_iter unrounded as each run's time to target)
    assert row["training_time_to_target_s"] == pytest.approx((N_ITER + C_VAR / 128) * (TAU_F + TAU_D * 128))
    # the fitted model at 128: K is fitted to whole step counts (rounding <= 0.5 of ~59 steps), so within 1%
    assert row["time_from_fit_s"] == pytest.approx((N_ITER + C_VAR / 128) * (TAU_F + TAU_D * 128), rel=0.01)
    assert row["indistinguishable"] == [b for b in grid if measured_time(b) <= 1.05 * measured_time(best)]
    assert row["smallest_slowdown"] == pytest.approx(measured_time(8) / measured_time(best), rel=1e-9)
    assert row["largest_slowdown"] == pytest.approx(measured_time(512) / measured_time(best), rel=1e-9)
    assert row["predicted_b_opt"] == pytest.approx(scaling.b_opt(N_ITER, C_VAR, TAU_F, TAU_D), rel=0.01)
    assert row["steps_to_target"] == np.round(N_ITER + C_VAR / 128)
    assert row["device_name"] == "synthetic"


def test_cli_text_and_json(results, capsys):
    assert cli.main(["recommend", str(results), "--all"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("synthetic on cpu (synthetic), config ")
    assert "  batch size 128 at learning rate 0.1; as fast within 5%" in text
    # each time named for where it comes from; the recommended size is not compared with itself
    assert "s from the profile (K x T_iter" in text and "s from the fit" in text and "s measured in training" in text
    assert "B = 8 takes" in text and "1.00x" not in text
    assert "warning: best learning rate on the edge of its grid" in text
    assert cli.main(["recommend", str(results / "fit"), "--json", "--all"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["batch_size"] == 128 and rows[0]["smallest_batch_size"] == 8


def test_a_reader_that_goes_away_ends_it_quietly(results):
    """``batchscope recommend | head -1``: the pipe closed before the answer is written ends the command with exit
    status 1 and no traceback (closed here before the interpreter has started, so the write always finds it
    closed)."""
    import os
    import subprocess
    import sys

    # stdout to a pipe is block-buffered unless PYTHONUNBUFFERED is set: the write then fails at the flush
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "batchscope", "recommend", str(results), "--all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipeError" not in err, err


def test_missing_and_inconsistent_caches(results, tmp_path):
    with pytest.raises(SystemExit, match="no fit results"):
        cli.main(["recommend", str(tmp_path), "--all"])
    stray = tmp_path / "fit"
    write_netcdf(xr.Dataset({"x": ((), 1.0)}, attrs={"stage": "train_model"}), stray / "stray.nc")
    with pytest.raises(CacheError, match="stray.nc: written by stage 'train_model', expected a 'fit_scaling'"):
        recommendations(tmp_path, everything=True)
    mixed = tmp_path / "mixed"
    for name, version in (("a", "0.0.9"), ("b", "0.1.0")):
        ds = xr.open_dataset(results / "fit" / "synthetic.nc", engine=ENGINE).load()
        ds.attrs.update(workload=name, batchscope_version=version)
        write_netcdf(ds, mixed / "fit" / f"{name}.nc")
    with pytest.raises(CacheError, match="different batchscope or algorithm versions"):
        recommendations(mixed, everything=True)
    ds.attrs.update(algorithm_version="1")  # a fit by an older fit algorithm is refused by name
    write_netcdf(ds, mixed / "fit" / "b.nc")
    with pytest.raises(CacheError, match="b.nc: computed by version '1' of the fit_scaling algorithm"):
        recommendations(mixed, everything=True)


def test_all_without_a_config_labels_nothing_as_current(results, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no config/config.yaml here
    assert cli.main(["recommend", str(results), "--all", "--json"]) == 0
    assert [row["current"] for row in json.loads(capsys.readouterr().out)] == [None]
    assert cli.main(["recommend", str(results), "--all"]) == 0
    assert "[no config given to compare with]" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give --configfile FILE"):
        cli.main(["recommend", str(results)])


def test_reading_results_does_not_need_the_factorys_package(tmp_path):
    """Results copied from a cluster: the study's config names a factory whose package is not installed here.
    The workflow refuses such a config; recommend only needs to read it."""
    import yaml

    from batchscope import config as cfg

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "grid": {"batch_sizes": [16, 64]},
        "workloads": {"mine": {"factory": "not_installed_here.workloads:make", "target": {"metric": "val_loss",
                               "value": 0.5}, "max_steps": 100, "learning_rates": [0.1]}},
    }))  # fmt: skip
    with pytest.raises(cfg.ConfigError, match="not_installed_here"):
        cfg.load(path)
    assert "mine" in cfg.load(path, importable=False)["workloads"]


def _benchmark_file(path, seconds):
    """A Snakemake benchmark file as its `benchmark:` directive writes it (tab-separated, `s` first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"s\th:m:s\tmax_rss\tmean_load\tcpu_time\n{seconds}\t0:00:0{int(seconds)}\t300.0\t90.0\t{seconds}\n"
    )
    return str(path)


def test_the_bill_in_device_seconds_and_training_runs(results, tmp_path):
    ds = xr.open_dataset(results / "fit" / "synthetic.nc", engine=ENGINE).load()
    # each run's wall time, as training records it (the fixture's runs have none): 0.2 s and up, all different
    ds["wall_time"] = ("run", 0.2 + 0.01 * np.arange(ds.sizes["run"]))
    trains = [_benchmark_file(tmp_path / "a.tsv", 1.25), _benchmark_file(tmp_path / "b.tsv", 1.5)]
    jobs = {"profile_hardware": [_benchmark_file(tmp_path / "p.tsv", 2.5)], "train_model": trains}
    billed = fit.add_bill(ds, jobs)
    assert list(billed["cost_s"].values) == [2.5, 2.75] and float(billed["total_cost_s"]) == 5.25
    # the unit: the median wall time of the recommended size's runs at its best learning rate (the fixture's runs)
    at_best = (ds["run_batch_size"].values == 128) & ds["run_at_best_lr"].values.astype(bool)
    run_s = float(np.median(ds["wall_time"].values[at_best]))
    # rel 1e-12: one float64 division, the same as add_bill's
    assert run_s > 0 and float(billed["cost_in_runs"]) == pytest.approx(5.25 / run_s, rel=1e-12)
    row = recommend_row(billed)
    assert f"this answer cost 5.25 device-seconds, {5.25 / run_s:.3g} training runs at B = 128" in format_row(row)
    # a thousand runs and more, whole (not 1.08e+03)
    many = format_row({**row, "cost_in_runs": 1081.4})
    assert "5.25 device-seconds, 1081 training runs at B = 128" in many and "e+03" not in many
    assert "5.25 device-seconds, 1000 training runs" in format_row({**row, "cost_in_runs": 999.7})  # .3g: 1e+03
    assert "5.25 device-seconds, 999 training runs" in format_row({**row, "cost_in_runs": 999.4})
    # one job's time unknown (no benchmark file): the bill says so rather than printing nan or a low total
    unknown = fit.add_bill(ds, {**jobs, "fit_scaling": [str(tmp_path / "missing.tsv")]})
    assert math.isnan(float(unknown["total_cost_s"]))
    text = format_row(recommend_row(unknown))
    assert "this answer cost unknown (a job without its Snakemake benchmark file" in text and "nan" not in text


def test_the_reports_answer_table_says_what_the_answer_saves_against_the_grids_ends(results):
    from batchscope.figures import answer_table

    ds = xr.open_dataset(results / "fit" / "synthetic.nc", engine=ENGINE).load()
    (row,) = answer_table({"synthetic": ds}, {}).to_dict("records")
    for end, b in (("smallest", 8), ("largest", 512)):
        ratio = measured_time(b) / measured_time(128)
        saved = measured_time(b) - measured_time(128)
        assert row[f"grid: against the grid's {end} B"] == (
            f"B = {b} takes {ratio:.2f}x as long: the recommended size saves {saved:.3g} s per training run (from the "
            "profile)"
        )


def test_a_fit_that_stopped_is_named_with_its_reason(tmp_path):
    """A study whose fit stopped (no K(B) to fit: too few sizes reached the target) has a results tree without
    results/fit: recommend names the file the workflow writes there and, from the fit's log beside results/, why it
    stopped, rather than pointing at results/ and asking for a run that already happened."""
    from batchscope import config as cfg

    config = cfg.validate(
        {
            "grid": {"batch_sizes": [8, 64]},
            "workloads": {
                "wl": {"dataset": {"name": "digits"}, "model": {"name": "mlp"}, "max_steps": 100,
                       "learning_rates": [0.1], "target": {"metric": "val_accuracy", "value": 0.9}}
            },
        }
    )  # fmt: skip
    results = tmp_path / "results"
    (results / "train").mkdir(parents=True)
    with pytest.raises(CacheError) as err:
        study_fits(results, config, "my.yaml")
    assert str(err.value).startswith(f"{results / 'fit' / 'wl.nc'}: no fit for workload 'wl' of my.yaml; run the")
    log = tmp_path / "logs" / "fit_scaling" / "wl.log"
    log.parent.mkdir(parents=True)
    reason = "ValueError: workload 'wl': the target was reached at 0 batch size(s); K(B) needs at least 2."
    log.write_text(f'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n{reason}\n\n')
    with pytest.raises(CacheError) as err:
        study_fits(results, config, "my.yaml")
    assert str(err.value) == (
        f"{results / 'fit' / 'wl.nc'}: no fit for workload 'wl' of my.yaml; the workflow's last fit of it stopped: "
        f"{reason} (the whole message: {log}); run the workflow with this config (or pass --configfile for the study "
        "you ran, or --all)"
    )
    # given the fit directory itself (empty: the fit stopped), the same file and the same log
    (results / "fit").mkdir()
    with pytest.raises(CacheError) as given_fit:
        study_fits(results / "fit", config, "my.yaml")
    assert str(given_fit.value) == str(err.value)
    (results / "fit").rmdir()
    log.write_text("2026-12-06 batchscope INFO wrote results/fit/wl.nc\n")  # a log that ends well says nothing
    with pytest.raises(CacheError, match="of my.yaml; run the workflow"):
        study_fits(results, config, "my.yaml")


def test_sizes_without_a_k_are_listed_by_recommend_and_the_report(results):
    """A trained batch size where no learning rate's median seed reached the target has no K(B): recommend and the
    report's "Failed points" list it, with how many of its runs reached the target, rather than saying nothing of it
    (the report said "No run diverged and no batch size ran out of memory")."""
    from batchscope import figures

    ds = xr.open_dataset(results / "fit" / "synthetic.nc", engine=ENGINE).load()
    ds["reached_target"] = ("run", np.isfinite(ds["steps_to_target"].values))  # as the training stage records it
    for name in ("diverged", "out_of_memory"):  # the synthetic records leave out what the report's table reads
        ds[name] = ("run", np.zeros(ds.sizes["run"], bool))
    for name in ("final_train_accuracy", "final_val_accuracy", "gap_accuracy", "gap_loss", "step_time_median"):
        ds[name] = ds.get(name, ("run", np.full(ds.sizes["run"], np.nan)))
    assert recommend_row(ds)["unreached"] == [] and figures.failures({"synthetic": ds}).empty
    at_8 = ds["run_batch_size"].values == 8
    ds["k"].loc[{"batch_size": 8}] = np.nan
    ds["steps_to_target"].values[np.flatnonzero(at_8)[1:]] = np.nan  # one run of them got there
    ds["reached_target"] = ("run", np.isfinite(ds["steps_to_target"].values))
    row = recommend_row(ds)
    assert row["unreached"] == [{"batch_size": 8, "runs_reached": 1, "runs": int(at_8.sum())}]
    assert (f"  no learning rate reached the target on its median seed at B = 8 (1 of {at_8.sum()} runs reached "
            "it)\n") in format_row(row)  # fmt: skip
    table = figures.failures({"synthetic": ds})
    assert table[["workload", "stage", "batch size"]].values.tolist() == [["synthetic", "train", 8]]
    assert table["what"].item() == f"target not reached on any learning rate's median seed (1 of {at_8.sum()} runs " \
        "reached it)"  # fmt: skip
    assert format_unreached([{"batch_size": 16, "runs_reached": 0, "runs": 6}, {"batch_size": 32, "runs_reached": 1,
                             "runs": 6}]) == "B = 16 (0 of 6 runs reached it), 32 (1 of 6)"  # fmt: skip
    # out of memory in every run, or past the profile's memory limit: listed as such, not as short of the target
    ds["out_of_memory"].values[at_8] = True
    assert recommend_row(ds)["unreached"] == []
    assert set(figures.failures({"synthetic": ds})["what"]) == {"out of memory"}
    ds["out_of_memory"].values[at_8] = False
    ds["k"].loc[{"batch_size": 512}] = np.nan
    ds["smallest_infeasible_batch_size"] = 512
    assert [row["batch_size"] for row in recommend_row(ds)["unreached"]] == [8]


@pytest.mark.parametrize(
    ("low", "high", "text"),
    [
        (43.4, 72.6, "43 to 73"),
        (1e-6, 79.0, "below 1 to 79"),
        (0.999, 2e6, "below 1 to unbounded"),
        (1.0, 5.0, "1 to 5"),
    ],
)
def test_a_batch_size_interval_prints_its_bounds_as_batch_sizes(low, high, text):
    """A bootstrap resample with C_var near 0 puts b_opt near 0, one with tau_d near 0 puts it in the billions: the
    interval says "below 1" and "unbounded" for them, not "0" or a ten-digit batch size."""
    from batchscope.stages._common import batch_interval

    assert batch_interval(low, high) == text
