"""The scaling model: T_iter(B) = tau_f + tau_d B, K(B) = N_iter + C_var / B, and T(B) = K(B) T_iter(B).

T(B) is minimised at b_opt = sqrt(C_var tau_f / (N_iter tau_d)). In McCandlish et al.'s notation
N_iter = S_min and C_var / N_iter = B_crit.

Both fits are linear in their parameters; they are solved as least squares on *relative* residuals
(each row divided by its observation), because K and T_iter span orders of magnitude across the grid and an
absolute fit would ignore the small-B end where tau_f and C_var are determined. Parameters are bounded to be
non-negative (scipy's ``lsq_linear``).

Beside the linear step time, a saturating one (:func:`fit_saturating_step_time`): on a GPU the step time is flat
(launch and latency bound) up to a knee and linear above it,

    T_sat(B) = tau_f + tau_d max(B - b_knee, 0),    tau_f, tau_d, b_knee >= 0.

It is the linear model when b_knee = 0, so on data that are linear the two agree; the benchmark's
max(tau_f, tau_d B) is the case b_knee = tau_f / tau_d. Its optimum has a closed form
(:func:`b_opt_saturating`). A smooth form (softplus, or the roofline sqrt(tau_f^2 + (tau_d B)^2)) would need a
fourth parameter for the knee's width, or would not contain the linear model, and has no closed-form optimum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

# the linear and the saturating step time's b_opt (each capped at the memory limit) agree within 1.5x, or the
# answer depends on the model (the full fit's and the quick estimate's diagnostics)
MODELS_RATIO_MAX = 1.5
# How far the quick estimate's b_opt has been from the answer: the full grid's fastest batch size over the quick
# b_opt, lowest and highest over every run of the budget benchmark's workloads that docs/benchmarks.md records
# (benchmarks/budget.py), rounded outward. B_noise stands in for the critical batch size only to within a factor of
# a few (McCandlish et al. 2018); the quick b_opt's interval holds the measurement's noise alone, so this range is
# what a user is told to expect of the model.
QUICK_BEST_OVER_B_OPT = (0.29, 3.5)


@dataclass(frozen=True)
class LinearFit:
    intercept: float
    slope: float
    r2: float
    residuals: np.ndarray  # observed minus fitted, in the observation's units


def relative_fit(features: np.ndarray, observed: np.ndarray) -> LinearFit:
    features, observed = np.asarray(features, float), np.asarray(observed, float)
    if len(observed) < 2:
        raise ValueError(f"need at least 2 points to fit a line, got {len(observed)}")
    from scipy.optimize import lsq_linear  # here: scipy.optimize costs ~0.5 s, and the stage table imports this

    design = np.column_stack([np.ones_like(features), features]) / observed[:, None]
    solution = lsq_linear(design, np.ones_like(observed), bounds=(0.0, np.inf)).x
    fitted = solution[0] + solution[1] * features
    ss_res = float(np.sum((observed - fitted) ** 2))
    ss_tot = float(np.sum((observed - observed.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return LinearFit(float(solution[0]), float(solution[1]), r2, observed - fitted)


def fit_step_time(batch_sizes: Sequence[float], t_iter: Sequence[float]) -> LinearFit:
    """T_iter(B) = tau_f + tau_d B: intercept is tau_f (s), slope tau_d (s per example)."""
    return relative_fit(np.asarray(batch_sizes, float), np.asarray(t_iter, float))


def fit_steps(batch_sizes: Sequence[float], steps: Sequence[float]) -> LinearFit:
    """K(B) = N_iter + C_var / B: intercept is N_iter (steps), slope C_var (steps x examples)."""
    return relative_fit(1.0 / np.asarray(batch_sizes, float), np.asarray(steps, float))


def b_opt(n_iter: float, c_var: float, tau_f: float, tau_d: float) -> float:
    """argmin over B of (N_iter + C_var/B)(tau_f + tau_d B); inf when either N_iter or tau_d is zero."""
    if n_iter <= 0 or tau_d <= 0:
        return math.inf
    return math.sqrt(c_var * tau_f / (n_iter * tau_d))


def predicted_time(b: np.ndarray | float, n_iter: float, c_var: float, tau_f: float, tau_d: float):
    b = np.asarray(b, float)
    return (n_iter + c_var / b) * (tau_f + tau_d * b)


@dataclass(frozen=True)
class SaturatingFit:
    tau_f: float  # s: the step time below the knee
    tau_d: float  # s per example above the knee
    b_knee: float  # examples: where the step time starts to rise
    r2: float
    residuals: np.ndarray  # observed minus fitted, in the observation's units (in the order given)


def saturating_step_time(b: np.ndarray | float, tau_f: float, tau_d: float, b_knee: float) -> np.ndarray:
    """T_sat(B) = tau_f + tau_d max(B - b_knee, 0): flat at tau_f up to b_knee, then rising by tau_d per example."""
    b = np.asarray(b, float)
    return tau_f + tau_d * np.maximum(b - b_knee, 0.0)


def _hinge_given_knee(b: np.ndarray, t: np.ndarray, knees: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each knee (m,): the non-negative (tau_f, tau_d) minimising sum((T_sat(B)/T - 1)^2) with the knee held,
    and that sum. With the knee held the model is linear in (tau_f, tau_d): the 2 x 2 normal equations, and where
    their solution has a negative part, the better of the two one-parameter fits (the non-negative least squares
    optimum of two parameters has at least one of them at zero when the unconstrained one is infeasible)."""
    u = 1.0 / t  # (n,): the tau_f column, divided by the observation
    v = np.maximum(b[None, :] - knees[:, None], 0.0) / t  # (m, n): the tau_d column
    suu, su = float(u @ u), float(u.sum())
    suv, svv, sv = v @ u, np.einsum("mn,mn->m", v, v), v.sum(axis=1)
    det = suu * svv - suv**2
    with np.errstate(divide="ignore", invalid="ignore"):
        tau_f = np.where(det > 0, (svv * su - suv * sv) / det, np.nan)
        tau_d = np.where(det > 0, (suu * sv - suv * su) / det, np.nan)
        only_d = np.where(svv > 0, sv / svv, 0.0)

    def ssr(f, d):
        return np.sum((f[:, None] * u[None, :] + d[:, None] * v - 1.0) ** 2, axis=1)

    m = len(knees)
    both_ok = (tau_f >= 0) & (tau_d >= 0)
    fits = [(np.full(m, su / suu), np.zeros(m)), (np.zeros(m), only_d)]
    if both_ok.any():
        fits.append((np.where(both_ok, tau_f, 0.0), np.where(both_ok, tau_d, 0.0)))
    errors = np.stack([ssr(f, d) for f, d in fits])
    if both_ok.any():
        errors[-1, ~both_ok] = np.inf
    pick = np.argmin(errors, axis=0)
    rows = np.arange(m)
    return (np.stack([f for f, _ in fits])[pick, rows], np.stack([d for _, d in fits])[pick, rows],
            errors[pick, rows])  # fmt: skip


