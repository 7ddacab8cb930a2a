"""Stage ``branch_checkpoint`` (optional, ``branch.enabled``): the local critical batch size at one snapshot of the
reference run, by short branches at k x its batch size (:mod:`batchscope.measure.branch`). One job per snapshot
fraction, from the kept state nearest it (the reference run keeps ``noise.kept_snapshots`` states whatever the
fractions), so adding a fraction adds its job and retrains nothing; the report draws the curve over training beside
B_simple and B_noise."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from batchscope import config as cfg
from batchscope.stages import Command, Rule, _common, noise

log = logging.getLogger("batchscope")


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    wl = config["workloads"][workload]
    settings = {k: v for k, v in config["branch"].items() if k != "enabled"}
    # the schedule over max_steps: the branches continue it along the examples they see
    return {**settings, "optimizer": wl["optimizer"], "loader": wl["loader"], "schedule": wl["schedule"],
            "max_steps": wl["max_steps"], "reference": list(cfg.noise_reference(config, workload)),
            # the run it branches from: its training settings (the data, model, target), by their hash
            "train_reference": noise.reference_training_hash(config, workload),
            **cfg.execution(config)}  # fmt: skip


def run(args: argparse.Namespace) -> None:
    import torch

    from batchscope import store
    from batchscope.engine.training import pick_saved
    from batchscope.measure.branch import branch

    spec = _common.spec(args, config_slice)
    device = _common.runtime(spec)
    saved = torch.load(args.snapshots, map_location=device)
    (snapshot,) = pick_saved(saved, [args.fraction])
    workload = _common.workload(saved["workload"], device, args.data)
    batch_size, lr, _ = spec["reference"]
    if "optimizer" not in snapshot:
        raise SystemExit(f"{args.snapshots}: snapshots without the optimizer's state (an older reference run); rerun "
                         "the workflow, which retrains the reference run")  # fmt: skip
    ds = branch(snapshot["state_dict"], workload, spec, (batch_size, lr), device, snapshot["optimizer"],
                int(snapshot["step"]))  # fmt: skip
    ds.attrs.update(store.provenance("branch_checkpoint", spec, device=str(device)), step=int(snapshot["step"]),
                    fraction=float(snapshot["fraction"]), workload=saved["workload"]["name"])  # fmt: skip
    store.write_netcdf(ds, args.out)
    low, high = ds["critical_ci"].values
    log.info("step %d: local critical batch size %d (next branch %d, 95%% interval %.0f to %.0f over %d seeds); mean "
             "losses %s", snapshot["step"], int(ds["critical_batch_size"]), int(ds["critical_upper"]), low, high,
             ds.sizes["seed"], ds["loss_mean"].values.round(4))  # fmt: skip


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True)
    parser.add_argument("--snapshots", required=True, help="the reference run's .snapshots file")
    parser.add_argument("--fraction", type=float, required=True, help="where along the reference run (one of "
                        "noise.snapshot_fractions): the kept state nearest it")  # fmt: skip


# 2: each branch over branch.seeds seeds, the rule on their mean and scatter, the interval over them resampled
# 3: the interval's resamples keep the whole sample's standard errors; a diverged seed's branch stays outside
# 4: each branch continues the reference run's optimizer state and its schedule (along the examples it sees); one
# job per snapshot fraction (its file named by the fraction, not by its place in the list)
RULES = {
    "branch_checkpoint": Rule(
        version=4,
        config_slice=config_slice,
        variables=("loss", "loss_mean", "critical_batch_size", "critical_upper", "critical_ci"),
    ),
}
COMMANDS = (
    Command(
        "branch", "the local critical batch size at one snapshot, by branching", run, _arguments, spec=config_slice
    ),  # fmt: skip
)
