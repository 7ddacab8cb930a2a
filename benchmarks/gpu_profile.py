"""The step time of ResNet-20 on CIFAR-shaped data on one GPU, up to the memory limit, fp32 / bf16 / compiled.

Profiles powers of two from 32 until out of memory (recorded, as the profile stage records it), fits the linear and
the saturating T_iter models (:mod:`batchscope.core.scaling`) on every feasible size, and prints a table; writes
benchmarks/results/gpu_profile.json. Synthetic CIFAR-shaped files (no download: the GPU machine has no internet).
Run by benchmarks/gpu_check.sh; needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.test_data writes the CIFAR-shaped files

from batchscope import config as cfg  # noqa: E402
from batchscope.core import scaling  # noqa: E402
from batchscope.engine import profiling, runtime  # noqa: E402
from batchscope.stages import profile as profile_stage  # noqa: E402
from tests.test_data import write_cifar  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu_profile.json"
SIZES = [2**k for k in range(5, 16)]  # 32 .. 32768
VARIANTS = {"fp32": {}, "bf16": {"precision": "bf16"}, "compiled": {"compile": True}}
COMPILED_SIZES = [128, 1024, 8192]  # a compile per size: a few, to bound the script's time


def spec_for(data_dir: str, variant: dict) -> dict:
    raw = yaml.safe_load((ROOT / "config" / "gpu.yaml").read_text())
    raw["workloads"]["cifar_resnet20"]["dataset"]["data_dir"] = data_dir
    config = cfg.validate(raw)
    spec = profile_stage.config_slice(config, "cifar_resnet20")
    spec["workload"] = {**spec["workload"], **variant}
    spec["profile"] = {**spec["profile"], "rounds": 3, "repeats": 2, "warmup": 5, "min_repeat_time": 0.02}
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--compiled-sizes", nargs="+", type=int, default=COMPILED_SIZES)
    args = parser.parse_args()
    device = runtime.resolve_device("cuda")
    runtime.setup(4, device, None, False)
    rows = {}
    with tempfile.TemporaryDirectory() as data_dir:
        write_cifar(Path(data_dir), per_batch=6600)  # 33,000 training images: the largest size fits the data
        for name in args.variants:
            variant = VARIANTS[name]
            sizes = args.compiled_sizes if variant.get("compile") else SIZES
            start = time.perf_counter()
            timed = profiling.profile(spec_for(data_dir, variant), sizes, device)
            feasible = [b for b in sizes if bool(timed[b]["feasible"])]
            t_iter = [float(timed[b]["t_iter_median"]) for b in feasible]
            linear = scaling.fit_step_time(feasible, t_iter)
            saturating = scaling.fit_saturating_step_time(feasible, t_iter) if len(feasible) >= 3 else None
            rows[name] = {
                "sizes": sizes, "feasible": feasible, "t_iter_s": t_iter,
                "largest_feasible": max(feasible) if feasible else None,
                "linear": {"tau_f": linear.intercept, "tau_d": linear.slope, "r2": linear.r2},
                "saturating": None if saturating is None else {
                    "tau_f": saturating.tau_f, "tau_d": saturating.tau_d, "b_knee": saturating.b_knee,
                    "r2": saturating.r2},
                "seconds": time.perf_counter() - start,
                "peak_memory": {b: float(timed[b]["peak_memory"]) for b in feasible},
            }  # fmt: skip
            # after each variant: a later one that runs out of the script's time leaves the earlier ones written
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "variants": rows}, indent=2))
            print(f"{name}: {len(feasible)} of {len(sizes)} sizes feasible, {rows[name]['seconds']:.0f} s", flush=True)
    name = torch.cuda.get_device_name(device)
    print(f"ResNet-20, CIFAR-shaped, {name}")
    print(f"{'variant':<10}{'largest B':>10}{'T_iter@128 ms':>15}{'T_iter@largest ms':>19}{'R2 lin':>8}"
          f"{'R2 sat':>8}{'knee':>8}{'s':>7}")  # fmt: skip
    for variant, row in rows.items():
        at = dict(zip(row["feasible"], row["t_iter_s"], strict=True))
        sat = row["saturating"] or {}
        print(
            f"{variant:<10}{row['largest_feasible'] or 0:>10}{1e3 * at.get(128, float('nan')):>15.3f}"
            f"{1e3 * at.get(row['largest_feasible'], float('nan')):>19.2f}{row['linear']['r2']:>8.3f}"
            f"{sat.get('r2', float('nan')):>8.3f}{sat.get('b_knee', float('nan')):>8.0f}{row['seconds']:>7.0f}"
        )


if __name__ == "__main__":
    main()