def fit_saturating_step_time(batch_sizes: Sequence[float], t_iter: Sequence[float]) -> SaturatingFit:
    """T_sat(B) = tau_f + tau_d max(B - b_knee, 0) by least squares on relative residuals, as the linear fit.

    The knee is the only parameter the model is not linear in: for a held knee, (tau_f, tau_d) are a
    non-negative linear least squares (:func:`_hinge_given_knee`), so the knee is found by minimising that
    profile, first on a grid (0, every batch size, and 256 sizes spaced evenly in log B between the smallest and the
    second-largest), then on three finer grids of 65 knees between the best knee's neighbours (the knee to about
    1e-6 of itself). The first grid makes the search global: the profile can have a local minimum between each
    pair of neighbouring batch sizes; the zooms cost less than a 1-D minimiser's scalar calls would.

    What the data cannot tell is fixed by convention. The knee stays at or below the second-largest size (above
    it only one size would set tau_d, and any knee up to the largest size would fit as well). A knee at or
    below the smallest size is moved down to the smallest value that fits alike: 0 (the linear model) when the
    line through the sizes has a non-negative intercept, -intercept / tau_d otherwise. Needs 3 sizes.
    """
    b, t = np.asarray(batch_sizes, float), np.asarray(t_iter, float)
    if len(t) < 3:
        raise ValueError(f"need at least 3 points to fit a saturating step time, got {len(t)}")
    order = np.argsort(b)
    bs, ts = b[order], t[order]
    knees = np.unique(np.concatenate([[0.0], bs[:-1], np.geomspace(bs[0], bs[-2], 256)]))
    for _ in range(4):  # the grid, then three zooms between the best knee's neighbours (65 knees each)
        tau_f, tau_d, ssr = _hinge_given_knee(bs, ts, knees)
        best = int(np.argmin(ssr))
        knee, f, d = knees[best], tau_f[best], tau_d[best]
        lo, hi = knees[max(best - 1, 0)], knees[min(best + 1, len(knees) - 1)]
        if not hi > lo:
            break
        knees = np.linspace(lo, hi, 65)
    if knee <= bs[0]:  # every size on the rising line: only its intercept c = tau_f - tau_d b_knee is seen
        intercept = f - d * knee
        knee = max(0.0, -intercept / d) if d > 0 else 0.0
        f = intercept + d * knee
    fitted = saturating_step_time(b, f, d, knee)
    ss_res = float(np.sum((t - fitted) ** 2))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return SaturatingFit(float(f), float(d), float(knee), r2, t - fitted)


