"""The ``batchscope`` command line: every workflow stage, runnable by hand.

Argument parsing only: each subcommand is declared by its stage module (:mod:`batchscope.stages`) and runs as one
call into it. A stage takes its config slice either as JSON (``--spec``, what the workflow passes) or as a config
file plus workload name (``--config``/``--workload``, for running a stage by hand while debugging).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from batchscope import config as cfg
from batchscope import stages

log = logging.getLogger("batchscope")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchscope", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in stages.commands():
        p = sub.add_parser(command.name, help=command.help)
        p.set_defaults(func=command.run)
        if command.spec is not None:
            p.add_argument("--spec", help="the stage's config slice as JSON (what the workflow passes)")
            p.add_argument("--config", help="a study config file (instead of --spec)")
            p.add_argument("--workload", help="workload name in --config")
            nargs = command.outputs
            p.add_argument("--out", required=True, nargs=nargs, help="output path" + ("s" if nargs else ""))
        command.arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    start = time.perf_counter()
    try:
        args.func(args)
        sys.stdout.flush()  # here, where a reader that went away is caught, not in the interpreter's flush at exit
    except (cfg.ConfigError, ValueError) as err:
        # bad input (config, data files, a workload factory, a batch size over the data): the message names it
        from batchscope.store import CacheError
        from batchscope.workloads.base import WorkloadError
        from batchscope.workloads.data import DataError

        if not isinstance(err, cfg.ConfigError | DataError | WorkloadError | CacheError):
            raise
        print(f"batchscope: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (``batchscope recommend | head``): stop quietly, as a shell tool does; stdout goes to
        # /dev/null so that the interpreter's own flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    log.debug("%s took %.2f s", args.command, time.perf_counter() - start)
    return 0
