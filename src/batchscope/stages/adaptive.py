"""Stage ``choose_batch_sizes``: the adaptive study's batch sizes, chosen from the quick estimate.

The full grid (``study: full``) trains every batch size, learning rate and seed. The adaptive study
(``study: adaptive``) spends its training where the answer is:

- **Batch sizes.** A Snakemake checkpoint (``workflow/rules/adaptive.smk``) reads the workload's quick estimate
  (b_opt from the profile and the reference run's B_noise, capped at the largest feasible batch size) and picks
  a geometric bracket of the grid around it (:func:`choose`): the grid size nearest b_opt (on a log scale) and
  ``adaptive.neighbours`` grid sizes on each side, widened until it covers the quick estimate's b_opt band over
  the run, never above the largest feasible batch size. Everything downstream (the fit, the Hessian stage, the
  bill and the report's cost table) reads the chosen sizes from the checkpoint's file. The profile still times
  every grid size: it is cheap, and the memory limit needs it.
- **Learning rates, by successive halving with a pruning bound.** One job per chosen batch size trains all its
  seeds (``train_batch_size``). Its first seed trains every learning rate, the likely best first
  (:func:`lr_order`: the noise stage's reference lr index, the middle of the grid by default, then outward), each
  capped at the steps of the best run so far: a run that has taken that many steps without reaching the target
  cannot win, so it stops there, recorded as not reached (``steps_to_target`` NaN, ``reached_target`` false,
  ``pruned`` true). The later seeds, in the same job, train only the learning rates that survived
  (:func:`survivors`: the fewest steps to the target at the first seed, ties kept), in full: K(B) is a median over
  seeds, which a per-seed bound could bias.

- **One size past the bracket, where the answer says so** (``adaptive.extend``, a second checkpoint,
  ``extend_bracket``). Once the bracket is trained, the fit on it (:func:`batchscope.stages.fit.fit_scaling`) says
  which size is fastest and which are indistinguishable from it. Under T(B) = (N_iter + C_var/B)(tau_f + tau_d B),
  two sizes that reach the target equally fast have b_opt exactly between them (at their geometric mean), so an
  edge of the bracket that the fit cannot tell from its inner neighbour (within ``fit.tolerance``) has the optimum
  near or between them, and loses at most that tolerance. An edge that is the fastest and beats its inner
  neighbour beyond noise says the optimum lies at or beyond it, which is where a quick
  estimate that is off by more than the bracket's half-width leaves it: the feasible grid's next size past that
  edge is trained too (:func:`extension`), once. Failing that, with the fastest an inner size, the fit's model
  decides: where every step-time model that gives a b_opt (from the bracket's K(B) and the profile) places it
  beyond the same edge, and that edge reached the target, the next size past it is trained. Past the trained
  sizes the fit extrapolates, so the threshold is the edge itself: one more size checks it. A quick estimate off
  by 3x (the digits CNN with momentum 0.9 in
  benchmarks/configs/digits_cnn.yaml) can leave the optimum outside a bracket whose measured fastest, with steps
  to target resolved to a few steps, is an inner size; the fit on the same sizes still places b_opt outside it,
  and the fit's diagnostics would otherwise only tell the user to add that size by hand. The fit then runs on
  every trained size; if the new size is the fastest again, or b_opt still lies beyond, its diagnostics say so.

The choices are written to small NetCDF files (values in their variables, not in paths), read back by the
workflow's input functions (:func:`read_choice`).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from batchscope import config as cfg
from batchscope.stages import Command, Rule, _common, quick

log = logging.getLogger("batchscope")


def config_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """The grid it chooses from, the bracket's width, and what identifies its input (the quick estimate)."""
    return {
        "batch_sizes": sorted(config["grid"]["batch_sizes"]),
        "neighbours": config["adaptive"]["neighbours"],
        "inputs": {"quick_estimate": cfg.config_hash(quick.config_slice(config, workload))},
    }


@dataclass(frozen=True)
class Choice:
    batch_sizes: list[int]  # the chosen grid sizes, ascending
    centre: int  # the feasible grid size nearest b_opt (-1: no b_opt)
    reason: str


