"""batchscope: measure the batch-size trade-off between hardware and statistics.

The library is usable without Snakemake; the workflow only calls the ``batchscope`` command line.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``batchscope.Workload`` for factories, imported on first use: the config code must not pay for torch."""
    if name == "ALGORITHM_VERSIONS":  # every rule's algorithm version, declared by its stage module
        from batchscope.stages import versions

        return versions()
    if name == "Workload":
        from batchscope.workloads import Workload

        return Workload
    raise AttributeError(f"module 'batchscope' has no attribute {name!r}")
