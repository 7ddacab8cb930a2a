"""Models by name: an MLP with configurable widths, and a small CNN with optional BatchNorm."""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def build_model(spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    if spec["name"] == "mlp":
        return mlp(math.prod(input_shape), spec["widths"], num_outputs)
    if spec["name"] == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"model 'cnn' needs (channels, height, width) inputs, got shape {input_shape}")
        return cnn(input_shape, spec["channels"], spec["hidden"], num_outputs, spec["batchnorm"])
    raise ValueError(f"unknown model {spec['name']!r}")


def mlp(in_features: int, widths: list[int], num_outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, num_outputs))
    return nn.Sequential(*layers)


def cnn(
    input_shape: tuple[int, ...], channels: list[int], hidden: int, num_outputs: int, batchnorm: bool
) -> nn.Sequential:
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in channels:
        # the conv bias is redundant under BatchNorm's shift
        layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        if min(height, width) >= 4:  # keep at least a 2x2 map on 8x8 digits
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        in_channels = out_channels
    layers += [
        nn.Flatten(),
        nn.Linear(in_channels * height * width, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_outputs),
    ]
    return nn.Sequential(*layers)
