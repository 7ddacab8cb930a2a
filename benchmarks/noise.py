"""Gradient-noise benchmark: tr(Sigma) of a batch of 256 on the default digits MLP, three ways, side by side.

- loop: one backward pass per example (the reference a user would write first);
- vmap: ``vmap(grad(...))`` materialising every per-example gradient (the tests' reference path);
- linear: per-example squared norms from one forward and one backward pass, |dW_n|^2 = |a_n|^2 |delta_n|^2 for
  each Linear layer (what the stage uses for all-Linear models).
tr(Sigma) needs only the per-example squared norms and the batch gradient. Target: >= 10x the loop for the path
the stage uses. Prints a table and writes benchmarks/results/noise.json (key ``vmap_speedup``).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from reference import per_example_loop

from batchscope import config
from batchscope.core import noise
from batchscope.workloads.base import build

RESULTS = Path(__file__).resolve().parent / "results" / "noise.json"
BATCH, REPEATS = 256, 15


def trace_from_norms(sq_norms: torch.Tensor, gradient: torch.Tensor) -> float:
    n = len(sq_norms)
    return n / (n - 1) * (float(sq_norms.mean()) - float(gradient @ gradient))


def main() -> None:
    torch.set_num_threads(1)
    study = config.load(Path(__file__).resolve().parents[1] / "config" / "config.yaml")
    built = build(config.workload_slice(study, "digits_mlp"), torch.device("cpu"), seed=0)
    model, loss, (x_train, y_train) = built.model, built.loss, built.train
    index = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:BATCH]
    x, y = x_train[index], y_train[index]

    def loop():
        return per_example_loop(model, loss, x, y)

    paths = {
        "loop": loop,
        "vmap": lambda: noise.per_example_sq_norms(model, loss, x, y, method="vmap"),
        "linear": lambda: noise.per_example_sq_norms(model, loss, x, y, method="linear"),
    }
    gradient = noise.full_gradient(model, loss, x, y)
    times, traces = {name: [] for name in paths}, {}
    for path in paths.values():
        path()  # warm-up
    for _ in range(REPEATS):
        for name, path in paths.items():
            start = time.perf_counter()
            norms = path()
            times[name].append(time.perf_counter() - start)
            traces[name] = trace_from_norms(norms, gradient)
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = traces["loop"]
    widths = study["workloads"]["digits_mlp"]["model"]["widths"]
    print(f"tr(Sigma) of a batch of {BATCH}, digits MLP {widths}, 1 thread, medians of {REPEATS}")
    print(f"{'path':8}{'time (ms)':>11}{'vs loop':>9}{'tr(Sigma)':>12}{'rel. diff':>11}")
    for name in paths:
        rel = abs(traces[name] - reference) / reference
        print(f"{name:8}{1e3 * medians[name]:>11.2f}{medians['loop'] / medians[name]:>9.1f}{traces[name]:>12.5g}"
              f"{rel:>11.1e}")  # fmt: skip
    used = "linear"
    result = {
        "vmap_speedup": round(medians["loop"] / medians[used], 1),
        "path_used": used,
        "materialising_vmap_speedup": round(medians["loop"] / medians["vmap"], 1),
        "times_ms": {name: round(1e3 * value, 3) for name, value in medians.items()},
        "trace_sigma": {name: value for name, value in traces.items()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"speedup of the stage's path ({used}): {result['vmap_speedup']}x (target >= 10x); wrote {RESULTS}")


if __name__ == "__main__":
    main()
