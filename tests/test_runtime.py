"""The runtime's machine-facing parts: one GPU per job (the slot pool), the numerics a job runs with, what counts
as out of memory."""

import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import torch

from batchscope import store as io
from batchscope.engine import runtime

CPU = torch.device("cpu")


def _hold(ids, directory, hold_s, queue):
    """A job: claim a slot, report (slot, when claimed, when released), hold it for ``hold_s``, exit."""
    index = runtime.claim_slot(ids, directory, poll=0.05)
    claimed = time.monotonic()
    time.sleep(hold_s)
    queue.put((index, claimed, time.monotonic()))


def test_concurrent_jobs_get_a_gpu_each_and_wait_when_all_are_taken(tmp_path):
    """Four jobs on three (fake) GPUs: the first three hold three different slots at once; the fourth waits for
    one to be freed (its owner exits) and takes that one. Without the pool every job would use cuda:0."""
    ids = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    jobs = [context.Process(target=_hold, args=(ids, tmp_path, 1.0, queue)) for _ in range(3)]
    for job in jobs:
        job.start()
    time.sleep(0.5)  # the three hold their slots
    late = context.Process(target=_hold, args=(ids, tmp_path, 0.1, queue))
    late.start()
    for job in [*jobs, late]:
        job.join(timeout=20)
    results = [queue.get(timeout=5) for _ in range(4)]
    first, last = results[:3], results[3]
    assert sorted(index for index, _, _ in first) == [0, 1, 2]  # three different GPUs at once
    assert last[1] >= min(released for _, _, released in first) - 0.05  # the fourth waited for a release
    assert last[0] in {index for index, _, _ in first}


