"""The quick estimate and the bill: b_opt from the profile and the reference run's B_noise, against the formula
computed here from the same synthetic caches; the cost from Snakemake benchmark files; `recommend --quick` and
`recommend --current-batch-size` against hand computations."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from batchscope import config as cfg
from batchscope.core import scaling
from batchscope.stages import quick, rule
from batchscope.stages import recommend as rec
from batchscope.store import write_netcdf
from tests.test_fit import profile_dataset

TAU_F, TAU_D = 2e-3, 1e-5  # tau_f / tau_d = 200 examples
GRID = [16, 64, 256]
NOISE_VERSION = str(rule("measure_gradient_noise").version)
B_NOISE = {0: 3.0, 10: 20.0, 20: 50.0, 30: 80.0, 40: 125.0}  # step -> B_noise along the run, growing


def write_caches(
    tmp_path,
    out_of_memory_from=None,
    extra=(1024,),
    noise=0.001,
    tau_d=TAU_D,
    pair_spread=0.05,
    b_noise_at=None,
    step_time=None,
    measured=None,
    b_simple_at=None,
):
    """Profiles of T_iter = TAU_F + tau_d B (or ``step_time(B)``), and snapshots of B_NOISE whose resampled pairs
    scatter lognormally by ``pair_spread``."""  # fmt: skip
    rng = np.random.default_rng(0)
    profiles = []
    sizes = sorted([*GRID, *extra])
    for b in sizes:
        times = (step_time(b) if step_time else TAU_F + tau_d * b) * (1 + noise * rng.standard_normal((3, 3)))
        fits = out_of_memory_from is None or b < out_of_memory_from
        profiles.append(write_netcdf(profile_dataset(b, times, sizes, fits), tmp_path / "profile" / f"B{b}.nc"))
    noise_dir = tmp_path / "noise"
    for i, (step, b_noise) in enumerate((b_noise_at or B_NOISE).items()):
        boot = b_noise * np.exp(pair_spread * rng.standard_normal(200))
        b_simple = (b_simple_at or {}).get(step, b_noise / 2)
        simple_boot = b_simple * np.exp(pair_spread * rng.standard_normal(200))
        ds = xr.Dataset({"two_batch_b_noise": ((), b_noise), "two_batch_b_simple": ((), b_simple),
                         "b_simple": ((), b_simple), "two_batch_b_noise_boot": ("resample", boot),
                         "two_batch_b_simple_boot": ("resample", simple_boot)},
                        attrs={"stage": "measure_gradient_noise", "algorithm_version": NOISE_VERSION, "step": step,
                               "fraction": step / 40, **(measured or {})})  # fmt: skip
        write_netcdf(ds, noise_dir / f"snapshot{i}.nc")
    write_netcdf(xr.Dataset({"mean_sq_error": ("batch_size", [1.0])}), noise_dir / "variance.nc")
    return [str(p) for p in profiles], str(noise_dir)


SPEC = {"batch_sizes": GRID, "reference": [64, 0.1, 0], "inputs": {}}


def progress_weighted(b_noise_at: dict[int, float], b_ref: float = 64, target: float | None = None) -> float:
    """The run's B_crit by hand, snapshot by snapshot (step 0 left out): each later snapshot holds from halfway to
    the one before (step 0 for the first) to halfway to the next (its own step for the last, or ``target``), cut at
    ``target`` (the step the run reached the target); that stretch's progress in infinite-batch steps is its
    length / (1 + B / b_ref), and B_crit the progress-weighted mean of B (an infinite B adds length x b_ref to the
    sum and no progress)."""
    steps = [step for step in sorted(b_noise_at) if step > 0]
    total = progress = 0.0
    for i, step in enumerate(steps):
        start = 0.0 if i == 0 else (steps[i - 1] + step) / 2
        end = (step if target is None else target) if i == len(steps) - 1 else (step + steps[i + 1]) / 2
        if target is not None:
            start, end = min(start, target), min(end, target)
        b = b_noise_at[step]
        if not b > 0:
            continue
        if math.isinf(b):
            total += (end - start) * b_ref
            continue
        progress += (end - start) / (1 + b / b_ref)
        total += (end - start) / (1 + b / b_ref) * b
    return total / progress


def test_b_opt_band_from_b_noise_and_the_profile(tmp_path):
    profiles, noise_dir = write_caches(tmp_path)
    ds = quick.estimate(SPEC, profiles, noise_dir)
    ratio = float(ds["tau_f"]) / float(ds["tau_d"])
    assert ratio == pytest.approx(TAU_F / TAU_D, rel=0.02)  # the linear fit on the grid's sizes
    later = [b for step, b in B_NOISE.items() if step > 0]  # step 0 is left out of the band
    expected = np.sqrt(np.array(later) * ratio)
    assert ds["b_crit_band"].values.tolist() == [min(later), max(later)]
    np.testing.assert_allclose(ds["b_opt_band"].values, [expected.min(), expected.max()], rtol=1e-12)
    # the point: the run's B_crit, weighted by progress (stretches 15, 10, 10 and 5 steps: 46.4, below the median
    # snapshot's 65, since a stretch of high B_noise makes little progress per step at the reference's B = 64)
    assert float(ds["b_crit"]) == pytest.approx(progress_weighted(B_NOISE), rel=1e-12)
    assert float(ds["b_crit"]) == pytest.approx(46.44, abs=0.01)  # the hand value above, to two decimals
    assert float(ds["b_opt"]) == pytest.approx(np.sqrt(progress_weighted(B_NOISE) * ratio), rel=1e-12)
    # per snapshot, sqrt(B tau_f / tau_d) of each noise scale
    np.testing.assert_allclose(ds["b_opt_b_noise"].values, np.sqrt(np.array(list(B_NOISE.values())) * ratio))
    # the grid's size nearest b_opt on a log scale (b_opt ~ 100: 64 is nearer than 256)
    nearest = min(GRID, key=lambda b: abs(math.log(b / float(ds["b_opt"]))))
    assert int(ds["nearest_grid_batch_size"]) == nearest == 64
    assert int(ds["largest_feasible_batch_size"]) == 1024


def test_b_opt_never_exceeds_the_largest_feasible_batch_size(tmp_path):
    profiles, noise_dir = write_caches(tmp_path, out_of_memory_from=128, extra=(1024,))
    ds = quick.estimate(SPEC, profiles, noise_dir)
    assert int(ds["largest_feasible_batch_size"]) == 64
    assert float(ds["b_opt_band"].max()) <= 64 and float(ds["b_opt"]) <= 64
    assert np.nanmax(ds["b_opt_b_noise"].values) == 64  # capped, where sqrt(125 x 200) = 158 would be
    notes = json.loads(ds.attrs["diagnostics"])
    assert any("largest feasible batch size 64" in n and "fits in memory" in n for n in notes), notes
    # every size fitted: the cap is the largest one profiled, and the note says so instead of blaming memory
    profiles, noise_dir = write_caches(tmp_path / "all_fit", extra=())
    ds = quick.estimate(SPEC, profiles, noise_dir)
    assert int(ds["largest_feasible_batch_size"]) == 256 and float(ds["b_opt"]) == pytest.approx(
        np.sqrt(progress_weighted(B_NOISE) * TAU_F / TAU_D), rel=0.01
    )  # 0.1% timing noise moves tau_f / tau_d by a fraction of a percent
    notes = json.loads(ds.attrs["diagnostics"])
    assert not any("capped" in n for n in notes)  # b_opt ~ 100 < 256: nothing to say
    profiles, noise_dir = write_caches(tmp_path / "all_fit_small", extra=(), b_noise_at={10: 2000.0, 20: 4000.0})
    notes = json.loads(quick.estimate(SPEC, profiles, noise_dir).attrs["diagnostics"])
    assert any("largest batch size profiled, 256" in n and "extra_batch_sizes" in n for n in notes), notes
    assert not any("fits in memory" in n for n in notes)


def test_the_cost_comes_from_the_benchmark_files(tmp_path):
    profiles, noise_dir = write_caches(tmp_path)
    files = {}
    for job, seconds in (("profile_hardware", 12.5), ("train_reference", 5.0), ("measure_gradient_noise", 7.5)):
        path = tmp_path / "bench" / f"{job}.tsv"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:{int(seconds):02d}\t100.0\n")
        files[job] = [str(path)]
    files["prepare_data"] = [str(tmp_path / "bench" / "absent.tsv")]  # run with --touch: unknown
    ds = quick.add_cost(quick.estimate(SPEC, profiles, noise_dir), files)
    assert math.isnan(float(ds["total_cost_s"]))  # one job's time unknown: the total is unknown, not low
    del files["prepare_data"]
    ds = quick.add_cost(quick.estimate(SPEC, profiles, noise_dir), files)
    assert float(ds["total_cost_s"]) == 25.0
    assert float(ds["cost_in_reference_runs"]) == 5.0
    assert dict(zip(ds["job"].values.tolist(), ds["cost_s"].values.tolist(), strict=True))["train_reference"] == 5.0
    # recommend --quick names the unit: the reference run's job, its process start included (the answer's bill
    # counts training runs by their own clock)
    from batchscope import store

    config = cfg.load("config/test/tiny.yaml")
    for name in config["workloads"]:
        spec = quick.config_slice(config, name)
        write_netcdf(ds.assign_attrs(store.provenance("quick_estimate", spec), workload=name),
                     tmp_path / "results" / "quick" / f"{name}.nc")  # fmt: skip
    text = rec.main(str(tmp_path / "results"), "config/test/tiny.yaml", False, False, quick=True)
    assert "it cost 25 device-seconds, 5 reference runs (a reference run: its job's 5 s, the process start " in text


def test_recommend_quick_reads_the_configs_estimates(tmp_path, capsys):
    config = cfg.load("config/test/tiny.yaml")
    profiles, noise_dir = write_caches(tmp_path)
    for name in config["workloads"]:
        spec = quick.config_slice(config, name)
        ds = quick.add_cost(quick.estimate(spec, profiles, noise_dir), {})
        from batchscope import store

        ds.attrs.update(store.provenance("quick_estimate", spec), workload=name)
        write_netcdf(ds, tmp_path / "results" / "quick" / f"{name}.nc")
    rows = json.loads(rec.main(str(tmp_path / "results"), "config/test/tiny.yaml", False, True, quick=True))
    assert [row["workload"] for row in rows] == sorted(config["workloads"])
    assert rows[0]["b_opt"] == pytest.approx(float(ds["b_opt"]))
    assert rows[0]["b_opt_sat"] == pytest.approx(float(ds["b_opt_sat"])) and math.isfinite(rows[0]["b_opt_sat"])
    from batchscope import cli

    # as typed: batchscope recommend --quick --configfile ... --current-batch-size 32
    argv = ["recommend", str(tmp_path / "results"), "--quick", "--configfile", "config/test/tiny.yaml"]
    assert cli.main([*argv, "--current-batch-size", "32"]) == 0
    text = capsys.readouterr().out
    assert "quick estimate" in text and f"b_opt {float(ds['b_opt']):.0f} " in text
    against = rec.quick_against(ds, 32)["current_slowdown"]
    assert f"against your B = 32: {against:.2f}x the time to target at b_opt {float(ds['b_opt']):.0f}" in text
    assert rows[0]["b_crit"] == float(ds["b_crit"]) and f"from the run's B_crit {float(ds['b_crit']):.3g}; " in text
    # with the reference run's steps to the target, the optimizer's build-up is named beside it
    row = rec.quick_rows(tmp_path / "results", config)[0]
    lagged = {**row, "steps_to_target": 50.0, "update_lag": 9.0, "b_noise_mean": 80.0}
    assert (
        f"from the run's B_crit {float(ds['b_crit']):.3g} (B_noise's progress-weighted mean 80, less the "
        "optimizer's build-up: 9 of the reference run's 50 steps); over the run"
    ) in rec.format_quick(lagged)
    # how far to trust it: the fastest B's range around b_opt on the benchmark's workloads, beside the interval
    b_opt, largest = float(ds["b_opt"]), int(ds["largest_feasible_batch_size"])
    low, high = scaling.QUICK_BEST_OVER_B_OPT
    assert 0 < low < 1 < high and high * b_opt < largest  # not capped here
    # rel 1e-12: the same float64 products, read back through a NetCDF file: rounding only
    assert rows[0]["best_b_range"] == pytest.approx([low * b_opt, high * b_opt], rel=1e-12)
    assert (f"the full grid's fastest B lay between {low:g} and {high:g} times the quick b_opt: here B = "
            f"{low * b_opt:.0f} to {high * b_opt:.0f}") in text  # fmt: skip
    # one product each (rel 1e-12: rounding only); the top capped, then no memory limit, then both ends capped
    assert scaling.quick_best_range(100.0, 256) == pytest.approx((100 * low, 256.0), rel=1e-12)
    assert scaling.quick_best_range(100.0, -1) == pytest.approx((100 * low, 100 * high), rel=1e-12)  # no limit
    assert scaling.quick_best_range(1000.0, 256) == pytest.approx((256.0, 256.0), rel=1e-12)
    assert all(math.isnan(x) for x in scaling.quick_best_range(math.nan, 256))
    assert "how far to trust it" not in rec.format_quick({**row, "best_b_range": [math.nan, math.nan]})
    # infinite at a snapshot (no gradient signal above the noise): the band says so rather than print its finite ends
    low_b_noise = row["b_crit_band"][0]
    assert f"(B_noise {low_b_noise:.3g} to infinite); " in rec.format_quick(
        {**row, "b_crit_band": [low_b_noise, math.inf]}
    )
    assert f"(B_noise {low_b_noise:.3g} to {row['b_crit_band'][1]:.3g}); " in text
    assert row["b_simple_stood_in"] is False  # every B_noise finite in these caches
    stood = rec.format_quick({**row, "b_simple_stood_in": True})
    assert f"(B_noise {low_b_noise:.3g} to {row['b_crit_band'][1]:.3g}, with B_simple where G^T H G <= 0); " in stood
    knee = float(ds["sat_b_knee"])
    assert f"with the saturating step time ({rec._knee(knee)}): b_opt {float(ds['b_opt_sat']):.0f}" in text
    assert rec._knee(0.0).startswith("no knee: one line") and rec._knee(200.0) == "flat up to B = 200"
    # another config's estimate is refused, naming the file
    other = tmp_path / "other.yaml"
    changed = yaml.safe_load(Path("config/test/tiny.yaml").read_text())
    changed["grid"]["batch_sizes"] = [*changed["grid"]["batch_sizes"], 32]
    other.write_text(yaml.safe_dump(changed))
    with pytest.raises(rec.CacheError, match="computed for another config"):
        rec.main(str(tmp_path / "results"), str(other), False, True, quick=True)
    # so is one whose reference run trained to another end: its max_steps (the noise stage's slice leaves it out)
    changed = yaml.safe_load(Path("config/test/tiny.yaml").read_text())
    for workload in changed["workloads"].values():
        workload["max_steps"] = 2 * cfg.load("config/test/tiny.yaml")["workloads"][name]["max_steps"]
    other.write_text(yaml.safe_dump(changed))
    with pytest.raises(rec.CacheError, match="computed for another config"):
        rec.main(str(tmp_path / "results"), str(other), False, True, quick=True)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_steps", 7),
        ("eval_interval", 3),
        ("stop_at_target", False),
        ("target", {"metric": "val_loss", "value": 0.5}),
    ],
)
def test_the_reference_runs_training_settings_name_the_quick_estimate(key, value):
    """The reference run trains to the workload's target within its max_steps, evaluating every eval_interval: each
    changes the run, so each changes the quick estimate's config hash (and so recommend --quick refuses the old one)."""
    from batchscope.stages import branch, noise

    config = cfg.load("config/test/tiny.yaml")
    name = sorted(config["workloads"])[0]
    # the noise stage names the run it measures; the quick estimate and the branches read it
    stages = (quick, noise, branch)
    before = [cfg.config_hash(stage.config_slice(config, name)) for stage in stages]
    assert config["workloads"][name][key] != value
    config["workloads"][name][key] = value
    after = [cfg.config_hash(stage.config_slice(config, name)) for stage in stages]
    assert all(b != a for b, a in zip(before, after, strict=True))


