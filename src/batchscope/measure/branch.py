"""The critical batch size measured locally by branching (Merrill et al. 2025, "Critical Batch Size Revisited").

From one checkpoint of a run trained at batch size B with learning rate eta, short branches continue training at
k B for each k, with the learning rate scaled by the optimizer's rule (linear in k for SGD, square root for Adam),
each over the same number of examples, so a larger batch takes proportionally fewer steps. While k B is below the
critical batch size, a larger batch loses nothing per example seen: its branch ends at the same loss. The local
critical batch size is the largest k B whose final loss stays within a relative tolerance of the best loss of the
smaller ones (:func:`local_critical_batch_size`); the truth lies between it and the next branch's k B.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from batchscope.engine import runtime
from batchscope.workloads.base import Workload, analysis_data


def lr_scale(optimizer: str, k: float) -> float:
    """How the learning rate follows the batch size: linear for SGD, the square root for Adam(W)."""
    return k if optimizer == "sgd" else math.sqrt(k)


def local_critical_batch_size(batch_sizes: Sequence[int], losses: Sequence[float], tolerance: float) -> tuple[int, int]:
    """(local critical batch size, the next branch's batch size or -1): the largest batch size, going up from the
    smallest, whose loss is within ``tolerance`` (relative) of the best loss of the batch sizes below it; the first
    one that is not ends the search. A diverged branch (NaN or inf) is not within it."""
    order = np.argsort(batch_sizes)
    sizes, values = np.asarray(batch_sizes)[order], np.asarray(losses, float)[order]
    best, critical = values[0], int(sizes[0])
    for size, value in zip(sizes[1:], values[1:], strict=True):
        if not (math.isfinite(value) and value <= best * (1 + tolerance)):
            return critical, int(size)
        best, critical = min(best, value), int(size)
    return critical, -1


def branch(state: dict, workload: Workload, spec: dict[str, Any], reference: tuple[int, float], device: torch.device
           ) -> xr.Dataset:  # fmt: skip
    """Branches from ``state`` (a checkpoint's weights) at ``spec["factors"]`` x the reference batch size, each over
    ``spec["examples"]`` training examples (default: ``steps_at_largest`` steps of the largest branch); the loss of
    each at its end on a fixed evaluation subset (``spec["eval_size"]`` of the analysis set, in eval mode)."""
    base_batch, base_lr = reference
    factors = sorted(spec["factors"])
    examples = spec["examples"] or spec["steps_at_largest"] * int(round(factors[-1] * base_batch))
    x_eval, y_eval = (t[: spec["eval_size"]] for t in analysis_data(workload, device))
    rows = []
    for k in factors:
        batch_size = max(1, int(round(k * base_batch)))
        lr = base_lr * lr_scale(spec["optimizer"]["name"], k)
        steps = max(1, examples // batch_size)
        workload.model.load_state_dict(state)
        model = workload.model.train()
        optimizer = runtime.make_optimizer(spec["optimizer"], model.parameters(), lr)  # fresh state per branch
        step = runtime.make_step(model, optimizer, workload.loss, device)
        generator = torch.Generator().manual_seed(spec["seed"])
        draws = runtime.batches(workload, batch_size, generator, spec["loader"], device)
        diverged = False
        for _ in range(steps):
            value = step(*next(draws))
            if not torch.isfinite(value):
                diverged = True
                break
        with torch.no_grad():
            loss = math.nan if diverged else float(workload.loss(model.eval()(x_eval), y_eval))
        rows.append((batch_size, k, lr, steps, loss))
    sizes, ks, lrs, steps, losses = map(np.asarray, zip(*rows, strict=True))
    critical, upper = local_critical_batch_size(sizes, losses, spec["tolerance"])
    return xr.Dataset(
        {
            "factor": ("branch_batch_size", ks),
            "lr": ("branch_batch_size", lrs, {"long_name": "learning rate, scaled by the optimizer's rule"}),
            "steps": ("branch_batch_size", steps),
            "loss": ("branch_batch_size", losses, {"long_name": "loss at the branch's end (eval mode)"}),
            "critical_batch_size": ((), critical, {"units": "examples", "long_name": "local critical batch size"}),
            "critical_upper": ((), upper, {"long_name": "the next branch's batch size (-1: none above)"}),
        },
        coords={"branch_batch_size": sizes.astype(int)},
        attrs={
            "examples": int(examples),
            "tolerance": spec["tolerance"],
            "reference_batch_size": base_batch,
            "reference_lr": base_lr,
        },  # fmt: skip
    )
