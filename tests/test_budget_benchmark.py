"""benchmarks/budget.py's own arithmetic: the study configs it runs, the grid steps, and what it reads off a real
adaptive study (the fit's bill, the runs, their seconds) against sums taken here from the files themselves."""

import importlib.util
import json

import numpy as np
import pytest
import yaml

from batchscope.store import job_seconds, read_netcdf


@pytest.fixture(scope="module")
def budget(repo):
    spec = importlib.util.spec_from_file_location("budget", repo / "benchmarks" / "budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_steps_count_sizes_apart_on_an_irregular_grid(budget):
    grid = [8, 16, 64, 256, 1024]  # not every power of two: steps are places on the grid, not log2 of the ratio
    assert budget.grid_steps(16, 256, grid) == 2
    assert budget.grid_steps(1024, 8, grid) == 4
    assert budget.grid_steps(64, 64, grid) == 0
    with pytest.raises(ValueError):
        budget.grid_steps(32, 64, grid)  # a size off the grid is an error, not a silent 0


def test_a_study_config_turns_the_analyses_off_and_leaves_the_base_alone(budget):
    base = {"study": "full", "hessian": {"enabled": True, "top_k": 3}, "noise": {"pairs": 50},
            "grid": {"batch_sizes": [16, 32]}}  # fmt: skip
    before = json.dumps(base, sort_keys=True)
    config = budget.study_config(base, "adaptive")
    assert config["study"] == "adaptive"
    assert config["hessian"] == {"enabled": False, "top_k": 3}  # off, its other settings kept
    for key in ("ghost", "edge_of_stability", "branch"):
        assert config[key] == {"enabled": False}
    assert config["noise"] == {"pairs": 50, "enabled": False}  # the noise stage's own results off; pairs kept
    assert json.dumps(base, sort_keys=True) == before


def test_a_config_gives_one_study_per_workload_and_drops_blocks_naming_another(budget, tmp_path):
    config = {
        "grid": {"batch_sizes": [16, 32]},
        "workloads": {"a": {"x": 1}, "b": {"x": 2}},
        "ghost": {"enabled": True, "workload": "b", "draws": 5},
        "edge_of_stability": {"enabled": False},
    }
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    studies = budget.from_config(path)
    assert list(studies) == ["a", "b"]
    assert studies["a"]["workloads"] == {"a": {"x": 1}} and studies["b"]["workloads"] == {"b": {"x": 2}}
    assert studies["a"]["ghost"] == {"enabled": True, "draws": 5}  # its own workload then (the default)
    assert studies["b"]["ghost"] == config["ghost"]
    assert studies["a"]["grid"] == config["grid"]
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({"grid": {"batch_sizes": [16]}}))
    with pytest.raises(SystemExit, match="empty.yaml: no workloads"):
        budget.from_config(empty)


def test_cpu_seconds_sum_every_jobs_last_row_but_the_fits(budget, tmp_path):
    rows = {"train_batch_size/w/B16.tsv": [2.5, 1.25], "train_batch_size/w/B32.tsv": [4.0],
            "profile_hardware/w.tsv": [0.75], "fit_scaling/w.tsv": [100.0]}  # fmt: skip
    for name, cpu in rows.items():
        path = tmp_path / "results" / "benchmarks" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("s\tcpu_time\n" + "".join(f"9.0\t{c}\n" for c in cpu))  # a rerun appends a row
    assert budget.cpu_seconds(tmp_path) == pytest.approx(1.25 + 4.0 + 0.75, abs=1e-12)  # three float additions


# the jobs of the adaptive study's answer, by their benchmark folders (train_batch_size bills as train_model)
ANSWER_JOBS = ("prepare_data", "profile_hardware", "train_reference", "measure_gradient_noise", "quick_estimate",
               "choose_batch_sizes", "extend_bracket", "train_batch_size")  # fmt: skip


@pytest.mark.integration
def test_the_answer_read_off_a_real_adaptive_study(budget, adaptive_study):
    workdir, _ = adaptive_study
    result = budget.answer(workdir, "tiny_mlp")
    fit = read_netcdf(workdir / "results/fit/tiny_mlp.nc")
    chosen = [int(b) for b in fit["batch_size"].values]
    assert result["trained"] == chosen
    assert result["fastest"] == int(fit["fastest_batch_size"]) and result["fastest"] in chosen
    # the bill: every answer job's benchmark file, summed here
    files = [p for job in ANSWER_JOBS for p in (workdir / "results/benchmarks" / job).rglob("*.tsv")]
    assert {p.relative_to(workdir / "results/benchmarks").parts[0] for p in files} == set(ANSWER_JOBS)
    assert result["cost_s"] == pytest.approx(sum(job_seconds(p) for p in files), abs=0.006)  # rounded to 0.01
    # the runs: every record the chosen sizes' jobs wrote; the reference run (B = 128, inside the bracket) was
    # copied into the grid byte for byte, so it is one of them and is not counted twice
    records = sorted((workdir / "results/train/tiny_mlp").glob("B*/seed*/*.nc"))
    assert 128 in chosen and len(records) == fit.sizes["run"]
    assert result["runs"] == len(records)
    seconds = sum(float(read_netcdf(p)["wall_time"]) for p in records)
    assert result["run_seconds"] == pytest.approx(seconds, abs=0.006)  # rounded to 0.01
    assert result["pruned_runs"] == sum(bool(read_netcdf(p)["pruned"]) for p in records) > 0
    assert result["b_opt"] == pytest.approx(float(fit["b_opt"]), abs=0.06)  # rounded to 0.1
    assert np.isfinite(result["cpu_s"]) and result["cpu_s"] > 0