def choose(grid: Sequence[int], b_opt: float, band: Sequence[float], largest_feasible: int,
           neighbours: int = 1) -> Choice:  # fmt: skip
    """The grid sizes to train around a predicted ``b_opt``.

    Only the feasible grid sizes count (at most ``largest_feasible``; ``largest_feasible`` <= 0: no profiled size
    fitted in memory, and the smallest sizes are chosen). The bracket is the feasible size nearest ``b_opt`` on a
    log scale (the smaller on a tie) and ``neighbours`` sizes on each side; at an end of the feasible grid it is
    shifted inward, so it keeps its 2 x neighbours + 1 sizes where the grid has them (b_opt below the smallest
    size: the smallest sizes; above the largest feasible one: the largest feasible sizes). It is then widened to
    cover ``band`` (the quick b_opt's range over the run: it moves as training proceeds), rounded to the grid:
    down to the feasible size nearest the band's low end and up to the one nearest its high end (log scale, a tie
    widening). No ``b_opt`` (NaN: no usable noise measurement): the whole feasible grid.
    """
    sizes = sorted(int(b) for b in grid)
    feasible = [b for b in sizes if b <= largest_feasible] if largest_feasible > 0 else []
    width = 2 * neighbours + 1
    if not feasible:
        return Choice(sizes[:width], -1, "no profiled batch size fitted in memory: the grid's smallest sizes")
    if not math.isfinite(b_opt) or b_opt <= 0:
        return Choice(feasible, -1, "no quick b_opt (no usable noise measurement): the whole feasible grid")
    given, b_opt = b_opt, min(b_opt, float(feasible[-1]))
    distance = [round(abs(math.log(b / b_opt)), 12) for b in feasible]  # rounded: a tie is a tie
    centre = min(range(len(feasible)), key=lambda i: (distance[i], feasible[i]))
    low, high = centre - neighbours, centre + neighbours
    if low < 0:
        low, high = 0, high - low
    if high > len(feasible) - 1:
        low, high = max(0, low - (high - len(feasible) + 1)), len(feasible) - 1
    band_low, band_high = (float(x) for x in band)
    before = (low, high)
    if math.isfinite(band_low) and band_low > 0:  # each end of the band to its nearest feasible size (log scale)
        low = min(low, _nearest(feasible, band_low, prefer_smaller=True))
    if math.isfinite(band_high) and band_high > 0:
        high = max(high, _nearest(feasible, band_high, prefer_smaller=False))
    widened = feasible[low : before[0]] + feasible[before[1] + 1 : high + 1]
    chosen = feasible[low : high + 1]
    capped = f" (capped at {feasible[-1]})" if given > b_opt else ""
    reason = (
        f"the feasible grid size nearest b_opt {given:.0f}{capped}, {feasible[centre]}, and {neighbours} on each side"
    )
    if widened:
        reason += f", widened to {', '.join(map(str, sorted(widened)))} to cover the b_opt band"
    if feasible[-1] < sizes[-1]:
        reason += f"; the grid above {feasible[-1]} does not fit in memory"
    return Choice(chosen, feasible[centre], reason)


def _nearest(sizes: list[int], value: float, prefer_smaller: bool) -> int:
    """The index of the size nearest ``value`` on a log scale; a tie goes to the smaller or the larger size."""
    sign = 1 if prefer_smaller else -1
    return min(range(len(sizes)), key=lambda i: (round(abs(math.log(sizes[i] / value)), 12), sign * sizes[i]))


def lr_order(lrs: Sequence[float], centre: int | None = None) -> list[float]:
    """The learning rates in the order the adaptive study trains them: the likely best first. ``centre`` is the
    index of the likely best in the ascending grid (the noise stage's ``reference_lr_index``; None: the middle),
    then outward, the smaller of each pair first."""
    ascending = sorted(lrs)
    index = len(ascending) // 2 if centre is None else min(centre, len(ascending) - 1)
    return sorted(ascending, key=lambda lr: (abs(ascending.index(lr) - index), lr))


def survivors(steps: dict[float, float]) -> list[float]:
    """The learning rates the later seeds train (successive halving): those whose first-seed run reached the target
    in the fewest steps, ties all kept. ``steps`` maps each learning rate to its first-seed run's steps to target
    (NaN: not reached, pruned or diverged). When none reached it there is nothing to halve on: every one survives.
    """
    reached = {lr: s for lr, s in steps.items() if math.isfinite(s)}
    if not reached:
        return sorted(steps)
    best = min(reached.values())
    return sorted(lr for lr, s in reached.items() if s == best)


