"""Stage ``extend_bracket``: the adaptive study's second round, one size past the trained bracket.

One size past the bracket, where the answer says so (``adaptive.extend``). Once the bracket is trained, the fit on it
(:func:`batchscope.stages.fit.fit_scaling`) says which size is fastest and which are indistinguishable from it. Under
T(B) = (N_iter + C_var/B)(tau_f + tau_d B), two sizes that reach the target equally fast have b_opt exactly between them
(at their geometric mean), so an edge of the bracket that the fit cannot tell from its inner neighbour (within
``fit.tolerance``) has the optimum near or between them, and loses at most that tolerance (unless the fit puts b_opt
past that edge: below). An edge that is the fastest and beats its inner neighbour beyond noise says the optimum lies at
or beyond it, which is where a quick estimate that is off by more than the bracket's half-width leaves it: the feasible
grid's next size past that edge is trained too (:func:`~batchscope.core.selection.extension`), once. Failing that, with
the fastest an inner size or an edge as fast as its inner neighbour, the fit's model decides: where every step-time
model that gives a b_opt (from the bracket's K(B) and the profile) places it beyond the same edge, and that edge reached
the target, the next size past it is trained. Past the trained sizes the fit extrapolates, so the threshold is the edge
itself: one more size checks it. A quick estimate off by 3x (the digits CNN with momentum 0.9 in
benchmarks/configs/digits_cnn.yaml) can leave the optimum outside a bracket whose measured fastest, with steps to target
resolved to a few steps, is an inner size; the fit on the same sizes still places b_opt outside it, and the fit's
diagnostics would otherwise only tell the user to add that size by hand. The fit then runs on every trained size; if the
new size is the fastest again, or b_opt still lies beyond, its diagnostics say so. A bracket where fewer than two sizes
reached the target has no fit to ask, and the final fit would stop the study: where the sizes that fell short ran out of
steps, the next size above the bracket is trained (a larger batch needs fewer steps; a quick estimate far below the
answer leaves the bracket there), and where they all diverged, the next size below
(:func:`~batchscope.core.selection.extension_without_a_fit`).

The file (``results/adaptive/WORKLOAD.extended.nc``) holds the bracket's choice (:mod:`batchscope.stages.adaptive`)
with ``chosen`` the sizes trained in the end, and what the fit on the bracket predicted.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from batchscope.core import scaling, selection
from batchscope.core.selection import MODELS
from batchscope.stages import Command, Rule, _common, adaptive, fit, train

log = logging.getLogger("batchscope")


def extend_choice(spec: dict[str, Any], choice_path: str, profile_paths: Sequence[str], run_paths: Sequence[str],
                  workload: str, expect: dict[str, str] | None = None) -> xr.Dataset:  # fmt: skip
    """The second checkpoint's file: the choice's variables with ``chosen`` the sizes trained in the end (the
    bracket, ``bracket``, and the extension, ``extended_batch_size``, -1 for none) and what decided it."""
    from batchscope.store import CacheError, read_expected

    choice = read_expected(choice_path, "choose_batch_sizes", adaptive.VARIABLES, expect)
    grid = choice["grid_batch_size"].values
    bracket = choice["chosen"].values.astype(bool)
    size, reason, fastest = None, "adaptive.extend is off", -1
    predicted = dict.fromkeys(fit.FIT_B_OPTS, math.nan)
    feasible = grid[choice["feasible"].values.astype(bool)]
    if spec.get("extend", True):
        runs = train.read_runs(run_paths, expect)
        k = scaling.steps_per_batch_size(fit.runs_table(runs, spec))["k"]
        if np.isfinite(k.values).sum() < 2:  # no K(B) to fit: the runs say which way to go, if they do
            size, reason = _without_a_fit(runs, k, feasible)
            reason = "no fit on the bracket: " + reason
        else:
            try:
                bracket_fit = fit.fit_scaling(profile_paths, run_paths, spec, workload, expect)
            except CacheError:  # a stale or damaged cache is the user's to fix, not a bracket without a fit
                raise
            except ValueError as err:  # e.g. too few sizes timed: the final fit says it again
                reason = f"no fit on the bracket ({err})"
            else:
                fastest = int(bracket_fit["fastest_batch_size"])
                predicted = {name: float(bracket_fit[name]) for name in fit.FIT_B_OPTS}
                size, reason = fit.extension_of_fit(bracket_fit, feasible)
        reason += f", so {size} is trained too" if size is not None else ""
    ds = choice.copy()
    ds["bracket"] = ("grid_batch_size", bracket, {"long_name": "chosen around the quick b_opt (choose_batch_sizes)"})
    ds["chosen"] = ("grid_batch_size", bracket | (grid == (size or -1)), {"long_name": "trained by the adaptive "
                    "study: the bracket and its extension"})  # fmt: skip
    ds["extended_batch_size"] = ((), size or -1, {"long_name": "trained past the bracket (-1: none)"})
    ds["bracket_fastest_batch_size"] = ((), fastest, {"long_name": "the fit on the bracket's fastest (-1: none)"})
    for name, model in zip(fit.FIT_B_OPTS, MODELS, strict=True):
        ds[f"bracket_{name}"] = ((), predicted[name], {"units": "examples", "long_name": f"the fit on the bracket's "
                                                       f"predicted b_opt, {model} step time (NaN: none)"})  # fmt: skip
    ds.attrs["reason"] = reason
    ds.attrs["bracket_reason"] = choice.attrs.get("reason", "")
    return ds


def _without_a_fit(runs: xr.Dataset, k, feasible_grid) -> tuple[int | None, str]:
    """:func:`~batchscope.core.selection.extension_without_a_fit` on the bracket's runs and their K(B)."""
    sizes = k.index.values.astype(int)
    at = [runs["run_batch_size"].values == b for b in sizes]
    short = train.ran_out_of_steps(runs)
    diverged = runs["diverged"].values.astype(bool) if "diverged" in runs else np.zeros(runs.sizes["run"], bool)
    fell_short = ~np.isfinite(runs["steps_to_target"].values)
    return selection.extension_without_a_fit(
        sizes, np.isfinite(k.values), [bool(short[m].any()) for m in at],
        [bool((fell_short & m).any() and diverged[fell_short & m].all()) for m in at], feasible_grid,
    )  # fmt: skip


