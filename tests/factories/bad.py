"""Factories that are wrong in one way each, for the error-message tests (and ``unused_parameter``, valid but
unusual)."""

import torch
from torch import nn

from batchscope import Workload

NOT_A_FUNCTION = 42


def _data(device, n=32):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=generator).to(device), torch.randint(3, (n,), generator=generator).to(device)


def good(spec, device):
    return Workload(
        model=nn.Linear(4, 3).to(device),
        train=_data(device),
        val=_data(device),
        loss=nn.functional.cross_entropy,
        metric=lambda out, y: (out.argmax(1) == y).float().mean(),
    )


def returns_tuple(spec, device):
    return nn.Linear(4, 3), _data(device), _data(device)


def data_elsewhere(spec, device):
    """The model on the device, the data on the meta device (a stand-in for cpu data with a cuda model)."""
    workload = good(spec, device)
    workload.train = tuple(t.to("meta") for t in workload.train)
    return workload


def model_elsewhere(spec, device):
    workload = good(spec, device)
    workload.model = workload.model.to("meta")
    return workload


def metric_not_a_number(spec, device):
    workload = good(spec, device)
    workload.metric = lambda out, y: "great"
    workload.metric_name = "vibes"
    return workload


def metric_nan(spec, device):
    workload = good(spec, device)
    workload.metric = lambda out, y: float("nan")
    return workload


def loss_per_example(spec, device):
    workload = good(spec, device)
    workload.loss = lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")
    return workload


def not_a_model(spec, device):
    workload = good(spec, device)
    workload.model = lambda x: x
    return workload


def nan_data(spec, device):
    workload = good(spec, device)
    x, y = workload.train
    x = x.clone()
    x[5, 2] = float("nan")
    x[9, 0] = float("inf")
    workload.train = (x, y)
    return workload


def list_data(spec, device):
    workload = good(spec, device)
    workload.train = [[0.0] * 4] * 8
    return workload


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


def unused_parameter(spec, device):
    """Valid: a model with a trainable layer its forward never reaches (training leaves it as it was)."""
    workload = good(spec, device)
    workload.model = _WithUnused().to(device)
    return workload
