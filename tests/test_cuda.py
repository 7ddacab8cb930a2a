"""The CUDA paths on a real GPU, against the CPU as the reference. Skipped without CUDA; benchmarks/gpu_check.sh
runs them (`pytest -m cuda`) on a GPU machine."""

import numpy as np
import pytest
import torch
from torch import nn

from batchscope import config as cfg
from batchscope.core import noise
from batchscope.core.hessian import HessianOperator, top_eigenvalues
from batchscope.engine import profiling, runtime
from batchscope.stages import profile as profile_stage
from batchscope.workloads.models import build_model
from tests.test_workloads import OPTIMIZER_IDS, OPTIMIZERS, assert_updates_as_torch_optim

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def digits_profile_spec():
    config = cfg.load("config/config.yaml")
    spec = profile_stage.config_slice(config, "digits_mlp")
    return {**spec, "device": "cuda", "profile": {**spec["profile"], "rounds": 3, "repeats": 2}}


def test_the_slot_pool_claims_a_real_gpu_by_uuid():
    device = runtime.resolve_device("cuda")
    assert device.type == "cuda"
    uuid = str(torch.cuda.get_device_properties(device.index or 0).uuid)
    assert (runtime.slot_directory() / f"{uuid}.lock").exists()


def test_profiling_on_cuda_times_every_size_and_records_memory():
    runtime.setup(1, CUDA, None, False)
    timed = profiling.profile(digits_profile_spec(), [64, 1024], CUDA)
    for b, ds in timed.items():
        assert bool(ds["feasible"]) and float(ds["t_iter_median"]) > 0, b
        assert float(ds["peak_memory"]) > 0 and float(ds["step_memory"]) >= 0, b
    assert ds.attrs.get("device_type", "cuda") == "cuda"


def test_out_of_memory_is_a_result_on_cuda():
    """A batch whose activations exceed the GPU's memory is recorded as infeasible, the small one still timed:
    linear regression in 4096 dimensions, one hidden layer of 65536 units, 200,000 examples (one activation of the
    whole set is 52 GB, and the backward pass holds several)."""
    config = cfg.load("config/config.yaml")
    spec = digits_profile_spec()
    spec["workload"] = {**cfg.workload_slice(config, "digits_mlp"),
                        "dataset": {"name": "linreg", "dim": 4096, "n_train": 200_000, "n_val": 1000,
                                    "noise_std": 0.5, "condition_number": 10.0, "seed": 0},
                        "model": {"name": "mlp", "widths": [65536], "norm": "none"}}  # fmt: skip
    timed = profiling.profile(spec, [8, 200_000], CUDA)
    assert bool(timed[8]["feasible"])
    if torch.cuda.get_device_properties(0).total_memory < 200e9:
        assert not bool(timed[200_000]["feasible"])


def test_hessian_on_cuda_matches_the_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    x, y = torch.randn(300, 10, dtype=torch.float64), torch.randint(0, 4, (300,))
    loss = nn.functional.cross_entropy
    values = []
    for device in (CPU, CUDA):
        op = HessianOperator(model.to(device), loss, x.to(device), y.to(device), chunk_size=100)
        values.append(top_eigenvalues(op, op.dim, 3, tol=1e-8, seed=0, device=device).values)
    np.testing.assert_allclose(values[1], values[0], rtol=1e-6)


def test_per_example_norms_on_cuda_match_vmap():
    torch.manual_seed(1)
    spec = {"name": "resnet", "widths": [8, 16], "blocks": 1, "norm": "batch"}
    model = build_model(spec, (3, 32, 32), 10).to(CUDA).eval()
    x, y = torch.randn(16, 3, 32, 32, device=CUDA), torch.randint(0, 10, (16,), device=CUDA)
    loss = nn.functional.cross_entropy
    fast = noise.per_example_sq_norms(model, loss, x, y, method="auto")
    reference = noise.per_example_sq_norms(model, loss, x, y, method="vmap")
    torch.testing.assert_close(fast, reference, rtol=1e-3, atol=1e-6)


def test_tf32_and_cudnn_benchmark_follow_the_config_and_are_recorded():
    from batchscope import store

    runtime.setup(1, CUDA, False, True)
    recorded = store.numerics()
    assert recorded["tf32"] == 1 and recorded["deterministic"] == 0
    runtime.setup(1, CUDA, False, False)
    assert store.numerics()["tf32"] == 0


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_the_optimizer_updates_as_torch_optim_on_cuda(spec):
    """runtime.Optimizer on CUDA, where torch's functional updates take the foreach path, against torch.optim's
    classes there: bit for bit, as on the CPU."""
    assert_updates_as_torch_optim(spec, CUDA)
