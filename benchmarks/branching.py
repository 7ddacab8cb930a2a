"""Branching benchmark: does the branched local critical batch size hold still when only the branches' example
draws change, and where does it sit against the full grid's B_crit?

It reads the working directories that ``benchmarks/budget.py --keep DIR`` left (DIR/WORKLOAD/adaptive, with the
reference run and the quick estimate, and DIR/WORKLOAD/full, with the full grid's fit), and runs the branch stage
(``branch_checkpoint``, one Snakemake job per snapshot of the reference run) in each adaptive directory four times:
one seed (``branch.seeds: 1``) at seed 0 and at seed 1, and three seeds at seeds 0 to 2 and at 3 to 5. Two repeats
with disjoint seeds are what a user would get by rerunning with another seed, so per setting it counts the snapshots
where the two repeats gave the same local critical batch size, and where they were at most one branch apart.

Reported per workload, for three seeds at seed 0 (what ``branch.enabled: true`` runs by default): the local critical
batch size at each snapshot with its 95% interval, the full fit's B_crit and the quick estimate's b_crit, the
branch jobs' cost (the Snakemake benchmark files' wall seconds) against the reference run's job, and the branches'
scatter over the six seeds of the two three-seed repeats (standard deviation over mean, branches at k <= 2): what
one seed's plain rule, with its 1% tolerance, is up against.

Prints a table and writes benchmarks/results/branching.json. Needs no package beyond the project's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import yaml
from budget import REPO, snakemake

from batchscope import config as cfg
from batchscope.store import job_seconds, read_netcdf

RESULTS = REPO / "benchmarks" / "results" / "branching.json"
# (branch.seed, branch.seeds)
SETTINGS = {
    "one seed, seed 0": (0, 1),
    "one seed, seed 1": (1, 1),
    "3 seeds, 0 to 2": (0, 3),
    "3 seeds, 3 to 5": (3, 3),
}
REPEATS = {"one seed": ("one seed, seed 0", "one seed, seed 1"), "3 seeds": ("3 seeds, 0 to 2", "3 seeds, 3 to 5")}


def run_branches(workdir: Path, workload: str, seed: int, seeds: int, cores: int) -> dict:
    """The branch jobs of every snapshot with ``branch.seed`` and ``branch.seeds`` set, and what they measured."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["branch"] = {**(config.get("branch") or {}), "enabled": True, "seed": seed, "seeds": seeds}
    path = workdir / "config_branching.yaml"
    path.write_text(yaml.safe_dump(config))
    fractions = [cfg.format_fraction(f) for f in cfg.load(path, importable=False)["noise"]["snapshot_fractions"]]
    snakemake(workdir, path, [f"results/branch/{workload}/fraction{f}.nc" for f in fractions], cores)
    rows = [read_netcdf(workdir / f"results/branch/{workload}/fraction{f}.nc") for f in fractions]
    seconds = sum(job_seconds(workdir / f"results/benchmarks/branch_checkpoint/{workload}/fraction{f}.tsv")
                  for f in fractions)  # fmt: skip
    return {
        "steps": [int(ds.attrs["step"]) for ds in rows],
        "sizes": rows[0]["branch_batch_size"].values.tolist(),
        "critical": [int(ds["critical_batch_size"]) for ds in rows],
        "interval": [[float(v) for v in ds["critical_ci"].values] for ds in rows],
        "factors": rows[0]["factor"].values.tolist(),
        "loss": [ds["loss"].transpose("seed", "branch_batch_size").values.tolist() for ds in rows],
        "cost_s": round(seconds, 2),
    }


def agreement(a: dict, b: dict) -> dict:
    """Per snapshot, two repeats' answers: the same, or at most one branch apart; and where they differ, whether the
    first repeat's interval holds the second's answer (never with one seed: no interval)."""
    index = {size: i for i, size in enumerate(a["sizes"])}
    apart = [abs(index[x] - index[y]) for x, y in zip(a["critical"], b["critical"], strict=True)]
    held = [d > 0 and low <= y <= high for d, (low, high), y in zip(apart, a["interval"], b["critical"], strict=True)]
    return {"same": sum(d == 0 for d in apart), "within_one": sum(d <= 1 for d in apart), "snapshots": len(apart),
            "differ": sum(d > 0 for d in apart), "differ_held": sum(held)}  # fmt: skip


