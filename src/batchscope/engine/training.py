"""Train one (workload, batch size, learning rate, seed) point until the validation target or max steps.

The loop is deliberately short: batches come from :func:`batchscope.engine.runtime.batches` (a slice of a per-epoch
permutation of data on the device, or a DataLoader), and the step is :func:`batchscope.engine.runtime.make_step`, the
same function the profiler times.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn
from torch.utils.data import DataLoader

from batchscope import faults
from batchscope.engine import runtime
from batchscope.workloads.base import Workload, first_examples
from batchscope.workloads.base import build as build_workload

log = logging.getLogger("batchscope")
EVAL_CHUNK = 4096  # at most this many examples per forward pass during evaluation
EVAL_MEMORY = 2**30  # bytes of activations one evaluation forward pass may take (eval_chunk)
EVAL_PROBE = 8  # examples of the probe forward pass that sizes the evaluation chunks
# A run has diverged when its loss is NaN/inf or exceeds this multiple of the initial validation loss: with
# ReLUs a too-large step often kills the units and parks the loss at ~1e6 without ever producing a NaN.
DIVERGENCE_FACTOR = 100.0


def point_name(lr: float, seed: int) -> str:
    """File stem of one training point inside its batch size's directory."""
    from batchscope.config import format_lr

    return f"lr{format_lr(lr)}_seed{seed}"


@dataclass
class Evaluation:
    loss: float
    metric: float  # the workload's metric (accuracy for the built-in classifiers); NaN when it has none


