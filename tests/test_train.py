"""Training: bitwise reproducibility, censoring, divergence as a result, and the profiler."""

import math

import numpy as np
import pytest
import torch

from batchscope import config as cfg
from batchscope import profile, runtime
from batchscope.train import train

CPU = torch.device("cpu")


def spec(**overrides):
    config = cfg.validate(
        {
            "device": "cpu",
            "grid": {"batch_sizes": [32]},
            "workloads": {
                "w": {
                    "dataset": {"name": "digits"},
                    "model": {"name": "mlp", "widths": [32]},
                    "target": {"metric": "val_accuracy", "value": 0.9},
                    "max_steps": 300,
                    "eval_interval": 10,
                    "learning_rates": [0.1],
                    **overrides,
                }
            },
        }
    )
    return cfg.train_slice(config, "w")


def test_training_is_bitwise_reproducible_per_seed():
    runtime.setup(1)
    first, ckpt_a = train(spec(), 32, 0.1, seed=3, device=CPU)
    second, ckpt_b = train(spec(), 32, 0.1, seed=3, device=CPU)
    other, _ = train(spec(), 32, 0.1, seed=4, device=CPU)
    np.testing.assert_array_equal(first["train_loss"].values, second["train_loss"].values)
    np.testing.assert_array_equal(first["val_metric"].values, second["val_metric"].values)
    assert float(first["steps_to_target"]) == float(second["steps_to_target"])
    for key, value in ckpt_a["state_dict"].items():
        assert torch.equal(value, ckpt_b["state_dict"][key]), key
    assert not np.array_equal(first["train_loss"].values, other["train_loss"].values)


def test_reaches_target_and_stops():
    ds, _ = train(spec(), 32, 0.1, seed=0, device=CPU)
    assert bool(ds["reached_target"]) and not bool(ds["diverged"])
    steps = float(ds["steps_to_target"])
    assert steps % 10 == 0 and steps == ds["step"].values[-1]  # evaluated every 10 steps, stopped there
    assert ds["val_metric"].values[-1] >= 0.9 > ds["val_metric"].values[0]
    # the gap is recomputed on the full sets at the end
    assert float(ds["gap_accuracy"]) == pytest.approx(
        float(ds["final_train_accuracy"]) - float(ds["final_val_accuracy"]), abs=1e-12
    )
    assert 0 < float(ds["time_to_target"]) <= float(ds["train_time"]) + 1e-12


def test_unreachable_target_is_censored():
    ds, _ = train(spec(target={"metric": "val_accuracy", "value": 1.0}, max_steps=40), 32, 0.1, 0, CPU)
    assert math.isnan(float(ds["steps_to_target"])) and not bool(ds["reached_target"])
    assert int(ds["steps_done"]) == 40 and ds.sizes["step"] == 4


@pytest.mark.parametrize("lr", [1e3, 1e20])  # loss parked at ~1e8 by dead ReLUs; NaN
def test_divergence_is_recorded_not_raised(lr):
    ds, _ = train(spec(), 32, lr, seed=0, device=CPU)
    assert bool(ds["diverged"]) and not bool(ds["reached_target"])
    last = ds["train_loss"].values[-1]
    assert not np.isfinite(last) or last > 100 * float(ds["initial_val_loss"])
    assert int(ds["steps_done"]) == 10  # stopped at the first evaluation


def test_a_large_but_recovering_loss_is_not_divergence():
    ds, _ = train(spec(), 32, 10.0, seed=0, device=CPU)  # first-interval loss ~17x the initial
    assert not bool(ds["diverged"]) and int(ds["steps_done"]) == 300


def test_cnn_with_batchnorm_trains():
    model = {"name": "cnn", "channels": [4, 8], "hidden": 16, "norm": "batch"}
    ds, ckpt = train(spec(model=model), 64, 0.05, seed=0, device=CPU)
    assert bool(ds["reached_target"])
    assert any("running_mean" in key for key in ckpt["state_dict"])


def test_regression_workload_uses_val_loss():
    # noise_std 0.5: the Bayes risk is 0.25, so 0.3 is reachable
    s = spec(target={"metric": "val_loss", "value": 0.3}, model={"name": "mlp", "widths": []},
             dataset={"name": "linreg"})  # fmt: skip
    ds, _ = train(s, 64, 0.05, seed=0, device=CPU)
    assert bool(ds["reached_target"]) and np.isnan(float(ds["final_val_accuracy"]))
    assert ds["val_metric"].values[-1] <= 0.3


def test_profile_times_the_training_step():
    settings = {
        "profile": {"warmup": 2, "repeats": 5, "min_repeat_time": 0.002},
        "workload": spec()["workload"],
        "optimizer": spec()["optimizer"],
    }
    small, large = (profile.profile(settings, b, CPU) for b in (8, 1024))
    for ds in (small, large):
        assert bool(ds["feasible"]) and ds.sizes["repeat"] == 5
        assert float(ds["t_iter_q25"]) <= float(ds["t_iter_median"]) <= float(ds["t_iter_q75"])
        # the calibration block lasted >= min_repeat_time (0.002 s); half of it allows for the machine's drift
        assert int(ds["steps_per_repeat"]) * float(ds["t_iter_median"]) >= 0.5 * 0.002
    # 128x the examples costs more per step (the per-example term tau_d is real on this model)
    assert float(large["t_iter_median"]) > float(small["t_iter_median"])


def test_out_of_memory_errors_are_recognised():
    assert runtime.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert runtime.is_out_of_memory(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"
        )
    )
    assert runtime.is_out_of_memory(MemoryError())
    assert not runtime.is_out_of_memory(RuntimeError("shape mismatch"))


def _oom_step(*args, **kwargs):
    def step(x, y):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    return step


def test_out_of_memory_is_recorded_by_profile_and_train(monkeypatch):
    # A real OOM cannot be provoked safely on a shared CPU machine; the step raises torch's message instead.
    monkeypatch.setattr(runtime, "make_step", _oom_step)
    settings = {
        "profile": {"warmup": 1, "repeats": 3, "min_repeat_time": 0.001},
        "workload": spec()["workload"],
        "optimizer": spec()["optimizer"],
    }
    prof = profile.profile(settings, 64, CPU)
    assert not bool(prof["feasible"]) and np.isnan(prof["t_iter"].values).all()
    ds, _ = train(spec(), 64, 0.1, seed=0, device=CPU)
    assert bool(ds["out_of_memory"]) and not bool(ds["reached_target"]) and int(ds["steps_done"]) == 0


def test_other_runtime_errors_are_not_swallowed(monkeypatch):
    def broken(*args, **kwargs):
        def step(x, y):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

        return step

    monkeypatch.setattr(runtime, "make_step", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(spec(), 64, 0.1, seed=0, device=CPU)