def run_workload(root: Path, cores: int) -> dict:
    workload = root.name
    adaptive, full = root / "adaptive", root / "full"
    measured = {name: run_branches(adaptive, workload, seed, seeds, cores) for name, (seed, seeds) in SETTINGS.items()}
    for name, values in measured.items():
        print(f"  {workload} {name}: {values['critical']} ({values['cost_s']:.0f} s)", flush=True)
    quick = read_netcdf(adaptive / f"results/quick/{workload}.nc")
    reference_s = float(quick["cost_s"].sel(job="train_reference"))
    default = measured["3 seeds, 0 to 2"]
    # the branches' scatter over the six seeds of the two three-seed repeats, at k <= 2 (the sizes the answers
    # mostly fall among), relative to their mean loss: what the rule's tolerance is up against
    near = np.asarray(default["factors"]) <= 2
    pooled = [np.vstack([measured[name]["loss"][i] for name in REPEATS["3 seeds"]])[:, near]
              for i in range(len(default["steps"]))]  # fmt: skip
    scatter = np.concatenate([losses.std(axis=0, ddof=1) / losses.mean(axis=0) for losses in pooled])
    fit_b_crit = float(read_netcdf(full / f"results/fit/{workload}.nc")["b_crit"])
    return {
        "workload": workload,
        "measured": measured,
        "agreement": {name: agreement(measured[a], measured[b]) for name, (a, b) in REPEATS.items()},
        "fit_b_crit": round(fit_b_crit, 1),
        "quick_b_crit": round(float(quick["b_crit"]), 1),
        "reference_job_s": reference_s,
        "branch_in_reference_runs": round(default["cost_s"] / reference_s, 2),
        "scatter": [round(float(np.nanmin(scatter)), 3), round(float(np.nanmax(scatter)), 3)],
        # after step 0, as the quick estimate's band
        "median_over_fit": round(float(np.median(default["critical"][1:])) / fit_b_crit, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, required=True,
                        help="the folder budget.py --keep wrote (WORKLOAD/adaptive, WORKLOAD/full)")  # fmt: skip
    parser.add_argument("--workloads", nargs="*", help="default: every workload folder in it")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    roots = sorted(p.parents[1] for p in args.source.glob("*/adaptive/config.yaml") if (p.parents[1] / "full").is_dir())
    roots = [root for root in roots if not args.workloads or root.name in args.workloads]
    if not roots:
        raise SystemExit(f"--from {args.source}: no WORKLOAD/adaptive and WORKLOAD/full folders (budget.py --keep)")
    start = time.perf_counter()
    rows = [run_workload(root, args.cores) for root in roots]
    print(f"\n{'workload':<14}{'3 seeds, seed 0: critical B per snapshot (95% interval)':<64}{'fit B_crit':>11}"
          f"{'quick':>7}{'median/fit':>11}{'cost, ref runs':>15}{'scatter':>12}  agree: 1 seed / 3 seeds (same, "
          "within one)")  # fmt: skip
    for r in rows:
        m = r["measured"]["3 seeds, 0 to 2"]
        cells = ", ".join(f"{c} ({lo:.0f}-{hi:.0f})" if math.isfinite(lo) else str(c)
                          for c, (lo, hi) in zip(m["critical"], m["interval"], strict=True))  # fmt: skip
        one, three = r["agreement"]["one seed"], r["agreement"]["3 seeds"]
        print(
            f"{r['workload']:<14}{cells:<64}{r['fit_b_crit']:>11.0f}{r['quick_b_crit']:>7.0f}"
            f"{r['median_over_fit']:>11.2f}{r['branch_in_reference_runs']:>15.1f}"
            f"{r['scatter'][0]:>6.0%}-{r['scatter'][1]:<5.0%}  "
            f"{one['same']}, {one['within_one']} / {three['same']}, {three['within_one']} of {one['snapshots']}"
        )
    for label, names in REPEATS.items():
        answers = [c for r in rows for name in names for c in r["measured"][name]["critical"]]
        same = sum(r["agreement"][label]["same"] for r in rows)
        within = sum(r["agreement"][label]["within_one"] for r in rows)
        snapshots, differ, held = (sum(r["agreement"][label][key] for r in rows)
                                   for key in ("snapshots", "differ", "differ_held"))  # fmt: skip
        print(f"{label}: answers {min(answers)} to {max(answers)}, median {np.median(answers):.0f}; two repeats the "
              f"same at {same}, within one branch at {within} of {snapshots} snapshots; where they differ ({differ}), "
              f"the first's interval holds the second's answer at {held}")  # fmt: skip
    result = {"rows": rows, "settings": SETTINGS, "total_s": round(time.perf_counter() - start, 1),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "source": str(args.source)}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