def fit_saturating_if_possible(batch_sizes: np.ndarray, t_iter: np.ndarray) -> SaturatingFit | None:
    """The saturating step time, or None with fewer than 3 sizes (it has 3 parameters)."""
    return fit_saturating_step_time(batch_sizes, t_iter) if len(t_iter) >= 3 else None


def quick_best_range(b_opt: float, largest_feasible: int) -> tuple[float, float]:
    """Where the fastest batch size has lain around a quick b_opt (:data:`QUICK_BEST_OVER_B_OPT`), the upper end at
    most the largest feasible batch size (none when nothing fitted, ``largest_feasible`` <= 0); NaN without b_opt."""
    if not (math.isfinite(b_opt) and b_opt > 0):
        return math.nan, math.nan
    low, high = (b_opt * factor for factor in QUICK_BEST_OVER_B_OPT)
    if largest_feasible > 0:
        low, high = min(low, largest_feasible), min(high, largest_feasible)
    return low, high


def models_ratio(linear: float, saturating: float) -> float:
    """How far apart the two step-time models put b_opt: >= 1 (1 when both are 0, inf when only one is), NaN when
    either is unknown."""
    if not (math.isfinite(linear) and math.isfinite(saturating)):
        return math.nan
    low, high = sorted((linear, saturating))
    return high / low if low > 0 else math.inf if high > 0 else 1.0


def b_opt_saturating(n_iter: float, c_var: float, tau_f: float, tau_d: float, b_knee: float) -> float:
    """argmin over B of (N_iter + C_var/B) T_sat(B), in closed form.

    Below the knee T(B) = (N_iter + C_var/B) tau_f only falls with B. Above it T_sat is the line a + tau_d B with
    a = tau_f - tau_d b_knee, so T(B) = N_iter a + C_var tau_d + N_iter tau_d B + C_var a / B, whose derivative
    N_iter tau_d - C_var a / B^2 vanishes at sqrt(C_var a / (N_iter tau_d)). Hence b_opt = max(b_knee, that) when
    C_var a > 0 (inf when also N_iter tau_d = 0: T falls for ever), and b_knee when C_var a <= 0 (T rises above
    the knee). With b_knee = 0 it is :func:`b_opt` of the linear model.
    """
    a = tau_f - tau_d * b_knee
    if c_var * a <= 0:
        return float(b_knee)
    if n_iter * tau_d <= 0:
        return math.inf
    return max(float(b_knee), math.sqrt(c_var * a / (n_iter * tau_d)))


