"""Training: bitwise reproducibility, censoring, divergence as a result, and the profiler."""

import math
import time

import numpy as np
import pytest
import torch

from batchscope import config as cfg
from batchscope.engine import profiling as profile
from batchscope.engine import runtime
from batchscope.engine.training import train
from batchscope.stages import train as stage_train

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
    return stage_train.config_slice(config, "w")


def test_training_is_bitwise_reproducible_per_seed():
    runtime.setup(1, CPU)  # null deterministic: on, on the CPU
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


def profile_spec(**profile_settings):
    """The profile stage's slice for the digits MLP of :func:`spec`, with these profile settings."""
    return {"profile": profile_settings, "workload": spec()["workload"], "optimizer": spec()["optimizer"]}


def test_profile_times_the_training_step():
    settings = profile_spec(warmup=2, rounds=3, repeats=5, min_repeat_time=0.002)
    timed = profile.profile(settings, [1024, 8], CPU)
    small, large = timed[8], timed[1024]
    for ds in (small, large):
        assert bool(ds["feasible"]) and ds.sizes["repeat"] == 5 and ds.sizes["round"] == 3
        np.testing.assert_allclose(ds["t_iter_round"].values, np.median(ds["t_iter"].values, axis=1))
        assert float(ds["t_iter_median"]) == pytest.approx(float(np.median(ds["t_iter_round"].values)))
        assert float(ds["t_iter_q25"]) <= float(ds["t_iter_median"]) <= float(ds["t_iter_q75"])
        # calibrated by doubling (test_calibration_doubles_until_a_block_lasts_min_repeat_time): steps times the
        # median step is not compared with min_repeat_time here, as the load can change between calibrating and timing
        assert int(ds["steps_per_repeat"]).bit_count() == 1
    # 128x the examples costs more per step (the per-example term tau_d is real on this model)
    assert float(large["t_iter_median"]) > float(small["t_iter_median"])


class _CountingClock:
    """A clock on which each step lasts ``step_s``: the calibration's arithmetic without the machine's load."""

    def __init__(self, step_s):
        self.step_s, self.steps = step_s, 0

    def start(self):
        self.steps = 0

    def stop(self):
        return self.steps * self.step_s


@pytest.mark.parametrize(
    ("step_s", "min_repeat_time", "expected"),
    [(0.001, 0.002, 2), (0.001, 0.0025, 4), (0.0003, 0.02, 128), (0.05, 0.02, 1), (0.001, 0.001, 1)],
)
def test_calibration_doubles_until_a_block_lasts_min_repeat_time(step_s, min_repeat_time, expected):
    # expected: the smallest power of two whose block lasts >= min_repeat_time (0.02 / 0.0003 = 66.7 -> 128)
    clock = _CountingClock(step_s)

    def step(x, y):
        clock.steps += 1

    batches = iter(lambda: (None, None), 0)
    assert profile._calibrate(step, batches, clock, min_repeat_time) == expected


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
    settings = profile_spec(warmup=1, rounds=3, repeats=1, min_repeat_time=0.001)
    prof = profile.profile(settings, [64], CPU)[64]
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


def test_profile_interleaves_batch_sizes_so_drift_falls_on_all(monkeypatch):
    """A machine that slows down steadily while profiling (each step costs more the later it runs): timed in
    interleaved rounds, two batch sizes keep their true step-time ratio; timed one after the other (the old
    profile), the later size would look slower than it is by the drift between them."""
    order = []  # the batch size of every step, in the order the steps ran

    def counting_step(*args, **kwargs):
        def step(x, y):
            order.append(len(x))

        return step

    def cost(i, b):  # 1 ms x (1 + B/64), times a drift that adds 1% per 2 steps
        return 1e-3 * (1 + b / 64) * (1 + i / 200)

    class DriftingClock:
        def __init__(self, device):
            pass

        def start(self):
            self.begin = len(order)

        def stop(self):
            return sum(cost(i, b) for i, b in enumerate(order[self.begin :], self.begin))

    monkeypatch.setattr(runtime, "make_step", counting_step)
    monkeypatch.setattr(runtime, "StepClock", DriftingClock)
    settings = profile_spec(warmup=2, rounds=8, repeats=2, min_repeat_time=0.004)
    timed = profile.profile(settings, [8, 128], CPU)
    truth = (1 + 128 / 64) / (1 + 8 / 64)
    ratio = float(timed[128]["t_iter_median"]) / float(timed[8]["t_iter_median"])
    # 3%: within a round the two sizes are timed a few steps apart, so the drift between them (0.5% per step)
    # leaves a residue of a few percent; timed one after the other it is over 20% (below)
    assert ratio == pytest.approx(truth, rel=0.03)
    # the same steps timed size after size: the drift between the two halves biases the ratio by over 20%
    n8, n128 = (int(timed[b]["steps_per_repeat"]) * 8 * 2 for b in (8, 128))
    sequential = (sum(cost(i, 128) for i in range(n8, n8 + n128)) / n128) / (sum(cost(i, 8) for i in range(n8)) / n8)
    assert sequential / truth > 1.2
    # every round times both sizes: the sizes alternate at least once per round in the timed part
    timed_part = order[-(n8 + n128) :]
    switches = sum(a != b for a, b in zip(timed_part, timed_part[1:], strict=False))
    assert switches >= 8


