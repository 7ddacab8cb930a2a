"""Stage ``train_model``: train every (learning rate, seed) point of one batch size to the target (the loop is
:mod:`batchscope.engine.training`); one NetCDF and one checkpoint per point."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from batchscope import config as cfg
from batchscope.stages import Command, Rule, _common

log = logging.getLogger("batchscope")

# what a run's file holds for the fit, the Hessian aggregate and the Ghost summary
VARIABLES = ("steps_to_target", "reached_target", "diverged", "out_of_memory", "time_to_target", "val_metric")


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """How a run trains and when it stops; learning rates and seeds are not in it (they are the job's points)."""
    wl = config["workloads"][workload]
    keys = ("optimizer", "schedule", "target", "max_steps", "eval_interval", "stop_at_target")
    return {"workload": cfg.workload_slice(config, workload), **{k: wl[k] for k in keys}, **cfg.execution(config)}


def run(args: argparse.Namespace) -> None:
    """Train every (lr, seed) point at one batch size in one process: a run costs ~0.2 s on digits while a
    process start (torch, xarray, torch.optim's dynamo import) costs ~2.5 s, so the workflow gives each job a
    seed's whole learning-rate grid. Each point still gets its own NetCDF and checkpoint."""
    from batchscope import store
    from batchscope.engine.training import point_name, train

    if (args.snapshot_lr is None) != (args.snapshot_fractions is None):
        raise SystemExit("train: --snapshot-lr and --snapshot-fractions go together")
    spec = _common.spec(args, config_slice)
    device = _common.runtime(spec)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for lr in args.lrs:
        for seed in args.seeds:
            fractions = args.snapshot_fractions if args.snapshot_lr is not None and lr == args.snapshot_lr else None
            ds, checkpoint = train(spec, args.batch_size, lr, seed, device, fractions, data_file=args.data)
            snapshots = checkpoint.pop("snapshots", None)
            ds.attrs.update(store.provenance("train_model", spec, device=str(device)))
            name = point_name(lr, seed)
            if snapshots:  # weights along the run, for the gradient-noise stage (not a .pt: not a checkpoint)
                store.save_torch({**checkpoint, "snapshots": snapshots}, out_dir / f"{name}.snapshots")
            store.save_torch(checkpoint, out_dir / f"{name}.pt")  # weights first: the .nc marks the point done
            store.write_netcdf(ds, out_dir / f"{name}.nc")
            log.info("B=%d lr=%g seed=%d: steps_to_target=%s diverged=%s out_of_memory=%s, %.2f s", args.batch_size,
                     lr, seed, float(ds["steps_to_target"]), bool(ds["diverged"]), bool(ds["out_of_memory"]),
                     float(ds["wall_time"]))  # fmt: skip


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lrs", type=float, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--snapshot-lr", type=float, help="save weights along the run at this learning rate")
    parser.add_argument("--snapshot-fractions", type=float, nargs="+", help="with --snapshot-lr: where along the run "
                        "(noise.snapshot_fractions)")  # fmt: skip


RULES = {"train_model": Rule(version=3, config_slice=config_slice, variables=VARIABLES)}
COMMANDS = (
    Command(
        "train", "train (lr, seed) points at one batch size; --out is a directory", run, _arguments, spec=config_slice
    ),  # fmt: skip
)
