"""The local critical batch size by branching: the selection rule against hand-worked cases, and a branch's
training against the same steps written out here with plain torch."""

import math

import numpy as np
import pytest
import torch

from batchscope import config as cfg
from batchscope.measure.branch import branch, local_critical_batch_size, lr_scale
from batchscope.stages import branch as branch_stage
from batchscope.workloads.base import analysis_data, build

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("losses", "expected"),
    [
        ([1.00, 1.00, 1.005, 1.2], (64, 128)),  # within 1% up to 64, then worse: the bracket is [64, 128]
        ([1.00, 0.98, 0.97, 0.975], (128, -1)),  # never worse than the best smaller one: the largest, no bracket
        ([1.00, 1.5, 0.9, 0.9], (16, 32)),  # the search stops at the first loss outside (32), whatever follows
        ([1.00, math.nan, 0.9, 0.9], (16, 32)),  # a diverged branch is outside
    ],
)
def test_the_local_critical_batch_size_is_the_largest_within_tolerance(losses, expected):
    assert local_critical_batch_size([16, 32, 64, 128], losses, 0.01) == expected
    # the order of the inputs does not matter
    assert local_critical_batch_size([128, 64, 32, 16], losses[::-1], 0.01) == expected


def test_learning_rate_rules():
    assert lr_scale("sgd", 4) == 4 and lr_scale("adamw", 4) == 2


def test_a_branch_trains_what_it_says():
    config = cfg.load("config/test/tiny.yaml")
    spec = branch_stage.config_slice(config, "tiny_mlp")
    spec = {**spec, "factors": [0.5, 2.0], "examples": 512, "eval_size": 200}
    workload = build(cfg.workload_slice(config, "tiny_mlp"), CPU, seed=0)
    state = {k: v.clone() for k, v in workload.model.state_dict().items()}
    ds = branch(state, workload, spec, (64, 0.1), CPU)
    assert ds["branch_batch_size"].values.tolist() == [32, 128]
    assert ds["steps"].values.tolist() == [16, 4]  # the same 512 examples each
    np.testing.assert_allclose(ds["lr"].values, [0.05, 0.2])  # SGD: linear in k
    # the k = 2 branch by hand: the same start, optimizer, batch order and evaluation subset
    fresh = build(cfg.workload_slice(config, "tiny_mlp"), CPU, seed=0)
    model = fresh.model
    model.load_state_dict(state)
    opt = spec["optimizer"]
    sgd = torch.optim.SGD(model.parameters(), lr=0.2, momentum=opt["momentum"], nesterov=opt["nesterov"],
                          weight_decay=opt["weight_decay"])  # fmt: skip
    x, y = fresh.train
    generator = torch.Generator().manual_seed(spec["seed"])
    order = torch.randperm(len(x), generator=generator)
    model.train()
    for i in range(4):
        index = order[i * 128 : (i + 1) * 128]
        sgd.zero_grad()
        fresh.loss(model(x[index]), y[index]).backward()
        sgd.step()
    x_eval, y_eval = (t[:200] for t in analysis_data(fresh, CPU))
    with torch.no_grad():
        expected = float(fresh.loss(model.eval()(x_eval), y_eval))
    assert float(ds["loss"].sel(branch_batch_size=128)) == pytest.approx(expected, rel=1e-6)
    assert int(ds["critical_batch_size"]) in (32, 128)