def test_a_killed_job_frees_its_gpu(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    job = context.Process(target=_hold, args=(["GPU-only"], tmp_path, 60.0, queue))
    job.start()
    time.sleep(0.5)
    job.kill()  # as the OOM killer or a cancelled job would: no cleanup runs
    job.join()
    start = time.monotonic()
    assert runtime.claim_slot(["GPU-only"], tmp_path, poll=0.05) == 0
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(("deterministic", "expected"), [(None, 1), (True, 1), (False, 0)])
def test_numerics_follow_the_config_and_are_recorded(deterministic, expected):
    """On the CPU, null means deterministic (bitwise reproducible runs); every file records what was in force."""
    try:
        runtime.setup(1, CPU, deterministic, tf32=False)
        assert io.numerics() == {"deterministic": expected, "tf32": 0, "cudnn_benchmark": 0}
        attrs = io.provenance("train_model", {"x": 1}, device="cpu")
        assert attrs["deterministic"] == expected and attrs["tf32"] == 0
    finally:
        runtime.setup(1, CPU)


def test_analysis_jobs_start_without_dynamo_or_scipy_stats(tmp_path):
    """A job that never compiles nor builds an optimizer (noise, Hessian, Jensen, edge of stability) sets
    deterministic kernels without importing dynamo and inductor, takes Hessian-vector products without them (nor
    torch's symbolic shapes), and fits the variance law without scipy.stats: each import costs 0.3 to 1.4 s of
    every such job's start. The
    switch is really set (read back), the edge of stability really descends and measures lambda_max (a Lanczos
    run of products), and the data come from a prepared file, as in a job."""
    from batchscope import config as cfg
    from batchscope.stages import train
    from batchscope.workloads.base import builtin_dataset

    config = cfg.validate({"device": "cpu", "grid": {"batch_sizes": [32]}, "workloads": {"w": {
        "dataset": {"name": "digits"}, "model": {"name": "mlp", "widths": [16]},
        "target": {"metric": "val_accuracy", "value": 0.8}, "max_steps": 10, "learning_rates": [0.1]}}})  # fmt: skip
    workload = train.config_slice(config, "w")["workload"]
    data = tmp_path / "data.nc"
    io.write_netcdf(builtin_dataset(workload["dataset"]), data)
    spec = {"examples": 200, "steps": 4, "interval": 2, "seed": 0, "workload": workload}
    script = (
        "import json, sys, torch\n"
        "from batchscope.engine import runtime\n"
        "runtime.setup(1, torch.device('cpu'))\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "from batchscope.measure import edge_of_stability, hessian, noise\n"
        "from batchscope.core import noise as core_noise\n"
        "import numpy as np\n"
        "x = np.array([16.0, 64, 256]); print(core_noise._loglog_slope(x, 1 / x)[0])\n"
        f"spec = json.loads({json.dumps(spec)!r})\n"
        f"ds = edge_of_stability.edge_of_stability(0.1, spec, torch.device('cpu'), {str(data)!r})\n"
        "print(float(ds['loss'][-1] / ds['loss'][0]), float(ds['lambda_max'][0]))\n"
        "from batchscope.stages import hessian as stage_hessian\n"  # the aggregate's rank correlation
        "assert stage_hessian.spearman(x, x**0.5)[0] > 0.99\n"
        "heavy = ('torch._dynamo', 'torch._inductor', 'torch.fx.experimental.symbolic_shapes', 'scipy.stats')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    slope, values, loaded = result.stdout.strip().splitlines()
    assert float(slope) == pytest.approx(-1.0, abs=1e-12)
    ratio, sharpness = map(float, values.split())
    assert ratio < 1.0 and sharpness > 0  # four descent steps lowered the loss; a positive top eigenvalue
    assert loaded == "[]"


def test_training_imports_no_dynamo():
    """A training run (SGD with momentum under a schedule, then AdamW) in a fresh process leaves dynamo unimported:
    torch.optim's classes import it on first use, 1.2 to 1.7 s of every training job's start, more than a digits
    job's runs (runtime.Optimizer takes their functional updates instead)."""
    script = (
        "import sys, torch\n"
        "from batchscope import config as cfg\n"
        "from batchscope.engine import runtime\n"
        "from batchscope.engine.training import train\n"
        "from batchscope.stages import train as stage\n"
        "runtime.setup(1, torch.device('cpu'))\n"
        "for optimizer in ({'name': 'sgd', 'momentum': 0.9}, {'name': 'adamw'}):\n"
        "    config = cfg.validate({'device': 'cpu', 'grid': {'batch_sizes': [32]}, 'workloads': {'w': {\n"
        "        'dataset': {'name': 'digits'}, 'model': {'name': 'mlp', 'widths': [16]}, 'optimizer': optimizer,\n"
        "        'schedule': {'warmup_steps': 5, 'decay': 'cosine'}, 'target': {'metric': 'val_accuracy',\n"
        "        'value': 0.99}, 'max_steps': 20, 'eval_interval': 10, 'learning_rates': [0.01]}}})\n"
        "    ds, _ = train(stage.config_slice(config, 'w'), 32, 0.01, 0, torch.device('cpu'))\n"
        "    print(int(ds['steps_done']), end=' ')\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["20", "20", "False"]  # both trained their 20 steps, and no dynamo


@pytest.mark.parametrize(("device", "deterministic", "expected"), [
    ("cuda", True, ":4096:8"), ("cuda", None, None), ("cuda", False, None), ("cpu", True, None)])  # fmt: skip
def test_deterministic_cuda_fixes_the_cublas_workspace(monkeypatch, device, deterministic, expected):
    """cuBLAS products are reproducible only with a fixed workspace: set for deterministic CUDA runs (null on CUDA
    means the fast kernels), never elsewhere, and a value the user set is kept."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        runtime.setup(1, torch.device(device), deterministic)
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == expected
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        runtime.setup(1, torch.device(device), deterministic)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        runtime.setup(1, CPU)


@pytest.mark.parametrize(
    ("message", "oom"),
    [
        ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
        ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
        ("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", True),
        ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB", True),
        ("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)", False),
        ("cuDNN error: CUDNN_STATUS_BAD_PARAM", False),
    ],
)
def test_out_of_memory_includes_cublas_and_cudnn_allocation_failures(message, oom):
    assert runtime.is_out_of_memory(RuntimeError(message)) is oom


@pytest.mark.parametrize(
    ("spec", "warmup"),
    [
        ({"name": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}, 0),
        ({"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.0}, 0),
        ({"name": "sgd", "momentum": 0.5, "nesterov": False, "weight_decay": 0.0}, 0),
        ({"name": "sgd", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}, 0),
        ({"name": "adamw", "betas": [0.9, 0.999], "weight_decay": 0.0}, 0),
        ({"name": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}, 20),
        ({"name": "adamw", "betas": [0.9, 0.999], "weight_decay": 0.0}, 20),
    ],
)
def test_the_update_lag_is_how_far_the_optimizer_trails_full_steps(spec, warmup):
    """scaling.update_lag against the optimizer itself: on a linear loss (a constant gradient) T updates, through
    the schedule, move the weight T - lag full-size steps (SGD: lr g / (1 - momentum); AdamW: lr per coordinate).
    Tolerance 1e-4 steps: AdamW's eps (1e-8 beside |g| >= 0.5) shortens each of its 400 steps by up to 2e-8."""
    from batchscope.core import scaling

    total, lr = 400, 0.01
    weight = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    gradient = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    optimizer = runtime.make_optimizer(spec, [weight], lr)
    schedule = runtime.make_schedule(optimizer, {"warmup_steps": warmup, "decay": "constant"}, total)
    for _ in range(total):
        optimizer.zero_grad()
        (weight @ gradient).backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
    full = lr * (gradient / (1 - spec.get("momentum", 0.0)) if spec["name"] == "sgd" else gradient.sign())
    taken = (-weight.detach() / full).numpy()  # full steps' worth, per coordinate
    assert taken == pytest.approx([total - scaling.update_lag(spec, warmup)] * 3, abs=1e-4)


def test_a_schedule_from_a_later_update_at_a_stride():
    """Schedule(start=s, stride=k): update i takes the factor of update s + k i (a branch from update s at k times
    the batch size, the same examples), against lr_factor's closed form; start 0, stride 1 is the run's own."""
    spec = {"warmup_steps": 20, "decay": "cosine", "min_factor": 0.0, "gamma": 0.1, "step_size": 1000}
    weight = torch.zeros(1, requires_grad=True)
    for start, stride in ((0, 1), (10, 2), (15, 0.5)):
        optimizer = runtime.make_optimizer({"name": "sgd", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
                                           [weight], 0.2)  # fmt: skip
        schedule = runtime.make_schedule(optimizer, spec, 100, start, stride)
        rates = []
        for _ in range(6):
            rates.append(optimizer.lr)
            schedule.step()
        expected = [0.2 * runtime.lr_factor(spec, int(round(start + stride * i)), 100) for i in range(6)]
        assert rates == pytest.approx(expected, rel=1e-15)  # the same expression: equal up to rounding
