"""Reference paths the benchmarks time the library against (imported by the scripts beside it)."""

from __future__ import annotations

import torch


def per_example_loop(model: torch.nn.Module, loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) squared per-example gradient norms, one backward pass per example: the plain loop every faster path
    is measured against (benchmarks/noise.py, benchmarks/per_example.py)."""
    norms = []
    for n in range(len(x)):
        model.zero_grad(set_to_none=True)
        loss(model(x[n : n + 1]), y[n : n + 1]).backward()
        norms.append(sum(float((p.grad**2).sum()) for p in model.parameters()))
    return torch.tensor(norms)
