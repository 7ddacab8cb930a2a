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
from batchscope.workload import build as build_workload

PROFILE_LR = 1e-4


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    # torch exposes no CPU allocator peak; the process's resident-set high-water mark is an upper bound
    scale = 1 if sys.platform == "darwin" else 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "process peak RSS (upper bound)"


def profile(spec: dict[str, Any], batch_size: int, device: torch.device, data_file: str | None = None) -> xr.Dataset:
    """Profile one batch size. Out-of-memory is recorded (``feasible`` = False), not raised.

    The timed step takes its batch as training does (:func:`batchscope.runtime.batches`): on the streaming
    path the DataLoader's cost is inside the clock.
    """
    settings, wl_spec = spec["profile"], spec["workload"]
    repeats = settings["repeats"]
    workload = build_workload(wl_spec, device, seed=0, data_file=data_file)
    streamed = runtime.streams(workload, wl_spec["loader"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = np.full(repeats, math.nan)
    steps_per_repeat, feasible = 0, True
    try:
        model = workload.model
        optimizer = runtime.make_optimizer(spec["optimizer"], model.parameters(), lr=PROFILE_LR)
        # the schedule's LambdaLR.step is part of a training step; its factors do not matter at PROFILE_LR
        scheduler = runtime.make_schedule(optimizer, spec.get("schedule"), 10**9)
        step = runtime.make_step(model, optimizer, workload.loss, device, scheduler, wl_spec["precision"],
                                 wl_spec["compile"])  # fmt: skip
        model.train()
        # training's access pattern: consecutive batches of epoch permutations (not a few cache-hot ones)
        batches = runtime.batches(workload, batch_size, torch.Generator().manual_seed(0), wl_spec["loader"], device)
        clock = runtime.StepClock(device)
        for _ in range(max(settings["warmup"], 1)):  # with compile: true the first step compiles
            step(*next(batches))
        # how many consecutive steps make a repeat last at least min_repeat_time: double until a block does (as
        # timeit's autorange), so one slow step cannot shrink every repeat
        steps_per_repeat = 1
        while True:
            clock.start()
            for _ in range(steps_per_repeat):
                step(*next(batches))
            if clock.stop() >= settings["min_repeat_time"]:
                break
            steps_per_repeat *= 2
        for r in range(repeats):
            clock.start()
            for _ in range(steps_per_repeat):
                step(*next(batches))
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
        data_path="stream" if streamed else "device",
        loader_workers=wl_spec["loader"]["workers"] if streamed else 0,
        precision=wl_spec["precision"],
        compiled=int(wl_spec["compile"]),
    )
    return ds
