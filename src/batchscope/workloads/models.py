"""Models by name: an MLP with configurable widths and a small CNN, each with an optional normalization layer
(``norm``: ``none``, ``batch`` for BatchNorm, ``ghost`` for Ghost BatchNorm with ``ghost_batch_size``)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from batchscope.core.ghost import GhostBatchNorm1d, GhostBatchNorm2d


def build_model(spec: dict[str, Any], input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    norm = spec.get("norm", "none"), spec.get("ghost_batch_size")
    if spec["name"] == "mlp":
        return mlp(math.prod(input_shape), spec["widths"], num_outputs, *norm)
    if spec["name"] == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"model 'cnn' needs (channels, height, width) inputs, got shape {input_shape}")
        return cnn(input_shape, spec["channels"], spec["hidden"], num_outputs, *norm)
    if spec["name"] == "resnet":
        if len(input_shape) != 3:
            raise ValueError(f"model 'resnet' needs (channels, height, width) inputs, got shape {input_shape}")
        return resnet(input_shape[0], spec["widths"], spec["blocks"], num_outputs, *norm)
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


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a normalization after each and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, ghost_batch_size: int | None):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = norm_layer(norm, out_channels, 2, ghost_batch_size) or nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = norm_layer(norm, out_channels, 2, ghost_batch_size) or nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias),
                norm_layer(norm, out_channels, 2, ghost_batch_size) or nn.Identity(),
            )

    def forward(self, x):
        out = nn.functional.relu(self.norm1(self.conv1(x)))
        return nn.functional.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def resnet(in_channels: int, widths: list[int], blocks: int, num_outputs: int, norm: str = "batch",
           ghost_batch_size: int | None = None) -> nn.Sequential:  # fmt: skip
    """A CIFAR-style ResNet (He et al. 2016): a 3x3 stem, then per width ``blocks`` basic blocks (the first of each
    later stage halves the resolution), global average pooling and a linear head. widths [16, 32, 64] with 1 block
    each is ResNet-8 (0.08 M parameters), with 3 blocks ResNet-20."""
    bias = norm == "none"
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=bias)]
    if (layer := norm_layer(norm, widths[0], 2, ghost_batch_size)) is not None:
        layers.append(layer)
    layers.append(nn.ReLU())
    channels = widths[0]
    for stage, width in enumerate(widths):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(channels, width, stride, norm, ghost_batch_size))
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_outputs)]
    return nn.Sequential(*layers)
