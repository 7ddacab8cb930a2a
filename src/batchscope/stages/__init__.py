"""The workflow's stages, one module per stage; this package's table is the one place their wiring is read from.

A stage module declares what the rest of the project derives:

- ``RULES``: ``{rule name: Rule(version, config_slice, variables)}`` for the Snakemake rules it serves. The
  workflow passes each rule its config slice and algorithm version as params (the rerun triggers), every file a
  rule writes carries both in its provenance, and readers of a rule's files require its ``variables``.
- ``COMMANDS``: the ``batchscope`` subcommands that run it, each its arguments and one ``run`` function.

The table is found by name (every public module of this package), so a new stage touches three places: its
module here, its ``workflow/rules/*.smk``, and its block of ``config.schema.yaml`` (docs/architecture.md).

Stage modules import numpy and xarray at most at their top; torch, scipy and plotting are imported inside the
functions that use them, so reading the table (the Snakefile at parse time, every job's command line) stays
cheap.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import ModuleType


@dataclass(frozen=True)
class Rule:
    """A workflow rule's facts: ``version`` (bump it when the algorithm changes results), the config slice that
    decides its results, and the variables its files must hold for a reader to accept them."""

    version: int
    config_slice: Callable[[dict, str], dict] | None = None
    variables: tuple[str, ...] = ()


@dataclass(frozen=True)
class Command:
    """A ``batchscope`` subcommand. ``spec``: it takes its config slice (``--spec`` JSON, or ``--config`` with
    ``--workload``, sliced by ``spec``) and writes ``--out`` (``outputs`` is its nargs)."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], None]
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    spec: Callable[[dict, str], dict] | None = None
    outputs: str | None = None


@cache
def modules() -> dict[str, ModuleType]:
    """Every stage module, by name (modules whose name starts with ``_`` are helpers, not stages)."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    return {name: importlib.import_module(f"{__name__}.{name}") for name in names}


@cache
def rules() -> dict[str, Rule]:
    table: dict[str, Rule] = {}
    for module in modules().values():
        for name, rule in getattr(module, "RULES", {}).items():
            if name in table:
                raise RuntimeError(f"rule {name!r} is declared by two stage modules")
            table[name] = rule
    return table


def rule(name: str) -> Rule:
    try:
        return rules()[name]
    except KeyError:
        raise KeyError(f"no stage declares rule {name!r} (known: {', '.join(sorted(rules()))})") from None


def commands() -> list[Command]:
    return [command for module in modules().values() for command in getattr(module, "COMMANDS", ())]


def versions() -> dict[str, int]:
    """Every rule's algorithm version (``batchscope.ALGORITHM_VERSIONS``)."""
    return {name: r.version for name, r in rules().items()}
