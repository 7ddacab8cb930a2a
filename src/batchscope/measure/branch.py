"""The critical batch size measured locally by branching (Merrill et al. 2025, "Critical Batch Size Revisited").

From one checkpoint of a run trained at batch size B with learning rate eta, short branches continue training at
k B for each k, with the learning rate scaled by the optimizer's rule (linear in k for SGD, square root for Adam),
each over the same number of examples, so a larger batch takes proportionally fewer steps. While k B is below the
critical batch size, a larger batch loses nothing per example seen: its branch ends at the same loss. The local
critical batch size is the largest k B whose final loss stays within a relative tolerance of the best loss of the
smaller ones (:func:`local_critical_batch_size`); the truth lies between it and the next branch's k B.

A branch's final loss moves with the examples it happened to draw: on spirals_wide (benchmarks/configs) the
branches' spread over 8 seeds was 4 to 22% of their loss, 4 to 22 times the default tolerance, and one seed's
critical batch size went 16, 32, 256, 16, 256 over the run's five snapshots. So each branch runs ``seeds`` times
(each seed its own example order, the same for every k), the rule reads the seeds' mean, and a larger batch counts
as worse only where its excess over the tolerance stands ``SIGNIFICANCE`` standard errors clear of the seeds'
scatter. With one seed that is the plain rule. The seeds resampled give the critical batch size's interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from batchscope import config as cfg
from batchscope.core import scaling
from batchscope.engine import runtime
from batchscope.workloads.base import Workload, analysis_data

SIGNIFICANCE = 2.0  # standard errors: a larger batch is worse only where its mean loss exceeds this clear of noise
BOOTSTRAP = 200  # resamples of the seeds for the critical batch size's interval


def lr_scale(optimizer: str, k: float) -> float:
    """How the learning rate follows the batch size: linear for SGD, the square root for Adam(W)."""
    return k if optimizer == "sgd" else math.sqrt(k)


def local_critical_batch_size(batch_sizes: Sequence[int], losses: Sequence, tolerance: float,
                              significance: float = SIGNIFICANCE) -> tuple[int, int]:  # fmt: skip
    """(local critical batch size, the next branch's batch size or -1): the largest batch size, going up from the
    smallest, whose loss is within ``tolerance`` (relative) of the best loss of the batch sizes below it; the first
    one that is not ends the search. ``losses`` is one per batch size, or (seeds, batch sizes): then the rule reads
    the seeds' mean, and a loss is outside only where its excess over the tolerance exceeds ``significance`` times
    the two means' combined standard error (the seeds' scatter). A diverged branch (NaN or inf in any seed) is
    outside."""
    values = np.atleast_2d(np.asarray(losses, float))
    order = np.argsort(batch_sizes)
    mean, se = mean_and_se(values[:, order])
    return _rule(np.asarray(batch_sizes)[order], mean, se, tolerance, significance)


def _rule(sizes: np.ndarray, mean: np.ndarray, se: np.ndarray, tolerance: float, significance: float
          ) -> tuple[int, int]:  # fmt: skip
    """The search itself, on sorted sizes, their mean losses and standard errors (NaN: no scatter to allow for)."""
    se = np.nan_to_num(se, nan=0.0)
    best, critical = 0, int(sizes[0])
    for j in range(1, len(sizes)):
        excess = mean[j] - mean[best] * (1 + tolerance)
        if not (math.isfinite(mean[j]) and excess <= significance * math.hypot(se[j], se[best] * (1 + tolerance))):
            return critical, int(sizes[j])
        best, critical = (j if mean[j] < mean[best] else best), int(sizes[j])
    return critical, -1


def mean_and_se(losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per batch size (column), the seeds' (rows') mean loss and its standard error (NaN with one seed)."""
    seeds = losses.shape[0]
    se = losses.std(axis=0, ddof=1) / math.sqrt(seeds) if seeds > 1 else np.full(losses.shape[1], math.nan)
    return losses.mean(axis=0), se


