"""Stability benchmark: does the answer hold still when only the machine's noise changes?

Trains the default study once (config/config.yaml, in a fresh temporary working directory, up to the fit), then
reruns its profile (not training: training is bitwise reproducible on the CPU) REPEATS times, with a busy loop
on one core beside it in some repeats, refitting each time. Counts how often the recommendation changes: the
set of batch sizes indistinguishable from the fastest, and the fastest itself; and whether b_opt's spread across
repeats lies inside its own reported interval. Prints a table and writes benchmarks/results/stability.json.

Targets (issue "Your study as you type it"): the recommendation (set or fastest B) identical in 5 of 5 repeats,
and every repeat's b_opt inside every other repeat's 95% interval. The quick estimate (``results/quick``) is rebuilt
from each repeat's profile too: its b_opt moves with the profile's tau_f / tau_d alone (its B_noise is bitwise
reproducible), and the same question is asked of it and its interval.

``--study adaptive --config their.yaml`` asks it of the adaptive study, where the profile decides more than the fit:
the quick b_opt picks the bracket of sizes to train, and the fit on the bracket whether a second round trains one
more. Each repeat reruns the profile and everything downstream of it (``--forcerun profile_hardware``): the quick
estimate, both checkpoints, the training jobs of any size not trained before (a size trained in an earlier repeat
is the same run, bitwise, and is not trained again) and the fit. The analyses that do not make the answer are off
(as in benchmarks/budget.py). Results go to stability-STEM.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from batchscope import config as cfg

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "stability.json"
DEFAULT_CONFIG = REPO / "config" / "config.yaml"
LOADED = (1, 3)  # repeats run beside a busy loop
# the analyses that do not make the adaptive study's answer (as in benchmarks/budget.py)
ANALYSES_OFF = ("hessian", "ghost", "edge_of_stability", "branch", "noise")


def snakemake(workdir: Path, target: str, config: Path, *args: str) -> float:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    # absolute: the jobs run in the working directory, where a PYTHONPATH relative to here would name nothing
    user = [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(user)
    # the target first: --configfile and --quiet both take several values and would swallow it
    cmd = ["snakemake", target, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args,
           "--configfile", str(config), "--quiet"]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - start


def _busy() -> None:
    while True:
        pass


def answer(workdir: Path, workload: str) -> dict[str, object]:
    from batchscope.store import read_netcdf

    ds = read_netcdf(workdir / "results" / "fit" / f"{workload}.nc")
    same = ds["batch_size"].values[ds["indistinguishable"].values.astype(bool)]
    quick = read_netcdf(workdir / "results" / "quick" / f"{workload}.nc")
    row: dict[str, object] = {}
    extended = workdir / "results" / "adaptive" / f"{workload}.extended.nc"
    if ds.attrs.get("study") == "adaptive":
        choice = read_netcdf(extended)
        grid = choice["grid_batch_size"].values
        row = {"bracket": [int(b) for b in grid[choice["bracket"].values.astype(bool)]],
               "extended": int(choice["extended_batch_size"])}  # fmt: skip
    return row | {
        "quick_b_opt": round(float(quick["b_opt"]), 1),
        "quick_b_opt_ci": [round(float(x), 1) for x in quick["b_opt_ci"].values],
        "quick_tau_ratio": round(float(quick["tau_ratio"]), 1),
        "fastest": int(ds["fastest_batch_size"]),
        "set": [int(b) for b in same],
        "b_opt": round(float(ds["b_opt"]), 1),
        "b_opt_ci": [round(float(x), 1) for x in ds["b_opt_ci"].values],
        "t_iter_r2": round(float(ds["t_iter_r2"]), 4),
        "round_spread_max": round(float(ds["t_iter_round_spread"].max()), 3),
        "warnings": len(json.loads(ds.attrs["diagnostics"])),
    }


def study_config(path: Path, study: str | None, workdir: Path) -> tuple[Path, str]:
    """The config each repeat runs (``study`` overridden, the analyses off for the adaptive study), and its
    workload."""
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or len(config.get("workloads") or {}) != 1:
        raise SystemExit(f"--config {path}: give a config with exactly one workload")
    (workload,) = config["workloads"]
    if study is None:
        return path, workload
    config["study"] = study
    if study == "adaptive":
        for key in ANALYSES_OFF:
            config[key] = {**(config.get(key) or {}), "enabled": False}
    out = workdir / "config.yaml"
    out.write_text(yaml.safe_dump(config))
    cfg.load(out, importable=False)  # as changed here, refused by name before any job (factories: by the workflow)
    return out, workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a study config with one workload "
                        "(default: config/config.yaml)")  # fmt: skip
    parser.add_argument("--study", choices=("full", "adaptive"), help="override the config's study")
    args = parser.parse_args()
    cfg.load(args.config)  # a bad config is refused by name before anything runs
    results = RESULTS if args.config.resolve() == DEFAULT_CONFIG and args.study is None else RESULTS.with_name(
        f"stability-{args.config.stem}{'-' + args.study if args.study else ''}.json")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="batchscope-stability-") as tmp:
        workdir = Path(tmp)
        config, workload = study_config(args.config, args.study, workdir)
        fit, quick = f"results/fit/{workload}.nc", f"results/quick/{workload}.nc"
        train_s = snakemake(workdir, fit, config) + snakemake(workdir, quick, config)
        for repeat in range(args.repeats):
            load = repeat in LOADED
            busy = multiprocessing.Process(target=_busy, daemon=True) if load else None
            if busy:
                busy.start()
            try:
                seconds = snakemake(workdir, fit, config, "--forcerun", "profile_hardware")
                seconds += snakemake(workdir, quick, config)  # the quick estimate from the same new profile
            finally:
                if busy:
                    busy.terminate()
                    busy.join()
            rows.append({"repeat": repeat, "cpu_load": load, "seconds": round(seconds, 1),
                         **answer(workdir, workload)})  # fmt: skip
    sets = {tuple(r["set"]) for r in rows}
    fastest = {r["fastest"] for r in rows}
    inside = all(o["b_opt_ci"][0] <= r["b_opt"] <= o["b_opt_ci"][1] for r in rows for o in rows)
    quick_inside = all(o["quick_b_opt_ci"][0] <= r["quick_b_opt"] <= o["quick_b_opt_ci"][1] for r in rows for o in rows)
    quick = [r["quick_b_opt"] for r in rows]
    summary = {
        "repeats": len(rows),
        "distinct_sets": len(sets),
        "distinct_fastest": len(fastest),
        "set_identical_in": max(sum(tuple(r["set"]) == s for r in rows) for s in sets),
        "fastest_identical_in": max(sum(r["fastest"] == b for r in rows) for b in fastest),
        "b_opt_spread": round(max(r["b_opt"] for r in rows) - min(r["b_opt"] for r in rows), 1),
        "b_opt_inside_every_interval": inside,
        "quick_b_opt_range": [min(quick), max(quick)],
        "quick_b_opt_max_over_min": round(max(quick) / min(quick), 3),
        "quick_b_opt_inside_every_interval": quick_inside,
        "training_s": round(train_s, 1),
        "config": str(args.config),
        "study": args.study or "as configured",
        "cpu_count": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    adaptive = "bracket" in rows[0]
    if adaptive:
        summary["bracket_identical_in"] = max(sum(r["bracket"] == o["bracket"] for r in rows) for o in rows)
        summary["trained_identical_in"] = max(
            sum(r["bracket"] + [r["extended"]] == o["bracket"] + [o["extended"]] for r in rows) for o in rows
        )
    print(f"{'repeat':<7}{'load':<6}{'fastest':>8}  {'as fast (set)':<22}{'b_opt':>7}  {'95% interval':<15}"
          f"{'R^2 T_iter':>11}{'round spread':>13}{'warnings':>9}{'quick b_opt':>12}  {'95% interval':<15}"
          f"{'tau_f/tau_d':>12}" + (f"  {'bracket':<16}{'second round':>13}" if adaptive else ""))  # fmt: skip
    for r in rows:
        interval = f"{r['b_opt_ci'][0]:.0f} to {r['b_opt_ci'][1]:.0f}"
        quick_interval = f"{r['quick_b_opt_ci'][0]:.0f} to {r['quick_b_opt_ci'][1]:.0f}"
        print(f"{r['repeat']:<7}{'busy' if r['cpu_load'] else '-':<6}{r['fastest']:>8}  "
              f"{', '.join(map(str, r['set'])):<22}{r['b_opt']:>7.1f}  {interval:<15}{r['t_iter_r2']:>11.4f}"
              f"{r['round_spread_max']:>13.3f}{r['warnings']:>9}{r['quick_b_opt']:>12.1f}  {quick_interval:<15}"
              f"{r['quick_tau_ratio']:>12.0f}"
              + (f"  {', '.join(map(str, r['bracket'])):<16}{r['extended'] if r['extended'] > 0 else '-':>13}"
                 if adaptive else ""))  # fmt: skip
    print(
        f"\nset identical in {summary['set_identical_in']} of {len(rows)}, fastest identical in "
        f"{summary['fastest_identical_in']} of {len(rows)} (target: 5 of 5 for either); b_opt spread "
        f"{summary['b_opt_spread']}, inside every repeat's interval: {inside}; quick b_opt {min(quick):.0f} to "
        f"{max(quick):.0f} ({summary['quick_b_opt_max_over_min']:.2f}x), inside every repeat's interval: "
        f"{quick_inside}"
        + (
            f"; bracket identical in {summary['bracket_identical_in']} of {len(rows)}, the trained sizes (bracket and "
            f"second round) in {summary['trained_identical_in']} of {len(rows)}"
            if adaptive
            else ""
        )
    )
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"summary": summary, "repeats": rows}, indent=2) + "\n")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