def run_extend(args: argparse.Namespace) -> None:
    from batchscope import store

    spec = _common.spec(args, fit.config_slice)
    ds = extend_choice(spec, args.choice, args.profiles, args.runs, args.workload, _common.expect(args))
    ds.attrs.update(store.provenance("extend_bracket", spec), workload=args.workload or "")
    store.write_netcdf(ds, args.out)
    size = int(ds["extended_batch_size"])
    log.info("%s: %s", f"train B = {size} too" if size > 0 else "no extension", ds.attrs["reason"])


def _extend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--choice", required=True, help="the bracket (results/adaptive/WORKLOAD.nc)")
    parser.add_argument("--profiles", nargs="+", required=True, help="the workload's profile files")
    parser.add_argument("--runs", nargs="+", required=True, help="the bracket's training directories")
    _common.add_expect(parser)


VARIABLES = (*adaptive.VARIABLES, "extended_batch_size")
# 2: with the fastest inside the bracket, past an edge beyond which every step-time model's b_opt lies
# its slice is the fit's: it fits the bracket as the fit does, and the final fit's slice covers adaptive.extend
# 3: where fewer than two bracket sizes reached the target, the next size up (they ran out of steps) or down (diverged)
# 4: a fastest edge as fast as its inner neighbour is extended past where every step-time model's b_opt lies past it
RULES = {"extend_bracket": Rule(version=4, config_slice=fit.config_slice, variables=VARIABLES)}
COMMANDS = (
    Command(
        "extend-bracket",
        "the adaptive study's second round: the grid's next size past the trained bracket's edge, if it is the fastest",
        run_extend,
        _extend_arguments,
        spec=fit.config_slice,
    ),  # fmt: skip
)