def critical_interval(batch_sizes: Sequence[int], losses: np.ndarray, tolerance: float,
                      rng: np.random.Generator, resamples: int = BOOTSTRAP,
                      significance: float = SIGNIFICANCE) -> np.ndarray:  # fmt: skip
    """The critical batch size's 95% interval with each branch's seeds resampled (independently: the seeds of
    different k share an example order, but their final losses hardly co-vary, correlation -0.6 to 0.8 and 0.1 on
    average between neighbouring branches of spirals_wide over 8 seeds). Each resample moves the means and keeps
    the whole sample's standard errors: three seeds redrawn often repeat one, and a standard error recomputed from
    the repeat falls to zero, which would stop the search at the first branch that drew high. A branch with a
    diverged seed stays diverged in every resample. NaN with one seed."""
    losses = np.atleast_2d(np.asarray(losses, float))
    seeds = losses.shape[0]
    if seeds < 2:
        return np.array([math.nan, math.nan])
    order = np.argsort(batch_sizes)
    sizes, losses = np.asarray(batch_sizes)[order], losses[:, order]
    losses = np.where(np.isfinite(losses).all(axis=0), losses, np.nan)
    _, se = mean_and_se(losses)
    columns = np.arange(losses.shape[1])
    drawn = [_rule(sizes, losses[rng.integers(0, seeds, losses.shape), columns].mean(axis=0), se, tolerance,
                   significance)[0] for _ in range(resamples)]  # fmt: skip
    return scaling.interval(np.asarray(drawn, float)[:, None])[0]


def _one_branch(state: dict, optimizer_state: dict | None, workload: Workload, spec: dict[str, Any], batch_size: int,
                lr: float, n_steps: int, seed: int, device: torch.device, evaluation: tuple, start: int,
                k: float) -> float:  # fmt: skip
    """One branch: ``n_steps`` steps at ``batch_size`` from the checkpoint (the run's update ``start``), its examples
    in ``seed``'s order, at base rate ``lr`` along the run's schedule (runtime.Schedule from ``start``, stride
    ``k``); its loss at the end on ``evaluation`` (eval mode), NaN if a step's loss was not finite (it stops
    there)."""
    workload.model.load_state_dict(state)
    model = workload.model.train()
    optimizer = runtime.make_optimizer(spec["optimizer"], model.parameters(), lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)  # copied: each branch starts from the same state
    schedule = runtime.make_schedule(optimizer, spec["schedule"], spec["max_steps"], start, k)
    step = runtime.make_step(model, optimizer, workload.loss, device, schedule)
    draws = runtime.batches(workload, batch_size, torch.Generator().manual_seed(seed), spec["loader"], device)
    if not all(torch.isfinite(step(*next(draws))) for _ in range(n_steps)):  # stops at the first non-finite loss
        return math.nan
    with torch.no_grad():
        return float(workload.loss(model.eval()(evaluation[0]), evaluation[1]))


