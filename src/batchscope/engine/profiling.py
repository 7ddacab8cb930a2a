"""Time the training step T_iter(B) of one workload at every batch size, in interleaved rounds, as training runs it.

All batch sizes are profiled in one process: after ``warmup`` untimed steps and a calibration at each size, every
round times each size once (``repeats`` repeats of enough consecutive steps to last at least ``min_repeat_time``;
a single sub-millisecond step is below the clock's useful resolution), in a rotated order, for ``rounds`` rounds.
A machine that slows down for a while (another program, a thermal limit) then slows every size alike instead of
the one that happened to be profiled then, and the per-round medians let the fit bootstrap over rounds: the
ratios between sizes, which decide the answer, hold still when the machine does not.

The learning rate is small (PROFILE_LR): the update runs as in training (at exactly 0 it measured ~15% faster
here), while the weights barely move and so cannot blow up into NaN/inf, whose arithmetic would change the timing.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from batchscope.engine import runtime
from batchscope.workloads.base import build as build_workload

PROFILE_LR = 1e-4


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    # torch exposes no CPU allocator peak; the process's resident-set high-water mark is an upper bound
    scale = 1 if sys.platform == "darwin" else 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "process peak RSS (upper bound)"


def profile(spec: dict[str, Any], batch_sizes: Sequence[int], device: torch.device,
            data_file: str | None = None) -> dict[int, xr.Dataset]:  # fmt: skip
    """Profile every batch size in interleaved rounds; one Dataset per size. Out-of-memory at a size is recorded
    (``feasible`` = False) and that size left out of the rounds, not raised.

    The timed step takes its batch as training does (:func:`batchscope.engine.runtime.batches`): on the streaming
    path the DataLoader's cost is inside the clock.
    """
    settings, wl_spec = spec["profile"], spec["workload"]
    rounds, repeats = settings["rounds"], settings["repeats"]
    sizes = sorted(set(batch_sizes))
    workload = build_workload(wl_spec, device, seed=0, data_file=data_file)
    streamed = runtime.streams(workload, wl_spec["loader"])
    model = workload.model
    if wl_spec["compile"]:  # one static-shape graph per batch size: let dynamo keep all of them (default 8)
        from torch import _dynamo

        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, len(sizes) + 1)
    optimizer = runtime.make_optimizer(spec["optimizer"], model.parameters(), lr=PROFILE_LR)
    # the schedule's step is part of a training step; its factors do not matter at PROFILE_LR
    scheduler = runtime.make_schedule(optimizer, spec.get("schedule"), 10**9)
    step = runtime.make_step(model, optimizer, workload.loss, device, scheduler, wl_spec["precision"],
                             wl_spec["compile"])  # fmt: skip
    model.train()
    clock = runtime.StepClock(device)
    times = {b: np.full((rounds, repeats), math.nan) for b in sizes}
    steps_per_repeat = dict.fromkeys(sizes, 0)
    peak = dict.fromkeys(sizes, math.nan)
    step_memory = dict.fromkeys(sizes, math.nan)
    peak_method = ""
    batches = {}
    if device.type == "cuda":  # what is resident before any step: the data set (when on the device) and the model
        torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated(device)
    for b in sizes:
        # training's access pattern: consecutive batches of epoch permutations (not a few cache-hot ones)
        batches[b] = runtime.batches(workload, b, torch.Generator().manual_seed(0), wl_spec["loader"], device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            for _ in range(max(settings["warmup"], 1)):  # with compile: true the first step compiles
                step(*next(batches[b]))
            steps_per_repeat[b] = _calibrate(step, batches[b], clock, settings["min_repeat_time"])
        except (RuntimeError, MemoryError) as err:
            _give_up(b, err, batches, optimizer, device)
        peak[b], peak_method = _peak_memory(device)
        if device.type == "cuda":
            step_memory[b] = peak[b] - resident
    # a streamed size's DataLoader prefetches while the other sizes are timed: untimed steps drain what it has
    # ready, so the timed steps wait for the input pipeline as training's do
    drain = 2 * wl_spec["loader"]["workers"] + 1 if streamed else 0
    for r in range(rounds):
        feasible = [b for b in sizes if b in batches]
        shift = r % max(len(feasible), 1)  # rotated, so no size is always timed right after the same other one
        for b in feasible[shift:] + feasible[:shift]:
            try:
                for _ in range(drain):
                    step(*next(batches[b]))
                for k in range(repeats):
                    clock.start()
                    for _ in range(steps_per_repeat[b]):
                        step(*next(batches[b]))
                    times[b][r, k] = clock.stop() / steps_per_repeat[b]
            except (RuntimeError, MemoryError) as err:  # the other sizes' cached blocks left too little room
                _give_up(b, err, batches, optimizer, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    attrs = {
        "device_type": device.type,
        "device_name": runtime.device_name(device),
        "threads": torch.get_num_threads(),
        "warmup": settings["warmup"],
        "rounds": rounds,
        "profiled_together": json.dumps(sizes),
        "data_path": "stream" if streamed else "device",
        "loader_workers": wl_spec["loader"]["workers"] if streamed else 0,
        "precision": wl_spec["precision"],
        "compiled": int(wl_spec["compile"]),
    }
    return {b: _dataset(b, times[b], b in batches, peak[b], step_memory[b], peak_method, steps_per_repeat[b], attrs)
            for b in sizes}  # fmt: skip


def _give_up(batch_size: int, err: BaseException, batches: dict, optimizer, device: torch.device) -> None:
    """Out of memory at ``batch_size``: recorded as infeasible (its timings are dropped) and left out of the
    remaining rounds; any other error is raised."""
    if not runtime.is_out_of_memory(err):
        raise err
    batches.pop(batch_size, None)
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _calibrate(step, batches, clock: runtime.StepClock, min_repeat_time: float) -> int:
    """How many consecutive steps make a repeat last at least ``min_repeat_time``: doubled until a block does (as
    timeit's autorange), so one slow step cannot shrink every repeat."""
    steps = 1
    while True:
        clock.start()
        for _ in range(steps):
            step(*next(batches))
        if clock.stop() >= min_repeat_time:
            return steps
        steps *= 2


def _dataset(batch_size: int, times: np.ndarray, feasible: bool, peak: float, step_memory: float,
             peak_method: str, steps_per_repeat: int, attrs: dict[str, Any]) -> xr.Dataset:  # fmt: skip
    if not feasible:
        times = np.full_like(times, math.nan)
    per_round = np.median(times, axis=1) if feasible else np.full(len(times), math.nan)
    if feasible:
        median = float(np.median(per_round))
        q25, q75 = np.quantile(times, [0.25, 0.75])
    else:
        median = q25 = q75 = math.nan
    ds = xr.Dataset(
        {
            "t_iter": (("round", "repeat"), times, {"units": "s", "long_name": "time per training step, per repeat"}),
            "t_iter_round": ("round", per_round, {"units": "s", "long_name": "median over the round's repeats"}),
            "t_iter_median": ((), median, {"units": "s", "long_name": "median over rounds of the round medians"}),
            "t_iter_q25": ((), q25, {"units": "s"}),
            "t_iter_q75": ((), q75, {"units": "s"}),
            "feasible": ((), feasible, {"long_name": "False: out of memory at this batch size"}),
            "peak_memory": ((), peak, {"units": "bytes", "method": peak_method}),
            "step_memory": (
                (),
                step_memory,
                {
                    "units": "bytes",
                    "long_name": "CUDA: peak beyond what was resident "
                    "before the first step (data set, model): activations, gradients, optimizer state; NaN "
                    "on the CPU",
                },
            ),
            "steps_per_repeat": ((), steps_per_repeat),
        },
        coords={"round": np.arange(times.shape[0]), "repeat": np.arange(times.shape[1])},
    )
    ds.attrs.update(batch_size=batch_size, **attrs)
    return ds
