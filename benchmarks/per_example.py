"""Per-example gradient norms of a ResNet-20: tr(Sigma) of a batch of 128 CIFAR-shaped examples, three ways.

- loop: one forward and backward pass per example (the reference a user would write first);
- vmap: ``vmap(grad(...))`` materialising every per-example gradient (what the stage used for any model that
  was not all-Linear);
- hooks: per-example squared norms from one forward and one backward pass (batchscope.core.per_example: Conv2d by the
  convolution's weight-gradient kernel with the examples as groups, BatchNorm's affine terms from x_hat, the
  Linear head rank one), what ``noise.per_example_sq_norms(method="auto")`` now picks for this model.
A fourth row, "batch step", is one forward and backward pass of the whole batch (the gradient training takes):
no one-pass method can be much faster than it, so loop / batch step bounds the hooks path's speedup.

Model: ``batchscope.workloads.models`` resnet, widths 16/32/64, 3 blocks per stage (ResNet-20, 0.27 M parameters), 10
classes, synthetic 3x32x32 inputs, float32, 1 thread. Normalisation: BatchNorm in eval mode, because it is the
architecture the project trains (the models module offers BatchNorm, Ghost BatchNorm or none, no GroupNorm),
and in eval mode (running statistics, set here by a few train-mode passes first) each example is normalised on
its own, so per-example gradients are defined; in train mode they are not, and the stage uses its two-batch
estimator. Target: hooks >= 10x the loop. Prints a table and writes benchmarks/results/per_example.json
(``--device cuda``: on the GPU, each timing ending with a synchronisation; writes per_example_cuda.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from reference import per_example_loop
from torch import nn

from batchscope.core import noise
from batchscope.workloads.models import build_model

RESULTS = Path(__file__).resolve().parent / "results" / "per_example.json"
BATCH, REPEATS, LOOP_REPEATS = 128, 9, 5
SPEC = {"name": "resnet", "widths": [16, 32, 64], "blocks": 3, "norm": "batch"}


def trace_from_norms(sq_norms: torch.Tensor, gradient: torch.Tensor) -> float:
    n = len(sq_norms)
    return n / (n - 1) * (float(sq_norms.double().mean()) - float(gradient.double() @ gradient.double()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    device = torch.device(parser.parse_args().device)
    results = RESULTS if device.type == "cpu" else RESULTS.with_name(f"per_example_{device.type}.json")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(SPEC, (3, 32, 32), 10).to(device)
    x, y = torch.randn(BATCH, 3, 32, 32).to(device), torch.randint(0, 10, (BATCH,)).to(device)
    with torch.no_grad():  # running statistics of the data, as after training
        for _ in range(3):
            model(x)
    model.eval()
    loss = nn.functional.cross_entropy

    def loop():
        return per_example_loop(model, loss, x, y)

    def batch_step():
        model.zero_grad(set_to_none=True)
        loss(model(x), y).backward()

    paths = {
        "loop": loop,
        "vmap": lambda: noise.per_example_sq_norms(model, loss, x, y, method="vmap"),
        "hooks": lambda: noise.per_example_sq_norms(model, loss, x, y, method="hooks"),
        "batch step": batch_step,
    }
    assert noise.noise_scale(model, loss, x[:8], y[:8]).method == "per-example (hooks)"  # what auto picks
    gradient = noise.full_gradient(model, loss, x, y)
    times, traces, norms_of = {name: [] for name in paths}, {}, {}
    for path in paths.values():
        path()  # warm-up
    start_all = time.perf_counter()
    for repeat in range(REPEATS):
        for name, path in paths.items():
            if name == "loop" and repeat >= LOOP_REPEATS:
                continue
            start = time.perf_counter()
            norms = path()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
            if norms is not None:
                traces[name], norms_of[name] = trace_from_norms(norms, gradient), norms.cpu()
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = traces["loop"]
    print(f"tr(Sigma) of a batch of {BATCH}, ResNet-20 (BatchNorm, eval mode), 3x32x32, 1 thread, {device}, "
          f"medians of {REPEATS} ({LOOP_REPEATS} for the loop); {time.perf_counter() - start_all:.0f} s")  # fmt: skip
    # rel. diff: of tr(Sigma) against the loop's; max rel.: the largest over examples of |g_n|^2's
    print(f"{'path':11}{'time (ms)':>11}{'vs loop':>9}{'tr(Sigma)':>12}{'rel. diff':>11}{'max rel.':>10}")
    worst = {name: float(((v - norms_of["loop"]).abs() / norms_of["loop"]).max()) for name, v in norms_of.items()}
    for name in paths:
        trace = traces.get(name)
        cells = (f"{trace:>12.6g}{abs(trace - reference) / reference:>11.1e}{worst[name]:>10.1e}"
                 if trace is not None else "")  # fmt: skip
        print(f"{name:11}{1e3 * medians[name]:>11.1f}{medians['loop'] / medians[name]:>9.2f}{cells}")
    result = {
        "hooks_speedup": round(medians["loop"] / medians["hooks"], 2),
        "vmap_speedup": round(medians["loop"] / medians["vmap"], 2),
        "batch_step_speedup": round(medians["loop"] / medians["batch step"], 2),
        "hooks_vs_batch_step": round(medians["hooks"] / medians["batch step"], 2),
        "target": 10,
        "times_ms": {name: round(1e3 * value, 2) for name, value in medians.items()},
        "repeats": {name: len(values) for name, values in times.items()},
        "trace_sigma": traces,
        "max_rel_diff_per_example": worst,
        "setup": {
            "model": SPEC,
            "input": [3, 32, 32],
            "batch": BATCH,
            "threads": 1,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"hooks: {result['hooks_speedup']}x the loop (target >= 10x; a whole-batch step is "
          f"{result['batch_step_speedup']}x); wrote {results}")  # fmt: skip


if __name__ == "__main__":
    main()