def branch(state: dict, workload: Workload, spec: dict[str, Any], reference: tuple[int, float], device: torch.device,
           optimizer_state: dict | None = None, start: int = 0) -> xr.Dataset:  # fmt: skip
    """Branches from ``state`` (a checkpoint's weights) at ``spec["factors"]`` x the reference batch size, each over
    ``spec["examples"]`` training examples (default: ``steps_at_largest`` steps of the largest branch) and repeated
    for ``spec["seeds"]`` example orders from ``spec["seed"]`` on; the loss of each at its end on a fixed evaluation
    subset (``spec["eval_size"]`` of the analysis set, in eval mode).

    Each branch continues the run: from its optimizer's state at the checkpoint (``optimizer_state``, momentum and
    AdamW's moments; None at step 0, before any update), its base rate the reference rate times the optimizer's
    scale for k, along the run's schedule (``spec["schedule"]`` over ``spec["max_steps"]``) from the checkpoint's
    update ``start`` on, k of the run's updates per branch update (the same examples): a warm-up goes on, a decay
    decays (a rate held at its value there would stay at the warm-up's first, or at a cosine's zero at the end,
    over every branch). A fresh momentum
    buffer would instead cost every branch the same build-up in steps (about 9 at momentum 0.9,
    core.scaling.update_lag), a larger share of a larger batch's fewer steps: it would read the critical batch
    size low. SGD's buffer tends to E[g] / (1 - momentum) whatever the batch size, so the carried one is each
    branch's own steady state; AdamW's second moment includes the noise Sigma / B, so at k > 1 a branch starts with
    a larger one than its own (its memory, 1 / (1 - beta2) steps, outlasts a branch): larger k read slower."""
    base_batch, base_lr = reference
    factors = sorted(spec["factors"])
    examples = spec["examples"] or spec["steps_at_largest"] * int(round(factors[-1] * base_batch))
    seeds = [spec["seed"] + i for i in range(spec["seeds"])]
    x_eval, y_eval = (t[: spec["eval_size"]] for t in analysis_data(workload, device))
    sizes = cfg.branch_batch_sizes(factors, base_batch)
    lrs = [base_lr * lr_scale(spec["optimizer"]["name"], k) for k in factors]
    steps = [max(1, examples // batch_size) for batch_size in sizes]
    losses = np.full((len(factors), len(seeds)), math.nan)
    fits = len(sizes)  # the branches below the first that ran out of memory (the larger ones are not tried)
    for i, (batch_size, lr, n_steps) in enumerate(zip(sizes, lrs, steps, strict=True)):
        try:
            for j, seed in enumerate(seeds):
                losses[i, j] = _one_branch(state, optimizer_state, workload, spec, batch_size, lr, n_steps, seed,
                                           device, (x_eval, y_eval), start, factors[i])  # fmt: skip
        except (RuntimeError, MemoryError) as err:
            if not runtime.is_out_of_memory(err):
                raise
            losses[i:] = math.nan
            fits = i
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
    if fits == 0:
        raise RuntimeError(f"the smallest branch, B = {sizes[0]}, ran out of memory")
    # the rule on the branches that fit: a run out of memory says nothing about the loss per example
    critical, upper = local_critical_batch_size(sizes[:fits], losses[:fits].T, spec["tolerance"])
    interval = critical_interval(sizes[:fits], losses[:fits].T, spec["tolerance"], np.random.default_rng(0))
    mean, se = mean_and_se(losses.T)
    return xr.Dataset(
        {
            "factor": ("branch_batch_size", factors),
            "lr": (
                "branch_batch_size",
                lrs,
                {
                    "long_name": "base learning rate, scaled by the optimizer's rule (the "
                    "run's schedule applies on top, continued from the checkpoint)"
                },
            ),
            "steps": ("branch_batch_size", steps),
            "loss": (
                ("branch_batch_size", "seed"),
                losses,
                {"long_name": "loss at the branch's end (eval mode); NaN: diverged"},
            ),
            "loss_mean": ("branch_batch_size", mean, {"long_name": "the seeds' mean loss"}),
            "loss_se": ("branch_batch_size", se, {"long_name": "its standard error (NaN with one seed)"}),
            "out_of_memory": ("branch_batch_size", np.arange(len(sizes)) >= fits),
            "critical_batch_size": ((), critical, {"units": "examples", "long_name": "local critical batch size"}),
            "critical_upper": ((), upper, {"long_name": "the next branch's batch size (-1: none above that fit)"}),
            "critical_ci": (
                "bound",
                interval,
                {"units": "examples", "long_name": "95% interval over the seeds resampled (NaN with one seed)"},
            ),
        },
        coords={"branch_batch_size": np.asarray(sizes, int), "seed": seeds, "bound": ["low", "high"]},
        attrs={
            "examples": int(examples),
            "tolerance": spec["tolerance"],
            "significance": SIGNIFICANCE,
            "reference_batch_size": base_batch,
            "reference_lr": base_lr,
            "start": int(start),
            # 1: the branches continued a state the run had built (none before its first update)
            "optimizer_state": int(any(t is not None for slot in (optimizer_state or {}).values() for t in slot)),
        },  # fmt: skip
    )
