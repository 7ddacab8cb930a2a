"""An example of bringing your own workload to batchscope: see docs/workloads.md."""
