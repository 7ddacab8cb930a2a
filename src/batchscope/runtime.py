"""What profiling and training share: device choice, the training step, its loss, and the step clock.

Profiling times exactly the step function that training runs, so T_iter(B) from the profile is the quantity
training pays per step.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from batchscope.data import Tensors
from batchscope.models import build_model


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device (set device: auto or cpu)")
    return torch.device(requested)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux: the CPU model; platform.processor() only gives the architecture there
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def setup(threads: int, deterministic: bool = True) -> None:
    torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def loss_fn(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if task == "regression":
        return lambda out, y: nn.functional.mse_loss(out.squeeze(-1), y)
    return nn.functional.cross_entropy


def make_model(spec: dict[str, Any], data: Tensors, device: torch.device) -> nn.Module:
    return build_model(spec, data.input_shape, data.num_classes).to(device)


def make_optimizer(spec: dict[str, Any], params, lr: float) -> torch.optim.Optimizer:
    if spec["name"] == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=spec["momentum"],
            nesterov=spec["nesterov"],
            weight_decay=spec["weight_decay"],
        )
    if spec["name"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(spec["betas"]), weight_decay=spec["weight_decay"])
    raise ValueError(f"unknown optimizer {spec['name']!r}")


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: Tensors, loss) -> Callable:
    """One training step on the examples at ``index``: gather, forward, backward, update. Returns the loss."""

    def step(index: torch.Tensor) -> torch.Tensor:
        x, y = data.x_train[index], data.y_train[index]
        optimizer.zero_grad(set_to_none=True)
        value = loss(model(x), y)
        value.backward()
        optimizer.step()
        return value.detach()

    return step


class StepClock:
    """Wall time of a block of steps on the device's own clock (CUDA events after synchronising on GPU).

    On the CPU the clock can also time single steps (:meth:`tick`) for free; on CUDA that would need a
    synchronisation per step, so ``per_step`` is False there and only blocks are timed.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.per_step = not self.cuda

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = self._last = time.perf_counter()

    def tick(self) -> float:
        """CPU only: seconds since the previous tick (or :meth:`start`)."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed

    def stop(self) -> float:
        """Seconds since :meth:`start`."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            return self._start.elapsed_time(end) / 1000.0
        return time.perf_counter() - self._t0


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError | MemoryError) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(err, MemoryError)
    )