def test_against_a_current_batch_size(tmp_path):
    from batchscope.core import scaling
    from batchscope.stages.fit import fit_scaling
    from tests.test_fit import _write_synthetic_caches

    rng = np.random.default_rng(3)
    profiles, runs = _write_synthetic_caches(tmp_path, 40.0, 2400.0, 2.5e-4, 1.1e-6, rng)
    spec = {"fit": {"bootstrap": 50, "seed": 0, "tolerance": 0.05}, "target": {"metric": "val_accuracy", "value": 0.9}}
    ds = fit_scaling(profiles, runs, spec, "w")
    best = int(ds["fastest_batch_size"])
    at = float(ds["time_from_profile"].sel(batch_size=best))

    def predicted(b):
        return float(scaling.predicted_time(b, *(float(ds[k]) for k in ("n_iter", "c_var", "tau_f", "tau_d"))))

    on_grid = rec.recommend_row(ds, "", current_batch_size=8)
    assert on_grid["current_source"] == "profile"
    assert on_grid["current_slowdown"] == pytest.approx(float(ds["time_from_profile"].sel(batch_size=8)) / at)
    between = rec.recommend_row(ds, "", current_batch_size=100)  # not trained, within the trained 8 to 512
    assert between["current_source"] == "fit" and between["current_time_s"] == pytest.approx(predicted(100))
    beyond = rec.recommend_row(ds, "", current_batch_size=1000)
    assert beyond["current_source"] == "fit, extrapolated beyond the trained B = 8 to 512"
    assert beyond["current_time_s"] == pytest.approx(predicted(1000))
    # a prediction beside the fit's own time at the recommended size, not beside the profile's (like with like)
    at_fit = float(ds["time_from_fit"].sel(batch_size=best))
    assert at_fit == pytest.approx(predicted(best), rel=1e-12) and at_fit != at  # float64 rounding only
    # rel 1e-12: the same model evaluated on the same float64 parameters, rounding only
    assert beyond["current_saving_s"] == pytest.approx(predicted(1000) - at_fit, rel=1e-12)
    assert between["current_slowdown"] == pytest.approx(predicted(100) / at_fit, rel=1e-12)
    # next to the recommended size (this fixture's fit puts b_opt at or below it) a predicted size reads at least as
    # slow, fit beside fit; beside the profile it read 0.96x with a saving of -0.001 s. 1e-9: float64 rounding of a
    # ratio of two nearly equal times
    near = rec.recommend_row(ds, "", current_batch_size=best + 1)
    assert near["current_source"] == "fit" and near["current_slowdown"] >= 1.0 - 1e-9
    # where the fit's own optimum lies nearer the current size, the fit puts it faster: said so, not as a saving < 0
    row = {"batch_size": 256, "current_batch_size": 272, "current_slowdown": 0.996, "current_saving_s": -1e-4,
           "current_source": "fit", "predicted_b_opt": 272.4}  # fmt: skip
    assert rec.slowdown(row, "current") == ("B = 272 takes 1.00x as long by the fit: the fit's own b_opt 272 lies "
                                            "nearer it; the recommended size is the fastest measured")  # fmt: skip
    # the grid's ends are the same comparison: measured where trained
    assert on_grid["smallest_batch_size"] == 8 and on_grid["smallest_time_s"] == on_grid["current_time_s"]
    assert on_grid["largest_source"] == "profile"
    assert on_grid["largest_slowdown"] == pytest.approx(float(ds["time_from_profile"].sel(batch_size=512)) / at)
    # a trained size that never reached the target, and sizes past the profile's memory limit, do not reach it:
    # the fit's prediction is not offered in their place
    failed = ds.copy(deep=True)
    failed["time_from_profile"].loc[{"batch_size": 512}] = np.inf
    at_512 = failed["run_batch_size"].values == 512
    steps = failed["steps_to_target"].values.copy()
    failed["steps_to_target"].values[at_512] = np.nan  # as the runs' records say it: none at 512 reached the target
    row = rec.recommend_row(failed, "", current_batch_size=512)
    assert row["current_slowdown"] == np.inf and row["current_source"] == "never reached the target in training"
    assert "B = 512 does not reach the target (never reached the target in training)" in rec.format_row(row)
    # one run of them reached it (not on a median seed): said so, not "never"
    first = np.flatnonzero(at_512)[0]
    failed["steps_to_target"].values[first] = steps[first]
    row = rec.recommend_row(failed, "", current_batch_size=512)
    assert row["current_source"] == (f"only 1 of {at_512.sum()} training runs reached the target, none on a "
                                     "learning rate's median seed")  # fmt: skip
    failed["smallest_infeasible_batch_size"] = 512
    for b in (512, 2000):
        row = rec.recommend_row(failed, "", current_batch_size=b)
        assert row["current_time_s"] == np.inf and row["current_source"] == "out of memory in the profile at B = 512"
    text = rec.format_row(rec.recommend_row(ds, "", current_batch_size=100))
    assert f"against your B = 100 takes {predicted(100) / at_fit:.2f}x as long: the recommended size saves " in text
    assert "(from the fit)" in text and "the grid's smallest: B = 8 takes" in text


