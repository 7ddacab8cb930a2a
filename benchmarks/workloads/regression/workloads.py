"""A nonlinear regression with a known noise floor: y = tanh(x W) v + noise, x standard normal in ``dim``
dimensions, fitted by a one-hidden-layer GELU MLP under the mean squared error (the target is a validation loss;
the floor is ``noise`` squared)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from batchscope import Workload

DATA_SEED = 123  # every job draws the same data; the run's seed sets only the model's initialisation
HIDDEN = 16  # the teacher's width


@functools.cache
def _data(examples: int, dim: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(DATA_SEED)
    w = torch.randn(dim, HIDDEN, generator=generator) / dim**0.5
    v = torch.randn(HIDDEN, 1, generator=generator) / HIDDEN**0.5
    x = torch.randn(examples, dim, generator=generator)
    return x, torch.tanh(x @ w) @ v + noise * torch.randn(examples, 1, generator=generator)


def make_regression(spec: dict[str, Any], device: torch.device) -> Workload:
    options = spec["options"]
    n, n_val = options["n_train"], options["n_val"]
    x, y = _data(n + n_val, options["dim"], options["noise"])
    model = nn.Sequential(nn.Linear(options["dim"], options["width"]), nn.GELU(), nn.Linear(options["width"], 1))
    return Workload(
        model=model.to(device),
        train=(x[:n].to(device), y[:n].to(device)),
        val=(x[n:].to(device), y[n:].to(device)),
        loss=nn.functional.mse_loss,
        metric=None,
        metric_name="mse",
        higher_is_better=False,
    )