@torch.no_grad()
def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes a no-grad forward pass of ``x`` in eval mode takes beyond what was allocated before it: on CUDA the
    allocator's peak; elsewhere (no allocator statistics) the outputs of every layer (module without children)
    added up, an upper bound, since a forward pass frees each layer's input once the next layers have used it."""
    was_training = model.training
    model.eval()
    try:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
            before = torch.cuda.memory_allocated(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            model(x)
            return max(torch.cuda.max_memory_allocated(x.device) - before, 0)
        total = 0

        def count(module, inputs, output):
            nonlocal total
            total += sum(t.nbytes for t in (output if isinstance(output, tuple | list) else (output,))
                         if isinstance(t, torch.Tensor))  # fmt: skip

        leaves = [m for m in model.modules() if next(m.children(), None) is None]
        handles = [m.register_forward_hook(count) for m in leaves]
        try:
            model(x)
        finally:
            for handle in handles:
                handle.remove()
        return total
    finally:
        model.train(was_training)


def eval_chunk(workload: Workload, device: torch.device, budget: int = EVAL_MEMORY) -> int:
    """Examples per evaluation forward pass: the most whose activations stay within ``budget`` bytes, at most
    EVAL_CHUNK. The bytes per example are the difference between probe passes of 2 x EVAL_PROBE and EVAL_PROBE
    validation examples, per example, so what a pass allocates whatever its size (a cuDNN workspace) does not
    count as activations. The evaluation's result does not depend on the chunk (a mean over chunks, each weighted
    by its size, in eval mode), so each model gets its own: 545 examples for a CIFAR ResNet-20 on the CPU, all
    4096 for the digits MLP."""
    x, _ = first_examples(workload.val, 2 * EVAL_PROBE, device)
    whole = activation_bytes(workload.model, x)
    half = len(x) // 2
    per_example = (whole - activation_bytes(workload.model, x[:half])) / (len(x) - half) if half else 0
    if per_example <= 0:  # one example, or a device whose figures do not grow with the examples
        per_example = whole / len(x)
    return int(min(EVAL_CHUNK, max(1, budget // max(per_example, 1))))


@torch.no_grad()
def evaluate(workload: Workload, split: str, device: torch.device, loader: dict[str, Any] | None = None,
             chunk: int = EVAL_CHUNK) -> Evaluation:  # fmt: skip
    """Mean loss and metric over a whole split, in eval mode, in chunks of ``chunk`` examples (:func:`eval_chunk`
    sizes them for the model)."""
    data = getattr(workload, split)
    model = workload.model
    was_training = model.training
    model.eval()
    if isinstance(data, tuple):
        chunks = ((data[0][i : i + chunk], data[1][i : i + chunk]) for i in range(0, len(data[0]), chunk))
    else:
        workers = loader["workers"] if loader else 0
        chunks = ((x.to(device), y.to(device)) for x, y in DataLoader(data, batch_size=chunk, num_workers=workers))
    total_loss = total_metric = 0.0
    count = 0
    for x, y in chunks:
        out = model(x)
        total_loss += float(workload.loss(out, y)) * len(y)
        if workload.metric is not None:
            total_metric += float(workload.metric(out, y)) * len(y)
        count += len(y)
    model.train(was_training)
    return Evaluation(total_loss / count, total_metric / count if workload.metric is not None else math.nan)


def reached(value: float, target: float, higher_is_better: bool) -> bool:
    return value >= target if higher_is_better else value <= target


SNAPSHOT_BUDGET = 2 * 10**8  # parameters x kept snapshots held in memory before they are thinned
# states held per snapshot fraction (at most; SNAPSHOT_BUDGET may allow fewer): evenly spaced at a stride that doubles
# as the run grows, two per fraction put each of the 17 default fractions within 1/32 of the run of its state, and
# more gain little (a simulation over run lengths of 17 to 20000 steps: 1/16 with one per fraction, 1/33 with two,
# 1/34 with four), while each costs a copy of the weights and the optimizer's state
STATES_PER_FRACTION = 2


class Snapshots:
    """Weights along a run within room for ``capacity`` states: step 0, every ``stride``-th step, and the newest.

    States arrive at step 0, at each multiple of the stride (the stride starts at one step) and at each evaluation.
    A state off the stride (an evaluation's) is kept only while it is the newest. So a short run keeps states
    between its evaluations too: 0.25 and 0.5 of a 30-step run evaluated every 10 steps are two states, not both
    step 10. When the room is full the stride doubles and the states off it go (:meth:`thin`), so the kept states
    stay evenly spaced over the whole run: any fraction of it has a kept state within one stride, and the newest
    (the run's end, where fraction 1.0 is taken) is always there. (Dropping every other state
    whatever its spacing would instead empty the early run fastest.)
    """

    def __init__(self, capacity: int, stride: int = 1):
        self.capacity, self.stride = max(capacity, 2), stride
        self.kept: list[tuple[int, Any]] = []
        self.thinnings = 0

    def add(self, step: int, state: Any) -> None:
        if len(self.kept) > 1 and self.kept[-1][0] % self.stride:
            self.kept.pop()  # off the stride: it was kept only as the newest
        self.kept.append((step, state))
        while len(self.kept) > self.capacity:
            self.thin()

    def thin(self) -> None:
        """Double the stride; keep the states on it, and the newest."""
        self.stride *= 2
        self.thinnings += 1
        newest = self.kept[-1]
        self.kept = [item for item in self.kept[:-1] if item[0] % self.stride == 0] + [newest]

    def due(self, step: int) -> bool:
        """Whether a state at ``step`` stays beyond being the newest (on the stride)."""
        return step % self.stride == 0

    def next_due(self, step: int) -> int:
        """The first step after ``step`` on the stride."""
        return (step // self.stride + 1) * self.stride

    def drop_after(self, step: int) -> None:
        """Forget the states kept after ``step`` (a run whose record ends there)."""
        self.kept = [item for item in self.kept if item[0] <= step]


def _pick_snapshots(kept: list[tuple[int, dict]], fractions: list[float], steps_done: int) -> list[dict]:
    """For each fraction f, the kept state nearest f x steps_done (kept states: :class:`Snapshots`):
    its record (``state_dict``, ``optimizer``) with its ``fraction`` and ``step``."""
    picked = []
    for fraction in fractions:
        step, state = min(kept, key=lambda item: abs(item[0] - fraction * steps_done))
        picked.append({"fraction": fraction, "step": step, **state})
    return picked


def pick_saved(saved: dict, fractions: list[float]) -> list[dict]:
    """From a reference run's .snapshots file (the states it kept, noise.kept_snapshots of them evenly spaced), for
    each fraction f the kept state nearest f x its steps_done, as :func:`_pick_snapshots` gives them: a change of
    the fractions picks other kept states and retrains nothing."""
    kept = [(int(s["step"]), {k: v for k, v in s.items() if k not in ("step", "fraction")}) for s in saved["snapshots"]]
    return _pick_snapshots(kept, fractions, int(saved["steps_done"]))


def train(
    spec: dict[str, Any],
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    snapshot_fractions: list[float] | None = None,
    data_file: str | None = None,
    prune_at: int | None = None,
) -> tuple[xr.Dataset, dict[str, Any]]:
    """Run one training point. Returns its record (an ``xarray.Dataset``) and a checkpoint dict.

    ``spec`` is the training config slice (:func:`batchscope.config.train_slice`); the workload's factory is
    called with torch seeded by ``seed`` (the model's initialisation). A NaN/inf loss ends the run with
    ``diverged`` set; out-of-memory ends it with ``out_of_memory`` set. Neither raises.

    ``prune_at`` (the adaptive study's pruning bound: the steps the best run at this batch size took to the
    target): a run that has taken that many steps without reaching the target cannot beat it, so it stops there
    with ``pruned`` set, recorded as not reached. Up to the bound it is the same run (the schedule still spans
    ``max_steps``), so a run that would reach the target within the bound does.
    """
    wl_spec, loader = spec["workload"], spec["workload"]["loader"]
    workload = build_workload(wl_spec, device, seed=seed, data_file=data_file)
    model = workload.model
    order = torch.Generator().manual_seed(seed)  # batch order, drawn on the CPU so it is device independent
    max_steps, interval = spec["max_steps"], spec["eval_interval"]
    optimizer = runtime.make_optimizer(spec["optimizer"], model.parameters(), lr)
    scheduler = runtime.make_schedule(optimizer, spec["schedule"], max_steps)
    step = runtime.make_step(model, optimizer, workload.loss, device, scheduler, wl_spec["precision"],
                             wl_spec["compile"])  # fmt: skip
    batches = runtime.batches(workload, batch_size, order, loader, device)
    clock = runtime.StepClock(device)
    metric, target = spec["target"]["metric"], spec["target"]["value"]
    higher_is_better = metric != "val_loss" and workload.higher_is_better
    if metric != "val_loss" and workload.metric is None:
        raise ValueError(f"target.metric {metric!r}: the workload's factory returned no metric (metric=None)")

    curve: dict[str, list[float]] = {k: [] for k in ("step", "train_loss", "val_loss", "val_metric", "step_time")}
    steps_done = 0
    train_time, time_to_target, steps_to_target = 0.0, math.nan, math.nan
    diverged = out_of_memory = pruned = False
    steady_steps: list[float] = []
    wall_start = time.perf_counter()
    chunk = eval_chunk(workload, device)
    initial_val_loss = evaluate(workload, "val", device, loader, chunk).loss
    first_step_time = math.nan
    n_params = sum(p.numel() for p in model.parameters())
    # a snapshot holds the weights and the optimizer's state (momentum; AdamW's two moments)
    room = SNAPSHOT_BUDGET // max(n_params * (1 + optimizer.state_slots()), 1)
    snapshots = Snapshots(min(room, STATES_PER_FRACTION * len(snapshot_fractions)) if snapshot_fractions else room)
    if snapshot_fractions and room < len(snapshot_fractions):
        log.warning("room for %d states of %d parameters (and the optimizer's) in memory, fewer than the %d to keep "
                    "(noise.kept_snapshots): the snapshot fractions share the states kept", max(room, 2), n_params,
                    len(snapshot_fractions))  # fmt: skip

    def keep(step: int, weights: dict | None = None) -> None:
        """The weights (copied, unless given) and the optimizer's state, so a branch from here continues the run
        (batchscope.measure.branch; the schedule there follows from the step)."""
        if snapshot_fractions:
            weights = weights or {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            snapshots.add(step, {"state_dict": weights, "optimizer": optimizer.state_dict()})

    keep(0)
    divergence_threshold = DIVERGENCE_FACTOR * initial_val_loss
    model.train()
    bar = runtime.progress(total=max_steps, desc=f"B={batch_size} lr={lr:g} seed={seed}")
    while steps_done < max_steps:
        block = min(interval, max_steps - steps_done)
        losses, durations = [], []
        done, timed, timed_s = 0, 0, 0.0  # steps of the block done; those timed, and their seconds
        while done < block:
            # the reference run keeps states between evaluations too: between timed segments, so the copy is not a
            # step's time, and outside the try, so a failed host copy is not the device running out of memory. (On
            # CUDA each segment ends in a synchronisation: while the stride is one step, the run's first few dozen
            # steps are timed alone, a little slower than in a block.)
            if snapshot_fractions and done and snapshots.due(steps_done + done):
                keep(steps_done + done)
            # the run's first step pays the warm-up (CUDA context, cuDNN's autotuning, compilation): timed apart, as
            # the profile's warm-up is, and counted at the first block's steady rate below
            first = steps_done == 0 and done == 0 and block > 1
            end = 1 if first else block
            if snapshot_fractions and not first:  # the next state to keep, or the block's end
                end = min(block, snapshots.next_due(steps_done + done) - steps_done)
            try:
                clock.start()
                for _ in range(end - done):
                    losses.append(step(*next(batches)))
                    if clock.per_step and not first:
                        durations.append(clock.tick())
                seconds = clock.stop()
            except (RuntimeError, MemoryError) as err:
                if not runtime.is_out_of_memory(err):
                    raise
                out_of_memory = True
                break
            if first:
                first_step_time = seconds
            else:
                timed, timed_s = timed + end - done, timed_s + seconds
            done = end
        if out_of_memory:
            # the run's record ends at its last evaluation: states kept after it, inside this block, go with it
            snapshots.drop_after(steps_done)
            break
        elapsed = timed_s * block / timed
        # The step time left out the first step after an evaluation: the evaluation's forward pass evicts
        # the step's caches and the next step pays ~40% extra here, an artefact of measuring, not a cost of
        # the step. On the CPU it is the median of single steps (the same holds for a few more steps, less
        # so); on CUDA the block mean. train_time counts every step.
        if durations[1:]:
            steady_steps += durations[1:]
            steady_time = float(np.median(durations[1:]))
        else:
            steady_time = elapsed / block
        train_time += elapsed
        steps_done += block
        bar.update(block)  # outside the clock
        faults.kill_point("train_step")  # tests: a kill in the middle of a run
        keep(steps_done)
        evaluation = evaluate(workload, "val", device, loader, chunk)
        value = evaluation.loss if metric == "val_loss" else evaluation.metric
        for key, item in zip(
            curve,
            (steps_done, float(torch.stack(losses).mean()), evaluation.loss, value, steady_time),
            strict=True,
        ):
            curve[key].append(item)
        worst = max(curve["train_loss"][-1], evaluation.loss)
        if not math.isfinite(worst) or worst > divergence_threshold:
            diverged = True
            break
        if math.isnan(steps_to_target) and reached(value, target, higher_is_better):
            steps_to_target, time_to_target = steps_done, train_time
            if spec["stop_at_target"]:
                break
        if prune_at is not None and math.isnan(steps_to_target) and steps_done >= prune_at:
            pruned = True  # as many steps as the best run took, and not there: it cannot win
            break
    wall_time = time.perf_counter() - wall_start
    bar.close()

    final_train = evaluate(workload, "train", device, loader, chunk)
    final_val = evaluate(workload, "val", device, loader, chunk)
    # per-step durations on the CPU; block means on CUDA, where the first block (warm-up) is left out
    steady = np.asarray(steady_steps if steady_steps else curve["step_time"][1:] or curve["step_time"])
    scalars = {
        "steps_to_target": (steps_to_target, "steps", "first evaluated step at which the target was reached"),
        "reached_target": (not math.isnan(steps_to_target), "", "False: censored at max_steps, or pruned"),
        "pruned": (
            pruned,
            "",
            "stopped at the best run's steps at this batch size without reaching the target "
            "(the adaptive study's bound): counts as not reached",
        ),
        "prune_at": (
            math.nan if prune_at is None else float(prune_at),
            "steps",
            "the pruning bound the run trained under (NaN: none)",
        ),
        "diverged": (
            diverged,
            "",
            f"a NaN/inf loss, or one above {DIVERGENCE_FACTOR:g}x the initial, ended the run",
        ),
        "initial_val_loss": (initial_val_loss, "", "validation loss at initialisation"),
        "out_of_memory": (out_of_memory, "", "the device ran out of memory"),
        "steps_done": (steps_done, "steps", ""),
        "time_to_target": (
            time_to_target,
            "s",
            "training-step time until the target (evaluation and the first "
            "step's warm-up excluded: that step counts at the first block's steady rate)",
        ),
        "train_time": (train_time, "s", "training-step time of the whole run (likewise)"),
        "first_step_time": (first_step_time, "s", "the run's first step: warm-up, compilation (not in the above)"),
        "wall_time": (wall_time, "s", "wall time of the run including evaluation"),
        "step_time_median": (
            float(np.median(steady)) if len(steady) else math.nan,
            "s",
            "median time per step, the first step after each evaluation excluded",
        ),
        "final_train_loss": (final_train.loss, "", ""),
        "final_val_loss": (final_val.loss, "", ""),
        "final_train_accuracy": (final_train.metric, "1", f"the workload's metric ({workload.metric_name})"),
        "final_val_accuracy": (final_val.metric, "1", f"the workload's metric ({workload.metric_name})"),
        "gap_accuracy": (final_train.metric - final_val.metric, "1", "train minus val metric"),
        "gap_loss": (final_val.loss - final_train.loss, "", "val minus train loss"),
    }
    ds = xr.Dataset(
        {
            name: ((), value, {"units": units, "long_name": note} if note else {"units": units})
            for name, (value, units, note) in scalars.items()
        }
    )
    curve_units = {"train_loss": "", "val_loss": "", "val_metric": "", "step_time": "s"}
    ds["steps_to_target"] = ds["steps_to_target"].astype(np.float64)
    for key, units in curve_units.items():
        ds[key] = ("step", np.asarray(curve[key], dtype=np.float64), {"units": units})
    ds = ds.assign_coords(step=("step", np.asarray(curve["step"], dtype=np.int64), {"units": "steps"}))
    ds["train_loss"].attrs["long_name"] = "mean minibatch loss over the evaluation interval"
    ds["val_metric"].attrs["long_name"] = metric
    ds.attrs.update(
        batch_size=batch_size, lr=lr, seed=seed, target_metric=metric, target_value=target,
        device_name=runtime.device_name(device),
        stop_at_target=int(spec["stop_at_target"]), metric_name=workload.metric_name,
        data_path="stream" if runtime.streams(workload, loader) else "device", precision=wl_spec["precision"],
        compiled=int(wl_spec["compile"]), optimizer=spec["optimizer"]["name"],
        schedule=json.dumps(spec["schedule"], sort_keys=True),
    )  # fmt: skip
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "workload": wl_spec,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "steps_done": steps_done,
    }
    if snapshot_fractions:
        # every run ends at an evaluation and keeps its state; one out of memory ends at its last evaluation, whose
        # state may have given way to one kept after it (dropped since): the weights now are past both, so the kept
        # states alone, each with its own step
        checkpoint["snapshots"] = _pick_snapshots(snapshots.kept, snapshot_fractions, steps_done)
    return ds, checkpoint
