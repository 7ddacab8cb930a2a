"""What the stages' commands share: their config slice from the command line, the device, built workloads."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from batchscope import config as cfg

UNBOUNDED = 1e6  # examples: a batch-size bound beyond this is printed as unbounded


def batch_interval(low: float, high: float) -> str:
    """A batch-size interval as ``recommend``, the report and the diagnostics print it. A bootstrap resample whose
    fitted tau_d comes out near zero sends b_opt to billions of examples: that bound says "unbounded", which is
    what it means, rather than a ten-digit batch size. At the other end a resample whose C_var comes out near zero
    sends b_opt towards 0: no batch size is below 1, so that bound says "below 1" rather than "0"."""

    def bound(value: float) -> str:
        if value >= UNBOUNDED:
            return "unbounded"
        return "below 1" if value < 1 else f"{value:.0f}"

    return f"{bound(low)} to {bound(high)}"


def times_apart(ratio: float) -> str:
    """How far apart two b_opt are, as the diagnostics print it: a b_opt near 0 (C_var fitted to 0) puts the ratio
    in the millions, which says no more than "more than 100x"."""
    return f"{ratio:.1f}x" if ratio < 100 else "more than 100x"


def spec(args: argparse.Namespace, slicer: Callable) -> dict:
    """The stage's config slice: ``--spec`` JSON (what the workflow passes), or sliced from ``--config`` for
    ``--workload`` (running a stage by hand)."""
    if args.spec is not None:
        return json.loads(args.spec)
    if args.config is None or args.workload is None:
        raise SystemExit("give --spec JSON, or --config FILE with --workload NAME")
    config = cfg.load(args.config)
    if args.workload not in config["workloads"]:
        raise SystemExit(f"--workload: {args.workload!r} is not in {args.config} ({', '.join(config['workloads'])})")
    return slicer(config, args.workload)


def runtime(spec: dict):
    """The job's device, with threads and numerics set as the slice says."""
    from batchscope.engine import runtime

    device = runtime.resolve_device(spec["device"])
    runtime.setup(spec["threads"], device, spec.get("deterministic"), spec.get("tf32", False))
    return device


def workload(spec: dict, device, data_file: str | None, cache: dict | None = None):
    """The workload a checkpoint was trained on, built once per distinct spec (its weights are loaded after)."""
    from batchscope.workloads import build

    key = json.dumps(spec, sort_keys=True)
    if cache is None:
        return build(spec, device, data_file=data_file)
    if key not in cache:
        cache[key] = build(spec, device, data_file=data_file)
    return cache[key]


def expect(args: argparse.Namespace) -> dict | None:
    """--expect: JSON of stage -> the config hash its input files must carry (the workflow passes it)."""
    if getattr(args, "expect", None) is None:
        return None
    try:
        value = json.loads(args.expect)
    except json.JSONDecodeError as err:
        raise cfg.ConfigError(f"--expect: {args.expect!r} is not JSON ({err})") from err
    if not isinstance(value, dict):
        raise cfg.ConfigError(f"--expect: {args.expect!r} is not a JSON object")
    return value


def add_expect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--expect", help="JSON: stage -> config hash the input files must carry (refuses others)")


def pairs(values: list[str], option: str) -> dict[str, list[str]]:
    """``KEY=PATH`` arguments grouped by key."""
    grouped: dict[str, list[str]] = {}
    for pair in values:
        key, _, path = pair.partition("=")
        if not key or not path:
            raise SystemExit(f"{option}: expected KEY=PATH, got {pair!r}")
        grouped.setdefault(key, []).append(path)
    return grouped
