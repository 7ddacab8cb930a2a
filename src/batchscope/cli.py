"""The ``batchscope`` command line: every workflow stage, runnable by hand.

Each stage takes its config slice either as JSON (``--spec``, what the workflow passes) or as a config file
plus workload name (``--config``/``--workload``, for running a stage by hand while debugging).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from batchscope import config as cfg

log = logging.getLogger("batchscope")


def _spec(args: argparse.Namespace, slicer: Callable) -> dict:
    if args.spec is not None:
        return json.loads(args.spec)
    if args.config is None or args.workload is None:
        raise SystemExit("give --spec JSON, or --config FILE with --workload NAME")
    config = cfg.load(args.config)
    if args.workload not in config["workloads"]:
        raise SystemExit(f"--workload: {args.workload!r} is not in {args.config} ({', '.join(config['workloads'])})")
    return slicer(config, args.workload)


def _runtime(spec: dict):
    from batchscope import runtime

    device = runtime.resolve_device(spec["device"])
    runtime.setup(spec["threads"], device, spec.get("deterministic"), spec.get("tf32", False))
    return device


def _workload(spec: dict, device, data_file: str | None, cache: dict | None = None):
    """The workload a checkpoint was trained on, built once per distinct spec (its weights are loaded after)."""
    from batchscope.workload import build

    key = json.dumps(spec, sort_keys=True)
    if cache is None:
        return build(spec, device, data_file=data_file)
    if key not in cache:
        cache[key] = build(spec, device, data_file=data_file)
    return cache[key]


def _expect(args: argparse.Namespace) -> dict | None:
    """--expect: JSON of stage -> the config hash its input files must carry (the workflow passes it)."""
    if getattr(args, "expect", None) is None:
        return None
    try:
        expect = json.loads(args.expect)
    except json.JSONDecodeError as err:
        raise cfg.ConfigError(f"--expect: {args.expect!r} is not JSON ({err})") from err
    if not isinstance(expect, dict):
        raise cfg.ConfigError(f"--expect: {args.expect!r} is not a JSON object")
    return expect


def cmd_validate(args: argparse.Namespace) -> None:
    """The workflow's own checks: the config file, then the sizes only the data know (:mod:`batchscope.study`)."""
    from batchscope import study

    config = cfg.load(args.config)
    sizes = study.check(config, args.results)
    n_runs = sum(len(cfg.train_points(config, w)) for w in config["workloads"])
    examples = ", ".join(f"{name} {n}" for name, n in sorted(sizes.items()))
    print(f"{args.config}: valid; {len(config['workloads'])} workload(s), {n_runs} training run(s); "
          f"training examples: {examples}")  # fmt: skip


def cmd_prepare_data(args: argparse.Namespace) -> None:
    """Check the workload's factory once, before any training, and keep a record of it. For the built-in
    datasets the record is also the data cache every later job reads."""
    import xarray as xr

    from batchscope import io, study
    from batchscope.workload import builtin_dataset

    spec = _spec(args, cfg.data_slice)
    wl_spec = spec["workload"]
    _, summary = study.record(wl_spec)  # what `batchscope validate` and the workflow's parse-time check build
    # the built-in factory has just built its dataset; the cache is that object (copied: the factory's is shared)
    builtin = wl_spec["factory"] == cfg.BUILTIN_FACTORY
    ds = builtin_dataset(wl_spec["dataset"]).copy() if builtin else xr.Dataset()
    ds.attrs.update(io.provenance("prepare_data", spec), **{k: json.dumps(v) if isinstance(v, list) else v
                                                           for k, v in summary.items()})  # fmt: skip
    io.write_netcdf(ds, args.out)
    log.info("wrote %s: %s", args.out, summary)


def cmd_profile(args: argparse.Namespace) -> None:
    """Every batch size of a workload in one process, in interleaved rounds; one NetCDF per batch size."""
    from batchscope import io
    from batchscope.profile import profile

    spec = _spec(args, cfg.profile_slice)
    device = _runtime(spec)
    if len(args.out) != len(args.batch_size):
        raise SystemExit(f"profile: {len(args.batch_size)} batch sizes but {len(args.out)} --out files")
    results = profile(spec, args.batch_size, device, data_file=args.data)
    for batch_size, out in zip(args.batch_size, args.out, strict=True):
        ds = results[batch_size]
        ds.attrs.update(io.provenance("profile_hardware", spec, device=str(device)))
        io.write_netcdf(ds, out)
        log.info("B=%d: median step %.3g ms over %d rounds, feasible=%s", batch_size,
                 1e3 * float(ds["t_iter_median"]), ds.sizes["round"], bool(ds["feasible"]))  # fmt: skip


