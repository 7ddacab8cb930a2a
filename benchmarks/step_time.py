"""T_iter(B) of a workload on this machine's device, and which model of it fits: linear or saturating.

    python benchmarks/step_time.py [--config config/gpu.yaml] [--workload NAME] [--device cuda]

Profiles every batch size of the config's grid and profile.extra_batch_sizes with the profiler the workflow uses
(CUDA events and synchronisation on a GPU, warm-up, median of repeats, max_memory_allocated, out-of-memory recorded
per batch size), then fits T_iter(B) = tau_f + tau_d B (batchscope's model) and the saturating
T_iter(B) = max(tau_f, tau_d B) (a device that is either overhead- or throughput-bound) and prints R^2 of both.
Writes benchmarks/results/step_time_<device>.json. Defaults: the default study on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import least_squares

from batchscope import config as cfg
from batchscope.engine import profiling as profile
from batchscope.engine import runtime
from batchscope.stages import profile as stage_profile
from batchscope.stages.fit import fit_step_time

ROOT = Path(__file__).resolve().parents[1]


def r_squared(observed: np.ndarray, predicted: np.ndarray) -> float:
    """R^2 on the log scale: step times span decades, and a relative misfit matters equally at every B."""
    log_obs, log_pred = np.log(observed), np.log(predicted)
    return float(1 - np.sum((log_obs - log_pred) ** 2) / np.sum((log_obs - log_obs.mean()) ** 2))


def fit_saturating(b: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """max(tau_f, tau_d B) by least squares on relative residuals (scipy; the kink makes it piecewise smooth)."""
    start = np.log([t.min(), (t / b).min()])
    result = least_squares(lambda p: np.maximum(np.exp(p[0]), np.exp(p[1]) * b) / t - 1, start)
    return float(np.exp(result.x[0])), float(np.exp(result.x[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    parser.add_argument("--workload")
    parser.add_argument("--device", help="override the config's device")
    args = parser.parse_args()
    overrides = {"device": args.device} if args.device else None
    config = cfg.load(args.config, overrides)
    workload = args.workload or next(iter(config["workloads"]))
    spec = stage_profile.config_slice(config, workload)
    device = runtime.resolve_device(config["device"])
    runtime.setup(config["threads"], device, config["deterministic"], config["tf32"])
    rows = []
    timed = profile.profile(spec, cfg.profile_batch_sizes(config), device)  # interleaved rounds, as the workflow
    for b in cfg.profile_batch_sizes(config):
        ds = timed[b]
        rows.append((b, float(ds["t_iter_median"]), bool(ds["feasible"]), float(ds["peak_memory"])))
        _, t_iter, ok, peak = rows[-1]
        print(f"B={b:>6}  T_iter={1e3 * t_iter:9.3f} ms  feasible={ok}  peak={peak / 2**20:8.1f} MiB")
    feasible = [(b, t) for b, t, ok, _ in rows if ok and math.isfinite(t)]
    b, t = (np.asarray(v, dtype=float) for v in zip(*feasible, strict=True))
    linear = fit_step_time(b, t)
    sat_f, sat_d = fit_saturating(b, t)
    result = {
        "device": str(device),
        "device_name": runtime.device_name(device),
        "workload": workload,
        "batch_sizes": [int(x) for x in b],
        "t_iter_ms": [round(1e3 * x, 4) for x in t],
        "max_feasible_batch_size": int(b.max()),
        "infeasible": [int(r[0]) for r in rows if not r[2]],
        "tau_f_ms": round(1e3 * linear.intercept, 4),
        "tau_d_us": round(1e6 * linear.slope, 4),
        "r2_linear": round(r_squared(t, linear.intercept + linear.slope * b), 4),
        "saturating_tau_f_ms": round(1e3 * sat_f, 4),
        "saturating_tau_d_us": round(1e6 * sat_d, 4),
        "r2_saturating": round(r_squared(t, np.maximum(sat_f, sat_d * b)), 4),
        "torch": torch.__version__,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("batch_sizes", "t_iter_ms")}, indent=2))
    out = ROOT / "benchmarks" / "results" / f"step_time_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