@pytest.mark.parametrize("n", range(3, 10))
def test_thinning_snapshots_keeps_the_initial_and_the_newest_state(n):
    """n states into room for n - 1: one thinning doubles the stride; the first and the newest stay, and every
    other kept state lies on the doubled stride (tests/test_snapshots.py follows many thinnings)."""
    from batchscope.engine.training import Snapshots

    snapshots = Snapshots(n - 1, 10)
    for i in range(n):
        snapshots.add(10 * i, f"state {i}")
    kept = snapshots.kept
    assert kept[0] == (0, "state 0") and kept[-1] == (10 * (n - 1), f"state {n - 1}")
    assert snapshots.thinnings == 1 and snapshots.stride == 20
    assert all(step % 20 == 0 for step, _ in kept[:-1]) and len(kept) == (n - 1) // 2 + 1 + (n - 1) % 2
    assert [step for step, _ in kept] == sorted({step for step, _ in kept})


def test_the_first_steps_warm_up_is_not_in_the_time_to_target(monkeypatch):
    """A first step that costs 0.3 s (a CUDA context, cuDNN autotuning, compilation): timed apart, as the profile's
    warm-up is, and left out of train_time and time_to_target, which count that step at the block's rate."""
    real = runtime.make_step

    def slow_first(*args, **kwargs):
        step, calls = real(*args, **kwargs), []

        def wrapped(x, y):
            calls.append(1)
            if len(calls) == 1:
                time.sleep(0.3)
            return step(x, y)

        return wrapped

    monkeypatch.setattr(runtime, "make_step", slow_first)
    ds, _ = train(spec(), 64, 0.1, seed=0, device=CPU)
    assert float(ds["first_step_time"]) >= 0.3
    assert float(ds["train_time"]) < 0.3 and float(ds["time_to_target"]) < 0.3


def test_out_of_memory_in_the_middle_of_the_rounds_drops_only_that_size(monkeypatch):
    """B = 1024 passes warm-up and calibration, then runs out of memory in a later round (the other sizes'
    cached blocks left too little room): it is recorded as infeasible, and the other size keeps its timings."""
    real = runtime.make_step

    def failing_later(*args, **kwargs):
        step, seen = real(*args, **kwargs), {"big": 0}

        def wrapped(x, y):
            if len(x) == 1024:
                seen["big"] += 1
                if seen["big"] > 5:  # past warm-up (2 steps) and calibration (1 step of >= 1 ms)
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return step(x, y)

        return wrapped

    monkeypatch.setattr(runtime, "make_step", failing_later)
    settings = profile_spec(warmup=2, rounds=4, repeats=2, min_repeat_time=0.001)
    timed = profile.profile(settings, [64, 1024], CPU)
    assert not bool(timed[1024]["feasible"]) and np.isnan(timed[1024]["t_iter"].values).all()
    assert bool(timed[64]["feasible"]) and np.isfinite(timed[64]["t_iter"].values).all()


def test_evaluation_chunks_are_sized_from_the_model_and_do_not_change_the_result():
    """eval_chunk: the probe's bytes per example (the layers' outputs on the CPU) against the budget, at most
    EVAL_CHUNK; the mean loss and accuracy over chunks of any size are those of one pass over the split."""
    from torch import nn

    from batchscope.engine.training import EVAL_CHUNK, Evaluation, activation_bytes, eval_chunk, evaluate
    from batchscope.workloads.base import Workload, accuracy
    from batchscope.workloads.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "cnn", "channels": [8, 16], "hidden": 32, "norm": "batch"}, (1, 8, 8), 10)
    x, y = torch.randn(300, 1, 8, 8), torch.randint(0, 10, (300,))
    workload = Workload(model=model, train=(x, y), val=(x, y), loss=nn.functional.cross_entropy, metric=accuracy)
    per_example = activation_bytes(model, x[:1])
    assert per_example >= (8 * 8 * 8 + 16 * 4 * 4) * 4  # at least the conv outputs, float32
    assert activation_bytes(model, x[:10]) == 10 * per_example and model.training  # mode restored
    assert eval_chunk(workload, torch.device("cpu")) == EVAL_CHUNK  # a small model: the cap
    assert eval_chunk(workload, torch.device("cpu"), budget=37 * per_example) == 37
    assert eval_chunk(workload, torch.device("cpu"), budget=1) == 1
    model.eval()
    with torch.no_grad():
        out = model(x)
    whole = Evaluation(float(nn.functional.cross_entropy(out, y)), float(accuracy(out, y)))
    model.train()
    for chunk in (1, 37, 300, EVAL_CHUNK):
        result = evaluate(workload, "val", torch.device("cpu"), chunk=chunk)
        assert result.loss == pytest.approx(whole.loss, rel=1e-6) and result.metric == pytest.approx(whole.metric)