def effective_b_crit(steps: Sequence[float], b_noise: np.ndarray, b_ref: float, end: float | None = None) -> np.ndarray:
    """The critical batch size of a whole run whose noise scale changes, from B_noise at snapshots of one run at
    batch size ``b_ref``: the mean of B_noise weighted by the progress each stretch of the run makes.

    With the local law, a stretch that an infinite batch crosses in dS_min steps costs dS_min (1 + B_noise / B)
    steps at batch size B, so a fixed B reaches the target in K(B) = S_min + (1/B) int B_noise dS_min steps: the
    grid's B_crit = C_var / N_iter is the mean of B_noise over dS_min. The reference run spent dS = dS_min
    (1 + B_noise / b_ref) steps on each stretch, hence dS_min = dS / (1 + B_noise / b_ref). Each snapshot stands
    for its stretch of the run (from halfway to the snapshot before, or step 0, to halfway to the next; the last to
    its own step, or to ``end``). ``end``: the step at which the run reached the target; K(B) counts steps to the
    target, so the stretches stop there (a run that trained on, ``stop_at_target: false``, has snapshots beyond it
    that get none). A stretch of B_noise = inf (no gradient signal left) has dS_min = 0 and adds dS b_ref to the
    integral. Snapshots with B_noise <= 0 or NaN are left out.

    ``b_noise``: (snapshots,) or (snapshots, resamples); the result has the trailing shape. NaN when no snapshot
    is usable, inf when every usable one is infinite.
    """
    steps = np.asarray(steps, float)
    b = np.asarray(b_noise, float)
    last = steps[-1] if end is None else end
    edges = np.minimum(np.concatenate([[0.0], (steps[1:] + steps[:-1]) / 2, [last]]), last)
    stretch = np.diff(edges) if last > 0 else np.ones(len(steps))  # a run of no steps: equal stretches
    stretch = stretch.reshape((-1,) + (1,) * (b.ndim - 1))
    usable = b > 0  # NaN compares False
    finite = usable & np.isfinite(b)
    b_safe = np.where(finite, b, 1.0)
    weight = np.where(finite, stretch / (1 + b_safe / b_ref), 0.0)  # dS_min
    integral = np.where(finite, weight * b_safe, np.where(usable, stretch * b_ref, 0.0)).sum(axis=0)
    mass = weight.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(mass > 0, integral / np.where(mass > 0, mass, 1.0), np.inf)
    return np.where(usable.any(axis=0), mean, np.nan)


def update_lag(optimizer: dict[str, Any], warmup_steps: int = 0) -> float:
    """The steps by which the optimizer's updates trail full-size steps under a constant gradient: what every run
    spends beyond S_min (1 + B_noise / B) steps, at every batch size alike.

    The update at step s is f(s) lr times g's multiple m(s): f the warm-up's factor ((s + 1) / W up to W updates,
    then 1: engine.runtime.lr_factor), m(s) = (1 - beta^(s+1)) / (1 - beta) for SGD's momentum beta (buf = beta buf
    + g, the update buf: torch's without dampening), (1 - beta^(s+2)) / (1 - beta) with Nesterov (g + beta buf), 1
    for AdamW (its bias correction makes the first update full-size). Full-size steps are f = 1 and m = 1 / (1 -
    beta), so the shortfall is sum_s (1 - f(s)) = (W - 1) / 2, plus sum_s f(s) beta^(s+1) (Nesterov: beta^(s+2)):
    beta / (1 - beta) without a warm-up (9 at 0.9, Nesterov 8.1), less under one, which overlaps the momentum's own
    build-up. Summed here until beta^s < 1e-12."""
    lag = (warmup_steps - 1) / 2 if warmup_steps > 1 else 0.0
    beta = float(optimizer.get("momentum", 0.0)) if optimizer.get("name") == "sgd" else 0.0
    if beta > 0:
        s = np.arange(math.ceil(math.log(1e-12) / math.log(beta)) + warmup_steps)
        warm = np.minimum((s + 1) / warmup_steps, 1.0) if warmup_steps > 0 else np.ones(len(s))
        lag += float(np.sum(warm * beta ** (s + (2 if optimizer.get("nesterov") else 1))))
    return lag


def b_crit_with_lag(b_crit: np.ndarray | float, steps_to_target: float, b_ref: float, lag: float) -> np.ndarray:
    """The B_crit that the grid's fit K(B) = N_iter + C_var / B measures when every run spends ``lag`` steps
    (:func:`update_lag`) beyond the local law's: K(B) = S_min (1 + b_crit / B) + lag, so N_iter = S_min + lag,
    C_var = S_min b_crit and B_crit = b_crit S_min / (S_min + lag). S_min comes from the reference run, which
    reached the target in ``steps_to_target`` steps at ``b_ref``: S_min = (steps_to_target - lag) / (1 + b_crit /
    b_ref), 0 for a run all of whose steps were lag. An infinite b_crit gives its limit, (steps_to_target - lag)
    b_ref / lag. No lag, or a run that did not reach the target (NaN): ``b_crit`` as it is."""
    b = np.asarray(b_crit, float)
    if not lag > 0 or not math.isfinite(steps_to_target):
        return b
    ahead = max(steps_to_target - lag, 0.0)
    with np.errstate(invalid="ignore"):
        s_min = ahead / (1 + b / b_ref)
        return np.where(np.isinf(b), ahead * b_ref / lag, b * s_min / (s_min + lag))


