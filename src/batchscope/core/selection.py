"""The adaptive study's rules, on numbers: which batch sizes to train and which learning rates survive.

- :func:`choose`: a geometric bracket of the grid around a predicted b_opt, within the feasible sizes, widened to
  cover b_opt's band over the run.
- :func:`lr_order` and :func:`survivors`: successive halving over a batch size's learning rates, the likely best
  first; each later seed trains the best third (``adaptive.halving_rate``) of the learning rates the seed before it
  trained.
- :func:`extension`: the one size past the trained bracket that the answer asks for, measured (an edge that is the
  fastest beyond noise) or predicted (every step-time model's b_opt beyond the same edge).

No files, config or tensors: the stages that read the quick estimate (``stages/adaptive.py``), the fit
(``stages/fit.py``, ``stages/extend.py``) and the training runs (``stages/train.py``) call these on what they read.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MODELS = ("linear", "saturating")  # the step-time models whose b_opt the fit predicts, in extension's b_opts order


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


def survivors(results: dict[float, list[tuple[float, float]]], rate: int = 3) -> list[float]:
    """Successive halving's next round: the best 1/``rate`` (rounded up) of the learning rates, by their runs so far
    (``results``: per learning rate, one (steps to the target, final validation loss) per seed trained). Ranked by
    the median steps over their seeds, a run that did not reach the target (pruned, diverged: NaN) counting as
    never, so it ranks below every one that did; the unreached ones by their mean final loss, how far they got.
    Every learning rate as fast as the last one kept is kept too (steps are counted at evaluations: a tie is no
    evidence). ``rate`` 3 is Hyperband's default; with three learning rates it keeps the fastest (and its ties)."""

    def steps(lr: float) -> float:
        return statistics.median(s if math.isfinite(s) else math.inf for s, _ in results[lr])

    def loss(lr: float) -> float:
        return statistics.fmean(value if math.isfinite(value) else math.inf for _, value in results[lr])

    ranked = sorted(results, key=lambda lr: (steps(lr), loss(lr)))
    last = ranked[math.ceil(len(ranked) / rate) - 1]
    if math.isfinite(steps(last)):
        return sorted(lr for lr in ranked if steps(lr) <= steps(last))
    return sorted(lr for lr in ranked if math.isfinite(steps(lr)) or loss(lr) <= loss(last))


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
    past. Failing that, the fit decides, with the fastest an inner size or an edge as fast as its inner neighbour:
    when every model that gives a b_opt places it beyond the same edge (for a fastest edge, that edge), and that
    edge reached the target, the next size past it is trained. The threshold is the edge, not the geometric
    midpoint to the next size: past the trained sizes the fit extrapolates, and one more size is the check (module
    docstring)."""
    sizes = [int(b) for b in trained]
    same = dict(zip(sizes, (bool(x) for x in indistinguishable), strict=True))
    if len(sizes) < 2 or fastest not in same:
        return None, "fewer than two trained sizes to compare"
    feasible = sorted(int(g) for g in feasible_grid)
    predicted = {model: float(b) for model, b in zip(MODELS, b_opts, strict=False) if not math.isnan(b)}
    below = bool(predicted) and all(b < sizes[0] for b in predicted.values())
    above = bool(predicted) and all(b > sizes[-1] for b in predicted.values())
    if fastest in (sizes[0], sizes[-1]):
        size, reason = _past_the_fastest_edge(sizes, fastest, same, feasible)
        inner = sizes[1] if fastest == sizes[0] else sizes[-2]
        # as fast as its neighbour, the measured rule puts the optimum between them; the fit may still put it past
        # this edge (never past the far one: the measurements say the optimum is not there)
        if size is not None or not same[inner] or not (below if fastest == sizes[0] else above):
            return size, reason
        side = "smallest" if fastest == sizes[0] else "largest"
        reason = f"the {side} trained size {fastest} is the fastest and {inner} as fast within the fit's noise"
    else:
        reason = f"the fastest trained size, {fastest}, is an inner one"
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


def extension_without_a_fit(trained: Sequence[int], reached: Sequence[bool], out_of_steps: Sequence[bool],
                            diverged: Sequence[bool], feasible_grid: Sequence[int]
                            ) -> tuple[int | None, str]:  # fmt: skip
    """The grid size to train past the trained sizes when fewer than two of them reached the target, so K(B) has
    nothing to be fitted on and the study would stop there; None when the runs do not say which way to go.

    Per trained size (ascending): ``reached`` the target; ``out_of_steps``: a run of it stopped at max_steps short
    of the target; ``diverged``: every run of it that fell short diverged. Steps to the target fall with B and every
    size has the same max_steps, so where a size ran out of steps the feasible grid's next size above the trained
    ones is trained (a larger batch needs fewer), unless the largest diverged at every learning rate (a larger one,
    at its larger rates, would too). Where sizes diverged instead, the next size below them (a smaller batch trains
    at its smaller learning rate), unless the smallest ran out of steps (a smaller one needs more). Where both
    directions are open, the edges decide: the largest ran out of steps, up; the smallest diverged, down."""
    sizes = [int(b) for b in trained]
    ran_out = [b for b, r, o in zip(sizes, reached, out_of_steps, strict=True) if not r and o]
    blew_up = [b for b, r, d in zip(sizes, reached, diverged, strict=True) if not r and d]
    done = [b for b, r in zip(sizes, reached, strict=True) if r]
    reason = (f"the target was reached at {len(done)} of the trained sizes"
              + (f" ({', '.join(map(str, done))})" if done else "") + ", and K(B) needs two")  # fmt: skip
    up, down = bool(ran_out) and sizes[-1] not in blew_up, bool(blew_up) and sizes[0] not in ran_out
    if up and down:
        up, down = sizes[-1] in ran_out, sizes[-1] not in ran_out and sizes[0] in blew_up
    if up:
        below, why = False, f"; {_listed(ran_out)} ran out of steps short of it, and a larger batch needs fewer"
    elif down:
        below, why = True, f"; {_listed(blew_up)} diverged, and a smaller batch trains at a smaller learning rate"
    elif ran_out and blew_up:
        return None, (f"{reason}; {_listed(ran_out)} ran out of steps and {_listed(blew_up)} diverged: neither a "
                      "larger nor a smaller batch is likely to reach it")  # fmt: skip
    else:
        return None, reason
    size = _next_past(sorted(int(g) for g in feasible_grid), sizes[0] if below else sizes[-1], below)
    if size is None:
        return None, reason + why + f", but the feasible grid has no size {'below' if below else 'above'} them"
    return size, reason + why


def _listed(sizes: Sequence[int]) -> str:
    return ", ".join(map(str, sizes))


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
