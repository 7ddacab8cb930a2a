"""Time the training step T_iter(B) for one (workload, batch size), as training runs it.

After ``warmup`` untimed steps, each of ``repeats`` repeats times enough consecutive steps to last at least
``min_repeat_time`` (a single sub-millisecond step is below the clock's useful resolution); the per-step time
of each repeat is recorded and the median reported. The learning rate is small (PROFILE_LR): the update runs
as in training (at exactly 0 it measured ~15% faster here), while the weights barely move and so cannot blow
up into NaN/inf, whose arithmetic would change the timing.
"""

from __future__ import annotations

import math
import resource
import sys
from typing import Any

import numpy as np
import torch
import xarray as xr

from batchscope import runtime
from batchscope.data import Tensors

PROFILE_LR = 1e-4


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    # torch exposes no CPU allocator peak; the process's resident-set high-water mark is an upper bound
    scale = 1 if sys.platform == "darwin" else 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "process peak RSS (upper bound)"


def profile(data: Tensors, spec: dict[str, Any], batch_size: int, device: torch.device) -> xr.Dataset:
    """Profile one batch size. Out-of-memory is recorded (``feasible`` = False), not raised."""
    settings = spec["profile"]
    repeats = settings["repeats"]
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = np.full(repeats, math.nan)
    steps_per_repeat, feasible = 0, True
    try:
        model = runtime.make_model(spec["model"], data, device)
        optimizer = runtime.make_optimizer(spec["optimizer"], model.parameters(), lr=PROFILE_LR)
        step = runtime.make_step(model, optimizer, data, runtime.loss_fn(data.task))
        model.train()
        generator = torch.Generator().manual_seed(0)
        n_train = len(data.x_train)
        # training's access pattern: consecutive batches of an epoch permutation (not a few cache-hot ones);
        # drawn before timing so randperm stays outside the clock
        permutation = torch.randperm(n_train, generator=generator).to(device)
        batches = [permutation[i : i + batch_size] for i in range(0, n_train - batch_size + 1, batch_size)]
        clock = runtime.StepClock(device)
        for i in range(max(settings["warmup"], 1)):
            step(batches[i % len(batches)])
        # how many consecutive steps make a repeat last at least min_repeat_time: double until a block does (as
        # timeit's autorange), so one slow step cannot shrink every repeat
        steps_per_repeat = 1
        while True:
            clock.start()
            for i in range(steps_per_repeat):
                step(batches[i % len(batches)])
            if clock.stop() >= settings["min_repeat_time"]:
                break
            steps_per_repeat *= 2
        for r in range(repeats):
            clock.start()
            for i in range(steps_per_repeat):
                step(batches[i % len(batches)])
            times[r] = clock.stop() / steps_per_repeat
    except (RuntimeError, MemoryError) as err:
        if not runtime.is_out_of_memory(err):
            raise
        feasible = False
        times[:] = math.nan
    peak, peak_method = _peak_memory(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    finite = times[np.isfinite(times)]
    quantiles = np.quantile(finite, [0.25, 0.5, 0.75]) if len(finite) else [math.nan] * 3
    ds = xr.Dataset(
        {
            "t_iter": ("repeat", times, {"units": "s", "long_name": "time per training step, per repeat"}),
            "t_iter_median": ((), quantiles[1], {"units": "s"}),
            "t_iter_q25": ((), quantiles[0], {"units": "s"}),
            "t_iter_q75": ((), quantiles[2], {"units": "s"}),
            "feasible": ((), feasible, {"long_name": "False: out of memory at this batch size"}),
            "peak_memory": ((), peak, {"units": "bytes", "method": peak_method}),
            "steps_per_repeat": ((), steps_per_repeat),
        },
        coords={"repeat": np.arange(repeats)},
    )
    ds.attrs.update(
        batch_size=batch_size,
        device_type=device.type,
        device_name=runtime.device_name(device),
        threads=torch.get_num_threads(),
        warmup=settings["warmup"],
    )
    return ds