def bracket_band(estimate: xr.Dataset) -> list[float]:
    """The band of b_opt the bracket must cover: the quick estimate's over the run with the linear step time,
    widened to the saturating step time's (where the two models disagree, the training decides between them).
    Unchanged where there is no linear b_opt (then the whole feasible grid is trained anyway)."""
    band = [float(x) for x in estimate["b_opt_band"].values]
    if not math.isfinite(float(estimate["b_opt"])):
        return band
    covered = [b for b in (*band, *(float(x) for x in estimate["b_opt_sat_band"].values)) if math.isfinite(b) and b > 0]
    return [min(covered), max(covered)] if covered else band


def estimate_choice(spec: dict[str, Any], quick_path: str, expect: dict[str, str] | None = None) -> xr.Dataset:
    """The checkpoint's file: per grid size whether it is trained (``chosen``) and feasible, and what decided it."""
    from batchscope.store import read_expected

    estimate = read_expected(quick_path, "quick_estimate", quick.VARIABLES + ("largest_feasible_batch_size",), expect)
    b_opt, band = float(estimate["b_opt"]), [float(x) for x in estimate["b_opt_band"].values]
    sat_band = [float(x) for x in estimate["b_opt_sat_band"].values]
    widened = bracket_band(estimate)
    largest = int(estimate["largest_feasible_batch_size"])
    choice = choose(spec["batch_sizes"], b_opt, widened, largest, spec["neighbours"])
    reason = choice.reason
    if widened != band:
        reason += (f" (the band taken to cover the saturating step time's b_opt over the run too, {sat_band[0]:.0f} to "
                   f"{sat_band[1]:.0f})")  # fmt: skip
    grid = np.asarray(sorted(spec["batch_sizes"]), dtype=np.int64)
    ds = xr.Dataset(
        {
            "chosen": ("grid_batch_size", np.isin(grid, choice.batch_sizes), {"long_name": "trained by the adaptive "
                       "study"}),
            "feasible": ("grid_batch_size", (grid <= largest) if largest > 0 else np.zeros(len(grid), bool),
                         {"long_name": "at most the largest batch size that fitted in memory"}),
            "b_opt": ((), b_opt, {"units": "examples", "long_name": "the quick estimate's b_opt (capped)"}),
            "b_opt_band": ("bound", band, {"units": "examples", "long_name": "the quick b_opt over the run"}),
            "b_opt_sat_band": ("bound", sat_band, {"units": "examples", "long_name": "the quick b_opt with the "
                               "saturating step time over the run (the bracket covers it too)"}),
            "largest_feasible_batch_size": ((), largest),
            "centre_batch_size": ((), choice.centre, {"long_name": "the feasible grid size nearest b_opt (-1: none)"}),
        },
        coords={"grid_batch_size": grid, "bound": ["low", "high"]},
    )  # fmt: skip
    ds.attrs["reason"] = reason
    return ds


def read_choice(path: str, stage: str = "choose_batch_sizes") -> list[int]:
    """The batch sizes a checkpoint chose, ``choose_batch_sizes``'s bracket or ``extend_bracket``'s bracket and
    extension (the workflow's input functions read them here)."""
    from batchscope.store import read_netcdf

    ds = read_netcdf(path, stage, VARIABLES)
    return [int(b) for b in ds["grid_batch_size"].values[ds["chosen"].values.astype(bool)]]


MODELS = ("linear", "saturating")  # the step-time models whose b_opt the fit predicts, in b_opts' order
FIT_B_OPTS = ("b_opt", "b_opt_sat")  # their b_opt in a fit's file (stages/fit.py), in the same order


def extension_of_fit(fit_ds: xr.Dataset, feasible_grid: Sequence[int]) -> tuple[int | None, str]:
    """:func:`extension` on a fit's file (:func:`batchscope.stages.fit.fit_scaling`): its trained sizes, fastest,
    indistinguishable ones, both models' b_opt and which sizes reached the target. The second round reads the fit
    on the bracket; the fit's diagnostics, the final fit of the adaptive study."""
    b_opts = [float(fit_ds[name]) if name in fit_ds else math.nan for name in FIT_B_OPTS]
    return extension(fit_ds["batch_size"].values, int(fit_ds["fastest_batch_size"]),
                     fit_ds["indistinguishable"].values, feasible_grid, b_opts,
                     np.isfinite(fit_ds["k"].values))  # fmt: skip