def test_an_adaptive_fit_compares_with_the_grids_ends_it_did_not_train(tmp_path):
    from batchscope.core import scaling
    from batchscope.stages.fit import fit_scaling
    from tests.test_fit import _write_synthetic_caches

    profiles, runs = _write_synthetic_caches(tmp_path, 40.0, 2400.0, 2.5e-4, 1.1e-6, np.random.default_rng(3))
    spec = {"fit": {"bootstrap": 50, "seed": 0, "tolerance": 0.05}, "target": {"metric": "val_accuracy", "value": 0.9}}
    ds = fit_scaling(profiles, runs, spec, "w")
    ds.attrs["grid_batch_sizes"] = json.dumps([4, 8, 16, 32, 64, 128, 256, 512, 1024])  # the bracket: 8 to 512
    row = rec.recommend_row(ds, "")
    params = (float(ds[k]) for k in ("n_iter", "c_var", "tau_f", "tau_d"))
    assert row["smallest_batch_size"] == 4 and row["largest_batch_size"] == 1024
    assert row["largest_time_s"] == pytest.approx(float(scaling.predicted_time(1024, *params)))
    assert row["largest_source"] == row["smallest_source"] == "fit, extrapolated beyond the trained B = 8 to 512"
    # the bracket's smallest, 8, ran out of steps short of the target at every learning rate (none diverged): K
    # falls with B and max_steps is the same for all, so the grid's 4, below it, is not predicted to get there
    short = ds.copy(deep=True)
    at_8 = short["run_batch_size"].values == 8
    short["k"].loc[{"batch_size": 8}] = np.nan
    short["time_from_profile"].loc[{"batch_size": 8}] = np.inf
    # the run records a real fit carries (the synthetic one has none: then nothing is claimed, as tested above)
    for name in ("reached_target", "diverged", "out_of_memory"):
        short[name] = ("run", np.zeros(short.sizes["run"], bool) if name != "reached_target" else ~at_8)
    row = rec.recommend_row(short, "", current_batch_size=16)
    assert row["smallest_time_s"] == np.inf and row["smallest_source"] == (
        "the next trained B = 8 ran out of steps short of the target, and a smaller batch needs more"
    )
    assert "B = 4 does not reach the target (the next trained B = 8 ran out of steps" in rec.format_row(row)
    assert row["largest_source"] == "fit, extrapolated beyond the trained B = 8 to 512"  # above it: unaffected
    # only the nearest trained size above counts: 512 running out of steps says nothing of 100, below 128, which
    # reached the target (at large B a fixed learning-rate grid can leave every rate short)
    top = ds.copy(deep=True)
    at_512 = top["run_batch_size"].values == 512
    top["k"].loc[{"batch_size": 512}] = np.nan
    for name in ("reached_target", "diverged", "out_of_memory"):
        top[name] = ("run", np.zeros(top.sizes["run"], bool) if name != "reached_target" else ~at_512)
    row = rec.recommend_row(top, "", current_batch_size=100)
    assert row["current_source"] == "fit" and np.isfinite(row["current_time_s"])
    # had 8 diverged at every learning rate instead, that says nothing of the steps 4 needs: the fit predicts it
    short["diverged"].values[at_8] = True
    row = rec.recommend_row(short, "")
    assert row["smallest_source"] == "fit, extrapolated beyond the trained B = 8 to 512"
    assert row["smallest_time_s"] == pytest.approx(float(scaling.predicted_time(4, *(float(ds[k]) for k in (
        "n_iter", "c_var", "tau_f", "tau_d")))), rel=1e-12)  # the same formula on the same floats  # fmt: skip