def cmd_train(args: argparse.Namespace) -> None:
    """Train every (lr, seed) point at one batch size in one process: a run costs ~0.2 s on digits while a
    process start (torch, xarray, torch.optim's dynamo import) costs ~2.5 s, so the workflow gives each job a
    seed's whole learning-rate grid. Each point still gets its own NetCDF and checkpoint."""
    from batchscope import io
    from batchscope.train import point_name, train

    spec = _spec(args, cfg.train_slice)
    device = _runtime(spec)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for lr in args.lrs:
        for seed in args.seeds:
            fractions = args.snapshot_fractions if args.snapshot_lr is not None and lr == args.snapshot_lr else None
            ds, checkpoint = train(spec, args.batch_size, lr, seed, device, fractions, data_file=args.data)
            snapshots = checkpoint.pop("snapshots", None)
            ds.attrs.update(io.provenance("train_model", spec, device=str(device)))
            name = point_name(lr, seed)
            if snapshots:  # weights along the run, for the gradient-noise stage (not a .pt: not a checkpoint)
                io.save_torch({**checkpoint, "snapshots": snapshots}, out_dir / f"{name}.snapshots")
            io.save_torch(checkpoint, out_dir / f"{name}.pt")  # weights first: the .nc marks the point done
            io.write_netcdf(ds, out_dir / f"{name}.nc")
            log.info(
                "B=%d lr=%g seed=%d: steps_to_target=%s diverged=%s out_of_memory=%s, %.2f s",
                args.batch_size,
                lr,
                seed,
                float(ds["steps_to_target"]),
                bool(ds["diverged"]),
                bool(ds["out_of_memory"]),
                float(ds["wall_time"]),
            )


def cmd_fit(args: argparse.Namespace) -> None:
    from batchscope import io
    from batchscope.fit import fit_scaling

    spec = _spec(args, cfg.fit_slice)
    ds = fit_scaling(args.profiles, args.runs, spec, args.workload, _expect(args))
    ds.attrs.update(io.provenance("fit_scaling", spec))
    io.write_netcdf(ds, args.out)
    log.info(
        "%s: b_opt=%.1f, fastest B from the profile=%d, B_crit=%.1f",
        args.workload,
        float(ds["b_opt"]),
        int(ds["fastest_batch_size"]),
        float(ds["b_crit"]),
    )


def cmd_hessian(args: argparse.Namespace) -> None:
    """Analyse every checkpoint (.pt) in the given train_model directories; one NetCDF per checkpoint."""
    import torch

    from batchscope import io
    from batchscope.sharpness import analyze

    spec = _spec(args, cfg.hessian_slice)
    device = _runtime(spec)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workloads: dict = {}
    checkpoints = [p for d in map(Path, args.checkpoints) for p in (sorted(d.glob("*.pt")) if d.is_dir() else [d])]
    if not checkpoints:
        raise SystemExit(f"no checkpoints (.pt) in {' '.join(args.checkpoints)}")
    from batchscope.runtime import progress

    for path in progress(checkpoints, desc="checkpoints"):
        checkpoint = torch.load(path, map_location=device)
        ds = analyze(checkpoint, _workload(checkpoint["workload"], device, args.data, workloads), spec, device)
        ds.attrs.update(io.provenance("analyze_hessian", spec, device=str(device)))
        io.write_netcdf(ds, out_dir / f"B{checkpoint['batch_size']}_{path.stem}.nc")
        log.info(
            "%s: lambda_max=%.4g trace=%.4g+-%.2g, %d HVPs, %.2f s%s", path, float(ds["lambda_max"]),
            float(ds["trace"]), float(ds["trace_se"]),
            int(ds["n_hvp_top"] + ds["n_hvp_trace"] + ds["n_hvp_slq"]),
            float(np.nansum([ds["time_top"], ds["time_trace"], ds["time_slq"]])),
            f" (skipped: {ds.attrs['skipped']})" if ds.attrs["skipped"] else "",
        )  # fmt: skip


