"""What profiling and training share: device choice, the training step, its loss, and the step clock.

Profiling times exactly the step function that training runs, so T_iter(B) from the profile is the quantity
training pays per step.
"""

from __future__ import annotations

import fcntl
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.adamw import adamw  # the functional forms: importing them imports no dynamo
from torch.optim.sgd import sgd
from torch.utils.data import DataLoader, Dataset, TensorDataset

from batchscope import faults
from batchscope.workloads.base import Workload, size


def resolve_device(requested: str) -> torch.device:
    """The job's device. A CUDA job claims a GPU of its own from the visible ones (:func:`claim_slot`, keyed by
    each GPU's UUID): Snakemake's ``--resources gpu=N`` only limits how many GPU jobs run at once, and without
    this every job would use cuda:0 while the other GPUs idle. Under a scheduler that hands each job its own GPU
    (CUDA_VISIBLE_DEVICES), the one visible GPU is claimed, and two jobs sharing it take turns."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA device (set device: auto or cpu)")
        ids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
        index = claim_slot(ids)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(requested)


_claimed: list = []  # lock files held for the life of the process: a job's GPU stays its own until it exits
_claimed_index: list[int] = []


def slot_directory() -> Path:
    return Path(os.environ.get("BATCHSCOPE_GPU_LOCKS", Path(tempfile.gettempdir()) / f"batchscope-gpus-{os.getuid()}"))


def claim_slot(ids: list[str], directory: Path | None = None, poll: float = 0.2) -> int:
    """Index of the first of ``ids`` that no other process holds, claimed (an exclusive ``flock`` on a file named
    by the id) until this process exits; waits while all are held. The kernel drops a dead process's locks, so
    a killed job frees its GPU. Written here (fcntl, a few lines) because no library in the environment does it."""
    if _claimed:  # this process holds a GPU already (flock conflicts with a second lock of its own)
        return _claimed_index[0]
    directory = directory or slot_directory()
    directory.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index, slot in enumerate(ids):
            handle = open(directory / f"{slot}.lock", "w")  # noqa: SIM115 (held open on purpose)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _claimed.append(handle)
            _claimed_index.append(index)
            return index
        if not waited:
            print(f"batchscope: every GPU ({len(ids)}) is held by another job; waiting", file=sys.stderr)
            waited = True
        time.sleep(poll)


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


def setup(threads: int, device: torch.device, deterministic: bool | None = None, tf32: bool = False) -> None:
    """Threads, and the numerics the user asked for. ``deterministic`` null means: on the CPU, deterministic
    algorithms (bitwise reproducible runs, which the tests check); on CUDA, the kernels people train with (cuDNN's
    benchmark mode picks the fastest; deterministic ones can be much slower), so T_iter is what training pays.
    ``tf32``: TF32 matrix products and convolutions on Ampere and newer GPUs (off unless asked)."""
    torch.set_num_threads(threads)
    if deterministic is None:
        deterministic = device.type != "cuda"
    if deterministic and device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace, chosen before its first handle (before any product:
        # setup runs before the workload is built); without it, deterministic runs on CUDA are not bitwise
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # torch.use_deterministic_algorithms sets the kernels' switch and inductor's flag, and imports inductor (and
    # dynamo) to do so: 1.4 s of every job's start, more than most analyses' work. The kernels' switch alone here;
    # inductor's flag where a step is compiled (train_step), which reads the switch back.
    torch._C._set_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


class Optimizer:
    """SGD (momentum, Nesterov, weight decay) or AdamW: torch.optim's update through its functional form
    (``torch.optim.sgd.sgd``, ``torch.optim.adamw.adamw``), the state (momentum buffers; moments and step counts)
    kept here, ``lr`` the rate of the next update.

    Why not ``torch.optim.SGD`` / ``AdamW`` themselves: their constructor and ``step`` import dynamo on first use
    (to keep themselves out of compiled graphs), 1.2 to 1.7 s of the start of every job that trains or profiles, more
    than a digits job's runs together. The functional form is the same arithmetic with the same defaults, and its
    state starts as the classes' does (the tests check updates bit for bit against them); nothing here is compiled
    (only the forward pass is).
    """

    def __init__(self, spec: dict[str, Any], params, lr: float):
        if spec["name"] not in ("sgd", "adamw"):
            raise ValueError(f"unknown optimizer {spec['name']!r}")
        self.spec, self.lr = spec, lr
        self.params = [p for p in params if p.requires_grad]
        self.complex = any(torch.is_complex(p) for p in self.params)
        # per parameter, None until its first gradient (as the classes start their state): SGD's momentum buffer
        # (made by the functional update), AdamW's moments and step count
        n = len(self.params)
        self.momentum_buffer: list[torch.Tensor | None] = [None] * n
        self.exp_avg: list[torch.Tensor | None] = [None] * n
        self.exp_avg_sq: list[torch.Tensor | None] = [None] * n
        self.steps: list[torch.Tensor | None] = [None] * n

    SLOTS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "steps")

    def state_slots(self) -> int:
        """How many parameter-sized tensors the state holds per parameter (for a snapshot's memory)."""
        if self.spec["name"] == "sgd":
            return int(self.spec["momentum"] != 0)
        return 2

    def state_dict(self) -> dict[str, list[torch.Tensor | None]]:
        """A copy of the state on the host (None for a parameter not yet updated), as a snapshot keeps it."""
        return {name: [None if t is None else t.detach().to("cpu", copy=True) for t in getattr(self, name)]
                for name in self.SLOTS}  # fmt: skip

    def load_state_dict(self, state: dict[str, list[torch.Tensor | None]]) -> None:
        """Continue from :meth:`state_dict`'s copy (copied again, onto each parameter's device; the step counts stay
        on the host, as :meth:`step` makes them). ``lr`` is not part of it."""
        for name in self.SLOTS:
            saved = state[name]
            if len(saved) != len(self.params):
                raise ValueError(f"optimizer state for {len(saved)} parameters, the model has {len(self.params)}")
            setattr(self, name, [None if t is None else t.to("cpu" if name == "steps" else p.device, copy=True)
                                 for t, p in zip(saved, self.params, strict=True)])  # fmt: skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        spec = self.spec
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        if spec["name"] == "sgd":
            buffers = [self.momentum_buffer[i] for i in live]
            sgd(params, grads, buffers, weight_decay=spec["weight_decay"], momentum=spec["momentum"], lr=self.lr,
                dampening=0.0, nesterov=spec["nesterov"], maximize=False,
                has_sparse_grad=any(g.is_sparse for g in grads))  # fmt: skip
            for i, buffer in zip(live, buffers, strict=True):  # created on a parameter's first update
                self.momentum_buffer[i] = buffer
            return
        for i in live:
            if self.steps[i] is None:  # zero moments, the step count on the host in the class's dtype
                p = self.params[i]
                self.exp_avg[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.exp_avg_sq[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
                count = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                self.steps[i] = torch.tensor(0.0, dtype=count, device="cpu")
        beta1, beta2 = spec["betas"]
        adamw(params, grads, [self.exp_avg[i] for i in live], [self.exp_avg_sq[i] for i in live], [],
              [self.steps[i] for i in live], amsgrad=False, beta1=beta1, beta2=beta2, lr=self.lr,
              weight_decay=spec["weight_decay"], eps=1e-8, maximize=False, has_complex=self.complex)  # fmt: skip


def make_optimizer(spec: dict[str, Any], params, lr: float) -> Optimizer:
    return Optimizer(spec, params, lr)


def lr_factor(spec: dict[str, Any], step: int, total_steps: int) -> float:
    """The schedule's multiplier of the base learning rate for the update at ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (the first update uses 1/warmup_steps of the base rate), then
    ``constant``, ``cosine`` (from 1 down to ``min_factor`` at ``total_steps``, i.e. the run's max_steps) or
    ``step`` (times ``gamma`` every ``step_size`` updates). Written as one closed form, which the tests check
    against, and applied by :class:`Schedule`.
    """
    warmup = spec["warmup_steps"]
    if step < warmup:
        return (step + 1) / warmup
    after = step - warmup
    if spec["decay"] == "cosine":
        span = max(total_steps - warmup, 1)
        progress = min(after / span, 1.0)
        return spec["min_factor"] + (1 - spec["min_factor"]) * 0.5 * (1 + math.cos(math.pi * progress))
    if spec["decay"] == "step":
        return spec["gamma"] ** (after // spec["step_size"])
    return 1.0


class Schedule:
    """Sets the optimizer's rate for each update to the base rate times :func:`lr_factor` (as torch's LambdaLR
    does for a torch.optim optimizer): ``step()`` after each update. Update i takes the schedule's factor at update
    ``start`` + ``stride`` i: a branch from a run's update s at k times its batch size (batchscope.measure.branch)
    continues the run's schedule along the examples, start s and stride k; a run itself starts at 0, stride 1."""

    def __init__(self, optimizer: Optimizer, spec: dict[str, Any], total_steps: int, start: int = 0,
                 stride: float = 1.0):  # fmt: skip
        self.optimizer, self.spec, self.total_steps = optimizer, spec, total_steps
        self.start, self.stride = start, stride
        self.base, self.updates = optimizer.lr, 0
        optimizer.lr = self.base * self.factor()

    def factor(self) -> float:
        return lr_factor(self.spec, int(round(self.start + self.stride * self.updates)), self.total_steps)

    def step(self) -> None:
        self.updates += 1
        self.optimizer.lr = self.base * self.factor()


def make_schedule(optimizer: Optimizer, spec: dict[str, Any] | None, total_steps: int, start: int = 0,
                  stride: float = 1.0) -> Schedule | None:  # fmt: skip
    """The schedule for the spec (from update ``start``, ``stride`` of its updates per update: :class:`Schedule`),
    or None for a constant rate without warm-up."""
    if spec is None or (spec["warmup_steps"] == 0 and spec["decay"] == "constant"):
        return None
    return Schedule(optimizer, spec, total_steps, start, stride)


def make_step(
    model: nn.Module,
    optimizer: Optimizer,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    scheduler=None,
    precision: str = "fp32",
    compile: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One training step on a batch: forward, backward, update, schedule. Returns the loss.

    ``precision: bf16`` runs the forward pass under bf16 autocast (weights and gradients stay fp32);
    ``compile`` passes the forward pass and loss through ``torch.compile`` (its backward is compiled too).
    """

    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(model(x), y)

    if compile:
        # static shapes, as training (one batch size per process) compiles them: the profile, which steps every
        # size in one process, would otherwise be timed on dynamic-shape kernels from the second size on
        import torch._inductor.config as inductor_config  # binds one name: not the module-wide `torch`

        # the deterministic setting setup() chose, for the compiled kernels too
        inductor_config.deterministic = torch.are_deterministic_algorithms_enabled()
        forward = torch.compile(forward, dynamic=False)
    bf16 = precision == "bf16"
    oom_limit = faults.oom_above()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if oom_limit is not None and len(x) > oom_limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated by BATCHSCOPE_FAULT for B={len(x)})")
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            value = forward(x, y)
        value.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return value.detach()

    return step


class DeviceBatches:
    """Data resident on the device: a batch is a slice of a per-epoch permutation; the partial tail is dropped.

    The permutation is drawn on the CPU from ``generator`` so the batch order does not depend on the device.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator
        self.position, self.permutation = len(x), None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > len(self.x):
            self.permutation = torch.randperm(len(self.x), generator=self.generator).to(self.x.device)
            self.position = 0
        index = self.permutation[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.x[index], self.y[index]


class StreamBatches:
    """Data read through a ``DataLoader`` (shuffled by ``generator``, pinned memory, worker processes) and
    copied to the device per batch: the step then pays the input pipeline, as it does in training."""

    def __init__(self, dataset: Dataset, batch_size: int, generator: torch.Generator, loader: dict[str, Any],
                 device: torch.device):  # fmt: skip
        self.device = device
        workers = loader["workers"]
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            drop_last=True,
            num_workers=workers,
            pin_memory=loader["pin_memory"] and device.type == "cuda",
            persistent_workers=workers > 0,
        )
        self.iterator = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x, y = next(self.iterator)
        except StopIteration:  # a new epoch
            self.iterator = iter(self.loader)
            x, y = next(self.iterator)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def streams(workload: Workload, loader: dict[str, Any]) -> bool:
    """Whether training reads its data through a DataLoader: a Dataset always does; tensors when asked to."""
    return workload.streamed or loader["stream"]


def batches(workload: Workload, batch_size: int, generator: torch.Generator, loader: dict[str, Any],
            device: torch.device) -> DeviceBatches | StreamBatches:  # fmt: skip
    n_train = size(workload.train)
    if batch_size > n_train:
        raise ValueError(f"batch size {batch_size} exceeds the {n_train} training examples of the workload")
    if not streams(workload, loader):
        return DeviceBatches(*workload.train, batch_size, generator)
    dataset = workload.train
    if isinstance(dataset, tuple):  # tensors asked to stream: from host memory, as data too big for the device
        dataset = TensorDataset(dataset[0].cpu(), dataset[1].cpu())
    return StreamBatches(dataset, batch_size, generator, loader, device)


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


def progress(iterable=None, total: int | None = None, desc: str = ""):
    """A tqdm progress bar on stderr: live on a terminal; in a job's log (not a terminal) an ASCII line at
    most every 10 s, so a long job shows where it is without flooding the log."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, mininterval=0.5 if tty else 10.0, ascii=not tty,
                dynamic_ncols=tty)  # fmt: skip


# What allocation failures say where no OutOfMemoryError is raised: the CPU allocator, and cuBLAS / cuDNN, which
# fail with their own status codes when the memory they need for a handle or a workspace is not there.
OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED",
                          "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")  # fmt: skip


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in OUT_OF_MEMORY_MESSAGES)
