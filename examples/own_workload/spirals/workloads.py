"""Two workload factories for batchscope, written as a user would write them in their own package.

- ``make_spirals``: interleaved spirals (a classic non-linear toy problem) in memory on the device, a small
  residual MLP, label-smoothed cross entropy, and macro-F1 as the target metric.
- ``make_streamed``: the same model on examples generated on the fly by a ``torch.utils.data.Dataset`` (stand-in
  for data too large for the device), which batchscope reads through a DataLoader.

The config passes ``options`` through ``spec["options"]``; batchscope seeds torch before each call, so the
model's initialisation follows the run's seed, while the data come from a fixed generator of their own.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from batchscope import Workload


def spirals(n: int, arms: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points on ``arms`` interleaved spirals in the plane, with Gaussian jitter."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(arms, (n,), generator=generator)
    radius = torch.rand(n, generator=generator)
    angle = 2 * math.pi * radius + 2 * math.pi * labels / arms
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return points + noise * torch.randn(n, 2, generator=generator), labels


class ResidualMLP(nn.Module):
    def __init__(self, width: int, blocks: int, classes: int):
        super().__init__()
        self.inp = nn.Linear(2, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(blocks))
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def macro_f1(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over classes of the F1 score of a batch (a metric batchscope does not know: higher is better)."""
    predicted = outputs.argmax(dim=1)
    scores = []
    for c in range(outputs.shape[1]):
        tp = ((predicted == c) & (targets == c)).sum()
        denominator = (predicted == c).sum() + (targets == c).sum()
        scores.append(2 * tp / denominator if denominator > 0 else torch.tensor(1.0))
    return torch.stack(scores).mean()


def _model_and_loss(options: dict[str, Any], device: torch.device) -> tuple[nn.Module, Any]:
    model = ResidualMLP(options.get("width", 32), options.get("blocks", 2), options.get("arms", 3)).to(device)
    smoothing = options.get("label_smoothing", 0.05)
    return model, lambda out, y: nn.functional.cross_entropy(out, y, label_smoothing=smoothing)


def make_spirals(spec: dict[str, Any], device: torch.device) -> Workload:
    options = spec["options"]
    arms, noise = options.get("arms", 3), options.get("noise", 0.05)
    x_train, y_train = spirals(options.get("n_train", 2048), arms, noise, seed=0)
    x_val, y_val = spirals(options.get("n_val", 512), arms, noise, seed=1)
    model, loss = _model_and_loss(options, device)
    return Workload(
        model=model,
        train=(x_train.to(device), y_train.to(device)),
        val=(x_val.to(device), y_val.to(device)),
        loss=loss,
        metric=macro_f1,
        metric_name="macro_f1",
        higher_is_better=True,
    )


class SpiralStream(Dataset):
    """Example ``i`` is generated from its index alone: any size, nothing held in memory."""

    def __init__(self, size: int, arms: int, noise: float, offset: int):
        self.size, self.arms, self.noise, self.offset = size, arms, noise, offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = spirals(1, self.arms, self.noise, seed=self.offset + index)
        return x[0], y[0]


def make_streamed(spec: dict[str, Any], device: torch.device) -> Workload:
    options = spec["options"]
    arms, noise = options.get("arms", 3), options.get("noise", 0.05)
    n_train = options.get("n_train", 2048)
    model, loss = _model_and_loss(options, device)
    return Workload(
        model=model,
        train=SpiralStream(n_train, arms, noise, offset=0),
        val=SpiralStream(options.get("n_val", 512), arms, noise, offset=10**6),
        loss=loss,
        metric=macro_f1,
        metric_name="macro_f1",
    )
