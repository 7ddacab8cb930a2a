"""Budget benchmark: is the adaptive study's answer the full grid's, at a fraction of its cost? And the quick
estimate's?

Six workloads, three data sets each twice:

- the default digits MLP of config/config.yaml, the spirals example of examples/own_workload on a wider grid, and
  the built-in ``teacher`` data set (benchmarks/configs/teacher.yaml), as they ship: runs of 0.01 to 0.3 s;
- the same three data sets at a run length that weighs beside a process start (benchmarks/configs/digits_wide.yaml,
  spirals_wide.yaml, teacher_wide.yaml: wider models, more data or stricter targets; runs of 0.3 to 2 s, where
  a job's process start is about 1.5 s).

For each it runs the full grid (``study: full``) and the adaptive study (``study: adaptive``), each in a fresh
temporary working directory up to the fit (``snakemake results/fit/WORKLOAD.nc``), with the analyses that are not
part of the answer off (Hessian, Ghost BatchNorm, edge of stability, branches; the noise stage's own results: the
quick estimate still measures B_noise along its reference run). The quick estimate is the adaptive study's first
stage, read from its directory (``results/quick``): a separate run would repeat the same jobs.

Reported per workload:

- the quick b_opt over the full grid's measured best B (``fastest_batch_size``: the argmin of the time to target
  from the profile); target: within 2x;
- the adaptive study's recommended B against the full grid's, in grid steps (log2 of their ratio on these
  power-of-two grids); target: within one step;
- the adaptive study's compute as a fraction of the full grid's: the fits' ``total_cost_s``, the sum of the
  Snakemake benchmark files' ``s`` (wall seconds) of the jobs each answer needed (the adaptive study's includes the
  quick estimate's jobs and the choice); target: <= 35%. Beside it, the same jobs' CPU seconds (wall seconds on a
  shared machine include waiting for a core), the training runs each trained (the adaptive study's reference run
  included) and the seconds those runs took (their own ``wall_time``), which leave the jobs' process starts out:
  what the fraction tends to when a run takes minutes rather than a tenth of a second.

Last, the quick estimate on a long reference run (benchmarks/configs/teacher_long.yaml, ``snakemake quick`` alone,
about a minute of training): its cost in reference runs, target <= 1.5. On the three workloads above a training run
takes 0.03 to 0.3 s, so there the quick estimate's cost is its jobs' process starts, whatever the method; so is
the adaptive study's: its fixed jobs (prepare, profile, reference run, noise, quick estimate, two checkpoints) are
seven process starts before it trains anything, against the full grid's two, so on runs much shorter than a start
its fraction cannot fall far below (7 + its training jobs) / (2 + the grid's training jobs). The wide rows' runs
take about a start each, which is where the fraction starts to measure the method.

Any study config runs the same comparison (``--config their.yaml``, a row per workload, its own factories importable
as for Snakemake): the grid, seeds and learning rates as the file gives them, the two studies and the quick
estimate as above. Its results go to benchmarks/results/budget-STEM.json, beside the three workloads'.

Prints a table and writes benchmarks/results/budget.json. Needs no package beyond the project's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from batchscope import config as cfg

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "budget.json"
EXAMPLE = REPO / "examples" / "own_workload"
TARGETS = {"quick_over_best": 2.0, "adaptive_grid_steps": 1, "cost_fraction": 0.35, "quick_in_reference_runs": 1.5}
LONG = REPO / "benchmarks" / "configs" / "teacher_long.yaml"
# the analyses that explain the answer rather than produce it: off, so each study costs what its answer needs
ANALYSES_OFF = {
    "hessian": {"enabled": False},
    "ghost": {"enabled": False},
    "edge_of_stability": {"enabled": False},
    "branch": {"enabled": False},
}


def digits() -> dict:
    """The default study (config/config.yaml) as it is."""
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def spirals() -> dict:
    """The example's in-memory spirals workload (examples/own_workload/config.yaml), on a grid wide enough to
    choose a bracket from and to hold its fastest size (the example's own grid is two sizes), evaluated often
    enough to tell neighbouring sizes apart."""
    config = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    config["workloads"] = {"spirals": config["workloads"]["spirals"]}
    # up to 1024 (half the data): on a grid up to 512 the full fit said its largest size was the fastest ("the
    # optimum may lie beyond it"), so the grid could not name a best batch size to compare with
    config["grid"] = {"batch_sizes": [16, 32, 64, 128, 256, 512, 1024], "seeds": [0, 1]}
    # steps to the target at the large sizes are 40 to 60: counted in the example's 20-step evaluation intervals
    # they are resolved to a third, which decides the fastest size by one interval; 5 resolves them to a tenth
    config["workloads"]["spirals"]["eval_interval"] = 5
    # up to 0.3: with 0.1 the largest, the full fit said the largest learning rate won at B = 256 and 512
    config["workloads"]["spirals"]["lr_scaling"]["base_lrs"] = [0.01, 0.03, 0.1, 0.3]
    config["profile"].update(rounds=4, repeats=2, min_repeat_time=0.01, warmup=10)
    config["fit"]["bootstrap"] = 200
    # the noise settings the quick estimate has by default: the example cuts them (10 pairs) to run in seconds,
    # which leaves B_noise at one snapshot to a handful of minibatch pairs
    config["noise"] = {key: value for key, value in config["noise"].items() if key not in ("pairs", "variance_draws")}
    return config


def teacher() -> dict:
    return yaml.safe_load((REPO / "benchmarks" / "configs" / "teacher.yaml").read_text())


def wide(name: str):
    """A data set above at a run length that weighs beside a process start (configs/NAME.yaml)."""
    return lambda: yaml.safe_load((REPO / "benchmarks" / "configs" / f"{name}.yaml").read_text())


STUDIES = {
    "digits_mlp": digits,
    "spirals": spirals,
    "teacher_mlp": teacher,
    "digits_wide": wide("digits_wide"),
    "spirals_wide": wide("spirals_wide"),
    "teacher_wide": wide("teacher_wide"),
}


def study_config(base: dict, study: str) -> dict:
    config = json.loads(json.dumps(base))
    config["study"] = study
    for key, value in ANALYSES_OFF.items():
        config[key] = {**(config.get(key) or {}), **value}
    config["noise"] = {**(config.get("noise") or {}), "enabled": False}  # its own results; quick still measures B_noise
    return config


def snakemake(workdir: Path, config_path: Path, target: str | list[str], cores: int) -> float:
    # absolute: the jobs run in the working directory, where a PYTHONPATH relative to here would name nothing
    user = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    path = os.pathsep.join([str(EXAMPLE), *user])
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], PYTHONPATH=path)
    # the target first: --configfile and --quiet both take several values and would swallow it
    targets = [target] if isinstance(target, str) else target
    cmd = ["snakemake", *targets, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", str(cores),
           "--configfile", str(config_path), "--quiet"]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def cpu_seconds(workdir: Path) -> float:
    """The CPU seconds (Snakemake's ``cpu_time``) of every job the answer needed: each job this run ran but the fit.
    Wall seconds on this shared machine include waiting for a core; CPU seconds do not."""
    total = 0.0
    for path in (workdir / "results" / "benchmarks").rglob("*.tsv"):
        if path.parent.name == "fit_scaling":
            continue
        header, *rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines() if line.strip()]
        total += float(rows[-1][header.index("cpu_time")])
    return total


def answer(workdir: Path, workload: str) -> dict:
    from batchscope.store import read_netcdf

    ds = read_netcdf(workdir / "results" / "fit" / f"{workload}.nc")
    # the runs' own clock: the adaptive study's reference run (the quick estimate's) counts too, once: where its
    # batch size was chosen its record was copied, byte for byte, into the grid's
    reference = []
    for path in sorted((workdir / "results" / "reference" / workload).glob("*.nc")):
        record = read_netcdf(path)
        grid = workdir / "results" / "train" / workload / f"B{record.attrs['batch_size']}"
        copy = grid / f"seed{record.attrs['seed']}" / path.name
        if not (copy.is_file() and copy.read_bytes() == path.read_bytes()):
            reference.append(record)
    run_seconds = float(np.nansum(ds["wall_time"].values)) + sum(float(r["wall_time"]) for r in reference)
    same = ds["batch_size"].values[ds["indistinguishable"].values.astype(bool)]
    pruned = ds["pruned"].values.astype(bool) if "pruned" in ds else np.zeros(ds.sizes["run"], bool)
    return {
        "trained": [int(b) for b in ds["batch_size"].values],
        "fastest": int(ds["fastest_batch_size"]),
        "as_fast": [int(b) for b in same],
        "b_opt": round(float(ds["b_opt"]), 1),
        "best_lr": float(ds["best_lr"].sel(batch_size=int(ds["fastest_batch_size"]))),
        "cost_s": round(float(ds["total_cost_s"]), 2),
        "cpu_s": round(cpu_seconds(workdir), 2),
        "cost_by_job": {str(j): round(float(s), 2) for j, s in zip(ds["job"].values, ds["cost_s"].values, strict=True)},
        "runs": int(ds.sizes["run"]) + len(reference),
        "pruned_runs": int(pruned.sum()),
        "run_seconds": round(run_seconds, 2),
        "warnings": len(json.loads(ds.attrs.get("diagnostics", "[]"))),
    }


def quick_answer(workdir: Path, workload: str) -> dict:
    from batchscope.store import read_netcdf

    ds = read_netcdf(workdir / "results" / "quick" / f"{workload}.nc")
    return {
        "b_opt": round(float(ds["b_opt"]), 1),
        "b_opt_band": [round(float(x), 1) for x in ds["b_opt_band"].values],
        "b_opt_sat": round(float(ds["b_opt_sat"]), 1),  # the saturating step time's, and its knee
        "sat_b_knee": round(float(ds["sat_b_knee"]), 1),
        "cost_s": round(float(ds["total_cost_s"]), 2),
    }


def grid_steps(a: int, b: int, grid: list[int]) -> int:
    """How many grid sizes apart two batch sizes are."""
    return abs(grid.index(a) - grid.index(b))


def from_config(path: Path) -> dict[str, dict]:
    """A study config's workloads, each as a study of its own (the file's other settings kept)."""
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or not config.get("workloads"):
        raise SystemExit(f"--config {path}: no workloads in it")
    studies = {}
    for name, spec in config["workloads"].items():
        study = {**config, "workloads": {name: spec}}
        for key in ("edge_of_stability", "ghost"):  # analyses off here; a block naming another workload is dropped
            if isinstance(study.get(key), dict) and study[key].get("workload") not in (None, name):
                study[key] = {k: v for k, v in study[key].items() if k != "workload"}
        studies[name] = study
    return studies


def run_workload(workload: str, base: dict, cores: int, keep: Path | None) -> dict:
    grid = sorted(base["grid"]["batch_sizes"])
    row: dict = {"workload": workload, "grid": grid, "seeds": sorted(base["grid"].get("seeds", [0]))}
    with tempfile.TemporaryDirectory(prefix=f"batchscope-budget-{workload}-") as tmp:
        root = keep / workload if keep else Path(tmp)
        for study in ("full", "adaptive"):
            workdir = root / study
            workdir.mkdir(parents=True, exist_ok=True)
            config_path = workdir / "config.yaml"
            config_path.write_text(yaml.safe_dump(study_config(base, study)))
            # the config as changed here is refused by name before any job (its factories: by the workflow, on the
            # PYTHONPATH the jobs get)
            cfg.load(config_path, importable=False)
            seconds = snakemake(workdir, config_path, f"results/fit/{workload}.nc", cores)
            row[study] = {"wall_s": round(seconds, 1), **answer(workdir, workload)}
            print(f"  {workload} {study}: {seconds:.0f} s, fastest B {row[study]['fastest']}", flush=True)
        row["quick"] = quick_answer(root / "adaptive", workload)
    full, adaptive, quick = row["full"], row["adaptive"], row["quick"]
    row["quick_over_best"] = round(quick["b_opt"] / full["fastest"], 3)
    # beside the ratio: against the nearest of the sizes the full grid cannot tell from its fastest (the
    # argmin among them is timing noise), and against the full fit's own b_opt
    row["quick_over_as_fast"] = round(
        min((quick["b_opt"] / b for b in full["as_fast"]), key=lambda r: abs(math.log(r))), 3
    )
    row["quick_over_full_b_opt"] = round(quick["b_opt"] / full["b_opt"], 3)
    row["adaptive_log2_steps"] = round(math.log2(adaptive["fastest"] / full["fastest"]), 3)
    row["adaptive_grid_steps"] = grid_steps(adaptive["fastest"], full["fastest"], grid)
    row["adaptive_in_full_as_fast"] = adaptive["fastest"] in full["as_fast"]
    row["cost_fraction"] = round(adaptive["cost_s"] / full["cost_s"], 3)
    row["cpu_fraction"] = round(adaptive["cpu_s"] / full["cpu_s"], 3)
    row["runs_fraction"] = round(adaptive["runs"] / full["runs"], 3)
    row["run_seconds_fraction"] = round(adaptive["run_seconds"] / full["run_seconds"], 3)
    row["met"] = {
        "quick_within_2x": 1 / TARGETS["quick_over_best"] <= row["quick_over_best"] <= TARGETS["quick_over_best"],
        "adaptive_within_one_step": row["adaptive_grid_steps"] <= TARGETS["adaptive_grid_steps"],
        "adaptive_cost_le_35pct": row["cost_fraction"] <= TARGETS["cost_fraction"],
    }
    return row


def quick_on_a_long_run(cores: int, keep: Path | None) -> dict:
    """``snakemake quick`` alone on benchmarks/configs/teacher_long.yaml, whose reference run takes about a minute:
    the quick estimate's cost in reference runs where its fixed costs (process starts, the profile) weigh what they
    would beside a real run. Beside the issue's figure (every job the estimate needed, prepare_data included), the
    same without prepare_data (the data, which every study prepares) and the noise measurement's own share."""
    from batchscope.store import read_netcdf

    with tempfile.TemporaryDirectory(prefix="batchscope-budget-long-") as tmp:
        workdir = keep / "teacher_long" if keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        seconds = snakemake(workdir, LONG, "quick", cores)
        ds = read_netcdf(workdir / "results" / "quick" / "teacher_long.nc")
        (reference,) = (workdir / "results" / "reference" / "teacher_long").glob("*.nc")
        run_s = float(read_netcdf(reference)["wall_time"])
        by_job = {str(j): round(float(c), 2) for j, c in zip(ds["job"].values, ds["cost_s"].values, strict=True)}
    reference_s = by_job["train_reference"]
    row = {
        "wall_s": round(seconds, 1),
        "cost_by_job": by_job,
        "cost_s": round(float(ds["total_cost_s"]), 2),
        "in_reference_runs": round(float(ds["cost_in_reference_runs"]), 3),
        "without_prepare": round((float(ds["total_cost_s"]) - by_job["prepare_data"]) / reference_s, 3),
        "noise_over_reference": round(by_job["measure_gradient_noise"] / reference_s, 3),
        "reference_run_s": round(run_s, 2),
        "pairs": int(ds.attrs["pairs"]),
        "pairs_cost_share": round(float(ds.attrs["cost_share"]), 3),
        "b_opt": round(float(ds["b_opt"]), 1),
        "b_opt_ci": [round(float(x), 1) for x in ds["b_opt_ci"].values],
    }
    row["met"] = row["in_reference_runs"] <= TARGETS["quick_in_reference_runs"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the working directories under this folder")
    parser.add_argument("--no-long", action="store_true", help="leave out the quick estimate on a long run")
    parser.add_argument("--config", type=Path, help="compare on this study config's workloads instead (their own "
                        "grid; results to budget-STEM.json; no long-run row)")  # fmt: skip
    args = parser.parse_args()
    start = time.perf_counter()
    if args.config:
        cfg.load(args.config)  # a bad config is refused by name before anything runs
        studies, results = from_config(args.config), RESULTS.with_name(f"budget-{args.config.stem}.json")
    else:
        studies, results = {w: STUDIES[w]() for w in args.workloads}, RESULTS
    rows = [run_workload(workload, base, args.cores, args.keep) for workload, base in studies.items()]
    long = None if args.no_long or args.config else quick_on_a_long_run(args.cores, args.keep)
    print(f"\n{'workload':<13}{'best B':>7}{'quick b_opt':>12}{'quick/best':>11}{'adaptive B':>11}{'steps':>6}"
          f"{'trained':>22}{'cost full':>10}{'adaptive':>9}{'fraction':>9}{'cpu':>6}{'runs':>6}"
          f"{'run-s':>7}{'q/as-fast':>10}{'q/fit':>7}")  # fmt: skip
    for r in rows:
        full, adaptive = r["full"], r["adaptive"]
        print(f"{r['workload']:<13}{full['fastest']:>7}{r['quick']['b_opt']:>12.0f}{r['quick_over_best']:>11.2f}"
              f"{adaptive['fastest']:>11}{r['adaptive_grid_steps']:>6}{', '.join(map(str, adaptive['trained'])):>22}"
              f"{full['cost_s']:>9.0f}s{adaptive['cost_s']:>8.0f}s{r['cost_fraction']:>9.0%}"
              f"{r['cpu_fraction']:>6.0%}{r['runs_fraction']:>6.0%}{r['run_seconds_fraction']:>7.0%}"
              f"{r['quick_over_as_fast']:>10.2f}{r['quick_over_full_b_opt']:>7.2f}")  # fmt: skip
    print(
        "\ntargets: quick within 2x of the full grid's best B; adaptive within one grid step of it at <= 35% of "
        "its compute (fraction: the answer jobs' wall seconds; cpu: their CPU seconds; runs: training runs, the "
        "reference run included; run-s: the runs' own seconds; q/as-fast: quick b_opt over the nearest of the full "
        "grid's as-fast sizes; q/fit: over the full fit's b_opt)"
    )
    for r in rows:
        print(f"  {r['workload']}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r["met"].items()))
    for r in rows:
        q = r["adaptive"]["cost_by_job"]
        quick_s = sum(q[j] for j in ("prepare_data", "profile_hardware", "train_reference", "measure_gradient_noise"))
        print(f"  {r['workload']}: quick estimate {quick_s:.1f} s = {quick_s / q['train_reference']:.2f} reference "
              f"runs (the reference run's job {q['train_reference']:.1f} s)")  # fmt: skip
    if long:
        print(f"\nquick estimate on a long run (teacher_long, the reference run {long['reference_run_s']:.0f} s of "
              f"training): {long['cost_s']:.1f} s = {long['in_reference_runs']:.2f} reference runs "
              f"({long['without_prepare']:.2f} without prepare_data; the noise job {long['noise_over_reference']:.2f}, "
              f"{long['pairs']} pairs per snapshot, {long['pairs_cost_share']:.2f} of the run's example-gradients); "
              f"target <= {TARGETS['quick_in_reference_runs']}: {'yes' if long['met'] else 'NO'}; "
              f"jobs {long['cost_by_job']}")  # fmt: skip
    result = {"rows": rows, "quick_long": long, "targets": TARGETS, "cores": args.cores, "cpu_count": os.cpu_count(),
              "total_s": round(time.perf_counter() - start, 1), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    if args.config:
        result["config"] = str(args.config)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {results} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