def predicted_time_saturating(b: np.ndarray | float, n_iter: float, c_var: float, tau_f: float, tau_d: float,
                              b_knee: float):  # fmt: skip
    b = np.asarray(b, float)
    return (n_iter + c_var / b) * saturating_step_time(b, tau_f, tau_d, b_knee)


def goodness(observed: np.ndarray, fitted: np.ndarray) -> tuple[float, float]:
    """(R^2 on the raw values, largest |observed - fitted| / observed) of a fitted curve at the observations."""
    observed, fitted = np.asarray(observed, float), np.asarray(fitted, float)
    if not len(observed):
        return math.nan, math.nan
    ss_tot = float(np.sum((observed - observed.mean()) ** 2))
    r2 = 1.0 - float(np.sum((observed - fitted) ** 2)) / ss_tot if ss_tot > 0 else math.nan
    return r2, max_relative(observed - fitted, observed)


def steps_cube(runs: pd.DataFrame):
    """The runs' steps to target as a (batch_size, lr, seed) cube (xarray): a censored or diverged run (NaN) counts
    as infinitely many steps; NaN marks a point that was not trained."""
    steps = runs.assign(steps=runs["steps_to_target"].fillna(np.inf))
    return steps.set_index(["batch_size", "lr", "seed"])["steps"].to_xarray()


def steps_per_batch_size(runs: pd.DataFrame) -> pd.DataFrame:
    """K(B): per batch size, the best learning rate's median steps-to-target over seeds.

    ``runs`` has columns batch_size, lr, seed, steps_to_target (NaN when censored or diverged). A censored
    run counts as infinitely many steps, so an lr whose median run never reached the target cannot win;
    a batch size where no lr's median reached it gets K = NaN and is left out of the fit.
    """
    per_lr = steps_cube(runs).median("seed")  # over the seeds each lr was trained with
    k, best_lr = per_lr.min("lr"), per_lr.fillna(np.inf).idxmin("lr")
    reached = np.isfinite(k.values)
    columns = {"k": np.where(reached, k.values, np.nan), "best_lr": np.where(reached, best_lr.values, np.nan)}
    return pd.DataFrame(columns, index=pd.Index(k["batch_size"].values, name="batch_size"))


