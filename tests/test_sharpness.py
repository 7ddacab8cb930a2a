"""The Hessian stage on real checkpoints: against the dense Hessian, and its aggregate."""

import math

import numpy as np
import pytest
import torch
import xarray as xr

from batchscope import config as cfg
from batchscope.engine.training import train
from batchscope.measure import edge_of_stability
from batchscope.measure import hessian as sharpness
from batchscope.stages import hessian as hessian_stage
from batchscope.stages import train as stage_train
from batchscope.store import write_netcdf
from batchscope.workloads import data
from batchscope.workloads.base import build, evaluation_set
from batchscope.workloads.models import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return data.load_tensors(data.build({"name": "digits", "val_fraction": 0.2, "seed": 0}), CPU)


def settings(**overrides):
    config = cfg.validate({
        "device": "cpu",
        "grid": {"batch_sizes": [32]},
        "hessian": {
            "top_k": 3, "tol": 1e-4, "hutchinson_probes": 200, "slq_runs": 4, "slq_steps": 30, **overrides,
        },
        "workloads": {"w": {
            "dataset": {"name": "digits"}, "model": {"name": "mlp", "widths": [8]},
            "target": {"metric": "val_accuracy", "value": 0.8}, "max_steps": 300, "learning_rates": [0.1],
        }},
    })  # fmt: skip
    return stage_train.config_slice(config, "w"), hessian_stage.config_slice(config, "w")


@pytest.fixture(scope="module")
def checkpoint():
    train_spec, _ = settings()
    _, ckpt = train(train_spec, 32, 0.1, seed=0, device=CPU)
    return ckpt


def test_analyze_matches_the_dense_hessian(digits, checkpoint):
    _, spec = settings(eval_size=len(digits.x_train))  # the whole set, as the dense reference below
    ds = sharpness.analyze(checkpoint, build(checkpoint["workload"], CPU), spec, CPU)
    model = build_model(checkpoint["workload"]["model"], (64,), 10)
    model.load_state_dict(checkpoint["state_dict"])
    # the reference, independent of batchscope's operator: torch.func.hessian of the loss in the flat weights
    model = model.double()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(w):
        parts = torch.split(w, [int(np.prod(shape)) for shape in shapes])
        params = {n: part.reshape(shape) for n, part, shape in zip(names, parts, shapes, strict=True)}
        outputs = torch.func.functional_call(model, params, (digits.x_train.double(),))
        return torch.nn.functional.cross_entropy(outputs, digits.y_train)

    dense = torch.func.hessian(loss_of)(flat)
    exact = np.linalg.eigvalsh(dense.numpy())[::-1]
    assert ds.attrs["n_params"] == 64 * 8 + 8 + 8 * 10 + 10
    np.testing.assert_allclose(ds["eigenvalues"].values, exact[:3], rtol=1e-3)  # float32 model
    assert abs(float(ds["trace"]) - float(torch.trace(dense))) < 3 * float(ds["trace_se"])
    assert int(ds["n_hvp_trace"]) == 200 and int(ds["n_hvp_slq"]) == 4 * 30
    grid, density = ds["density_grid"].values, ds["density"].values
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=0.01)
    assert ds.attrs["skipped"] == "" and bool(ds["top_converged"])


def test_eval_subset_and_train_mode_are_recorded(digits, checkpoint):
    _, spec = settings(eval_size=500, mode="train", chunk_size=128)
    ds = sharpness.analyze(checkpoint, build(checkpoint["workload"], CPU), spec, CPU)
    assert ds.attrs["eval_size"] == 500 and ds.attrs["mode"] == "train" and ds.attrs["chunk_size"] == 128
    size = sharpness.eval_size(spec, len(digits.x_train))
    x, _ = evaluation_set(digits.x_train, digits.y_train, size, spec["seed"], "hessian.eval_size")
    x_again, _ = evaluation_set(digits.x_train, digits.y_train, size, spec["seed"], "hessian.eval_size")
    assert len(x) == 500 and torch.equal(x, x_again)  # a fixed subset