def cmd_edge_of_stability(args: argparse.Namespace) -> None:
    from batchscope import io
    from batchscope.sharpness import edge_of_stability

    spec = _spec(args, cfg.edge_of_stability_slice)
    device = _runtime(spec)
    ds = edge_of_stability(args.step_size, spec, device, data_file=args.data)
    ds.attrs.update(io.provenance("edge_of_stability", spec, device=str(device)))
    io.write_netcdf(ds, args.out)
    log.info("step size %g: lambda_max %.3g at the end, 2/eta = %.3g", args.step_size,
             float(ds["lambda_max"][-1]), 2 / args.step_size)  # fmt: skip


def _pairs(pairs: list[str], option: str) -> dict[str, list[str]]:
    """``KEY=PATH`` arguments grouped by key."""
    grouped: dict[str, list[str]] = {}
    for pair in pairs:
        key, _, path = pair.partition("=")
        if not key or not path:
            raise SystemExit(f"{option}: expected KEY=PATH, got {pair!r}")
        grouped.setdefault(key, []).append(path)
    return grouped


def _by_ghost_size(pairs: list[str]) -> dict[int, list[str]]:
    """``SIZE=PATH`` arguments grouped by ghost size."""
    grouped = _pairs(pairs, "ghost sizes")
    bad = [size for size in grouped if not size.isdigit()]
    if bad:
        raise SystemExit(f"expected GHOST_SIZE=PATH, got ghost size {bad[0]!r}")
    return {int(size): paths for size, paths in grouped.items()}


def cmd_ghost_variance(args: argparse.Namespace) -> None:
    from batchscope import io
    from batchscope.ghost_experiment import variance_experiment

    spec = _spec(args, cfg.ghost_slice)
    device = _runtime(spec)
    ds = variance_experiment({**spec, "groups": spec["variance_groups"]}, device, data_file=args.data)
    ds.attrs.update(io.provenance("ghost_variance", spec, device=str(device)))
    io.write_netcdf(ds, args.out)
    ratios = dict(zip(ds["groups"].values.tolist(), ds["ratio_mean"].values.round(2), strict=True))
    log.info("variance ratio by g: %s", ratios)


def cmd_ghost_summary(args: argparse.Namespace) -> None:
    from batchscope import io
    from batchscope.ghost_experiment import summarize

    spec = _spec(args, cfg.ghost_slice)
    ds = summarize(
        spec,
        args.base_runs,
        _by_ghost_size(args.ghost_runs),
        args.base_profile,
        {size: paths[0] for size, paths in _by_ghost_size(args.ghost_profiles).items()},
        args.variance,
        args.base_hessian,
        _by_ghost_size(args.ghost_hessian) if args.ghost_hessian else None,
    )
    ds.attrs.update(io.provenance("summarize_ghost", spec))
    io.write_netcdf(ds, args.out)
    log.info("\n%s", ds[["val_accuracy", "gap", "steps_to_target", "lambda_max", "step_time_over_bn"]].to_dataframe())


def cmd_noise(args: argparse.Namespace) -> None:
    """B_simple at each snapshot of the reference run and the variance law at its end; one NetCDF each."""
    import torch

    from batchscope import io
    from batchscope.noise_stage import measure_snapshot, measure_variance

    spec = _spec(args, cfg.noise_slice)
    device = _runtime(spec)
    saved = torch.load(args.snapshots, map_location=device)
    workload = _workload(saved["workload"], device, args.data)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from batchscope.runtime import progress

    for i, snapshot in enumerate(progress(saved["snapshots"], desc="snapshots")):
        ds = measure_snapshot(snapshot, workload, spec, device)
        ds.attrs.update(io.provenance("measure_gradient_noise", spec, device=str(device)),
                        reference=f"B={saved['batch_size']} lr={saved['lr']} seed={saved['seed']}",
                        workload=saved["workload"]["name"])  # fmt: skip
        io.write_netcdf(ds, out_dir / f"snapshot{i}.nc")
        log.info("step %d: B_simple %.1f (per example), %.1f (two-batch)", ds.attrs["step"], float(ds["b_simple"]),
                 float(ds["two_batch_b_simple"]))  # fmt: skip
    ds = measure_variance(saved["state_dict"], workload, spec, device)  # the run's final weights
    ds.attrs.update(io.provenance("measure_gradient_noise", spec, device=str(device)),
                    workload=saved["workload"]["name"])  # fmt: skip
    io.write_netcdf(ds, out_dir / "variance.nc")
    log.info("variance law slope %.3f, corrected %.3f", float(ds["slope"]), float(ds["slope_corrected"]))


