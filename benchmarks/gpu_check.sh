#!/usr/bin/env bash
# The GPU check: one script for a machine with one NVIDIA GPU (H100/H200), <= 8 minutes, no downloads (the GPU
# machine has no internet: CIFAR-shaped synthetic files). Run from the repository root, with the project's .venv
# when there is one (else the python on PATH, batchscope importable, e.g. through PYTHONPATH=src):
#   bash benchmarks/gpu_check.sh
# 1. the CUDA-marked tests (tests/test_cuda.py: slot pool, profiling, out of memory, Hessian and per-example norms
#    against the CPU, TF32 and cuDNN settings recorded);
# 2. per-example gradient norms of ResNet-20 at B = 128 against a loop (benchmarks/per_example.py);
# 3. ResNet-20's step time up to the memory limit, fp32 / bf16 / compiled, linear against saturating fit
#    (benchmarks/gpu_profile.py);
# 4. the CPU rehearsal's study (config/test/gpu_rehearsal.yaml: every stage) on CUDA through Snakemake;
# 5. the memory benchmark on CUDA (benchmarks/memory.py, when present);
# then prints a table and writes docs/gpu.md. Each step has its own time limit; a failed step is reported, and the
# others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
OUT="benchmarks/results/gpu"
# this run's results only: an earlier run's files would be read into docs/gpu.md if a step of this one failed
rm -rf "$OUT" benchmarks/results/per_example_cuda.json benchmarks/results/gpu_profile.json
mkdir -p "$OUT"
status=()

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its output, note its exit status and time
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    status+=("$name|$rc|$((SECONDS - start))")
    echo "== $name: exit $rc in $((SECONDS - start)) s"
    tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
step cuda_tests 65 python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
step per_example 30 python benchmarks/per_example.py --device cuda
step profile 180 python benchmarks/gpu_profile.py --compiled-sizes 128 1024

# the rehearsal's study on CUDA, in a scratch directory, on CIFAR-shaped files written there
WORK=$(mktemp -d)
python - "$WORK" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, ".")
from tests.test_data import write_cifar

target = Path(sys.argv[1]) / "data" / "cifar-10-batches-py"
target.mkdir(parents=True)
write_cifar(target, per_batch=6600)  # the data of the CI rehearsal (tests/test_as_typed.py)
PY
# gpu=3 on one GPU: three jobs start at once and take turns on the GPU through the slot pool (the concurrency that
# the pool is for, on a real GPU), so that the jobs' start-up overlaps the GPU work of the one holding it
step study 140 snakemake --cores 8 --resources gpu=3 --configfile config/test/gpu_rehearsal.yaml \
    --config device=cuda --directory "$WORK"
cp -r "$WORK/results" "$OUT/study_results" 2>/dev/null; cp -r "$WORK/logs" "$OUT/study_logs" 2>/dev/null
if [ -f benchmarks/memory.py ]; then
    step memory 60 python benchmarks/memory.py --device cuda --now-only
fi

python - "$OUT" "$WORK" "${status[@]}" <<'PY'
import json
import sys
from pathlib import Path

out, work, rows = Path(sys.argv[1]), Path(sys.argv[2]), [r.split("|") for r in sys.argv[3:]]
gpu = (out / "gpu.txt").read_text().strip()
lines = ["# batchscope on a GPU", "", f"Measured by `bash benchmarks/gpu_check.sh` on: {gpu}.", "",
         "| step | exit status | seconds |", "| --- | --- | --- |"]
lines += [f"| {name} | {rc} | {seconds} |" for name, rc, seconds in rows]
profile = Path("benchmarks/results/gpu_profile.json")
if profile.is_file():
    data = json.loads(profile.read_text())
    lines += ["", "## ResNet-20 step time (CIFAR-shaped, `benchmarks/gpu_profile.py`)", "",
              "| variant | largest feasible B | T_iter at 128 (ms) | R^2 linear | R^2 saturating | knee |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, row in data["variants"].items():
        at = dict(zip(row["feasible"], row["t_iter_s"]))
        sat = row["saturating"] or {}
        lines.append(f"| {name} | {row['largest_feasible']} | {1e3 * at.get(128, float('nan')):.3f} | "
                     f"{row['linear']['r2']:.3f} | {sat.get('r2', float('nan')):.3f} | {sat.get('b_knee', float('nan')):.0f} |")
per_example = Path("benchmarks/results/per_example_cuda.json")
if per_example.is_file():
    data = json.loads(per_example.read_text())
    lines += ["", "## Per-example gradient norms, ResNet-20, B = 128 (`benchmarks/per_example.py --device cuda`)", "",
              "| path | time (ms) | speed-up over the loop |", "| --- | --- | --- |"]
    lines += [f"| {name} | {ms:.2f} | {data['times_ms']['loop'] / ms:.1f} |" for name, ms in data["times_ms"].items()]
memory = Path("benchmarks/results/memory.json")
if memory.is_file() and json.loads(memory.read_text()).get("device") == "cuda":
    data = json.loads(memory.read_text())
    s = data["settings"]
    lines += ["", f"## Analyses' GPU memory at {s['n']} and {s['n'] * s['factor']} examples, chunks of {s['chunk']} "
              "(`benchmarks/memory.py --device cuda`)", "",
              "| analysis | work at N (MB) | work at 5N (MB) | ratio | target |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['analysis']} | {r['small']['work_mb']:.0f} | {r['large']['work_mb']:.0f} | {r['ratio']:.2f} | "
              f"<= {data['target']} |" for r in data["rows"]]
fit = Path(work) / "results" / "fit" / "cifar_resnet.nc"
if fit.is_file():
    import xarray as xr

    ds = xr.open_dataset(fit)
    lines += ["", f"The rehearsal study on CUDA: recommended B = {int(ds['fastest_batch_size'])}, b_opt = "
              f"{float(ds['b_opt']):.0f}, device {ds.attrs.get('device_name', '?')}."]
Path("docs/gpu.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