def test_a_cache_smaller_than_the_chunks_changes_memory_not_results(digits, checkpoint):
    """hessian.cache_mb reaches the operator: with 0 MB no chunk's linearisation is kept (each product rebuilds
    them), and every result is the same, bit for bit, as with all 4 chunks kept."""
    results = {}
    for cache_mb in (0, 1024):
        _, spec = settings(eval_size=500, chunk_size=128, cache_mb=cache_mb, hutchinson_probes=4, slq_runs=1)
        assert spec["cache_mb"] == cache_mb
        results[cache_mb] = sharpness.analyze(checkpoint, build(checkpoint["workload"], CPU), spec, CPU)
    assert results[0].attrs["cached_chunks"] == 0 and results[1024].attrs["cached_chunks"] == 4
    assert results[0].attrs["n_chunks"] == 4
    for name in ("eigenvalues", "trace", "slq_nodes", "grad_norm", "loss"):
        np.testing.assert_array_equal(results[0][name].values, results[1024][name].values, err_msg=name)


def test_a_diverged_checkpoint_is_recorded_as_skipped(checkpoint):
    _, spec = settings()
    broken = {
        **checkpoint,
        "state_dict": {k: torch.full_like(v, math.nan) for k, v in checkpoint["state_dict"].items()},
    }
    ds = sharpness.analyze(broken, build(checkpoint["workload"], CPU), spec, CPU)
    assert ds.attrs["skipped"] == "diverged" and np.isnan(float(ds["lambda_max"])) and int(ds["n_hvp_top"]) == 0


def test_aggregate_relates_sharpness_to_batch_size_and_gap(tmp_path):
    """Synthetic caches where lambda_max grows with B and the gap with lambda_max."""
    batch_sizes, lrs, seeds = [8, 32, 128, 512], [0.1, 0.3], [0, 1]
    runs = [(b, lr, s) for b in batch_sizes for lr in lrs for s in seeds]
    best = {8: 0.1, 32: 0.1, 128: 0.3, 512: 0.3}
    for b, lr, s in runs:
        # training results: lr 0.1 reaches the target first at B <= 32, lr 0.3 above
        steps = 100.0 if (lr == 0.1) == (b <= 32) else 200.0
        train_point = xr.Dataset(
            {
                "steps_to_target": ((), steps),
                "gap_accuracy": ((), 0.001 * b + 0.0001 * s),
                "gap_loss": ((), 0.0),
                "reached_target": ((), True),
                "diverged": ((), False),
                "out_of_memory": ((), False),
                "time_to_target": ((), 1.0),
                "val_metric": ("step", [0.9]),
            },
            coords={"step": [10]},
            attrs={"batch_size": b, "lr": lr, "seed": s, "stop_at_target": 1},
        )
        write_netcdf(train_point, tmp_path / "train" / f"B{b}" / f"lr{lr}_seed{s}.nc")
    for b, lr, s in runs:
        point = xr.Dataset(
            {
                "lambda_max": ((), np.log(b) + 0.01 * s),
                "trace": ((), 10.0 * b),
                "density": ("density_point", np.ones(4)),
                "density_grid": ("density_point", np.arange(4.0)),
                "slq_nodes": (("slq_run", "slq_step"), np.ones((1, 2))),
                "slq_weights": (("slq_run", "slq_step"), np.ones((1, 2))),
            },
            attrs={"batch_size": b, "lr": lr, "seed": s, "skipped": ""},
        )
        write_netcdf(point, tmp_path / "h" / f"B{b}_lr{lr}_seed{s}.nc")
    from batchscope.stages.fit import fit_scaling
    from tests.test_fit import profile_dataset

    profiles = [write_netcdf(profile_dataset(b, np.full((3, 1), 1e-3 + 1e-6 * b)), tmp_path / "p" / f"B{b}.nc")
                for b in batch_sizes]  # fmt: skip
    spec = {"fit": {"bootstrap": 0, "seed": 0, "tolerance": 0.05}, "target": {"metric": "val_accuracy", "value": 0.9}}
    fit = fit_scaling(profiles, sorted((tmp_path / "train").iterdir()), spec, "synthetic")
    assert {b: float(fit["best_lr"].sel(batch_size=b)) for b in batch_sizes} == best  # the fit decides, once
    write_netcdf(fit, tmp_path / "fit.nc")
    ds = hessian_stage.aggregate([tmp_path / "h"], tmp_path / "fit.nc", "synthetic")
    import pandas as pd

    # B has ties (two seeds each), so rho(B, lambda_max) < 1: compare with pandas' rank correlation
    at_best = [(b, s) for b, lr, s in runs if best[b] == lr]
    expected = pd.Series([b for b, _ in at_best]).corr(pd.Series([np.log(b) + 0.01 * s for b, s in at_best]),
                                                       method="spearman")  # fmt: skip
    assert float(ds["rho_batch_size_sharpness"]) == pytest.approx(expected, abs=1e-12)
    assert float(ds["rho_sharpness_gap"]) == pytest.approx(1.0)  # same ordering, no ties
    assert bool(ds["larger_batch_sharper"]) and int(ds["n_runs_compared"]) == 8
    medians = ds["lambda_max_at_best_lr"].sel(summary="median").values
    np.testing.assert_allclose(medians, np.log(batch_sizes) + 0.005)
    sentence = hessian_stage.reproduction_sentence(ds)
    assert "reproduced" in sentence and "at equal validation accuracy 0.9 rather than at convergence" in sentence
    # a loss target is named as such, not as an accuracy
    fit.attrs.update(target_metric="val_loss", target_value=0.25)
    write_netcdf(fit, tmp_path / "fit.nc")
    sentence = hessian_stage.reproduction_sentence(hessian_stage.aggregate([tmp_path / "h"], tmp_path / "fit.nc", "x"))
    assert "at equal validation loss 0.25 rather than" in sentence and "accuracy" not in sentence
    fit.attrs.update(target_metric="val_metric", target_value=0.8, metric_name="f1")  # a factory's own metric
    write_netcdf(fit, tmp_path / "fit.nc")
    sentence = hessian_stage.reproduction_sentence(hessian_stage.aggregate([tmp_path / "h"], tmp_path / "fit.nc", "x"))
    assert "at equal validation f1 0.8 rather than" in sentence


