"""Models by name: an MLP with configurable widths and a small CNN, each with an optional normalization layer
(``norm``: ``none``, ``batch`` for BatchNorm, ``ghost`` for Ghost BatchNorm with ``ghost_batch_size``)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from batchscope.ghost import GhostBatchNorm1d, GhostBatchNorm2d


def build_model(spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    norm = spec.get("norm", "none"), spec.get("ghost_batch_size")
    if spec["name"] == "mlp":
        return mlp(math.prod(input_shape), spec["widths"], num_outputs, *norm)
    if spec["name"] == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"model 'cnn' needs (channels, height, width) inputs, got shape {input_shape}")
        return cnn(input_shape, spec["channels"], spec["hidden"], num_outputs, *norm)
    raise ValueError(f"unknown model {spec['name']!r}")


def norm_layer(kind: str, features: int, dims: int, ghost_batch_size: int | None = None) -> nn.Module | None:
    """BatchNorm or Ghost BatchNorm over ``features`` channels of 1-d (dims=1) or 2-d (dims=2) inputs."""
    if kind == "none":
        return None
    if kind == "batch":
        return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(features)
    if kind == "ghost":
        if ghost_batch_size is None:
            raise ValueError("norm 'ghost' needs ghost_batch_size")
        return (GhostBatchNorm1d if dims == 1 else GhostBatchNorm2d)(features, ghost_batch_size)
    raise ValueError(f"unknown norm {kind!r}")


def mlp(in_features: int, widths: list[int], num_outputs: int, norm: str = "none",
        ghost_batch_size: int | None = None) -> nn.Sequential:  # fmt: skip
    layers: list[nn.Module] = [nn.Flatten()]
    for width in widths:
        layers.append(nn.Linear(in_features, width, bias=norm == "none"))  # a bias is redundant before a norm
        if (layer := norm_layer(norm, width, 1, ghost_batch_size)) is not None:
            layers.append(layer)
        layers.append(nn.ReLU())
        in_features = width
    layers.append(nn.Linear(in_features, num_outputs))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], channels: list[int], hidden: int, num_outputs: int, norm: str = "none",
        ghost_batch_size: int | None = None) -> nn.Sequential:  # fmt: skip
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none"))
        if (layer := norm_layer(norm, out_channels, 2, ghost_batch_size)) is not None:
            layers.append(layer)
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