def cmd_jensen(args: argparse.Namespace) -> None:
    import torch

    from batchscope import io
    from batchscope.noise_stage import measure_jensen_linreg, measure_jensen_subspace

    if args.data is None:  # the linear-regression experiment needs no workload
        if args.spec is None:
            raise SystemExit("jensen without --data needs --spec (noise.jensen settings as JSON)")
        spec = json.loads(args.spec)
        ds = measure_jensen_linreg(spec)
        ds.attrs.update(io.provenance("measure_jensen_bias", spec), experiment="linreg")
    else:
        spec = _spec(args, cfg.jensen_slice)
        device = _runtime(spec)
        checkpoint = torch.load(args.checkpoint, map_location=device)
        settings = {**spec["jensen"], "seed": spec["seed"]}
        workload = _workload(checkpoint["workload"], device, args.data)
        ds = measure_jensen_subspace(checkpoint["state_dict"], workload, settings, device)
        ds.attrs.update(io.provenance("measure_jensen_bias", spec, device=str(device)), experiment="trained model",
                        workload=checkpoint["workload"]["name"])  # fmt: skip
    io.write_netcdf(ds, args.out)
    log.info(
        "relative bias by m: %s", dict(zip(ds["m"].values.tolist(), ds["relative_bias"].values.round(4), strict=True))
    )


def cmd_aggregate_hessian(args: argparse.Namespace) -> None:
    from batchscope import io
    from batchscope.sharpness import aggregate, reproduction_sentence

    ds = aggregate(args.hessian, args.fit, args.workload, _expect(args))
    ds.attrs.update(io.provenance("aggregate_hessian", {"workload": args.workload}))
    io.write_netcdf(ds, args.out)
    log.info(reproduction_sentence(ds))


def cmd_report(args: argparse.Namespace) -> None:
    from batchscope.report import render

    html = render(args.fits, args.notebook, args.out, args.figures, hessian_paths=args.hessian,
                  stability_paths=args.edge_of_stability, ghost_paths=args.ghost, noise_paths=args.noise,
                  expect=_expect(args), benchmarks=_pairs(args.benchmarks, "--benchmarks"))  # fmt: skip
    print(html)


