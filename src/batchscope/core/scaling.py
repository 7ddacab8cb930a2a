"""The scaling model: T_iter(B) = tau_f + tau_d B, K(B) = N_iter + C_var / B, and T(B) = K(B) T_iter(B).

T(B) is minimised at b_opt = sqrt(C_var tau_f / (N_iter tau_d)). In McCandlish et al.'s notation
N_iter = S_min and C_var / N_iter = B_crit.

Both fits are linear in their parameters; they are solved as least squares on *relative* residuals
(each row divided by its observation), because K and T_iter span orders of magnitude across the grid and an
absolute fit would ignore the small-B end where tau_f and C_var are determined. Parameters are bounded to be
non-negative (scipy's ``lsq_linear``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


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


def steps_per_batch_size(runs: pd.DataFrame) -> pd.DataFrame:
    """K(B): per batch size, the best learning rate's median steps-to-target over seeds.

    ``runs`` has columns batch_size, lr, seed, steps_to_target (NaN when censored or diverged). A censored
    run counts as infinitely many steps, so an lr whose median run never reached the target cannot win;
    a batch size where no lr's median reached it gets K = NaN and is left out of the fit.
    """
    steps = runs.assign(steps=runs["steps_to_target"].fillna(np.inf))
    per_lr = steps.groupby(["batch_size", "lr"])["steps"].median().reset_index()
    best = per_lr.loc[per_lr.groupby("batch_size")["steps"].idxmin()].set_index("batch_size")
    best.loc[~np.isfinite(best["steps"]), ["steps", "lr"]] = np.nan
    return best.rename(columns={"steps": "k", "lr": "best_lr"})[["k", "best_lr"]]


def bootstrap_steps(
    runs: pd.DataFrame, n_boot: int, rng: np.random.Generator, vectorised: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """K(B) for ``n_boot`` bootstrap replicates: seeds resampled with replacement in every (B, lr) cell.

    Returns (batch sizes, K of shape (n_boot, n_batch_sizes)). Vectorised over replicates on a
    (B, lr, seed) cube when every cell has the same number of seeds (what the workflow produces); cells of
    different sizes are resampled one by one (``vectorised=False`` forces that path).
    """
    steps = runs.assign(steps=runs["steps_to_target"].fillna(np.inf))
    batch_sizes = np.sort(steps["batch_size"].unique())
    cells = [group["steps"].to_numpy() for _, group in steps.groupby(["batch_size", "lr"])]
    lr_counts = steps.groupby("batch_size")["lr"].nunique().to_numpy()
    regular = len({len(c) for c in cells}) == 1 and len(set(lr_counts)) == 1
    if vectorised is None:
        vectorised = regular
    if vectorised and not regular:
        raise ValueError("vectorised bootstrap needs the same number of seeds in every (batch size, lr) cell")
    if vectorised:
        cube = np.stack(cells).reshape(len(batch_sizes), lr_counts[0], len(cells[0]))
        picks = rng.integers(0, cube.shape[-1], (n_boot, *cube.shape))
        resampled = np.take_along_axis(np.broadcast_to(cube, picks.shape), picks, axis=-1)
        k = np.median(resampled, axis=-1).min(axis=-1)
    else:
        k = np.empty((n_boot, len(batch_sizes)))
        for i in range(n_boot):
            parts = [g.iloc[rng.integers(0, len(g), len(g))] for _, g in runs.groupby(["batch_size", "lr"])]
            k[i] = steps_per_batch_size(pd.concat(parts))["k"].fillna(np.inf).to_numpy()
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
