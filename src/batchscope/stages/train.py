"""Stage ``train_model``: train every (learning rate, seed) point of one batch size to the target (the loop is
:mod:`batchscope.engine.training`); one NetCDF and one checkpoint per point.

The adaptive study (:mod:`batchscope.stages.adaptive`) adds two options: ``--prune`` caps each run at the steps
the best run of the job (same seed) took to the target so far, and ``--survivors-of DIR`` trains only the learning
rates whose run in DIR (the first seed's job at the same batch size) reached the target in the fewest steps.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from batchscope import config as cfg
from batchscope.stages import Command, Rule, _common
from batchscope.store import netcdf_files, read_expected, same_device, same_provenance

log = logging.getLogger("batchscope")

# what a run's file holds for the fit, the Hessian aggregate and the Ghost summary
VARIABLES = ("steps_to_target", "reached_target", "diverged", "out_of_memory", "time_to_target", "val_metric", "pruned")


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """How a run trains and when it stops; learning rates and seeds are not in it (they are the job's points)."""
    wl = config["workloads"][workload]
    keys = ("optimizer", "schedule", "target", "max_steps", "eval_interval", "stop_at_target")
    return {"workload": cfg.workload_slice(config, workload), **{k: wl[k] for k in keys}, **cfg.execution(config)}


def read_runs(paths: Sequence[str | Path], expect: dict[str, str] | None = None) -> xr.Dataset:
    """Concatenate training points along ``run``; ``paths`` may be point files or train_model directories."""
    parts, datasets = [], []
    files = netcdf_files(paths, "training results")
    for path in files:
        ds = read_expected(path, "train_model", VARIABLES, expect)
        datasets.append(ds)
        run = xr.Dataset(coords={f"run_{k}": ("run", [ds.attrs[k]]) for k in ("batch_size", "lr", "seed")})
        parts.append(ds.expand_dims("run").assign_coords(run.coords))
    same_provenance(datasets, files, "training results")
    same_device(datasets, files, "training results")
    merged = xr.concat(parts, dim="run", join="outer", combine_attrs="drop_conflicts")
    # in (batch size, lr, seed) order, whatever order the files came in
    merged = merged.sortby(["run_batch_size", "run_lr", "run_seed"])
    return merged.assign_coords(run=np.arange(merged.sizes["run"]))


def run(args: argparse.Namespace) -> None:
    """Train every (lr, seed) point at one batch size in one process: a run costs ~0.2 s on digits while a
    process start (torch, xarray, torch.optim's dynamo import) costs ~2.5 s, so the workflow gives each job a
    seed's whole learning-rate grid. Each point still gets its own NetCDF and checkpoint."""
    from batchscope import store
    from batchscope.engine.training import point_name, train

    if (args.snapshot_lr is None) != (args.snapshot_fractions is None):
        raise SystemExit("train: --snapshot-lr and --snapshot-fractions go together")
    spec = _common.spec(args, config_slice)
    lrs = args.lrs if args.survivors_of is None else surviving(args.lrs, args.survivors_of, args.batch_size)
    device = _common.runtime(spec)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    best: dict[int, float] = {}  # seed -> the fewest steps to the target of this job's runs so far (--prune)
    for lr in lrs:
        for seed in args.seeds:
            fractions = args.snapshot_fractions if args.snapshot_lr is not None and lr == args.snapshot_lr else None
            bound = int(best[seed]) if args.prune and seed in best else None
            ds, checkpoint = train(spec, args.batch_size, lr, seed, device, fractions, data_file=args.data,
                                   prune_at=bound)  # fmt: skip
            steps = float(ds["steps_to_target"])
            if steps == steps:  # reached: with the bound on, a run that reaches the target is at least as fast
                best[seed] = min(best.get(seed, steps), steps)
            snapshots = checkpoint.pop("snapshots", None)
            ds.attrs.update(store.provenance("train_model", spec, device=str(device)))
            name = point_name(lr, seed)
            if snapshots:  # weights along the run, for the gradient-noise stage (not a .pt: not a checkpoint)
                store.save_torch({**checkpoint, "snapshots": snapshots}, out_dir / f"{name}.snapshots")
            store.save_torch(checkpoint, out_dir / f"{name}.pt")  # weights first: the .nc marks the point done
            store.write_netcdf(ds, out_dir / f"{name}.nc")
            log.info("B=%d lr=%g seed=%d: steps_to_target=%s diverged=%s out_of_memory=%s pruned=%s (bound %s), "
                     "%.2f s", args.batch_size, lr, seed, steps, bool(ds["diverged"]), bool(ds["out_of_memory"]),
                     bool(ds["pruned"]), bound, float(ds["wall_time"]))  # fmt: skip


def surviving(lrs: list[float], first_seed_dir: str, batch_size: int) -> list[float]:
    """The learning rates of ``lrs`` that survived the first seed's job at this batch size (successive halving,
    :func:`batchscope.stages.adaptive.survivors`), in the order given."""
    from batchscope.stages import adaptive

    runs = read_runs([first_seed_dir])
    if set(runs["run_batch_size"].values.tolist()) != {batch_size}:
        raise ValueError(f"--survivors-of {first_seed_dir}: runs at batch sizes "
                         f"{sorted(set(runs['run_batch_size'].values.tolist()))}, not {batch_size}")  # fmt: skip
    steps = dict(zip(runs["run_lr"].values.tolist(), runs["steps_to_target"].values.tolist(), strict=True))
    kept = {cfg.format_lr(lr) for lr in adaptive.survivors(steps)}
    chosen = [lr for lr in lrs if cfg.format_lr(lr) in kept]
    log.info("B=%d: the first seed's runs %s; training the survivors %s", batch_size,
             {cfg.format_lr(lr): s for lr, s in steps.items()}, chosen)  # fmt: skip
    return chosen


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lrs", type=float, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--snapshot-lr", type=float, help="save weights along the run at this learning rate")
    parser.add_argument("--snapshot-fractions", type=float, nargs="+", help="with --snapshot-lr: where along the run "
                        "(noise.snapshot_fractions)")  # fmt: skip
    parser.add_argument(
        "--prune",
        action="store_true",
        help="adaptive study: stop each run at the steps the best "
        "run of this job (same seed) took to the target; it is recorded as pruned, not reached",
    )
    parser.add_argument(
        "--survivors-of",
        metavar="DIR",
        help="adaptive study: train only the learning rates whose "
        "run in DIR (the first seed's job at this batch size) reached the target in the fewest steps",
    )


RULES = {"train_model": Rule(version=4, config_slice=config_slice, variables=VARIABLES)}
COMMANDS = (
    Command(
        "train", "train (lr, seed) points at one batch size; --out is a directory", run, _arguments, spec=config_slice
    ),  # fmt: skip
)
