"""Stages ``analyze_hessian`` and ``aggregate_hessian``: the curvature of every trained checkpoint
(:mod:`batchscope.measure.hessian`), one NetCDF per checkpoint, and its aggregate per workload: lambda_max and
trace against the batch size at each batch size's best learning rate, and how sharpness relates to the batch size
and to the generalization gap (Spearman's rho), the comparison of Keskar et al. 2017.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from batchscope import config as cfg
from batchscope.stages import Command, Rule, _common
from batchscope.store import netcdf_files, read_expected, same_provenance

log = logging.getLogger("batchscope")


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """The Hessian stage's own settings only, so changing hessian.* reruns no training."""
    settings = {k: v for k, v in config["hessian"].items() if k != "enabled"}
    return {**settings, **cfg.execution(config)}


def aggregate(hessian_paths: Sequence[str | Path], fit_path: str | Path, workload: str,
              expect: dict[str, str] | None = None) -> xr.Dataset:  # fmt: skip
    """Concatenate a workload's per-checkpoint results and relate sharpness to batch size and generalization.

    ``hessian_paths`` are analyze_hessian output directories (or files); ``fit_path`` the workload's
    fit_scaling result, which holds every run's generalization gap and, computed there once, each batch size's
    best learning rate (``best_lr``) and which runs used it (``run_at_best_lr``). ``expect``: stage -> config
    hash the inputs must carry (the workflow's).
    """
    parts, datasets = [], []
    files = netcdf_files(hessian_paths, "Hessian results")
    for path in files:
        ds = read_expected(path, "analyze_hessian", RULES["analyze_hessian"].variables, expect)
        datasets.append(ds)
        keys = {f"run_{k}": ("run", [ds.attrs[k]]) for k in ("batch_size", "lr", "seed")}
        parts.append(ds.drop_vars(["slq_nodes", "slq_weights"]).expand_dims("run").assign_coords(keys))
    same_provenance(datasets, files, "Hessian results")
    runs = xr.concat(parts, dim="run", combine_attrs="drop_conflicts")
    runs = runs.sortby(["run_batch_size", "run_lr", "run_seed"])
    runs = runs.assign_coords(run=np.arange(runs.sizes["run"]))

    fit = read_expected(fit_path, "fit_scaling", ("best_lr", "run_at_best_lr", "gap_accuracy", "gap_loss"), expect)
    keys_of = ("run_batch_size", "run_lr", "run_seed")
    trained = list(zip(*(fit[k].values for k in keys_of), strict=True))
    gap_name = "gap_accuracy" if np.isfinite(fit["gap_accuracy"].values).any() else "gap_loss"
    gap_of = dict(zip(trained, fit[gap_name].values, strict=True))
    best_of = dict(zip(trained, fit["run_at_best_lr"].values.astype(bool), strict=True))
    keys = list(zip(*(runs[k].values for k in keys_of), strict=True))
    runs["gap"] = ("run", np.array([gap_of.get(key, np.nan) for key in keys]), {"long_name": gap_name})
    at_best = np.array([best_of.get(key, False) for key in keys])
    runs["at_best_lr"] = ("run", at_best, {"long_name": "the run used its batch size's best learning rate"})
    stop_at_target = int(fit.attrs.get("stop_at_target", 0))

    grid_b = fit["batch_size"].values
    per_b = {name: np.full((len(grid_b), 3), np.nan) for name in ("lambda_max", "trace")}
    for i, b in enumerate(grid_b):
        mask = at_best & (runs["run_batch_size"].values == b)
        for name in per_b:
            values = runs[name].values[mask]
            values = values[np.isfinite(values)]
            if len(values):
                per_b[name][i] = [np.median(values), values.min(), values.max()]
    out = xr.Dataset(
        {
            f"{name}_at_best_lr": (
                ("batch_size", "summary"),
                table,
                {"long_name": f"{name}, seeds at the best lr"},
            )
            for name, table in per_b.items()
        },
        coords={"batch_size": grid_b, "summary": ["median", "min", "max"]},
    )
    best = at_best & np.isfinite(runs["lambda_max"].values)
    b_rho, b_p = spearman(runs["run_batch_size"].values[best], runs["lambda_max"].values[best])
    gap_ok = best & np.isfinite(runs["gap"].values)
    g_rho, g_p = spearman(runs["lambda_max"].values[gap_ok], runs["gap"].values[gap_ok])
    out["rho_batch_size_sharpness"] = ((), b_rho, {"long_name": "Spearman rho(B, lambda_max), best-lr runs"})
    out["p_batch_size_sharpness"] = ((), b_p)
    out["rho_sharpness_gap"] = (
        (),
        g_rho,
        {"long_name": f"Spearman rho(lambda_max, {gap_name}), best-lr runs"},
    )
    out["p_sharpness_gap"] = ((), g_p)
    out["n_runs_compared"] = ((), int(best.sum()))
    out["larger_batch_sharper"] = ((), bool(b_rho > 0 and b_p < 0.05))
    merged = xr.merge([out, runs], combine_attrs="drop_conflicts")
    # the target's metric in words, for the sentence on checkpoints taken at it (val_loss: "validation loss")
    metric = str(fit.attrs["target_metric"]).removeprefix("val_")
    if metric == "metric":  # a factory's own metric, by the name it gave it
        metric = fit.attrs.get("metric_name") or "metric"
    merged.attrs.update(workload=workload, gap_metric=gap_name, stop_at_target=stop_at_target,
                        target=f"validation {metric} {float(fit.attrs['target_value']):g}")  # fmt: skip
    return merged


def spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value, as ``scipy.stats.spearmanr`` gives them (the tests compare): the
    Pearson correlation of the average ranks, and the t test on n - 2 degrees of freedom. Written out because
    importing scipy.stats costs 0.7 s, half of this job's time; ranks come from pandas (which xarray imports) and
    the t distribution from scipy.special (0.1 s)."""
    import pandas as pd
    from scipy.special import stdtr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    rank_a, rank_b = (pd.Series(np.asarray(x, dtype=float)).rank().to_numpy() for x in (a, b))
    rho = float(np.clip(np.corrcoef(rank_a, rank_b)[0, 1], -1.0, 1.0))
    dof = len(a) - 2
    if abs(rho) == 1.0:
        return rho, 0.0
    t = abs(rho) * math.sqrt(dof / ((1.0 - rho) * (1.0 + rho)))
    return rho, float(2.0 * stdtr(dof, -t))


def reproduction_sentence(ds: xr.Dataset) -> str:
    """Whether this run reproduced "larger batch -> sharper minimum", with the evidence."""
    rho, p, n = (
        float(ds["rho_batch_size_sharpness"]),
        float(ds["p_batch_size_sharpness"]),
        int(ds["n_runs_compared"]),
    )
    verdict = "reproduced" if bool(ds["larger_batch_sharper"]) else "did not reproduce"
    gap_rho = float(ds["rho_sharpness_gap"])
    sentence = (
        f'For {ds.attrs["workload"]}, this run {verdict} "larger batch -> sharper minimum": Spearman\'s rho '
        f"between the batch size and lambda_max is {rho:.2f} (p = {p:.2g}, {n} runs at each batch size's "
        f"best learning rate); between lambda_max and the generalization gap it is {gap_rho:.2f}."
    )
    if ds.attrs.get("stop_at_target"):
        sentence += (
            " The checkpoints were taken when each run first reached the target (stop_at_target: true), at "
            f"equal {ds.attrs['target']} rather than at convergence as in Keskar et al.; set stop_at_target: "
            "false to measure the minima that training converges to."
        )
    return sentence


def run(args: argparse.Namespace) -> None:
    """Analyse every checkpoint (.pt) in the given train_model directories; one NetCDF per checkpoint."""
    import torch

    from batchscope import store
    from batchscope.engine.runtime import progress
    from batchscope.measure.hessian import analyze

    spec = _common.spec(args, config_slice)
    device = _common.runtime(spec)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workloads: dict = {}
    checkpoints = [p for d in map(Path, args.checkpoints) for p in (sorted(d.glob("*.pt")) if d.is_dir() else [d])]
    if not checkpoints:
        raise SystemExit(f"no checkpoints (.pt) in {' '.join(args.checkpoints)}")
    reused = 0
    for path in progress(checkpoints, desc="checkpoints"):
        checkpoint = torch.load(path, map_location=device)
        out = out_dir / f"B{checkpoint['batch_size']}_{path.stem}.nc"
        kept = _reuse_file(args.reuse, checkpoint, spec)
        if kept is not None and kept.is_file():
            try:  # the same checkpoint's bytes, analysed with the same settings and algorithm version
                store.write_netcdf(store.read_netcdf(kept, "analyze_hessian", RULES["analyze_hessian"].variables,
                                                     cfg.config_hash(spec)), out)  # fmt: skip
                reused += 1
                continue
            except store.CacheError:
                pass  # damaged or foreign: analysed again below, and replaced
        workload = _common.workload(checkpoint["workload"], device, args.data, workloads)
        ds = analyze(checkpoint, workload, spec, device)
        ds.attrs.update(store.provenance("analyze_hessian", spec, device=str(device)))
        store.write_netcdf(ds, out)
        if kept is not None:
            store.write_netcdf(ds, kept)
        log.info(
            "%s: lambda_max=%.4g trace=%.4g+-%.2g, %d HVPs, %.2f s%s", path, float(ds["lambda_max"]),
            float(ds["trace"]), float(ds["trace_se"]),
            int(ds["n_hvp_top"] + ds["n_hvp_trace"] + ds["n_hvp_slq"]),
            float(np.nansum([ds["time_top"], ds["time_trace"], ds["time_slq"]])),
            f" (skipped: {ds.attrs['skipped']})" if ds.attrs["skipped"] else "",
        )  # fmt: skip
    log.info("%d of %d checkpoints analysed before with these settings: reused", reused, len(checkpoints))


def _reuse_file(directory: str | None, checkpoint: dict, spec: dict) -> Path | None:
    """Where a checkpoint's analysis is kept for reuse, named by what decides it: the checkpoint's weights and
    workload, the stage's config slice and its algorithm version (not the file's bytes: a rewritten file of the
    same weights differs in its archive's name). The job analyses a (workload, seed)'s checkpoints at every batch
    size (job starts cost more than a checkpoint's analysis), so adding a batch size reruns it; the checkpoints it
    analysed before are then read back, not analysed again (on a GPU study, hours)."""
    import torch

    if directory is None:
        return None
    digest = hashlib.sha256(json.dumps(checkpoint["workload"], sort_keys=True).encode())
    for name, tensor in sorted(checkpoint["state_dict"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(f"{cfg.config_hash(spec)}:{RULES['analyze_hessian'].version}".encode())
    return Path(directory) / f"{digest.hexdigest()[:24]}.nc"


def run_aggregate(args: argparse.Namespace) -> None:
    from batchscope import store

    ds = aggregate(args.hessian, args.fit, args.workload, _common.expect(args))
    ds.attrs.update(store.provenance("aggregate_hessian", {"workload": args.workload}))
    store.write_netcdf(ds, args.out)
    log.info(reproduction_sentence(ds))


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="train_model directories or .pt files")
    parser.add_argument("--reuse", help="a directory where each checkpoint's analysis is kept, by content, for reuse")


def _aggregate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", required=True)
    parser.add_argument("--fit", required=True, help="the workload's fit_scaling result (best lr, gaps)")
    parser.add_argument("--hessian", nargs="+", required=True, help="analyze_hessian output directories")
    parser.add_argument("--out", required=True)
    _common.add_expect(parser)


RULES = {
    "analyze_hessian": Rule(version=3, config_slice=config_slice, variables=("lambda_max", "trace", "density")),
    "aggregate_hessian": Rule(version=3, variables=("lambda_max",)),
}
COMMANDS = (
    Command("hessian", "Hessian spectrum of checkpoints; --out is a directory", run, _arguments, spec=config_slice),
    Command("aggregate-hessian", "aggregate a workload's Hessian results", run_aggregate, _aggregate_arguments),
)