@pytest.mark.parametrize(("value", "message"), [("0", "0 is not a batch size"), ("-5", "-5 is not a batch size"),
                                                ("2.5", "'2.5' is not a whole number")])  # fmt: skip
def test_a_current_batch_size_that_is_not_one_is_refused(value, message, capsys):
    from batchscope import cli

    with pytest.raises(SystemExit):
        cli.main(["recommend", "--all", "--current-batch-size", value])
    assert message in capsys.readouterr().err


def test_the_quick_estimate_against_a_current_batch_size(tmp_path):
    from batchscope.core import scaling

    ds = quick.estimate(SPEC, *write_caches(tmp_path))
    params = (1.0, float(ds["b_crit"]), float(ds["tau_f"]), float(ds["tau_d"]))
    ratio = float(scaling.predicted_time(32, *params) / scaling.predicted_time(float(ds["b_opt"]), *params))
    assert ratio > 1  # b_opt minimises T(B): any other size takes longer
    against = rec.quick_against(ds, 32)
    assert against["current_slowdown"] == pytest.approx(ratio, rel=1e-12)  # the same float64 formula: rounding only
    # above the largest size profiled, with nothing out of memory: predicted, and said to be extrapolated
    largest = int(ds["largest_feasible_batch_size"])
    assert int(ds["smallest_infeasible_batch_size"]) == -1
    beyond = rec.quick_against(ds, 2 * largest)
    assert math.isfinite(beyond["current_slowdown"]) and beyond["current_slowdown"] > 1
    assert beyond["current_source"].endswith(f"extrapolated beyond the largest size profiled, {largest}")
    # at or above a size the profile ran out of memory at: it does not fit
    limited = quick.estimate(SPEC, *write_caches(tmp_path / "oom", out_of_memory_from=1024))
    assert int(limited["smallest_infeasible_batch_size"]) == 1024
    assert rec.quick_against(limited, 2000)["current_slowdown"] == np.inf
    assert rec.quick_against(limited, 2000)["current_source"] == "out of memory in the profile at B = 1024"
    assert math.isfinite(rec.quick_against(limited, 1000)["current_slowdown"])


def test_the_interval_of_tau_f_over_tau_d_says_how_sure_b_opt_is(tmp_path):
    quiet = quick.estimate(SPEC, *write_caches(tmp_path / "quiet"))
    low, high = quiet["tau_ratio_ci"].values
    assert low <= TAU_F / TAU_D * 1.02 and high >= TAU_F / TAU_D * 0.98 and high < 1.2 * low  # 0.1% noise: tight
    assert quiet["b_opt_ci"].values[0] <= float(quiet["b_opt"]) * 1.05 and json.loads(quiet.attrs["diagnostics"]) == []
    # a per-example cost 1% of the fixed one at B = 256, under 5% timing noise (a small model on a busy CPU):
    # the ratio is not pinned down, and the estimate says so
    noisy = quick.estimate(SPEC, *write_caches(tmp_path / "noisy", noise=0.05, tau_d=TAU_F / 25600))
    low, high = noisy["tau_ratio_ci"].values
    assert not high < 4 * low
    assert any("does not pin tau_f / tau_d down" in note for note in json.loads(noisy.attrs["diagnostics"]))


