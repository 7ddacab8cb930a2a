"""batchscope: measure the batch-size trade-off between hardware and statistics.

The library is usable without Snakemake; the workflow only calls the ``batchscope`` command line.
"""

__version__ = "0.1.0"

# Bump a stage's version when its algorithm changes results: the workflow passes these as rule params, so
# Snakemake's params trigger reruns exactly the stages whose algorithm changed (edits under src/ are invisible
# to its code trigger).
ALGORITHM_VERSIONS = {
    "prepare_data": 1,
    "profile_hardware": 2,
    "train_model": 2,
    "fit_scaling": 2,
    "analyze_hessian": 3,
    "aggregate_hessian": 2,
    "edge_of_stability": 2,
    "ghost_variance": 1,
    "measure_gradient_noise": 2,
    "measure_jensen_bias": 2,
    "summarize_ghost": 1,
    "render_report": 1,
}


def __getattr__(name: str):
    """``batchscope.Workload`` for factories, imported on first use: the config code must not pay for torch."""
    if name == "Workload":
        from batchscope.workload import Workload

        return Workload
    raise AttributeError(f"module 'batchscope' has no attribute {name!r}")
