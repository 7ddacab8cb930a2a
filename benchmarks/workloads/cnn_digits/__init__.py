"""A workload for ``benchmarks/budget.py --config benchmarks/configs/digits_cnn.yaml``, written as a user would write
their own (docs/workloads.md): batchscope's code knows nothing of it."""