def test_the_quick_estimate_the_choice_and_the_linear_regression_run_without_torch(tmp_path):
    """Light stages never import torch (its import is 1.6 s of a 2.8 s job); their files carry no torch version,
    which only a job that ran torch records. The Jensen experiment on linear regression is NumPy only."""
    import subprocess
    import sys

    profiles, noise_dir = write_caches(tmp_path)
    out, choice, jensen = tmp_path / "quick.nc", tmp_path / "choice.nc", tmp_path / "jensen.nc"
    linreg = {"dim": 4, "condition_number": 10.0, "seed": 0, "sizes": [8, 32], "draws": 50}
    spec = {**SPEC, "inputs": {}}
    choose_spec = {"batch_sizes": GRID, "neighbours": 1, "inputs": {"quick_estimate": cfg.config_hash(spec)}}
    script = (
        "import sys\nfrom batchscope import cli\n"
        f"assert cli.main(['quick-estimate', '--spec', {json.dumps(spec)!r}, '--workload', 'w', '--profiles', "
        f"*{profiles!r}, '--noise', {noise_dir!r}, '--out', {str(out)!r}]) in (0, None)\n"
        f"assert cli.main(['choose-batch-sizes', '--spec', {json.dumps(choose_spec)!r}, '--workload', 'w', "
        f"'--quick', {str(out)!r}, '--out', {str(choice)!r}]) in (0, None)\n"
        f"assert cli.main(['jensen', '--spec', {json.dumps(linreg)!r}, '--out', {str(jensen)!r}]) in (0, None)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
    from batchscope.stages import adaptive
    from batchscope.store import read_netcdf

    assert "torch_version" not in read_netcdf(out).attrs
    assert adaptive.read_choice(str(choice)) == GRID  # b_opt ~ 100 on a grid of three: all of it
    bias = read_netcdf(jensen)  # the closed form (p + 1)/(m - p - 1) beside the Monte Carlo
    np.testing.assert_allclose(bias["analytic"].values, [5 / 3, 5 / 27], rtol=1e-12)


def test_b_opts_interval_carries_the_noise_pairs_and_warns_when_b_noise_is_unsure(tmp_path):
    """B_crit's interval is the progress-weighted B_noise of the later snapshots, each resampled (recomputed here by
    hand); b_opt's joins it with the profile's, which is tight here (0.1% timing noise), so b_opt's interval is
    sqrt(B_crit's x tau_f / tau_d) to within 2%. A wide scatter of the resampled pairs gets a warning."""
    from batchscope.store import read_netcdf

    profiles, noise_dir = write_caches(tmp_path / "narrow")
    ds = quick.estimate(SPEC, profiles, noise_dir)
    later = sorted(Path(noise_dir).glob("snapshot*.nc"))[1:]  # step 0 is left out, as from the point
    boot = np.array([read_netcdf(p)["two_batch_b_noise_boot"].values for p in later])
    steps = [step for step in B_NOISE if step > 0]
    by_resample = [progress_weighted(dict(zip(steps, column, strict=True))) for column in boot.T]
    expected = np.quantile(by_resample, [0.025, 0.975], method="inverted_cdf")
    np.testing.assert_allclose(ds["b_crit_ci"].values, expected, rtol=1e-12)
    ratio = float(ds["tau_f"]) / float(ds["tau_d"])
    np.testing.assert_allclose(ds["b_opt_ci"].values, np.sqrt(expected * ratio), rtol=0.02)
    low, high = ds["b_opt_ci"].values
    assert low < float(ds["b_opt"]) < high
    assert not any("B_noise is unsure" in note for note in json.loads(ds.attrs["diagnostics"]))
    # the same run with pairs that scatter by a factor e each way: B_crit's interval spans more than 4x
    profiles, noise_dir = write_caches(tmp_path / "wide", pair_spread=1.0)
    wide = quick.estimate(SPEC, profiles, noise_dir)
    c_low, c_high = wide["b_crit_ci"].values
    assert c_high > 4 * c_low
    assert any("B_noise is unsure" in note and "noise.pairs" in note for note in json.loads(wide.attrs["diagnostics"]))
    w_low, w_high = wide["b_opt_ci"].values
    # B_crit's interval spans > 4x, so b_opt's spans > sqrt(4) = 2x from the noise pairs alone, where the narrow
    # case's spans about 1.05x: 1.9 leaves that width's margin
    assert w_high / w_low > 1.9 * high / low


def test_an_infinite_snapshot_counts_in_the_point_and_its_interval_alike(tmp_path):
    """A snapshot whose G^T H G came out <= 0 has B_noise = inf (its b_opt capped at the largest feasible size):
    its stretch of the run (the last 5 steps) makes no progress at any finite batch size and adds 5 x 64 to
    B_crit's integral. The point and the interval alike count it, so the interval still holds the point."""
    steps = {0: 3.0, 10: 20.0, 20: 50.0, 30: 80.0, 40: math.inf}
    profiles, noise_dir = write_caches(tmp_path, b_noise_at=steps)
    ds = quick.estimate(SPEC, profiles, noise_dir)
    ratio = float(ds["tau_f"]) / float(ds["tau_d"])
    progress = 15 / (1 + 20 / 64) + 10 / (1 + 50 / 64) + 10 / (1 + 80 / 64)
    b_crit = (15 / (1 + 20 / 64) * 20 + 10 / (1 + 50 / 64) * 50 + 10 / (1 + 80 / 64) * 80 + 5 * 64) / progress
    assert float(ds["b_crit"]) == pytest.approx(b_crit, rel=1e-12) == progress_weighted(steps)
    assert float(ds["b_opt"]) == pytest.approx(np.sqrt(b_crit * ratio), rel=1e-12)
    low, high = ds["b_opt_ci"].values
    assert low <= float(ds["b_opt"]) <= high < np.sqrt(80 * ratio)


def test_where_the_loss_curves_down_along_the_gradient_b_simple_stands_in(tmp_path):
    """B_noise = inf at a snapshot whose B_simple is finite: G^T H G <= 0 there, not a vanished gradient. B_simple
    (35) stands in for it there, in the point (the hand-weighted B_crit of 20, 35, 80, 90), the band and every
    resample that is infinite on its own pairs; a note names the step and its B_simple. Where B_simple is infinite
    too (no gradient signal above the noise) the snapshot stays infinite: perfect scaling, and no such note."""
    steps = {0: 3.0, 10: 20.0, 20: math.inf, 30: 80.0, 40: 90.0}
    profiles, noise_dir = write_caches(tmp_path, b_noise_at=steps, b_simple_at={20: 35.0})
    ds = quick.estimate(SPEC, profiles, noise_dir)
    stood_in = {**steps, 20: 35.0}
    # rel 1e-12 here and below: the stage's float64 arithmetic done again by hand (and read back from NetCDF files),
    # so rounding only
    assert float(ds["b_crit"]) == pytest.approx(progress_weighted(stood_in), rel=1e-12)
    assert float(ds["b_crit"]) < progress_weighted(steps)  # the literal reading: perfect scaling, a higher B_crit
    assert ds["b_noise"].sel(step=20) == math.inf and float(ds["b_noise_or_simple"].sel(step=20)) == 35.0
    assert ds["b_crit_band"].values.tolist() == [20.0, 90.0]
    ratio = float(ds["tau_f"]) / float(ds["tau_d"])
    assert float(ds["b_opt_b_noise"].sel(step=20)) == pytest.approx(np.sqrt(35.0 * ratio), rel=1e-12)
    # the interval: each resample's B_crit by hand, with step 20's B_simple resample in place of its infinite
    # B_noise resample (all of them infinite here)
    from batchscope.store import read_netcdf

    files = sorted(Path(noise_dir).glob("snapshot*.nc"), key=lambda path: read_netcdf(path).attrs["step"])[1:]
    later = [read_netcdf(path) for path in files]
    columns = np.array([np.where(np.isinf(f["two_batch_b_noise_boot"].values), f["two_batch_b_simple_boot"].values,
                                 f["two_batch_b_noise_boot"].values) for f in later])  # fmt: skip
    by_resample = [progress_weighted(dict(zip([10, 20, 30, 40], column, strict=True))) for column in columns.T]
    expected = np.quantile(by_resample, [0.025, 0.975], method="inverted_cdf")
    np.testing.assert_allclose(ds["b_crit_ci"].values, expected, rtol=1e-12)
    assert np.isfinite(expected).all() and expected[0] <= float(ds["b_crit"]) <= expected[1]
    notes = json.loads(ds.attrs["diagnostics"])
    assert any(n.startswith("G^T H G <= 0 at step 20 of the reference run (of 4 snapshots after step 0)")
               and "B_simple (35) stands in for it there" in n for n in notes)  # fmt: skip
    # B_simple infinite too (|G|^2 not clear of the noise): no gradient signal, not curvature; it stays infinite
    profiles, noise_dir = write_caches(tmp_path / "flat", b_noise_at=steps)
    flat = quick.estimate(SPEC, profiles, noise_dir)
    assert not any(n.startswith("G^T H G <= 0") for n in json.loads(flat.attrs["diagnostics"]))
    assert float(flat["b_crit"]) == pytest.approx(progress_weighted(steps), rel=1e-12)
    assert flat["b_crit_band"].values.tolist() == [20.0, math.inf]
    # a NaN snapshot (NaN gradients: a diverged reference run) is no G^T H G <= 0 either
    profiles, noise_dir = write_caches(tmp_path / "nan", b_noise_at={**steps, 20: math.nan})
    notes = json.loads(quick.estimate(SPEC, profiles, noise_dir).attrs["diagnostics"])
    assert not any(n.startswith("G^T H G <= 0") for n in notes)


def test_b_simple_stands_in_resample_by_resample():
    """stand_in is elementwise: a resample whose own pairs give G^T H G <= 0 takes its own B_simple, one whose pairs
    do not keeps its B_noise, and an infinite B_simple (or a NaN one) leaves the infinity alone."""
    from batchscope.core import scaling

    b_noise = np.array([[np.inf, 50.0, np.inf, np.inf], [np.inf, np.inf, 7.0, np.inf]])
    b_simple = np.array([[30.0, 40.0, np.inf, np.nan], [0.0, 12.0, 3.0, -1.0]])
    # B_simple <= 0 (no noise seen) stands in too: left out downstream as any value <= 0, not perfect scaling
    expected = np.array([[30.0, 50.0, np.inf, np.inf], [0.0, 12.0, 7.0, -1.0]])
    np.testing.assert_array_equal(quick.stand_in(b_noise, b_simple), expected)
    # a stand-in <= 0 is left out of the run's B_crit, as a B_noise <= 0 is: the other two stretches decide
    steps = np.array([10, 20, 30])
    # both left out, so the same stretches weigh in: equal to the bit
    assert scaling.effective_b_crit(steps, np.array([20.0, -1.0, 80.0]), 64, None) == scaling.effective_b_crit(
        steps, np.array([20.0, 0.0, 80.0]), 64, None
    )
    assert scaling.effective_b_crit(steps, np.array([20.0, -1.0, 80.0]), 64, None) < scaling.effective_b_crit(
        steps, np.array([20.0, np.inf, 80.0]), 64, None
    )


def test_the_saturating_step_time_gives_its_own_b_opt_and_a_note_when_the_models_disagree(tmp_path):
    """A GPU-like step time, flat at 2 ms up to B = 512 and then 1 ms per 1024 examples more: the quick estimate's
    saturating b_opt is the argmin of (1 + B_noise/B) T_sat(B), found here by brute force on a fine grid of B, per
    snapshot (at the knee for the smallest B_noise, above it for the others) and for the run's B_crit; the linear
    model,
    fitted on the grid's three small sizes, sees almost no cost per example and caps b_opt at the largest size; the
    note says the two disagree. Noise-free timings: the fit recovers the knee to its optimiser's precision."""
    from batchscope.core import scaling

    knee, slope = 512.0, 1e-3 / 1024

    def flat_then_linear(b):
        return scaling.saturating_step_time(b, 2e-3, slope, knee)

    b_noise_at = {0: 3.0, 10: 100.0, 20: 800.0, 30: 2000.0, 40: 4000.0}  # sqrt(100 x 1536) < 512: the knee
    profiles, noise_dir = write_caches(tmp_path, extra=(1024, 2048, 4096, 8192), noise=0.0, b_noise_at=b_noise_at,
                                       step_time=flat_then_linear)  # fmt: skip
    ds = quick.estimate(SPEC, profiles, noise_dir)
    assert float(ds["sat_b_knee"]) == pytest.approx(knee, rel=1e-6)
    dense = np.geomspace(16, 8192, 20001)  # consecutive sizes 3.1e-4 apart (relative): the brute force's precision
    brute = [dense[np.argmin((1 + b / dense) * flat_then_linear(dense))] for step, b in b_noise_at.items() if step]
    assert brute[0] == pytest.approx(knee, rel=2e-4) and len(set(brute)) == 4  # the knee once, then above it
    np.testing.assert_allclose(ds["b_opt_sat_b_noise"].values[1:], brute, rtol=2e-4)
    b_crit = progress_weighted(b_noise_at)
    assert float(ds["b_opt_sat"]) == pytest.approx(dense[np.argmin((1 + b_crit / dense) * flat_then_linear(dense))],
                                                   rel=2e-4)  # fmt: skip
    # T_iter is flat over the grid (16, 64, 256): the linear fit's tau_d is ~0 and its b_opt the largest size
    assert float(ds["b_opt"]) == 8192
    (note,) = [n for n in json.loads(ds.attrs["diagnostics"]) if "step-time model decides" in n]
    assert f"{float(ds['b_opt_sat']):.0f} with the saturating one" in note
    assert f"knee at B = {float(ds['sat_b_knee']):.0f}," in note
    sat_later = ds["b_opt_sat_b_noise"].values[1:]
    assert ds["b_opt_sat_band"].values.tolist() == [sat_later.min(), sat_later.max()]
    # only the linear b_opt is at the cap: the cap note names its model
    assert any("b_opt with the linear step time is capped" in n for n in json.loads(ds.attrs["diagnostics"]))
    # a linear step time: the two models agree, no note
    profiles, noise_dir = write_caches(tmp_path / "linear", noise=0.0)
    ds = quick.estimate(SPEC, profiles, noise_dir)
    assert float(ds["b_opt_sat"]) == pytest.approx(float(ds["b_opt"]), rel=1e-6)  # knee 0: the same line
    assert not any("step-time model" in n for n in json.loads(ds.attrs["diagnostics"]))


# each snapshot stands for its stretch of the run, a midpoint rule in steps: 6.9e-6 off with 400 snapshots and 9.5%
# with 4, here; each tolerance sits just above its rule's error (the test is deterministic)
@pytest.mark.parametrize("snapshots, rtol", [(400, 1e-4), (4, 0.1)])
def test_the_runs_b_crit_is_what_the_grid_of_fixed_batch_sizes_measures(snapshots, rtol):
    """Under the local law a stretch of du infinite-batch steps costs du (1 + B_noise(u) / B) steps at batch size B.
    With B_noise(u) = B0 e^(a u) over u in [0, U], a fixed B needs K(B) = U + B0 (e^(aU) - 1) / (a B) steps: the
    grid's B_crit = C_var / N_iter = B0 (e^(aU) - 1) / (a U), in closed form. The reference run at b_ref takes
    s(u) = u + B0 (e^(au) - 1) / (a b_ref) steps; its snapshots, evenly spaced in its steps, see B_noise(u(s)).
    effective_b_crit on them recovers the closed form (to the snapshot spacing's precision), where their median
    does not (B_noise grows 20x over the run)."""
    from scipy.optimize import brentq

    from batchscope.core.scaling import effective_b_crit

    b0, a, length, b_ref = 10.0, 0.3, 10.0, 64.0
    truth = b0 * np.expm1(a * length) / (a * length)

    def steps_at(u):
        return u + b0 * np.expm1(a * u) / (a * b_ref)

    steps = np.linspace(0, steps_at(length), snapshots + 1)[1:]
    b_noise = np.array([b0 * np.exp(a * brentq(lambda u, s=s: steps_at(u) - s, 0, length)) for s in steps])
    assert float(effective_b_crit(steps, b_noise, b_ref)) == pytest.approx(truth, rel=rtol)
    assert abs(np.median(b_noise) / truth - 1) > 0.15  # 16% high with 400 snapshots
    # a constant B_noise is its own B_crit, whatever the stretches; resamples along a second axis
    assert float(effective_b_crit([3, 50, 51], np.full(3, 42.0), b_ref)) == pytest.approx(42.0, rel=1e-12)
    both = effective_b_crit(steps, np.stack([b_noise, 2 * b_noise], axis=1), b_ref)
    assert both.shape == (2,) and both[0] == pytest.approx(float(effective_b_crit(steps, b_noise, b_ref)), rel=1e-12)
    # a run that trained on to twice the target's steps, B_noise growing on: the stretches stop at the target
    beyond = np.linspace(0, 2 * steps_at(length), 2 * snapshots + 1)[1:]
    grown = b0 * np.exp(a * np.array([brentq(lambda u, s=s: steps_at(u) - s, 0, 3 * length) for s in beyond]))
    at_target = float(effective_b_crit(beyond, grown, b_ref, end=steps_at(length)))
    assert at_target == pytest.approx(truth, rel=rtol)  # the same spacing up to the target: the same error
    assert float(effective_b_crit(beyond, grown, b_ref)) > 2 * truth
    # no usable snapshot: NaN; only infinite ones: inf
    assert np.isnan(effective_b_crit([1, 2], np.array([-1.0, np.nan]), b_ref))
    assert effective_b_crit([1, 2], np.array([np.inf, -1.0]), b_ref) == np.inf


def test_the_runs_b_crit_stops_at_the_step_it_reached_the_target(tmp_path):
    """A reference run that trained on past the target (stop_at_target: false): the noise stage records the step
    it reached the target at (25 here), and the snapshots' stretches stop there: 15 and 10 steps for the snapshots at
    10 and 20, none for those at 30 and 40 (B_noise 80 and 125, which K(B) to the target never sees)."""
    profiles, noise_dir = write_caches(tmp_path, measured={"run_steps_to_target": 25.0})
    ds = quick.estimate(SPEC, profiles, noise_dir)
    by_hand = (15 / (1 + 20 / 64) * 20 + 10 / (1 + 50 / 64) * 50) / (15 / (1 + 20 / 64) + 10 / (1 + 50 / 64))
    assert float(ds["b_crit"]) == pytest.approx(by_hand, rel=1e-12) == progress_weighted(B_NOISE, target=25)
    ratio = float(ds["tau_f"]) / float(ds["tau_d"])
    assert float(ds["b_opt"]) == pytest.approx(np.sqrt(by_hand * ratio), rel=1e-12)
    low, high = ds["b_crit_ci"].values
    assert low <= by_hand <= high < 80
    # the last snapshot (40) before the step the target was reached (50): its stretch (B_noise 125) runs to 50,
    # 15 steps instead of 5, and B_crit rises
    profiles, noise_dir = write_caches(tmp_path / "longer", measured={"run_steps_to_target": 50.0})
    ds = quick.estimate(SPEC, profiles, noise_dir)
    assert float(ds["b_crit"]) == pytest.approx(progress_weighted(B_NOISE, target=50), rel=1e-12)
    assert float(ds["b_crit"]) == pytest.approx(56.45, abs=0.01) and progress_weighted(B_NOISE) < 46.5  # 2 decimals


def test_the_reports_warnings_carry_the_quick_estimates(tmp_path):
    """The report's "what makes this answer unsure" lists each quick estimate's notes beside the fits' (here a
    reference run that never reached the target), marked as the quick estimate's; none where it has none."""
    from batchscope.figures import diagnostics

    measured = {"run_steps_to_target": float("nan"), "run_examples": 40 * 64}
    ds = quick.estimate(SPEC, *write_caches(tmp_path, measured=measured))
    notes = json.loads(ds.attrs["diagnostics"])
    table = diagnostics({}, {"w": ds})
    assert table["workload"].tolist() == ["w"] * len(notes) and len(notes) >= 1
    assert table["warning"].tolist() == [f"the quick estimate: {note}" for note in notes]
    both = diagnostics({}, {"b": ds, "a": ds})  # by workload, each one's together
    assert both["workload"].tolist() == ["a"] * len(notes) + ["b"] * len(notes)
    clean = quick.estimate(SPEC, *write_caches(tmp_path / "clean"))
    assert json.loads(clean.attrs["diagnostics"]) == [] and diagnostics({}, {"w": clean}).empty


def test_a_reference_run_that_never_reached_the_target_is_named(tmp_path):
    """The noise stage records NaN steps to the target for a reference run that ran out of steps: the estimate's
    notes say so, with the run's length (run_examples / its batch size); one that reached it gets no such note,
    nor does a noise record without the field."""
    measured = {"run_steps_to_target": float("nan"), "run_examples": 40 * 64}
    profiles, noise_dir = write_caches(tmp_path, measured=measured)
    notes = json.loads(quick.estimate(SPEC, profiles, noise_dir).attrs["diagnostics"])
    named = "the reference run (B = 64, lr 0.1) never reached the target in its 40 steps"
    assert any(n.startswith(named) for n in notes), notes
    for name, given in (("reached", {**measured, "run_steps_to_target": 40.0}), ("unrecorded", None)):
        profiles, noise_dir = write_caches(tmp_path / name, measured=given)
        notes = json.loads(quick.estimate(SPEC, profiles, noise_dir).attrs["diagnostics"])
        assert not any("never reached the target" in n for n in notes), name


def test_a_noise_measurement_that_outweighs_the_reference_run_is_named(tmp_path):
    """The noise stage records its pairs and their cost against the reference run's example-gradients; above 1x
    (a short run held at noise.min_pairs) the quick estimate says so and what cuts it; at 0.4x it says nothing."""
    costly = {"pairs": 20, "cost_share": 33.4, "run_examples": 7680}
    profiles, noise_dir = write_caches(tmp_path / "short", measured=costly)
    ds = quick.estimate(SPEC, profiles, noise_dir)
    (note,) = [n for n in json.loads(ds.attrs["diagnostics"]) if "gradient-noise measurement" in n]
    assert "33.4x" in note and "20 pairs" in note and "7680" in note and "noise.eval_size" in note
    assert "as noise.budget and noise.pairs allow" in note  # no min_pairs recorded: not called the floor
    profiles, noise_dir = write_caches(tmp_path / "floor", measured={**costly, "min_pairs": 20})
    notes = json.loads(quick.estimate(SPEC, profiles, noise_dir).attrs["diagnostics"])
    assert any("the floor noise.min_pairs" in n and "a lower noise.min_pairs" in n for n in notes), notes
    assert ds.attrs["cost_share"] == 33.4
    profiles, noise_dir = write_caches(tmp_path / "long", measured={**costly, "cost_share": 0.4})
    ds = quick.estimate(SPEC, profiles, noise_dir)
    assert not any("gradient-noise measurement" in n for n in json.loads(ds.attrs["diagnostics"]))


def test_the_reports_answer_table_shows_the_quick_estimate_and_its_b_crit(tmp_path):
    """The report's first table, with the quick estimate alone: its b_opt, the run's B_crit it came from, its band
    and its cost, read from the estimate's file."""
    from batchscope.figures import answer_table

    profiles, noise_dir = write_caches(tmp_path)
    ds = quick.add_cost(quick.estimate(SPEC, profiles, noise_dir), {})
    (row,) = answer_table({}, {"w": ds}).to_dict("records")
    assert row["workload"] == "w" and row["quick: b_opt"] == float(ds["b_opt"])
    assert row["quick: B_crit"] == pytest.approx(progress_weighted(B_NOISE), rel=1e-12)
    low, high = ds["b_opt_band"].values
    assert row["quick: b_opt over the run"] == f"{low:.0f} to {high:.0f}" and row["quick: nearest grid B"] == 64
    assert row["quick: cost (device-s)"] == 0.0 and math.isnan(row["quick: cost (reference runs)"])
    # the model's error beside it: the stated factors times b_opt (~96), under the largest feasible size
    b_opt, (low, high) = float(ds["b_opt"]), scaling.QUICK_BEST_OVER_B_OPT
    assert high * b_opt < int(ds["largest_feasible_batch_size"])
    assert row["quick: where the fastest B has lain"] == f"{low * b_opt:.0f} to {high * b_opt:.0f}"


def test_the_answer_table_and_figure_put_the_branched_critical_batch_size_beside_it(tmp_path):
    """With branching measured: its local critical batch size per snapshot, its jobs' device-seconds, and those in
    reference runs (the reference run's job from the quick estimate's own bill: 5 s against 2 s); the figure draws
    the three answers on one axis."""
    from batchscope.figures import answer_table, plot_critical_batch

    profiles, noise_dir = write_caches(tmp_path)
    bench = tmp_path / "reference.tsv"
    bench.write_text("s\th:m:s\tmax_rss\n2.0\t0:00:02\t100\n")
    ds = quick.add_cost(quick.estimate(SPEC, profiles, noise_dir), {"train_reference": [str(bench)]})
    steps = ds["step"].values[:3]
    branch = xr.Dataset(
        {
            "critical_batch_size": ("step", [16, 64, 128]),
            "critical_upper": ("step", [32, 128, -1]),
            "critical_ci": (("step", "bound"), [[16, 64], [32, 128], [np.nan, np.nan]]),
            "smallest_branch": ("step", [16, 16, 16]),  # as load_branch gives it
        },
        coords={"step": steps, "bound": ["low", "high"]},
    )
    (row,) = answer_table({}, {"w": ds}, {"w": branch}, {"w": 5.0}).to_dict("records")
    # the first snapshot's answer is the smallest branch: nothing smaller was compared, so it is a bound
    assert row["branching: local critical B over the run"] == "<= 16, 64, 128"
    assert row["branching: cost (device-s)"] == 5.0 and row["branching: cost (reference runs)"] == pytest.approx(2.5)
    (plain,) = answer_table({}, {"w": ds}).to_dict("records")
    assert not any(key.startswith("branching") for key in plain)  # none measured: no columns
    fig = plot_critical_batch(ds, None, "w", branch)
    (ax,) = fig.axes
    labels = ax.get_legend_handles_labels()[1]
    assert any(label.startswith("B_noise") for label in labels) and any("branching" in label for label in labels)
    assert any("interval over the branch seeds" in label for label in labels)
    assert "at the smallest branch: at most this" in labels
    assert not any(label.startswith("B_simple in its place") for label in labels)  # every B_noise finite here
    # a snapshot where G^T H G <= 0: B_simple drawn open in its place, at its value
    profiles, noise_dir = write_caches(tmp_path / "concave", b_noise_at={**B_NOISE, 20: math.inf},
                                       b_simple_at={20: 35.0})  # fmt: skip
    concave = quick.estimate(SPEC, profiles, noise_dir)
    (ax,) = plot_critical_batch(concave, None, "w").axes
    handles, labels = ax.get_legend_handles_labels()
    (marker,) = [h for h, label in zip(handles, labels, strict=True) if label.startswith("B_simple in its place")]
    assert marker.get_xdata().tolist() == [20] and marker.get_ydata().tolist() == [35.0]


def test_b_crit_with_the_update_lag_is_what_the_grids_fit_measures():
    """Runs that spend ``lag`` steps beyond the local law, K(B) = S_min (1 + B_noise / B) + lag, fitted as the full
    study fits them (scaling.fit_steps: N_iter + C_var / B): their B_crit = C_var / N_iter is what
    b_crit_with_lag gives from one reference run's steps at b_ref and B_noise alone. An infinite B_noise gives the
    limit of a large one; no lag, or no steps to the target, leaves B_noise as it is."""
    from batchscope.core import scaling

    grid = np.array([16, 32, 64, 128, 256, 512, 1024], float)
    for s_min, b_noise, lag in ((30.0, 120.0, 9.0), (4.0, 350.0, 8.1), (200.0, 60.0, 9.0), (12.0, 20.0, 0.5)):
        fit = scaling.fit_steps(grid, s_min * (1 + b_noise / grid) + lag)
        k_ref = s_min * (1 + b_noise / 64) + lag
        expected = fit.slope / fit.intercept
        # rel 1e-9: the fit of noise-free K(B) is exact up to its least-squares solve's rounding
        assert float(scaling.b_crit_with_lag(b_noise, k_ref, 64, lag)) == pytest.approx(expected, rel=1e-9)
        assert expected < b_noise  # the lag only ever lowers it
    # rel 1e-9: at B_noise 1e12 the finite formula is off its limit by S_min / lag, about 1.5e-10
    assert float(scaling.b_crit_with_lag(np.inf, 30.0, 64, 9.0)) == pytest.approx(
        float(scaling.b_crit_with_lag(1e12, 30.0, 64, 9.0)), rel=1e-9)  # fmt: skip
    assert float(scaling.b_crit_with_lag(120.0, 30.0, 64, 0.0)) == 120.0
    assert float(scaling.b_crit_with_lag(120.0, math.nan, 64, 9.0)) == 120.0


def test_the_quick_estimate_takes_the_optimizers_build_up_off_b_crit(tmp_path):
    """With SGD at momentum 0.9 (a 9-step build-up) and a reference run that reached the target at step 30, b_crit
    is B_noise's progress-weighted mean less the build-up's share (scaling.b_crit_with_lag), and b_opt follows it;
    AdamW has none, and its b_crit is that mean."""
    from batchscope.core import scaling

    steps = {0: 3.0, 10: 20.0, 20: 50.0, 30: 80.0}
    profiles, noise_dir = write_caches(tmp_path, b_noise_at=steps, measured={"run_steps_to_target": 30.0})
    sgd = {**SPEC, "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": False}, "warmup_steps": 0}
    ds = quick.estimate(sgd, profiles, noise_dir)
    mean = progress_weighted(steps, target=30.0)
    assert float(ds["b_noise_mean"]) == pytest.approx(mean, rel=1e-12)
    assert float(ds["update_lag"]) == pytest.approx(9.0, rel=1e-12)
    s_min = (30 - 9) / (1 + mean / 64)
    # rel 1e-9 here and below: the same formula by hand, its terms summed in another order
    assert float(ds["b_crit"]) == pytest.approx(mean * s_min / (s_min + 9), rel=1e-9)
    ratio = float(ds["tau_f"]) / float(ds["tau_d"])
    assert float(ds["b_opt"]) == pytest.approx(math.sqrt(float(ds["b_crit"]) * ratio), rel=1e-12)
    low, high = ds["b_opt_ci"].values
    assert low <= float(ds["b_opt"]) <= high
    adamw = quick.estimate({**sgd, "optimizer": {"name": "adamw"}}, profiles, noise_dir)
    assert float(adamw["update_lag"]) == 0.0 and float(adamw["b_crit"]) == pytest.approx(mean, rel=1e-12)
    assert float(scaling.b_crit_with_lag(mean, 30.0, 64, 9.0)) == pytest.approx(float(ds["b_crit"]), rel=1e-9)