def cmd_recommend(args: argparse.Namespace) -> None:
    from batchscope.recommend import CacheError, main

    config_file = args.configfile
    if config_file is None and Path(cfg.DEFAULT_CONFIG).is_file():
        config_file = cfg.DEFAULT_CONFIG  # as snakemake: the default study when no config is named
    if config_file is None and not args.all:
        raise SystemExit(f"batchscope recommend: no {cfg.DEFAULT_CONFIG} here; give --configfile FILE (the "
                         "study you ran) or --all")  # fmt: skip
    try:
        print(main(args.results, config_file, args.all, args.json))
    except CacheError as err:
        raise SystemExit(f"batchscope recommend: {err}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchscope", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, func: Callable, help_text: str, outputs: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=func)
        p.add_argument("--spec", help="the stage's config slice as JSON (what the workflow passes)")
        p.add_argument("--config", help="a study config file (instead of --spec)")
        p.add_argument("--workload", help="workload name in --config")
        p.add_argument("--out", required=True, nargs=outputs, help="output path" + ("s" if outputs else ""))
        return p

    p = sub.add_parser("validate", help="validate a config file and its data (the workflow's checks) and summarise")
    p.add_argument("config")
    p.add_argument("--results", default="results", help="where prepare_data records are reused from (default: results)")
    p.set_defaults(func=cmd_validate)

    stage("prepare-data", cmd_prepare_data, "check a workload's factory; cache a built-in dataset as NetCDF")
    p = stage("profile", cmd_profile, "time the training step at batch sizes, in interleaved rounds", outputs="+")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, nargs="+", required=True)
    p = stage("train", cmd_train, "train (lr, seed) points at one batch size; --out is a directory")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--lrs", type=float, nargs="+", required=True)
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--snapshot-lr", type=float, help="save weights along the run at this learning rate")
    p.add_argument("--snapshot-fractions", type=float, nargs="*", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p = stage("fit", cmd_fit, "fit the scaling model of one workload")
    p.add_argument("--profiles", nargs="+", required=True)
    p.add_argument("--runs", nargs="+", required=True, help="train_model output directories")
    p.add_argument("--expect", help="JSON: stage -> config hash the input files must carry (refuses others)")

    p = stage("hessian", cmd_hessian, "Hessian spectrum of checkpoints; --out is a directory")
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoints", nargs="+", required=True, help="train_model directories or .pt files")

    p = stage("edge-of-stability", cmd_edge_of_stability, "full-batch GD: lambda_max against 2/eta")
    p.add_argument("--data", required=True)
    p.add_argument("--step-size", type=float, required=True)

    p = stage("noise", cmd_noise, "gradient noise along the reference run; --out is a directory")
    p.add_argument("--data", required=True)
    p.add_argument("--snapshots", required=True, help="the reference run's .snapshots file")
    p = stage("jensen", cmd_jensen, "Jensen bias: linear regression (no --data) or a trained model's subspace")
    p.add_argument("--data")
    p.add_argument("--checkpoint", help="the trained model (.pt), with --data")
    p = stage("ghost-variance", cmd_ghost_variance, "Ghost BatchNorm: variance of ghost-batch means vs g")
    p.add_argument("--data", required=True)
    p = stage("ghost-summary", cmd_ghost_summary, "Ghost BatchNorm: the variants side by side")
    p.add_argument("--base-runs", nargs="+", required=True, help="the workload's train_model directories")
    p.add_argument("--ghost-runs", nargs="+", required=True, help="GHOST_SIZE=DIR for each ghost training dir")
    p.add_argument("--base-profile", required=True, help="the workload's profile at the large batch")
    p.add_argument("--ghost-profiles", nargs="+", required=True, help="GHOST_SIZE=FILE")
    p.add_argument("--variance", required=True)
    p.add_argument("--base-hessian", nargs="*", default=[])
    p.add_argument("--ghost-hessian", nargs="*", default=[], help="GHOST_SIZE=DIR")

    p = sub.add_parser("aggregate-hessian", help="aggregate a workload's Hessian results")
    p.set_defaults(func=cmd_aggregate_hessian)
    p.add_argument("--workload", required=True)
    p.add_argument("--fit", required=True, help="the workload's fit_scaling result (best lr, gaps)")
    p.add_argument("--hessian", nargs="+", required=True, help="analyze_hessian output directories")
    p.add_argument("--out", required=True)
    p.add_argument("--expect", help="JSON: stage -> config hash the input files must carry (refuses others)")

    p = sub.add_parser("recommend", help="the recommended batch size and learning rate, from the cached fits")
    p.set_defaults(func=cmd_recommend)
    p.add_argument("results", nargs="?", default="results", help="a results directory (or its fit/ directory)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--configfile", help=f"the study's config, as given to snakemake (default: {cfg.DEFAULT_CONFIG}, as "
                   "snakemake's)")  # fmt: skip
    p.add_argument("--all", action="store_true", help="every cached fit, labelled by config hash")

    p = sub.add_parser("report", help="execute the report notebook and write HTML")
    p.set_defaults(func=cmd_report)
    p.add_argument("--fits", nargs="+", required=True)
    p.add_argument("--expect", help='JSON: {"fit_scaling": {workload: config hash}}; other fits are refused')
    p.add_argument("--hessian", nargs="*", default=[], help="aggregate_hessian outputs (optional)")
    p.add_argument("--edge-of-stability", nargs="*", default=[], help="edge_of_stability outputs (optional)")
    p.add_argument("--ghost", nargs="*", default=[], help="summarize_ghost outputs (optional)")
    p.add_argument("--noise", nargs="*", default=[], help="gradient-noise directories and Jensen files (optional)")
    p.add_argument("--benchmarks", nargs="*", default=[], help="RULE=FILE: Snakemake benchmark files, for the "
                   "stages' share of the compute (optional)")  # fmt: skip
    p.add_argument("--notebook", required=True)
    p.add_argument("--out", required=True, help="output HTML path")
    p.add_argument("--figures", required=True, help="directory for the figure PNGs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.command == "fit" and args.workload is None:  # it names the output's workload, even with --spec
        raise SystemExit("fit: --workload is required")
    start = time.perf_counter()
    try:
        args.func(args)
    except (cfg.ConfigError, ValueError) as err:
        # bad input (config, data files, a workload factory, a batch size over the data): the message names it
        from batchscope.data import DataError
        from batchscope.io import CacheError
        from batchscope.workload import WorkloadError

        if not isinstance(err, cfg.ConfigError | DataError | WorkloadError | CacheError):
            raise
        print(f"batchscope: {err}", file=sys.stderr)
        return 2
    log.debug("%s took %.2f s", args.command, time.perf_counter() - start)
    return 0
