"""Fault injection for the fault-tolerance tests (tests/faults/). Unset in normal use, and then inert.

``BATCHSCOPE_FAULT`` is a comma-separated list of:

- a kill point, ``train_step``, ``report_render`` or ``netcdf_write[:STAGE]``: the process sends itself SIGKILL
  there, as the kernel's OOM killer or a pre-empted cluster node would (no cleanup, no Python exception);
- ``oom_above=N``: every training step on a batch larger than N raises torch's CUDA out-of-memory error, so the
  workflow's handling of a batch that does not fit can be run on a machine where nothing runs out of memory.
"""

from __future__ import annotations

import os
import signal

ENV = "BATCHSCOPE_FAULT"


def _tokens() -> list[str]:
    return [token.strip() for token in os.environ.get(ENV, "").split(",") if token.strip()]


def kill_point(name: str, stage: str | None = None) -> None:
    """SIGKILL this process if ``name`` (or ``name:stage``) is armed."""
    tokens = _tokens()
    if name in tokens or (stage is not None and f"{name}:{stage}" in tokens):
        os.kill(os.getpid(), signal.SIGKILL)


def oom_above() -> int | None:
    """The batch size above which steps fail with out-of-memory, when armed."""
    for token in _tokens():
        key, _, value = token.partition("=")
        if key == "oom_above":
            return int(value)
    return None