def test_the_bill_says_when_the_noise_job_ran_the_whole_noise_stage(tmp_path):
    """With noise.enabled the quick estimate's noise job is the whole stage (its variance.nc there): the cost line
    says so; with the stage off (no variance.nc) it does not."""
    profiles, noise_dir = write_caches(tmp_path)
    whole = quick.add_cost(quick.estimate(SPEC, profiles, noise_dir), {})
    assert whole.attrs["noise_job_whole_stage"] == 1
    (Path(noise_dir) / "variance.nc").unlink()
    alone = quick.add_cost(quick.estimate(SPEC, profiles, noise_dir), {})
    assert alone.attrs["noise_job_whole_stage"] == 0
    config = cfg.load("config/test/tiny.yaml")
    for ds, expected in ((whole, True), (alone, False)):
        spec = quick.config_slice(config, "tiny_mlp")
        from batchscope import store

        ds.attrs.update(store.provenance("quick_estimate", spec), workload="tiny_mlp")
        write_netcdf(ds, tmp_path / "results" / "quick" / "tiny_mlp.nc")
        write_netcdf(ds.assign_attrs(workload="tiny_cnn", config_hash=cfg.config_hash(quick.config_slice(
            config, "tiny_cnn"))), tmp_path / "results" / "quick" / "tiny_cnn.nc")  # fmt: skip
        text = rec.main(str(tmp_path / "results"), "config/test/tiny.yaml", False, False, quick=True)
        assert ("its gradient-noise job ran the whole noise stage" in text) == expected


def test_two_b_opt_far_apart_are_said_to_be_more_than_100x():
    """A linear b_opt near 0 (C_var fitted to 0) against a saturating one at its knee: the ratio runs to millions,
    which the diagnostics print as "more than 100x"; below that, to one decimal."""
    from batchscope.core.scaling import models_ratio
    from batchscope.stages._common import times_apart

    assert times_apart(models_ratio(120.0, 80.0)) == "1.5x"
    assert times_apart(models_ratio(1.9e-5, 38.0)) == "more than 100x"
    assert times_apart(models_ratio(0.0, 38.0)) == "more than 100x"  # inf
    assert times_apart(99.94) == "99.9x"
