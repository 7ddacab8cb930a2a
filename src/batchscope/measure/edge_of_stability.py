"""The edge of stability (Cohen et al. 2021): full-batch gradient descent on the squared loss, with lambda_max
measured along the way against the stability limit 2 / step size."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from batchscope.core import hessian
from batchscope.engine import runtime
from batchscope.workloads.base import analysis_data
from batchscope.workloads.base import build as build_workload


def edge_of_stability(step_size: float, spec: dict[str, Any], device: torch.device, data_file: str | None = None
                      ) -> xr.Dataset:  # fmt: skip
    """Full-batch gradient descent on the squared loss, tracking lambda_max against 2 / step size.

    Cohen et al. (2021): under gradient descent with step size eta, sharpness rises (progressive sharpening)
    until it reaches 2/eta, the stability limit of a quadratic, and then hovers there while the loss keeps
    falling, non-monotonically. ``spec`` is the ``edge_of_stability`` config section: ``examples`` (the first
    that many training examples), ``steps``, ``interval`` (steps between lambda_max measurements), ``seed``.
    Integer (class) targets are one-hot over the model's outputs; the loss is 0.5 |f(x) - target|^2 averaged
    over examples. The workload (``spec["workload"]``) comes from its factory, seeded with ``spec["seed"]``.
    """
    workload = build_workload(spec["workload"], device, seed=spec["seed"], data_file=data_file)
    x, y = (t[: spec["examples"]] for t in analysis_data(workload, device))
    model = workload.model

    def squared_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        classes = not target.is_floating_point()
        goal = nn.functional.one_hot(target, out.shape[-1]).to(out.dtype) if classes else target
        return 0.5 * ((out.reshape(len(out), -1) - goal.reshape(len(out), -1)) ** 2).sum(1).mean()

    # plain gradient descent: SGD without momentum or weight decay (a parameter the forward never reaches gets no
    # gradient, and SGD leaves it alone)
    plain = {"name": "sgd", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
    optimizer = runtime.make_optimizer(plain, model.parameters(), step_size)
    steps, sharpness_values, losses = [], [], []
    for step in range(spec["steps"] + 1):
        if step % spec["interval"] == 0:
            op = hessian.HessianOperator(model, squared_loss, x, y)
            value = op.loss_value()
            if not math.isfinite(value):
                break
            # one start: lambda_max only, measured every `interval` steps along a path it follows closely
            top = hessian.top_eigenvalues(op, op.dim, 1, tol=1e-3, seed=spec["seed"], device=device, starts=1)
            steps.append(step)
            sharpness_values.append(float(top.values[0]))
            losses.append(value)
        if step < spec["steps"]:
            optimizer.zero_grad(set_to_none=True)
            squared_loss(model(x), y).backward()
            optimizer.step()
    ds = xr.Dataset(
        {
            "lambda_max": ("step", np.asarray(sharpness_values), {"long_name": "largest Hessian eigenvalue"}),
            "loss": ("step", np.asarray(losses), {"long_name": "full-batch squared loss"}),
            "stability_limit": ((), 2.0 / step_size, {"long_name": "2 / step size"}),
        },
        coords={"step": np.asarray(steps, dtype=np.int64)},
    )
    expected = spec["steps"] // spec["interval"] + 1
    ds.attrs.update(step_size=step_size, examples=len(x), diverged=int(len(steps) < expected))
    return ds