@pytest.mark.parametrize("n", [3, 4, 8, 20, 72])
def test_spearman_is_scipys(n):
    """The aggregate's rank correlation and its p-value against scipy.stats.spearmanr (the job itself does not
    import scipy.stats: 0.7 s), on data with and without ties, of both signs."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(n)
    for trial in range(40):
        a = rng.integers(0, 4, n).astype(float) if trial % 2 else rng.normal(size=n)
        b = a * rng.normal() + rng.normal(size=n) * rng.uniform(0.1, 2)
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        expected = spearmanr(a, b)
        rho, p = hessian_stage.spearman(a, b)
        # the same formulas (Pearson on average ranks; the t test) evaluated in another order: rho agrees to
        # rounding (1e-16 on a value <= 1); the p-value goes through a t tail that amplifies rho's rounding by up to
        # ~1e3 near |rho| = 1 (measured worst here 2e-13 relative), so 1e-9 relative, and tails below 1e-300 count
        # as equal
        assert rho == pytest.approx(expected.statistic, abs=1e-12)
        assert p == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)
    assert all(math.isnan(x) for x in hessian_stage.spearman(np.ones(5), np.arange(5.0)))  # constant: undefined


def test_edge_of_stability_sharpness_settles_at_two_over_eta():
    """Cohen et al. 2021 on digits: with 2/eta below where sharpening would plateau (~9.6 for this MLP),
    lambda_max ends within 10% of 2/eta; with a small step it stays far below its limit."""
    workload = {**settings()[0]["workload"], "model": {"name": "mlp", "widths": [64], "norm": "none"}}
    spec = {"examples": 1000, "steps": 500, "interval": 50, "seed": 0, "workload": workload}
    large = edge_of_stability.edge_of_stability(0.5, spec, CPU)
    assert float(large["stability_limit"]) == pytest.approx(4.0)
    assert float(large["lambda_max"][0]) > 4.0  # starts above the limit: GD must push sharpness down to it
    final = large["lambda_max"].values[-3:] / 4.0
    assert np.all(np.abs(final - 1) < 0.10), final
    assert large["loss"].values[-1] < large["loss"].values[0] and not large.attrs["diverged"]
    small = edge_of_stability.edge_of_stability(0.05, {**spec, "steps": 200}, CPU)
    assert small["lambda_max"].values[-1] < 0.4 * float(small["stability_limit"])


def test_edge_of_stability_leaves_a_parameter_the_forward_never_reaches_alone(monkeypatch):
    """Gradient descent as SGD makes it: a layer the forward never uses keeps its weights, the used one moves."""
    from batchscope.workloads.base import build

    config = cfg.validate({"device": "cpu", "grid": {"batch_sizes": [8]}, "workloads": {"w": {
        "factory": "tests.factories.bad:unused_parameter", "target": {"metric": "val_accuracy", "value": 0.9},
        "max_steps": 20, "learning_rates": [0.1]}}})  # fmt: skip
    workload = stage_train.config_slice(config, "w")["workload"]
    spec = {"examples": 32, "steps": 3, "interval": 3, "seed": 0, "workload": workload}
    before = build(workload, CPU, seed=0).model.state_dict()
    built = []
    monkeypatch.setattr(edge_of_stability, "build_workload", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    ds = edge_of_stability.edge_of_stability(0.1, spec, CPU)
    assert float(ds["loss"][-1]) < float(ds["loss"][0])
    after = built[0].model.state_dict()
    torch.testing.assert_close(after["unused.weight"], before["unused.weight"], rtol=0, atol=0)
    assert not torch.equal(after["used.weight"], before["used.weight"])


def test_a_checkpoints_analysis_is_reused_and_only_new_ones_are_analysed(tmp_path, monkeypatch):
    """The hessian command twice on one reuse directory, the second time with one more checkpoint: only that one
    is analysed, and the reused file holds the first analysis's numbers. A checkpoint whose bytes changed, or other
    settings, are analysed again."""
    import json

    from batchscope.cli import main
    from batchscope.measure import hessian as measure_hessian
    from batchscope.store import read_netcdf, save_torch

    train_spec, hessian_spec = settings(top_k=2, hutchinson_probes=10, slq_runs=1, slq_steps=8)
    first = save_torch(train(train_spec, 32, 0.1, seed=0, device=CPU)[1], tmp_path / "ckpt" / "lr0.1_seed0.pt")
    second = save_torch(train(train_spec, 32, 0.1, seed=1, device=CPU)[1], tmp_path / "more" / "lr0.1_seed1.pt")
    calls = []
    real = measure_hessian.analyze
    monkeypatch.setattr(measure_hessian, "analyze", lambda *a, **k: calls.append(1) or real(*a, **k))

    data_file = str(tmp_path / "data.nc")  # the data cache, as prepare_data writes it
    assert main(["prepare-data", "--spec", json.dumps({"workload": train_spec["workload"]}), "--out", data_file]) == 0

    def run(out, *paths, spec=hessian_spec):
        args = ["hessian", "--spec", json.dumps(spec), "--data", data_file, "--reuse", str(tmp_path / "reuse"),
                "--checkpoints", *map(str, paths), "--out", str(tmp_path / out)]  # fmt: skip
        assert main(args) == 0

    run("a", first)
    assert len(calls) == 1
    run("b", first, second)
    assert len(calls) == 2  # only the new checkpoint
    before, after = (read_netcdf(tmp_path / d / "B32_lr0.1_seed0.nc") for d in ("a", "b"))
    assert float(after["lambda_max"]) == float(before["lambda_max"]) and float(after["trace"]) == float(before["trace"])
    run("c", first, spec={**hessian_spec, "hutchinson_probes": 11})  # other settings: analysed again
    assert len(calls) == 3
    save_torch(train(train_spec, 32, 0.1, seed=2, device=CPU)[1], first)  # other weights under the same name
    run("d", first)
    assert len(calls) == 4
