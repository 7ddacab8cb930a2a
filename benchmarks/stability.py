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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "stability.json"
FIT = "results/fit/digits_mlp.nc"
QUICK = "results/quick/digits_mlp.nc"
LOADED = (1, 3)  # repeats run beside a busy loop


def snakemake(workdir: Path, target: str, *args: str) -> float:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    # the target first: --configfile and --quiet both take several values and would swallow it
    cmd = ["snakemake", target, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args,
           "--configfile", str(REPO / "config" / "config.yaml"), "--quiet"]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - start


def _busy() -> None:
    while True:
        pass


def answer(workdir: Path) -> dict[str, object]:
    from batchscope.store import read_netcdf

    ds = read_netcdf(workdir / FIT)
    same = ds["batch_size"].values[ds["indistinguishable"].values.astype(bool)]
    quick = read_netcdf(workdir / QUICK)
    return {
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="batchscope-stability-") as tmp:
        workdir = Path(tmp)
        train_s = snakemake(workdir, FIT) + snakemake(workdir, QUICK)
        for repeat in range(args.repeats):
            load = repeat in LOADED
            busy = multiprocessing.Process(target=_busy, daemon=True) if load else None
            if busy:
                busy.start()
            try:
                seconds = snakemake(workdir, FIT, "--forcerun", "profile_hardware")
                seconds += snakemake(workdir, QUICK)  # the quick estimate from the same new profile
            finally:
                if busy:
                    busy.terminate()
                    busy.join()
            rows.append({"repeat": repeat, "cpu_load": load, "seconds": round(seconds, 1), **answer(workdir)})
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
        "cpu_count": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(f"{'repeat':<7}{'load':<6}{'fastest':>8}  {'as fast (set)':<22}{'b_opt':>7}  {'95% interval':<15}"
          f"{'R^2 T_iter':>11}{'round spread':>13}{'warnings':>9}{'quick b_opt':>12}  {'95% interval':<15}"
          f"{'tau_f/tau_d':>12}")  # fmt: skip
    for r in rows:
        interval = f"{r['b_opt_ci'][0]:.0f} to {r['b_opt_ci'][1]:.0f}"
        quick_interval = f"{r['quick_b_opt_ci'][0]:.0f} to {r['quick_b_opt_ci'][1]:.0f}"
        print(f"{r['repeat']:<7}{'busy' if r['cpu_load'] else '-':<6}{r['fastest']:>8}  "
              f"{', '.join(map(str, r['set'])):<22}{r['b_opt']:>7.1f}  {interval:<15}{r['t_iter_r2']:>11.4f}"
              f"{r['round_spread_max']:>13.3f}{r['warnings']:>9}{r['quick_b_opt']:>12.1f}  {quick_interval:<15}"
              f"{r['quick_tau_ratio']:>12.0f}")  # fmt: skip
    print(
        f"\nset identical in {summary['set_identical_in']} of {len(rows)}, fastest identical in "
        f"{summary['fastest_identical_in']} of {len(rows)} (target: 5 of 5 for either); b_opt spread "
        f"{summary['b_opt_spread']}, inside every repeat's interval: {inside}; quick b_opt {min(quick):.0f} to "
        f"{max(quick):.0f} ({summary['quick_b_opt_max_over_min']:.2f}x), inside every repeat's interval: "
        f"{quick_inside}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "repeats": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