def bootstrap_steps(
    runs: pd.DataFrame, n_boot: int, rng: np.random.Generator, vectorised: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """K(B) for ``n_boot`` bootstrap replicates: seeds resampled with replacement in every (B, lr) cell.

    Returns (batch sizes, K of shape (n_boot, n_batch_sizes)). Vectorised over replicates on a
    (B, lr, seed) cube when every cell has the same number of seeds (what the full grid produces); cells of
    different sizes (the adaptive study's survivors) are resampled cell by cell, all replicates of a cell at once
    (``vectorised=False`` forces that path).
    """
    cube = steps_cube(runs).transpose("batch_size", "lr", "seed")
    batch_sizes = cube["batch_size"].values
    regular = not bool(cube.isnull().any())  # every (batch size, lr) trained at every seed
    if vectorised is None:
        vectorised = regular
    if vectorised and not regular:
        raise ValueError("vectorised bootstrap needs the same number of seeds in every (batch size, lr) cell")
    if vectorised:
        cube = cube.values
        picks = rng.integers(0, cube.shape[-1], (n_boot, *cube.shape))
        resampled = np.take_along_axis(np.broadcast_to(cube, picks.shape), picks, axis=-1)
        k = np.median(resampled, axis=-1).min(axis=-1)
    else:
        # K = min over lr of the cell's median, as steps_per_batch_size, on each cell's own resamples (one pass
        # per resample through pandas took 15 ms: 3 s for 200 replicates of an adaptive study)
        k = np.full((n_boot, len(batch_sizes)), np.inf)
        column = {b: j for j, b in enumerate(batch_sizes)}
        for (b, _), cell in runs.groupby(["batch_size", "lr"]):
            steps = cell["steps_to_target"].fillna(np.inf).to_numpy(float)
            medians = np.median(steps[rng.integers(0, len(steps), (n_boot, len(steps)))], axis=1)
            k[:, column[b]] = np.minimum(k[:, column[b]], medians)
    k[~np.isfinite(k)] = np.nan
    return batch_sizes, k


def round_bootstrap(t_round: np.ndarray, n_boot: int, rng: np.random.Generator, paired: bool) -> np.ndarray:
    """T_iter per batch size for ``n_boot`` resamples of the profiling rounds: (n_boot, n_sizes).

    ``t_round`` is (n_sizes, n_rounds), each round's median. ``paired`` (the sizes were timed in the same
    interleaved rounds): the same rounds are drawn for every size, since a round timed all sizes within seconds
    of each other, so a slow spell of the machine moves them together and their ratios, which decide b_opt and
    the ranking, stay as they were. Otherwise (profiles of separate jobs) each size's rounds are drawn alone.
    """
    n_sizes, n_rounds = t_round.shape
    if paired:
        picks = rng.integers(0, n_rounds, (n_boot, n_rounds))
        return np.median(t_round[:, picks], axis=-1).T
    picks = rng.integers(0, n_rounds, (n_boot, n_sizes, n_rounds))
    return np.median(np.take_along_axis(np.broadcast_to(t_round, picks.shape), picks, axis=-1), axis=-1)


def interval(samples: np.ndarray) -> np.ndarray:
    """95% percentile interval of each column of ``samples`` (n_boot, n): (n, 2). Infinite samples (a resample
    that never reached the target) count, and can make a bound infinite; NaN ones (none drawn) do not."""
    result = np.full((samples.shape[1], 2), np.nan)
    for j in range(samples.shape[1]):
        drawn = samples[:, j][~np.isnan(samples[:, j])]
        if len(drawn) and np.isfinite(drawn).any():
            result[j] = np.quantile(np.sort(drawn), [0.025, 0.975], method="lower")
    return result


def relative_iqr(t_round: np.ndarray) -> np.ndarray:
    """Per size, the relative interquartile range of its round medians after dividing out each round's common
    level (the geometric mean over sizes): a slow spell that moved every size alike (which the paired bootstrap
    cancels) is not counted; what one size suffered alone is."""
    if not t_round.size:
        return np.full(len(t_round), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        level = np.exp(np.nanmean(np.log(t_round), axis=0))
        ratio = t_round / level
        q25, q50, q75 = np.nanquantile(ratio, [0.25, 0.5, 0.75], axis=1)
    return (q75 - q25) / q50


def max_relative(residuals: np.ndarray, observed: np.ndarray) -> float:
    return float(np.max(np.abs(residuals) / observed)) if len(observed) else math.nan


def fastest(grid_b: np.ndarray, time: np.ndarray, boot_time: np.ndarray,
             tolerance: float) -> tuple[int, np.ndarray, np.ndarray]:  # fmt: skip
    """(fastest batch size, which sizes are indistinguishable from it, share of resamples each is fastest in).

    A size is indistinguishable when its time is within ``tolerance`` of the resample's fastest in at least 5% of
    the resamples: the data cannot rule out that it is as fast. The point estimate's fastest always is.
    """
    if not np.isfinite(time).any():
        return -1, np.zeros(len(grid_b), bool), np.zeros(len(grid_b))
    best = int(np.nanargmin(time))
    candidates = np.zeros(len(grid_b), bool)
    candidates[best] = True
    p_fastest = np.zeros(len(grid_b))
    usable = np.isfinite(boot_time).any(axis=1)
    if usable.any():
        resampled = np.where(np.isfinite(boot_time[usable]), boot_time[usable], np.inf)
        ratio = resampled / resampled.min(axis=1, keepdims=True)
        candidates |= np.isfinite(time) & (np.quantile(ratio, 0.05, axis=0) <= 1 + tolerance)
        p_fastest = np.bincount(resampled.argmin(axis=1), minlength=len(grid_b)) / usable.sum()
    return int(grid_b[best]), candidates, p_fastest
