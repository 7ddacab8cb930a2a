"""Stage ``train_model``: train every (learning rate, seed) point of one batch size to the target (the loop is
:mod:`batchscope.engine.training`); one NetCDF and one checkpoint per point.

The adaptive study (:mod:`batchscope.stages.adaptive`) trains a batch size's seeds in one job (``--adaptive``,
one ``--out`` directory per seed): the first seed's runs are each capped at the steps of the best run so far, and
the later seeds train only the learning rates whose first-seed run reached the target in the fewest steps. With
``--reuse`` (the reference run's directory, where the job's batch size is the reference run's) that point is copied
rather than trained again.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from batchscope import config as cfg
from batchscope.core.selection import survivors
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


def ran_out_of_steps(runs: xr.Dataset) -> np.ndarray:
    """Per run (:func:`read_runs`, or a fit's merged runs): it stopped at max_steps short of the target, rather than
    reaching it, diverging, running out of memory or being pruned (the adaptive study's alone). All False where the
    records say nothing of it (no ``reached_target``): nothing is claimed."""
    if "reached_target" not in runs:
        return np.zeros(runs.sizes["run"], bool)
    ended = np.zeros(runs.sizes["run"], bool)
    for name in ("reached_target", "diverged", "pruned", "out_of_memory"):
        if name in runs:
            ended |= runs[name].values.astype(bool)
    return ~ended


def run(args: argparse.Namespace) -> None:
    """Train every (lr, seed) point at one batch size in one process: a run costs ~0.2 s on digits while a
    process start (torch, xarray) costs ~2 s, so the workflow gives each job a
    seed's whole learning-rate grid (the adaptive study: every seed's). Each point still gets its own NetCDF and
    checkpoint: in ``--out``'s one directory, or with one directory per seed, in its seed's."""
    if (args.snapshot_lr is None) != (args.snapshot_fractions is None):
        raise SystemExit("train: --snapshot-lr and --snapshot-fractions go together")
    if len(args.out) not in (1, len(args.seeds)):
        raise SystemExit(f"train: --out names {len(args.out)} directories for {len(args.seeds)} seeds "
                         "(give one, or one per seed)")  # fmt: skip
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"train: --seeds {args.seeds} repeats a seed")
    spec = _common.spec(args, config_slice)
    device = _common.runtime(spec)
    out_dirs = [Path(out) for out in args.out] * (len(args.seeds) if len(args.out) == 1 else 1)
    if not args.adaptive:
        for lr in args.lrs:  # lr outer, as before: a seed's runs of one lr follow each other
            for seed, out_dir in zip(args.seeds, out_dirs, strict=True):
                _train_point(args, spec, device, lr, seed, out_dir)
        return
    # the adaptive study: the first seed tries every lr, each run capped at the steps of its best run so far
    # (a run that has taken as many steps without reaching the target cannot win); each later seed trains the
    # best 1/--halving-rate of the learning rates the seed before it trained (successive halving,
    # selection.survivors), in full (K(B) is a median over seeds, which a per-seed bound could bias)
    results: dict[float, list[tuple[float, float]]] = {}  # lr -> (steps to the target or NaN, final loss) per seed
    for lr in args.lrs:
        reached = [runs[0][0] for runs in results.values() if not math.isnan(runs[0][0])]
        ds = _reuse_or_train(args, spec, device, lr, args.seeds[0], out_dir=out_dirs[0],
                             bound=int(min(reached)) if reached else None)  # fmt: skip
        results[lr] = [_halving_record(ds)]
    kept = list(args.lrs)
    for seed, out_dir in zip(args.seeds[1:], out_dirs[1:], strict=True):
        kept = survivors({lr: results[lr] for lr in kept}, args.halving_rate)
        log.info("B=%d: seed %d trains %s (the runs so far: %s)", args.batch_size, seed, kept, results)
        for lr in args.lrs:
            if lr in kept:
                ds = _reuse_or_train(args, spec, device, lr, seed, out_dir)
                results[lr].append(_halving_record(ds))


def _halving_record(ds) -> tuple[float, float]:
    """What successive halving ranks a run by (selection.survivors): its steps to the target, its final loss."""
    return float(ds["steps_to_target"]), float(ds["final_val_loss"])


def _reuse_or_train(args, spec: dict, device, lr: float, seed: int, out_dir: Path, bound: int | None = None):
    """The point copied from ``--reuse`` where that holds the same run (:func:`_reused`), else trained."""
    ds = _reused(args, spec, device, lr, seed, out_dir, bound)
    return ds if ds is not None else _train_point(args, spec, device, lr, seed, out_dir, bound)


def _reused(args, spec: dict, device, lr: float, seed: int, out_dir: Path, bound: int | None) -> xr.Dataset | None:
    """The reference run's record and checkpoint for this point (``--reuse``: the adaptive study's reference run is
    one of the grid's points), copied instead of trained again; None where there is none to copy: no such point,
    another config, version, batch size, device (or GPU model) or numerics, or a bound the reference run did not
    reach the target within (the capped run would have stopped there: it is trained, capped)."""
    import shutil

    from batchscope import store
    from batchscope.engine.runtime import device_name
    from batchscope.engine.training import point_name
    from batchscope.stages import rule

    name = point_name(lr, seed)
    source = Path(args.reuse) / f"{name}.nc" if args.reuse else None
    if source is None or not source.exists():
        return None
    ds = store.read_netcdf(source)
    # the same run: config, version, device (its model too: the fit refuses to mix them) and numerics in force
    expected = {"config_hash": cfg.config_hash(spec), "algorithm_version": str(rule("train_model").version),
                "device": str(device), "device_name": device_name(device), "batch_size": args.batch_size,
                **store.numerics()}  # fmt: skip
    if any(ds.attrs.get(key) != value for key, value in expected.items()):
        return None
    if bound is not None and not float(ds["steps_to_target"]) <= bound:
        return None
    # the checkpoint first and the record last, each by an atomic rename: the .nc marks the point done
    for suffix in (".pt", ".nc"):
        origin = source.with_suffix(suffix)
        store.atomic_write(out_dir / f"{name}{suffix}", lambda tmp, origin=origin: shutil.copyfile(origin, tmp))
    log.info("B=%d lr=%g seed=%d: the reference run's, copied from %s (steps_to_target=%s)", args.batch_size, lr,
             seed, args.reuse, float(ds["steps_to_target"]))  # fmt: skip
    return ds


def _train_point(args, spec: dict, device, lr: float, seed: int, out_dir: Path, bound: int | None = None):
    """One (lr, seed) point, written to ``out_dir``: its NetCDF (written last: it marks the point done), its
    checkpoint, and at the snapshot lr its weights along the run."""
    from batchscope import store
    from batchscope.engine.training import point_name, train

    fractions = args.snapshot_fractions if args.snapshot_lr is not None and lr == args.snapshot_lr else None
    ds, checkpoint = train(spec, args.batch_size, lr, seed, device, fractions, data_file=args.data, prune_at=bound)
    snapshots = checkpoint.pop("snapshots", None)
    ds.attrs.update(store.provenance("train_model", spec, device=str(device)))
    name = point_name(lr, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if snapshots:  # weights along the run, for the gradient-noise stage (not a .pt: not a checkpoint)
        # with the step it reached the target at: where the quick estimate's B_crit stops counting
        store.save_torch({**checkpoint, "steps_to_target": float(ds["steps_to_target"]), "snapshots": snapshots},
                         out_dir / f"{name}.snapshots")  # fmt: skip
    store.save_torch(checkpoint, out_dir / f"{name}.pt")  # weights first: the .nc marks the point done
    store.write_netcdf(ds, out_dir / f"{name}.nc")
    log.info("B=%d lr=%g seed=%d: steps_to_target=%s diverged=%s out_of_memory=%s pruned=%s (bound %s), %.2f s",
             args.batch_size, lr, seed, float(ds["steps_to_target"]), bool(ds["diverged"]),
             bool(ds["out_of_memory"]), bool(ds["pruned"]), bound, float(ds["wall_time"]))  # fmt: skip
    return ds


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lrs", type=float, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--snapshot-lr", type=float, help="save weights along the run at this learning rate")
    parser.add_argument("--snapshot-fractions", type=float, nargs="+", help="with --snapshot-lr: where along the run "
                        "(noise.snapshot_fractions)")  # fmt: skip
    parser.add_argument(
        "--adaptive",
        action="store_true",
        help="adaptive study: the first seed tries the learning rates in the order given, each run stopped at the "
        "steps its best run so far took to the target (recorded as pruned, not reached); each later seed trains "
        "the best 1/--halving-rate of the learning rates the seed before it trained (successive halving)",
    )
    parser.add_argument("--halving-rate", type=int, default=3, help="with --adaptive: adaptive.halving_rate")
    parser.add_argument("--reuse", help="with --adaptive: a directory of runs of the same config (the reference "
                        "run's) whose points are copied rather than trained again")  # fmt: skip


RULES = {"train_model": Rule(version=4, config_slice=config_slice, variables=VARIABLES)}
# What the reference run's .snapshots file holds, versioned apart from its runs (train_reference's params), so a
# change to it retrains the reference run alone. 2: each snapshot keeps the optimizer's state, which the branches
# continue from (batchscope.measure.branch); the run keeps noise.kept_snapshots states whatever the fractions.
# 3: states between evaluations too (the stride starts at one step), so a short run's fractions get distinct states.
SNAPSHOT_VERSION = 3
# How the adaptive study's job (train_batch_size) picks each later seed's learning rates, versioned apart from the
# runs themselves, so a change reruns the adaptive study's training alone. 2: successive halving, each later seed
# the best 1/adaptive.halving_rate of the learning rates the seed before it trained (1: the first seed's fastest).
HALVING_VERSION = 2
COMMANDS = (
    Command(
        "train",
        "train (lr, seed) points at one batch size; --out: a directory, or one per seed",
        run,
        _arguments,
        spec=config_slice,
        outputs="+",
    ),  # fmt: skip
)