def extension(trained: Sequence[int], fastest: int, indistinguishable: Sequence[bool],
              feasible_grid: Sequence[int], b_opts: Sequence[float] = (),
              reached: Sequence[bool] | None = None) -> tuple[int | None, str]:  # fmt: skip
    """The grid size to train past the trained sizes, or None, and the evidence in words (what the second round
    appends ", so N is trained too" to, and the fit's note "train the grid's next size N too").

    ``trained``: the trained sizes, the bracket (ascending); ``fastest``: the fit's fastest of them;
    ``indistinguishable``: per trained size, whether the fit cannot tell it from the fastest; ``feasible_grid``:
    the grid sizes that fit in memory; ``b_opts``: the fit's predicted b_opt per step-time model (:data:`MODELS`;
    NaN: that model gives none); ``reached``: per trained size, whether it reached the target (None: all did).

    The measured rule first: an edge that is the fastest and beats its inner neighbour beyond noise is extended
    past. Failing that, with the fastest an inner size, the fit decides: when every model that gives a b_opt
    places it beyond the same edge, and that edge reached the target, the next size past it is trained. The
    threshold is the edge, not the geometric midpoint to the next size: past the trained sizes the fit
    extrapolates, and one more size is the check (module docstring)."""
    sizes = [int(b) for b in trained]
    same = dict(zip(sizes, (bool(x) for x in indistinguishable), strict=True))
    if len(sizes) < 2 or fastest not in same:
        return None, "fewer than two trained sizes to compare"
    feasible = sorted(int(g) for g in feasible_grid)
    if fastest in (sizes[0], sizes[-1]):
        return _past_the_fastest_edge(sizes, fastest, same, feasible)
    reason = f"the fastest trained size, {fastest}, is an inner one"
    predicted = {model: float(b) for model, b in zip(MODELS, b_opts, strict=False) if not math.isnan(b)}
    below = bool(predicted) and all(b < sizes[0] for b in predicted.values())
    above = bool(predicted) and all(b > sizes[-1] for b in predicted.values())
    if not (below or above):
        return None, reason
    values = " and ".join(f"{b:.0f} ({model} step time)" for model, b in predicted.items())
    edge = sizes[0] if below else sizes[-1]
    where = f"b_opt {values}, {'below' if below else 'above'} the trained sizes ({sizes[0]} to {sizes[-1]})"
    if reached is not None and not dict(zip(sizes, reached, strict=True))[edge]:
        return None, f"{reason}; the fit predicts {where}, but {edge} did not reach the target"
    size = _next_past(feasible, edge, below)
    if size is None:
        return None, f"{reason}; the fit predicts {where}, and the feasible grid has no size past them"
    return size, f"{reason}; the fit predicts {where}"


def _next_past(feasible: list[int], edge: int, below: bool) -> int | None:
    """The feasible grid's next size below or above ``edge`` (None: there is none)."""
    beyond = [b for b in feasible if (b < edge if below else b > edge)]
    return (beyond[-1] if below else beyond[0]) if beyond else None


def _past_the_fastest_edge(sizes: list[int], fastest: int, same: dict[int, bool],
                           feasible: list[int]) -> tuple[int | None, str]:  # fmt: skip
    """The measured rule, for a fastest size at an edge: the grid size past it when it beats its inner neighbour
    beyond noise, or None, and why."""
    low_edge = fastest == sizes[0]
    inner = sizes[1] if low_edge else sizes[-2]
    side = "smallest" if low_edge else "largest"
    if same[inner]:
        return None, (f"the {side} trained size {fastest} is the fastest, but {inner} is as fast within the fit's "
                      "noise: the optimum lies between them")  # fmt: skip
    size = _next_past(feasible, fastest, low_edge)
    if size is None:
        return None, (f"the {side} trained size {fastest} is the fastest, and the feasible grid has no size "
                      f"{'below' if low_edge else 'above'} it")  # fmt: skip
    return size, (f"the {side} trained size {fastest} is the fastest, beating {inner} beyond the fit's noise: the "
                  "optimum lies at or beyond it")  # fmt: skip


def extension_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """The fit's slice (the extension fits the bracket as the fit does, and the final fit's slice covers
    ``adaptive.extend``); imported here, not at the top: the fit stage reads this module."""
    from batchscope.stages import fit

    return fit.config_slice(config, workload)


