"""Stage ``edge_of_stability`` (optional): full-batch gradient descent on one workload at each configured step
size, lambda_max against 2 / step size (:mod:`batchscope.measure.edge_of_stability`)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from batchscope import config as cfg
from batchscope.stages import Command, Rule, _common

log = logging.getLogger("batchscope")


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    settings = {k: v for k, v in config["edge_of_stability"].items() if k not in ("enabled", "step_sizes")}
    return {**settings, "workload": cfg.workload_slice(config, workload), **cfg.execution(config)}


def run(args: argparse.Namespace) -> None:
    from batchscope import store
    from batchscope.measure.edge_of_stability import edge_of_stability

    spec = _common.spec(args, config_slice)
    device = _common.runtime(spec)
    ds = edge_of_stability(args.step_size, spec, device, data_file=args.data)
    ds.attrs.update(store.provenance("edge_of_stability", spec, device=str(device)))
    store.write_netcdf(ds, args.out)
    log.info("step size %g: lambda_max %.3g at the end, 2/eta = %.3g", args.step_size,
             float(ds["lambda_max"][-1]), 2 / args.step_size)  # fmt: skip


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True)
    parser.add_argument("--step-size", type=float, required=True)


RULES = {"edge_of_stability": Rule(version=2, config_slice=config_slice, variables=("lambda_max", "loss"))}
COMMANDS = (
    Command("edge-of-stability", "full-batch GD: lambda_max against 2/eta", run, _arguments, spec=config_slice),
)
