"""Pipeline benchmark: the default study end to end, a no-op rerun, a report-only rebuild, and how well the
profiled step time T_iter(B) predicts the step time training actually pays.

Runs in a fresh temporary working directory with config/config.yaml, prints a table and writes
benchmarks/results/pipeline.json. Targets (issue: "The default batch-size study runs end to end"):
study <= 120 s, no-op <= 3 s, report-only <= 30 s, training step / profiled step <= 1.15 at every B; and
(issue "Your study as you type it") the analyses' share of the study's job time <= 30%, here and on the example
(``--config examples/own_workload/config.yaml``, run with the example package on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "pipeline.json"
TARGETS = {"study_s": 120.0, "noop_s": 3.0, "report_only_s": 30.0, "step_over_profile_max": 1.15,
           "analysis_share": 0.30}  # fmt: skip
CONFIG = REPO / "config" / "config.yaml"


def snakemake(workdir: Path, *args: str) -> float:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    cmd = [
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        "all",
        "--quiet",
        *args,
        "--configfile",
        str(CONFIG),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return time.perf_counter() - start


def step_ratios(fit_path: Path) -> dict[str, dict[int, float]]:
    """Per batch size: median over runs of (training step time / profiled median step time).

    ``steady``: the runs' steady-state step time (first step after each evaluation left out);
    ``all_steps``: train_time / steps_done, which includes that post-evaluation cache refill.
    """
    from batchscope.store import read_netcdf

    ds = read_netcdf(fit_path)
    profiled = dict(zip(ds["profile_batch_size"].values.tolist(), ds["profile_t_iter_median"].values, strict=True))
    b = ds["run_batch_size"].values
    steady = ds["step_time_median"].values
    all_steps = ds["train_time"].values / ds["steps_done"].values
    out: dict[str, dict[int, float]] = {"steady": {}, "all_steps": {}}
    for size in sorted(set(b.tolist())):
        mask = b == size
        out["steady"][size] = float(np.median(steady[mask]) / profiled[size])
        out["all_steps"][size] = float(np.median(all_steps[mask]) / profiled[size])
    return out


def analysis_share(workdir: Path) -> tuple[float, dict[str, float]]:
    """The analyses' share of the job time (the report's classification, ``figures.ANALYSIS_RULES``), and each
    stage's seconds, from Snakemake's benchmark files (the rule is the first folder under results/benchmarks/,
    Snakemake's layout for this workflow)."""
    from batchscope.figures import stage_costs

    root = workdir / "results" / "benchmarks"
    by_rule = {}
    for entry in sorted(root.iterdir()):  # a folder per rule, or one file for a rule with a single job
        rule = entry.name.removesuffix(".tsv")
        if rule != "render_report":
            by_rule[rule] = sorted(map(str, entry.rglob("*.tsv"))) if entry.is_dir() else [str(entry)]
    costs = stage_costs(by_rule)
    seconds = dict(zip(costs["stage"], costs["seconds"], strict=True))
    return float(costs.loc[costs["kind"] == "analysis", "share"].sum()), seconds


def default_study_checks(fit_path: Path) -> dict[str, object]:
    """What the default config must show: every B reaches the target, and b_opt lies inside the grid."""
    from batchscope.store import read_netcdf

    ds = read_netcdf(fit_path)
    grid = ds["batch_size"].values
    b_opt = float(ds["b_opt"])
    return {
        "b_opt": round(b_opt, 1),
        "b_opt_ci": [round(float(x), 1) for x in ds["b_opt_ci"].values],
        "fastest_batch_size": int(ds["fastest_batch_size"]),
        "indistinguishable": [int(b) for b in grid[ds["indistinguishable"].values.astype(bool)]],
        "b_crit": round(float(ds["b_crit"]), 1),
        "b_opt_inside_grid": bool(grid.min() < b_opt < grid.max()),
        "every_batch_size_reached_target": bool(np.isfinite(ds["k"].values).all()),
    }


def main() -> None:
    global CONFIG
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="the study (default: config/config.yaml)")
    CONFIG = parser.parse_args().config.resolve()
    with tempfile.TemporaryDirectory(prefix="batchscope-bench-") as tmp:
        workdir = Path(tmp)
        study_s = snakemake(workdir)
        share, stage_seconds = analysis_share(workdir)
        noop_s = snakemake(workdir)
        report_only_s = snakemake(workdir, "--forcerun", "render_report", "render_report")
        fit_path = sorted((workdir / "results" / "fit").glob("*.nc"))[0]
        ratios = step_ratios(fit_path)
        science = default_study_checks(fit_path)
    result = {
        "study_s": round(study_s, 2),
        "noop_s": round(noop_s, 2),
        "report_only_s": round(report_only_s, 2),
        "step_over_profile_max": round(max(ratios["steady"].values()), 3),
        "step_over_profile_max_all_steps": round(max(ratios["all_steps"].values()), 3),
        "step_over_profile": {str(k): round(v, 3) for k, v in ratios["steady"].items()},
        "step_over_profile_all_steps": {str(k): round(v, 3) for k, v in ratios["all_steps"].items()},
        "analysis_share": round(share, 3),
        # beside it, the share with the gradient-noise stage counted as analysis, as before it fed the quick estimate
        "analysis_share_noise_included": round(
            share + stage_seconds.get("measure_gradient_noise", 0.0) / sum(stage_seconds.values()), 3
        ),
        "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()},
        "config": str(CONFIG.relative_to(REPO)) if CONFIG.is_relative_to(REPO) else str(CONFIG),
        **science,
        "cpu_count": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(f"{'measure':<34}{'value':>10}{'target':>10}  ok")
    for key, target in TARGETS.items():
        print(f"{key:<34}{result[key]:>10}{target:>10}  {'yes' if result[key] <= target else 'NO'}")
    for key in ("step_over_profile_max_all_steps", "analysis_share_noise_included"):
        print(f"{key:<34}{result[key]:>10}{'-':>10}")
    for key in (
        "b_opt",
        "b_opt_ci",
        "fastest_batch_size",
        "indistinguishable",
        "b_opt_inside_grid",
        "every_batch_size_reached_target",
    ):
        print(f"{key:<34}{result[key]!s:>10}")
    print("\nB      train step / profiled step (steady, all steps)")
    for size in ratios["steady"]:
        print(f"{size:<7}{ratios['steady'][size]:>8.3f}{ratios['all_steps'][size]:>8.3f}")
    default = CONFIG == REPO / "config" / "config.yaml"
    out = RESULTS if default else RESULTS.with_name(f"pipeline-{CONFIG.parent.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