def extend_choice(spec: dict[str, Any], choice_path: str, profile_paths: Sequence[str], run_paths: Sequence[str],
                  workload: str, expect: dict[str, str] | None = None) -> xr.Dataset:  # fmt: skip
    """The second checkpoint's file: the choice's variables with ``chosen`` the sizes trained in the end (the
    bracket, ``bracket``, and the extension, ``extended_batch_size``, -1 for none) and what decided it."""
    from batchscope.stages import fit
    from batchscope.store import CacheError, read_expected

    choice = read_expected(choice_path, "choose_batch_sizes", VARIABLES, expect)
    grid = choice["grid_batch_size"].values
    bracket = choice["chosen"].values.astype(bool)
    size, reason, fastest = None, "adaptive.extend is off", -1
    predicted = dict.fromkeys(FIT_B_OPTS, math.nan)
    if spec.get("extend", True):
        try:
            bracket_fit = fit.fit_scaling(profile_paths, run_paths, spec, workload, expect)
        except CacheError:  # a stale or damaged cache is the user's to fix, not a bracket without a fit
            raise
        except ValueError as err:  # e.g. the target reached at fewer than two sizes: the final fit says it again
            reason = f"no fit on the bracket ({err})"
        else:
            fastest = int(bracket_fit["fastest_batch_size"])
            predicted = {name: float(bracket_fit[name]) for name in FIT_B_OPTS}
            size, reason = extension_of_fit(bracket_fit, grid[choice["feasible"].values.astype(bool)])
            reason += f", so {size} is trained too" if size is not None else ""
    ds = choice.copy()
    ds["bracket"] = ("grid_batch_size", bracket, {"long_name": "chosen around the quick b_opt (choose_batch_sizes)"})
    ds["chosen"] = ("grid_batch_size", bracket | (grid == (size or -1)), {"long_name": "trained by the adaptive "
                    "study: the bracket and its extension"})  # fmt: skip
    ds["extended_batch_size"] = ((), size or -1, {"long_name": "trained past the bracket (-1: none)"})
    ds["bracket_fastest_batch_size"] = ((), fastest, {"long_name": "the fit on the bracket's fastest (-1: none)"})
    for name, model in zip(FIT_B_OPTS, MODELS, strict=True):
        ds[f"bracket_{name}"] = ((), predicted[name], {"units": "examples", "long_name": f"the fit on the bracket's "
                                                       f"predicted b_opt, {model} step time (NaN: none)"})  # fmt: skip
    ds.attrs["reason"] = reason
    ds.attrs["bracket_reason"] = choice.attrs.get("reason", "")
    return ds


def run_extend(args: argparse.Namespace) -> None:
    from batchscope import store

    spec = _common.spec(args, extension_slice)
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


def run(args: argparse.Namespace) -> None:
    from batchscope import store

    spec = _common.spec(args, config_slice)
    ds = estimate_choice(spec, args.quick, _common.expect(args))
    ds.attrs.update(store.provenance("choose_batch_sizes", spec), workload=args.workload or "")
    store.write_netcdf(ds, args.out)
    chosen = ds["grid_batch_size"].values[ds["chosen"].values]
    log.info("train B = %s of the grid %s: %s", ", ".join(map(str, chosen)),
             ", ".join(map(str, ds["grid_batch_size"].values)), ds.attrs["reason"])  # fmt: skip


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", required=True, help="the workload's quick estimate (results/quick/WORKLOAD.nc)")
    _common.add_expect(parser)


VARIABLES = ("chosen", "feasible", "b_opt", "b_opt_band", "largest_feasible_batch_size")
# choose_batch_sizes 2: the bracket also covers the saturating step time's b_opt
# extend_bracket 2: with the fastest inside the bracket, past an edge beyond which every step-time model's b_opt lies
RULES = {
    "choose_batch_sizes": Rule(version=2, config_slice=config_slice, variables=VARIABLES),
    "extend_bracket": Rule(version=2, config_slice=extension_slice, variables=VARIABLES + ("extended_batch_size",)),
}
COMMANDS = (
    Command(
        "choose-batch-sizes",
        "the adaptive study's batch sizes: a bracket of the grid around the quick estimate's b_opt",
        run,
        _arguments,
        spec=config_slice,
    ),  # fmt: skip
    Command(
        "extend-bracket",
        "the adaptive study's second round: the grid's next size past the trained bracket's edge, if it is the fastest",
        run_extend,
        _extend_arguments,
        spec=extension_slice,
    ),  # fmt: skip
)
