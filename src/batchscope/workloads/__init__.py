"""Workloads: the protocol a study trains (:class:`Workload`), the built-in datasets and models, and the builder
that turns a config's factory path into a checked workload. A user's factory imports ``Workload`` from here (or
as ``batchscope.Workload``); ``batchscope.workloads:builtin`` is the built-in factory's path in a config."""

from batchscope.workloads.base import Workload, WorkloadError, build, builtin

__all__ = ["Workload", "WorkloadError", "build", "builtin"]
