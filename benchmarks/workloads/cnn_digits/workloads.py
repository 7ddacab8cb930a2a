"""A small CNN with BatchNorm on the 8 x 8 digits images (scikit-learn's ``load_digits``), cross entropy, accuracy."""

from __future__ import annotations

from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

from batchscope import Workload


class DigitsCNN(nn.Module):
    """Three 3 x 3 convolutions (``channels``, then twice as many), each followed by BatchNorm (``bn``) and ReLU, a
    2 x 2 max pool after the second, global average pooling and a linear head."""

    def __init__(self, channels: int, bn: bool = True, classes: int = 10):
        super().__init__()

        def norm(width: int) -> nn.Module:
            return nn.BatchNorm2d(width) if bn else nn.Identity()

        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), norm(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), norm(2 * c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), norm(2 * c), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(1) == targets).float().mean()


def make_cnn(spec: dict[str, Any], device: torch.device) -> Workload:
    options = spec["options"]
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    labels = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # a fixed split of its own
    val, train = order[: options.get("n_val", 397)], order[options.get("n_val", 397) :]
    return Workload(
        model=DigitsCNN(options.get("channels", 16), options.get("bn", True)).to(device),
        train=(images[train].to(device), labels[train].to(device)),
        val=(images[val].to(device), labels[val].to(device)),
        loss=nn.functional.cross_entropy,
        metric=accuracy,
        metric_name="accuracy",
        higher_is_better=True,
    )
