"""Stages ``measure_gradient_noise`` and ``measure_jensen_bias`` (:mod:`batchscope.measure.noise`): B_simple along
one reference run per workload and the variance law at its end; the Jensen bias of E[H_m^-1], on linear
regression (exact) and in a trained model's top-eigenvector subspace."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from batchscope import config as cfg
from batchscope.stages import Command, Rule, _common, train

log = logging.getLogger("batchscope")


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """The noise settings, and the reference run it measures: that run's training settings (train_model's slice: data,
    model, target, max_steps) by their hash, so a measurement along a run of another target is another config's (the
    quick estimate's hash and the branches' carry it on)."""
    settings = {k: v for k, v in config["noise"].items() if k not in ("enabled", "jensen")}
    # with the stage off only the quick estimate reads it: the two-batch B_noise alone (no per-example pass, no
    # variance law)
    quick_only = not config["noise"]["enabled"]
    return {**settings, "quick_only": quick_only, "jensen": config["noise"]["jensen"],
            "train_reference": reference_training_hash(config, workload), **cfg.execution(config)}  # fmt: skip


def reference_training_hash(config: dict[str, Any], workload: str) -> str:
    """The config hash of the reference run's training (the train_reference rule trains with train_model's slice)."""
    return cfg.config_hash(train.config_slice(config, workload))


def jensen_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """The trained-model Jensen experiment: its settings and the evaluation set's (the variance-law grid does not
    concern it)."""
    shared = {key: config["noise"][key] for key in ("seed", "eval_size", "chunk_size")}
    return {"jensen": config["noise"]["jensen"], **shared, **cfg.execution(config)}


def jensen_linreg_slice(config: dict[str, Any]) -> dict[str, Any]:
    return {**config["noise"]["jensen"], "seed": config["noise"]["seed"]}


def run(args: argparse.Namespace) -> None:
    """B_simple at each snapshot of the reference run and the variance law at its end; one NetCDF each."""
    import torch

    from batchscope import store
    from batchscope.engine.runtime import progress
    from batchscope.engine.training import pick_saved
    from batchscope.measure.noise import evaluation_data, measure_snapshot, measure_variance, pairs_within_budget

    spec = _common.spec(args, config_slice)
    device = _common.runtime(spec)
    saved = torch.load(args.snapshots, map_location=device)
    workload = _common.workload(saved["workload"], device, args.data)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    snapshots = pick_saved(saved, spec["snapshot_fractions"])
    if spec["quick_only"]:  # the quick estimate leaves the initial weights out: so does its measurement
        snapshots = [snapshot for snapshot in snapshots if snapshot["step"] > 0] or snapshots
    run_examples = int(saved["steps_done"]) * int(saved["batch_size"])
    data = evaluation_data(workload, spec, device)  # once, for every snapshot and the variance law
    # two fractions of a short run can pick the same kept state (the run keeps evenly spaced states, not every
    # evaluation's): each distinct step is measured once, with the budget shared by the distinct ones only
    pairs, share = pairs_within_budget(spec, run_examples, len({int(s["step"]) for s in snapshots}), len(data[0]))
    log.info("%d pairs per snapshot: %.2f of the reference run's %d example-gradients (noise.budget %s)", pairs,
             share, run_examples, spec["budget"])  # fmt: skip
    measured: dict[int, Any] = {}  # step -> its dataset
    for i, snapshot in enumerate(progress(snapshots, desc="snapshots")):
        step = int(snapshot["step"])
        if step not in measured:
            measured[step] = measure_snapshot(snapshot, workload, spec, device, pairs, data)
        ds = measured[step].copy()  # its own attributes: a copy's are not the measured one's
        ds.attrs.update(store.provenance("measure_gradient_noise", spec, device=str(device)),
                        fraction=float(snapshot["fraction"]),
                        reference=f"B={saved['batch_size']} lr={saved['lr']} seed={saved['seed']}",
                        workload=saved["workload"]["name"], run_examples=run_examples, cost_share=share,
                        min_pairs=spec["min_pairs"])  # fmt: skip
        if "steps_to_target" in saved:  # NaN: never reached; absent from older snapshots files: not known
            ds.attrs["run_steps_to_target"] = saved["steps_to_target"]
        store.write_netcdf(ds, out_dir / f"snapshot{i}.nc")
        log.info("step %d: B_noise %.1f, B_simple %.1f (per example), %.1f (two-batch)", ds.attrs["step"],
                 float(ds["two_batch_b_noise"]), float(ds["b_simple"]), float(ds["two_batch_b_simple"]))  # fmt: skip
    if spec["quick_only"]:
        return
    ds = measure_variance(saved["state_dict"], workload, spec, device, data)  # the run's final weights
    ds.attrs.update(store.provenance("measure_gradient_noise", spec, device=str(device)),
                    workload=saved["workload"]["name"])  # fmt: skip
    store.write_netcdf(ds, out_dir / "variance.nc")
    log.info("variance law slope %.3f, corrected %.3f", float(ds["slope"]), float(ds["slope_corrected"]))


def run_jensen(args: argparse.Namespace) -> None:
    from batchscope import store

    if args.data is None:  # the linear-regression experiment needs no workload (nor torch)
        from batchscope.measure.jensen import measure_jensen_linreg

        if args.spec is None:
            raise SystemExit("jensen without --data needs --spec (noise.jensen settings as JSON)")
        spec = json.loads(args.spec)
        ds = measure_jensen_linreg(spec)
        ds.attrs.update(store.provenance("measure_jensen_bias", spec), experiment="linreg")
    else:
        import torch

        from batchscope.measure.noise import measure_jensen_subspace

        spec = _common.spec(args, jensen_slice)
        device = _common.runtime(spec)
        checkpoint = torch.load(args.checkpoint, map_location=device)
        settings = {**spec["jensen"], **{key: spec[key] for key in ("seed", "eval_size", "chunk_size")}}
        workload = _common.workload(checkpoint["workload"], device, args.data)
        ds = measure_jensen_subspace(checkpoint["state_dict"], workload, settings, device)
        ds.attrs.update(store.provenance("measure_jensen_bias", spec, device=str(device)), experiment="trained model",
                        workload=checkpoint["workload"]["name"])  # fmt: skip
    store.write_netcdf(ds, args.out)
    log.info(
        "relative bias by m: %s", dict(zip(ds["m"].values.tolist(), ds["relative_bias"].values.round(4), strict=True))
    )


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True)
    parser.add_argument("--snapshots", required=True, help="the reference run's .snapshots file")


def _jensen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data")
    parser.add_argument("--checkpoint", help="the trained model (.pt), with --data")


# what the report requires: per snapshot, and of the variance law (variance.nc)
SNAPSHOT_VARIABLES = ("b_simple", "two_batch_b_simple", "two_batch_b_noise_boot", "two_batch_b_simple_boot")
VARIANCE_VARIABLES = ("mean_sq_error",)
RULES = {
    # 4: noise.eval_size and noise.chunk_size (the snapshot's loss in chunks); 5: B_noise's resampled pairs;
    # 6: B_noise's Hessian in chunks of chunk_size (a change with BatchNorm in train mode, chunks below 512)
    # 7: the pairs within noise.budget of the reference run; with the stage off, the two-batch estimate alone, and
    # not at step 0; 8: a step two fractions picked measured once, the budget shared by the distinct steps;
    # 9: b_big null is the whole evaluation set, its gradient and G^T H G computed once per snapshot;
    # 10: B_simple's resamples beside B_noise's (two_batch_b_simple_boot)
    "measure_gradient_noise": Rule(version=10, config_slice=config_slice, variables=SNAPSHOT_VARIABLES),
    # 3: the full Hessian over noise.eval_size examples in chunks of noise.chunk_size, its kept linearisations
    # bounded (batchscope.core.hessian.CACHE_MB)
    "measure_jensen_bias": Rule(version=3, config_slice=jensen_slice, variables=("relative_bias",)),
}
COMMANDS = (
    Command(
        "noise", "gradient noise along the reference run; --out is a directory", run, _arguments, spec=config_slice
    ),  # fmt: skip
    Command(
        "jensen",
        "Jensen bias: linear regression (no --data) or a trained model's subspace",
        run_jensen,
        _jensen_arguments,
        spec=jensen_slice,
    ),  # fmt: skip
)
