"""Ghost Batch Normalization (Hoffer, Hubara and Soudry 2017): BatchNorm over smaller "ghost" batches.

In training, a batch of N examples is split into g = N // m ghost batches of m = ``ghost_batch_size``; each is
normalized with its own mean and variance, with the affine parameters shared. This brings back the noise of
small-batch normalization inside a large, hardware-friendly physical batch. In eval mode the running statistics
are used exactly as ``nn.BatchNorm`` uses them.

Which examples share a ghost batch: example n belongs to ghost batch n mod g (interleaved, not consecutive
blocks). Training batches are random draws, so membership does not change the statistics, and interleaving makes
the fold of the groups into the channel dimension, (N, C, ...) = (m, g, C, ...) -> (m, g*C, ...), a free view:
one call of the fused ``batch_norm`` kernel then normalizes all g groups with no copy. Consecutive blocks need a
transpose copy in and out (1.29x BatchNorm's training step here), a Python loop over groups 1.26x, means and
variances by hand 1.53x (benchmarks/ghostbn.py).

A batch that is not a multiple of m: the last N - g*m examples form one more group. If that remainder cannot be
normalized on its own (one value per channel, e.g. a single example for BatchNorm1d), it joins the m examples of
the last interleaved group, which are then normalized together as a consecutive tail.

Running statistics (``momentum`` p): updated once per ghost batch, in group order, as if the groups had been
separate batches: r <- (1 - p) r + p s_j for j = 1..g, with s_j the group's mean (or unbiased variance). One step
therefore moves the running statistics as far as g BatchNorm steps would, and ``num_batches_tracked`` grows by
g. The fused call updates one copy of the statistics per group in parallel, u_j = (1 - p) r + p s_j; the
sequential result is recovered exactly as (1 - p)^g r + sum_j (1 - p)^(g - j) (u_j - (1 - p) r).
``momentum=None`` (a cumulative average) is not supported.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional


class _GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    def __init__(self, num_features: int, ghost_batch_size: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):  # fmt: skip
        if momentum is None:
            raise ValueError("GhostBatchNorm needs a float momentum (one EMA step per ghost batch), not None")
        if ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be at least 1, got {ghost_batch_size}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.ghost_batch_size = ghost_batch_size

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ghost_batch_size={self.ghost_batch_size}"

    def _layout(self, x: torch.Tensor) -> tuple[int, int]:
        """(interleaved groups g, examples in the consecutive tail): the tail is the remainder, or the remainder
        plus one interleaved group's worth when the remainder alone has one value per channel."""
        n, m = x.shape[0], self.ghost_batch_size
        groups, tail = n // m, n % m
        if tail and tail * math.prod(x.shape[2:]) < 2 and groups > 1:
            groups, tail = groups - 1, tail + m
        return groups, tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or x.shape[0] <= self.ghost_batch_size:
            return super().forward(x)  # eval mode, or a single group: plain BatchNorm
        groups, tail = self._layout(x)
        head = groups * self.ghost_batch_size
        out, updates = self._normalize(x[:head].view(self.ghost_batch_size, groups * x.shape[1], *x.shape[2:]), groups)
        out = out.view(head, *x.shape[1:])
        if tail:
            tail_out, tail_updates = self._normalize(x[head:], 1)
            out, updates = torch.cat([out, tail_out]), updates + tail_updates
        if self.track_running_stats:
            self._sequential_update(updates)
        return out

    def _normalize(self, folded: torch.Tensor, groups: int):
        """One fused batch_norm over ``groups`` groups folded into the channels; each group's EMA copy."""
        c = self.num_features
        weight = self.weight.repeat(groups) if self.affine else None
        bias = self.bias.repeat(groups) if self.affine else None
        if not self.track_running_stats:
            return functional.batch_norm(folded, None, None, weight, bias, True, 0.0, self.eps), []
        mean, var = self.running_mean.repeat(groups), self.running_var.repeat(groups)
        out = functional.batch_norm(folded, mean, var, weight, bias, True, self.momentum, self.eps)
        return out, list(zip(mean.view(groups, c), var.view(groups, c), strict=True))

    @torch.no_grad()
    def _sequential_update(self, updates: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        keep, g = 1.0 - self.momentum, len(updates)
        weights = keep ** torch.arange(g - 1, -1, -1, dtype=self.running_mean.dtype, device=self.running_mean.device)
        for buffer, index in ((self.running_mean, 0), (self.running_var, 1)):
            parallel = torch.stack([update[index] for update in updates])  # (g, C)
            buffer.copy_(keep**g * buffer + (weights[:, None] * (parallel - keep * buffer)).sum(0))
        self.num_batches_tracked.add_(g)


class GhostBatchNorm1d(_GhostBatchNorm):
    """Drop-in for ``nn.BatchNorm1d`` (inputs (N, C) or (N, C, L)) with ``ghost_batch_size``."""

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class GhostBatchNorm2d(_GhostBatchNorm):
    """Drop-in for ``nn.BatchNorm2d`` (inputs (N, C, H, W)) with ``ghost_batch_size``."""

    _check_input_dim = nn.BatchNorm2d._check_input_dim


def expected_ratio(batch_size: int, ghost_size: int, population: int | None) -> float:
    """E[Var(ghost-batch mean)] / E[Var(physical-batch mean)] for batches drawn without replacement.

    The mean of n draws without replacement from N values has variance sigma^2 / n * (N - n) / (N - 1), so the
    ratio is g = B / m for an infinite population (or draws with replacement) and g (N - m) / (N - B) for a
    finite one: with B close to N, the physical batch's mean hardly varies at all.
    """
    g = batch_size / ghost_size
    if population is None:
        return g
    return g * (population - ghost_size) / (population - batch_size)


def mean_variance_ratio(
    values: np.ndarray,
    batch_size: int,
    ghost_size: int,
    draws: int,
    rng: np.random.Generator,
    replace: bool = False,
    n_bootstrap: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo Var(mean of a ghost batch) / Var(mean of its physical batch), with a bootstrap standard error.

    ``values``: one value per example (shape (N,)) or per example and channel (N, C), e.g. a layer's
    pre-normalization activations averaged over space. Each draw takes a physical batch of ``batch_size``
    examples (without replacement, as training draws them, unless ``replace``) and its first ghost batch of
    ``ghost_size``. Returns the ratio and its standard error (per channel when ``values`` is 2-d).
    """
    values = np.asarray(values, dtype=float)
    n = len(values)
    if replace:
        index = rng.integers(0, n, (draws, batch_size))
    else:
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} values")
        index = np.argsort(rng.random((draws, n)), axis=1)[:, :batch_size]
    batches = values[index]  # (draws, batch_size[, C])
    full = batches.mean(axis=1)
    ghost = batches[:, :ghost_size].mean(axis=1)
    ratio = ghost.var(axis=0, ddof=1) / full.var(axis=0, ddof=1)
    resampled = rng.integers(0, draws, (n_bootstrap, draws))
    boot = ghost[resampled].var(axis=1, ddof=1) / full[resampled].var(axis=1, ddof=1)
    return ratio, boot.std(axis=0, ddof=1)
