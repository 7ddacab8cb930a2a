"""Ghost BatchNorm benchmark: the whole training step of the digits CNN with GBN (ghost size 32) against BN at a
physical batch of 1024, interleaved repeat by repeat so the machine's drift hits both alike (target: GBN / BN
<= 1.10). A GBN that loops over the groups in Python is timed beside them, as the baseline the fused version
replaces. Prints a table and writes benchmarks/results/ghostbn.json (key ``gbn_over_bn_step``).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from batchscope.engine import runtime
from batchscope.workloads import data
from batchscope.workloads.models import cnn

RESULTS = Path(__file__).resolve().parent / "results" / "ghostbn.json"
BATCH, GHOST, REPEATS, STEPS = 1024, 32, 15, 10


class LoopGhostBatchNorm2d(nn.BatchNorm2d):
    """The straightforward version: one BatchNorm call per ghost batch (for comparison only)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        return torch.cat([super(LoopGhostBatchNorm2d, self).forward(part) for part in x.split(GHOST)])


def model(kind: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    norm = {"bn": "batch", "gbn": "ghost", "loop": "batch"}[kind]
    net = cnn((1, 8, 8), [16, 32], 64, 10, norm, GHOST if kind == "gbn" else None)
    if kind == "loop":
        for name, module in list(net.named_children()):
            if isinstance(module, nn.BatchNorm2d):
                net._modules[name] = LoopGhostBatchNorm2d(module.num_features)
    return net.to(device)


def main() -> None:
    torch.set_num_threads(2)
    results = {}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        tensors = data.load_tensors(data.build({"name": "digits", "val_fraction": 0.2, "seed": 0}), device)
        steps, clock = {}, runtime.StepClock(device)
        for kind in ("bn", "gbn", "loop"):
            net = model(kind, device)
            optimizer = runtime.make_optimizer({"name": "sgd", "momentum": 0.9, "nesterov": False,
                                                "weight_decay": 0.0}, net.parameters(), 0.01)  # fmt: skip
            steps[kind] = runtime.make_step(net, optimizer, torch.nn.functional.cross_entropy, device)
        index = torch.randperm(len(tensors.x_train), generator=torch.Generator().manual_seed(0))[:BATCH].to(device)
        times = {kind: [] for kind in steps}
        x, y = tensors.x_train[index], tensors.y_train[index]
        for step in steps.values():  # warm-up
            for _ in range(5):
                step(x, y)
        for _ in range(REPEATS):
            for kind, step in steps.items():
                clock.start()
                for _ in range(STEPS):
                    step(x, y)
                times[kind].append(clock.stop() / STEPS)
        medians = {kind: statistics.median(values) for kind, values in times.items()}
        results[device.type] = {
            "bn_step_ms": round(1e3 * medians["bn"], 3),
            "gbn_step_ms": round(1e3 * medians["gbn"], 3),
            "loop_step_ms": round(1e3 * medians["loop"], 3),
            "gbn_over_bn_step": round(medians["gbn"] / medians["bn"], 3),
            "loop_over_bn_step": round(medians["loop"] / medians["bn"], 3),
            "device_name": runtime.device_name(device),
        }
    print(f"digits CNN [16, 32] + BN, physical batch {BATCH}, ghost size {GHOST}, medians of {REPEATS} x {STEPS} steps")
    print(f"{'device':8}{'BN (ms)':>10}{'GBN (ms)':>10}{'loop (ms)':>11}{'GBN/BN':>9}{'loop/BN':>9}")
    for name, row in results.items():
        print(f"{name:8}{row['bn_step_ms']:>10}{row['gbn_step_ms']:>10}{row['loop_step_ms']:>11}"
              f"{row['gbn_over_bn_step']:>9}{row['loop_over_bn_step']:>9}")  # fmt: skip
    output = {"gbn_over_bn_step": results["cpu"]["gbn_over_bn_step"], "devices": results,
              "when": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(output, indent=2) + "\n")
    print(f"target GBN / BN <= 1.10: {'met' if output['gbn_over_bn_step'] <= 1.10 else 'NOT met'}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
