"""Memory benchmark: each analysis's working memory at evaluation size N and 5N, with the same chunk size.

CIFAR-shaped synthetic data (3x32x32, 10 classes, 5N examples generated in memory: no downloads) and the ResNet-20
of config/gpu.yaml (widths 16-32-64, 3 blocks per stage, BatchNorm), float32, 1 thread. The data are the same in
every measurement; only the evaluation size changes. Each measurement runs in a fresh subprocess:

- CPU: the process's resident memory after building the model and data and one warm-up forward and backward pass
  (the baseline), then its peak (VmHWM, reset to the baseline through /proc/self/clear_refs) during the analysis.
  glibc maps large blocks on their own and returns them when freed, so the resident memory follows the live
  tensors (forcing every block of 128 KB or more to be mapped, MALLOC_MMAP_THRESHOLD_=131072, gave the same
  figures within 20 MB at 3x the time).
- CUDA (``--device cuda``): torch.cuda.max_memory_allocated during the analysis less memory_allocated before it.

The working memory is the peak less the baseline. The analyses, at their stages' settings except where said:

- ``hessian``: :func:`batchscope.measure.hessian.analyze` (top-1 eigenvalue by Lanczos from 2 starts at tol 0.5,
  2 Hutchinson probes, 1 SLQ run of 2 steps: few products; memory does not depend on how many), chunks of CHUNK
  examples, hessian.cache_mb = CACHE_MB: room for one chunk's linearisation, so that the cache is full at N
  already and the bound (cache_mb plus one chunk) is what both sizes show.
- ``noise``: :func:`batchscope.measure.noise.measure_snapshot` (BatchNorm: the snapshot's loss and the two-batch
  estimator, b_small 4, b_big 8, 2 pairs), noise.chunk_size = CHUNK.
- ``jensen``: :func:`batchscope.measure.noise.measure_jensen_subspace` (k = 2, minibatches of 4 and 8, 2 draws),
  noise.chunk_size = CHUNK, the operator's cache bound lowered to CACHE_MB as for the Hessian. ARPACK's eigenvector
  solve is replaced by EIGSH_PRODUCTS products of the same operator, orthonormalised: ARPACK spends 20 or more
  products, and every product of the operator takes the same memory.

Each is also run as before this change (``before``): every chunk's linearisation kept (hessian.cache_mb
unbounded), the snapshot's loss and the Jensen experiment's full Hessian in one pass over the evaluation set
(chunk_size = eval_size). Target: working memory at 5N / at N <= 1.3 for every analysis as it is now. Prints a
table and writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
N, FACTOR, CHUNK, CACHE_MB, EIGSH_PRODUCTS = 16, 5, 8, 32, 4
RESNET20 = {"name": "resnet", "widths": [16, 32, 64], "blocks": 3, "norm": "batch"}
ANALYSES = ("hessian", "noise", "jensen")
VARIANTS = ("now", "before")
TARGET = 1.3


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(analysis: str, size: int, variant: str, device_name: str) -> dict:
    import numpy as np
    import scipy.sparse.linalg
    import torch
    from torch import nn

    from batchscope.core import hessian
    from batchscope.measure import hessian as measure_hessian
    from batchscope.measure import noise as measure_noise
    from batchscope.workloads.base import Workload, accuracy
    from batchscope.workloads.models import build_model

    torch.set_num_threads(1)
    device = torch.device(device_name)
    generator = torch.Generator().manual_seed(0)
    n_data = N * FACTOR
    x = torch.randn(n_data, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (n_data,), generator=generator).to(device)
    torch.manual_seed(0)
    model = build_model(RESNET20, (3, 32, 32), 10).to(device)
    workload = Workload(model=model, train=(x, y), val=(x, y), loss=nn.functional.cross_entropy, metric=accuracy,
                        spec={"loader": {"analysis_examples": n_data}})  # fmt: skip
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    nn.functional.cross_entropy(model(x[:2]), y[:2]).backward()  # warm-up: kernels, thread pools
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    before = variant == "before"
    chunk = size if before else CHUNK
    hessian.CACHE_MB = 1e9 if before else CACHE_MB  # the operator's bound when none is given (the Jensen one's)

    def stand_in(operator, k, **_):
        vectors = np.stack([operator.matvec(np.random.default_rng(i).standard_normal(operator.shape[0]))
                            for i in range(EIGSH_PRODUCTS)], axis=1)  # fmt: skip
        return None, np.linalg.qr(vectors)[0][:, :k]

    scipy.sparse.linalg.eigsh = stand_in

    def run():
        if analysis == "hessian":
            spec = {"mode": "eval", "eval_size": size, "chunk_size": CHUNK, "cache_mb": 1e9 if before else CACHE_MB,
                    "top_k": 1, "tol": 0.5, "hutchinson_probes": 2, "slq_runs": 1, "slq_steps": 2,
                    "density_points": 16, "density_sigma": 0.01, "seed": 0}  # fmt: skip
            checkpoint = {"state_dict": state, "batch_size": 128, "lr": 0.1, "seed": 0}
            ds = measure_hessian.analyze(checkpoint, workload, spec, device)
            return {"cached_chunks": ds.attrs["cached_chunks"], "n_chunks": ds.attrs["n_chunks"]}
        if analysis == "noise":
            spec = {"eval_size": size, "chunk_size": chunk, "seed": 0, "b_small": 4, "b_big": 8, "pairs": 2}
            measure_noise.measure_snapshot({"state_dict": state, "step": 0, "fraction": 0.0}, workload, spec, device)
            return {}
        spec = {"eval_size": size, "chunk_size": chunk, "seed": 0, "subspace_dim": 2, "subspace_sizes": [4, 8],
                "subspace_draws": 2, "damping": 1e-3}  # fmt: skip
        measure_noise.measure_jensen_subspace(state, workload, spec, device)
        return {}

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory starts again from here
    start = time.perf_counter()
    extra = run()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status("VmHWM")
    return {"baseline_mb": baseline / 2**20, "peak_mb": peak / 2**20, "work_mb": (peak - baseline) / 2**20,
            "seconds": seconds, "eval_data_mb": size * 3 * 32 * 32 * 4 / 2**20, **extra}  # fmt: skip


def measure(analysis: str, size: int, variant: str, device: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", analysis, str(size), variant, "--device", device]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--now-only", action="store_true", help="skip the 'before' runs")
    parser.add_argument("--child", nargs=3, metavar=("ANALYSIS", "SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        analysis, size, variant = args.child
        print(json.dumps(child(analysis, int(size), variant, args.device)))
        return
    rows = []
    for analysis in ANALYSES:
        for variant in VARIANTS[:1] if args.now_only else VARIANTS:
            small, large = (measure(analysis, size, variant, args.device) for size in (N, FACTOR * N))
            ratio = large["work_mb"] / small["work_mb"]
            rows.append({"analysis": analysis, "variant": variant, "n": N, "n_large": FACTOR * N, "chunk": CHUNK,
                         "small": small, "large": large, "ratio": ratio})  # fmt: skip
            print(f"{analysis:8} {variant:7} work {small['work_mb']:7.1f} MB at {N:4d}, {large['work_mb']:7.1f} MB "
                  f"at {FACTOR * N:4d}: x{ratio:.2f} ({small['seconds']:.0f} s, {large['seconds']:.0f} s)",
                  flush=True)  # fmt: skip
    print()
    print(f"| analysis | variant | work at {N} (MB) | work at {FACTOR * N} (MB) | ratio | target |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        target = f"<= {TARGET}" if row["variant"] == "now" else ""
        print(f"| {row['analysis']} | {row['variant']} | {row['small']['work_mb']:.0f} | {row['large']['work_mb']:.0f} "
              f"| {row['ratio']:.2f} | {target} |")  # fmt: skip
    now = [row for row in rows if row["variant"] == "now"]
    summary = {
        "device": args.device,
        "settings": {"n": N, "factor": FACTOR, "chunk": CHUNK, "cache_mb": CACHE_MB, "model": RESNET20},
        "rows": rows,
        "max_ratio_now": max(row["ratio"] for row in now),
        "target": TARGET,
        "met": all(row["ratio"] <= TARGET for row in now),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {RESULTS}; target {'met' if summary['met'] else 'NOT met'} (largest ratio "
          f"{summary['max_ratio_now']:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
