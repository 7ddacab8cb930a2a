"""The Ghost BatchNorm experiment: does normalizing over ghost batches bring small-batch behaviour back at a large
physical batch, and what does it cost per step?

- :func:`variance_experiment`: Monte Carlo Var(ghost-batch mean) / Var(physical-batch mean) of real activations
  (the input of the network's first normalization layer, averaged over space), against g.
(The comparison of the trained variants is the stage's: :mod:`batchscope.stages.ghost`.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from batchscope.core import ghost
from batchscope.workloads.base import analysis_data
from batchscope.workloads.base import build as build_workload


@torch.no_grad()
def first_norm_inputs(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Per example and channel, the spatial mean of what the first normalization layer receives."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("the model has no normalization layer: set the workload's model norm to 'batch'")
    captured = {}
    handle = norms[0].register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    model.eval()
    try:
        model(x)
    finally:
        handle.remove()
    values = captured["x"]
    return values.flatten(2).mean(-1).cpu().numpy() if values.dim() > 2 else values.cpu().numpy()


def variance_experiment(spec: dict[str, Any], device, data_file: str | None = None) -> xr.Dataset:
    """Var(ghost-batch mean) / Var(physical-batch mean) for g in ``spec['groups']`` at ``spec['batch_size']``.

    The activations come from the workload's model at initialization (seed ``spec['seed']``) on the training
    set; batches are drawn without replacement, as training draws them, so the expectation is
    g (N - m) / (N - B) (:func:`batchscope.core.ghost.expected_ratio`), not g, when B is close to N.
    """
    wl_spec = {**spec["workload"], "model": {**spec["workload"]["model"], "norm": "batch"}}
    wl_spec["model"].pop("ghost_batch_size", None)
    workload = build_workload(wl_spec, device, seed=spec["seed"], data_file=data_file)
    values = first_norm_inputs(workload.model, analysis_data(workload, device)[0])
    rng = np.random.default_rng(spec["seed"])
    batch, population = spec["batch_size"], len(values)
    groups = [g for g in spec["groups"] if batch % g == 0]
    ratio = np.empty((len(groups), values.shape[1]))
    error = np.empty_like(ratio)
    for i, g in enumerate(groups):
        ratio[i], error[i] = ghost.mean_variance_ratio(values, batch, batch // g, spec["draws"], rng)
    return xr.Dataset(
        {
            "ratio": (("groups", "channel"), ratio, {"long_name": "Var(ghost-batch mean) / Var(batch mean)"}),
            "ratio_se": (("groups", "channel"), error, {"long_name": "bootstrap standard error"}),
            "ratio_mean": ("groups", ratio.mean(axis=1), {"long_name": "ratio averaged over channels"}),
            "expected": (
                "groups",
                [ghost.expected_ratio(batch, batch // g, population) for g in groups],
                {"long_name": "g (N - m) / (N - B): draws without replacement"},
            ),  # fmt: skip
            "expected_iid": ("groups", np.asarray(groups, float), {"long_name": "g: i.i.d. draws"}),
        },
        coords={"groups": np.asarray(groups), "ghost_size": ("groups", [batch // g for g in groups])},
        attrs={"batch_size": batch, "population": population, "draws": spec["draws"]},
    )
