"""Gradient noise: per-example gradients, the gradient noise scale, the variance law, and the Jensen bias.

A minibatch gradient g_B is an unbiased estimate of the full gradient G whose covariance is Sigma / B (for draws
with replacement; times (N - B)/(N - 1) without). McCandlish et al. (2018) summarise the noise by the simple noise
scale B_simple = tr(Sigma) / |G|^2, and predict the critical batch size B_crit of the steps-to-target curve
S = S_min (1 + B_crit / B) to be close to it.

Two ways to measure tr(Sigma) and |G|^2:
- per example (:func:`per_example_sq_norms`, :func:`noise_scale`): tr(Sigma) = N/(N-1) (mean |g_n|^2 - |G|^2) needs
  only the squared norms of the per-example gradients. For models whose parametrised layers are all ``nn.Linear``
  the norms come from one backward pass, |dW_n|^2 = |a_n|^2 |delta_n|^2 (input activation times output gradient,
  a rank-one gradient) plus |delta_n|^2 for the bias; for models of Linear (also on sequences), Conv1d/2d,
  Layer/Group/RMS/BatchNorm (eval mode) and Embedding layers also from one pass (:mod:`batchscope.core.per_example`);
  otherwise from ``vmap(grad)`` in chunks.
- from two batch sizes (:func:`two_batch_noise_scale`, McCandlish et al. appendix A): E|g_B|^2 = |G|^2 +
  tr(Sigma)/B, solved for both from minibatch gradients at B_small and B_big. It needs no per-example gradients,
  so it also works where they are undefined (BatchNorm in train mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special
from torch import nn
from torch.func import functional_call, grad, vmap

from batchscope.core import per_example, scaling
from batchscope.core.jensen import JensenResult

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

BOOTSTRAP = 200  # resamples of the two-batch estimator's pairs, for its intervals


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def per_example_grads(
    model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """(N, P) per-example gradients by ``vmap(grad(...))`` over chunks of ``chunk`` examples (flattened)."""
    params, buffers = _params(model), {k: v.detach() for k, v in model.named_buffers()}

    def one(p, xn, yn):
        return loss(functional_call(model, (p, buffers), (xn.unsqueeze(0),)), yn.unsqueeze(0))

    per_example = vmap(grad(one), in_dims=(None, 0, 0))
    rows = []
    for start in range(0, len(x), chunk):
        grads = per_example(params, x[start : start + chunk], y[start : start + chunk])
        rows.append(torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1))
    return torch.cat(rows)


def _all_linear(model: nn.Module) -> bool:
    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    return bool(layers) and all(isinstance(m, nn.Linear) for m in layers)


def _sq_norms(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, chunk: int,
              method: str) -> tuple[torch.Tensor, str]:  # fmt: skip
    """:func:`per_example_sq_norms` and the method it used."""
    if method == "auto":
        method = "linear" if _all_linear(model) else "hooks" if per_example.supported(model) else "vmap"
        if method == "hooks":
            try:
                return _sq_norms(model, loss, x, y, chunk, "hooks")
            except per_example.Unsupported:  # a layer without the example dimension first
                method = "vmap"
    if method == "linear":
        if not _all_linear(model):
            raise ValueError("method 'linear' needs a model whose parametrised layers are all nn.Linear")
        # the one-pass path, on a model where it needs only the rank-one Linear identity
        return torch.cat([per_example.sq_norms(model, loss, x[i : i + chunk], y[i : i + chunk])
                          for i in range(0, len(x), chunk)]), method  # fmt: skip
    if method == "hooks":
        return torch.cat([per_example.sq_norms(model, loss, x[i : i + chunk], y[i : i + chunk])
                          for i in range(0, len(x), chunk)]), method  # fmt: skip
    return torch.cat([(per_example_grads(model, loss, x[i : i + chunk], y[i : i + chunk]) ** 2).sum(1)
                      for i in range(0, len(x), chunk)]), "vmap"  # fmt: skip


def per_example_sq_norms(
    model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024, method: str = "auto"
) -> torch.Tensor:
    """(N,) squared norms of the per-example gradients. ``method``: "linear" (one backward pass, all-Linear
    models), "hooks" (one pass, the layers of :func:`batchscope.core.per_example.supported`), "vmap" (materialises
    each gradient), or "auto" (linear, else hooks, else vmap; benchmarks/noise.py, benchmarks/per_example.py)."""
    return _sq_norms(model, loss, x, y, chunk, method)[0]


def full_gradient(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The flattened gradient of the mean loss over (x, y), accumulated over chunks by plain autograd (so it also
    works with BatchNorm in train mode, where each chunk is normalised by its own statistics)."""
    model.zero_grad(set_to_none=True)
    for start in range(0, len(x), chunk):
        xb, yb = x[start : start + chunk], y[start : start + chunk]
        (loss(model(xb), yb) * (len(xb) / len(x))).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).detach()
    model.zero_grad(set_to_none=True)
    return flat


@dataclass
class NoiseScale:
    grad_sq_norm: float  # |G|^2
    trace_sigma: float  # tr(Sigma), the per-example gradient covariance
    b_simple: float  # tr(Sigma) / |G|^2
    method: str
    # with a Hessian-vector product (two-batch only): G^T H G, tr(H Sigma) and B_noise = tr(H Sigma) / G^T H G
    g_h_g: float = math.nan
    trace_h_sigma: float = math.nan
    b_noise: float = math.nan
    # two-batch only: (resamples, 2) B_simple and B_noise recomputed from the pairs resampled with replacement (the
    # pairs are independent draws), for their intervals; None for the per-example estimate
    boot: np.ndarray | None = None

    def interval(self, column: int) -> tuple[float, float]:
        """The 95% percentile interval of B_simple (``column`` 0) or B_noise (1) over :attr:`boot`
        (:func:`batchscope.core.scaling.interval`: an infinite resample counts, a NaN one does not)."""
        if self.boot is None:
            return math.nan, math.nan
        low, high = scaling.interval(self.boot[:, [column]])[0]
        return float(low), float(high)


def noise_scale(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, method: str = "auto",
                chunk: int = 4096) -> NoiseScale:  # fmt: skip
    """|G|^2, tr(Sigma) and B_simple over the whole of (x, y), from per-example squared gradient norms; passes of
    at most ``chunk`` examples (1024 for the per-example norms)."""
    n = len(x)
    g = full_gradient(model, loss, x, y, chunk)
    sq, used = _sq_norms(model, loss, x, y, min(chunk, 1024), method)
    g_sq = float(g @ g)
    trace = n / (n - 1) * (float(sq.mean()) - g_sq)  # sum_n |g_n - G|^2 / (N - 1)
    return NoiseScale(g_sq, trace, trace / g_sq if g_sq > 0 else math.inf, f"per-example ({used})")


def minibatch_gradient(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of one minibatch, as training computes it (the model's own mode: BatchNorm as it is set)."""
    model.zero_grad(set_to_none=True)
    loss(model(x), y).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return flat.detach()


def two_batch_noise_scale(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, b_small: int,
                          b_big: int | None, pairs: int, rng: np.random.Generator,
                          hvp: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          chunk: int = 4096) -> NoiseScale:  # fmt: skip
    """McCandlish et al.'s estimator from ``pairs`` draws of a small and a big minibatch (without replacement).

    With E|g_B|^2 = |G|^2 + tr(Sigma)/B: |G|^2 = (B_big |g_big|^2 - B_small |g_small|^2)/(B_big - B_small) and
    tr(Sigma) = (|g_small|^2 - |g_big|^2)/(1/B_small - 1/B_big), each averaged over the pairs before the ratio.
    Draws without replacement shrink the 1/B term by (N - B)/(N - 1); both sizes are corrected for it.

    ``hvp`` (v -> H v, H the Hessian of the loss over (x, y) at the same weights): the same two sizes also give
    B_noise, since any fixed quadratic form obeys the same law, E[g_B^T H g_B] = G^T H G + tr(H Sigma)/B. It needs
    no per-example gradients, so it works for any model (BatchNorm in train mode included); one HVP per draw.

    ``b_big`` None (or at least N): the big "batch" is the whole of (x, y), whose 1/B term vanishes. Its gradient G
    (in passes of ``chunk`` examples) and G^T H G are then computed once, exactly, rather than drawn per pair: a pair
    is one small draw and one HVP, the levels |G|^2 and G^T H G carry no sampling noise, and the traces only the
    small draws'.
    """
    n = len(x)
    population = b_big is None or b_big >= n
    b_big = n if population else b_big
    small_draws, big_draws = [], []
    drawn = [(b_small, small_draws)] if population else [(b_small, small_draws), (b_big, big_draws)]
    for _ in range(pairs):
        for size, draws in drawn:
            index = torch.as_tensor(rng.choice(n, size, replace=False), device=x.device)
            g = minibatch_gradient(model, loss, x[index], y[index])
            draws.append((float(g @ g), float(g @ hvp(g)) if hvp is not None else math.nan))
    if population:
        g = full_gradient(model, loss, x, y, chunk)
        big_draws = [(float(g @ g), float(g @ hvp(g)) if hvp is not None else math.nan)] * pairs
    # the 1/B term of E[q(g_B)] is q-trace x (N - B) / (B (N - 1)) without replacement (0 for the whole set)
    inv_small, inv_big = (n - b_small) / (b_small * (n - 1)), (n - b_big) / (b_big * (n - 1))
    small, big = np.asarray(small_draws), np.asarray(big_draws)  # (pairs, 2): |g|^2, g^T H g

    def estimate(small_mean: np.ndarray, big_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(levels, traces, ratios) from the draws' means: |G|^2 and G^T H G, tr(Sigma) and tr(H Sigma)."""
        traces = (small_mean - big_mean) / (inv_small - inv_big)
        levels = small_mean - traces * inv_small
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(levels > 0, traces / np.where(levels > 0, levels, 1.0), np.inf)
        # no estimate (no HVP, or NaN draws) stays NaN; only a level estimated at <= 0 means B = inf
        return levels, traces, np.where(np.isnan(levels) | np.isnan(traces), np.nan, ratios)

    levels, traces, ratios = estimate(small.mean(0), big.mean(0))
    # the pairs resampled with replacement: the estimator's spread, from the same draws (no extra gradients)
    picks = rng.spawn(1)[0].integers(0, pairs, size=(BOOTSTRAP, pairs))
    boot = estimate(small[picks].mean(1), big[picks].mean(1))[2]  # (BOOTSTRAP, 2)
    # without an HVP the curvature column is NaN throughout: G^T H G, tr(H Sigma) and B_noise stay NaN
    return NoiseScale(levels[0], traces[0], ratios[0], "two-batch", levels[1], traces[1], ratios[1], boot=boot)


@dataclass
class VarianceLaw:
    batch_sizes: np.ndarray
    mean_sq_error: np.ndarray  # E|g_B - G|^2 over the draws
    predicted: np.ndarray  # tr(Sigma) (N - B) / (B (N - 1))
    z_max: np.ndarray  # per B: the largest |mean of g_B - G| / standard error over the coordinates
    within_3se: np.ndarray  # per B: the share of coordinates whose mean lies within 3 standard errors of G
    slope: float  # log-log slope of E|g_B - G|^2 against B
    slope_ci: tuple[float, float]
    slope_corrected: float  # the same after dividing out (N - B)/(N - 1)
    slope_corrected_ci: tuple[float, float]


def _loglog_slope(batch_sizes: np.ndarray, values: np.ndarray) -> tuple[float, tuple[float, float]]:
    # numpy's least squares and scipy.special's t quantile rather than scipy.stats.linregress: importing
    # scipy.stats costs 0.5 s of the noise job's start, more than the fit's whole use of it. polyfit's covariance
    # is scaled by the residual variance over n - 2 degrees of freedom: linregress's standard error, squared.
    # One size (or one repeated) has no slope; two sizes fit exactly and leave no degree of freedom: no interval.
    x, y = np.log(np.asarray(batch_sizes, float)), np.log(np.asarray(values, float))
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan, (math.nan, math.nan)
    if len(x) < 3:
        return float(np.polyfit(x, y, 1)[0]), (math.nan, math.nan)
    coefficients, covariance = np.polyfit(x, y, 1, cov=True)
    slope, stderr = float(coefficients[0]), float(np.sqrt(covariance[0, 0]))
    half = float(special.stdtrit(len(x) - 2, 0.975)) * stderr
    return slope, (slope - half, slope + half)


def variance_law(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, batch_sizes: list[int],
                 draws: int, rng: np.random.Generator, trace_sigma: float | None = None,
                 chunk: int = 4096) -> VarianceLaw:  # fmt: skip
    """Unbiasedness and the 1/B law: for each B, ``draws`` minibatches without replacement; the mean of their
    gradients against G (in standard errors; G in passes of ``chunk`` examples), and E|g_B - G|^2 against B with
    the finite-population correction."""
    n = len(x)
    g_full = full_gradient(model, loss, x, y, chunk)
    mse, z_max, within = [], [], []
    for size in batch_sizes:
        grads = torch.stack([
            minibatch_gradient(model, loss, x[i], y[i])
            for i in (torch.as_tensor(rng.choice(n, size, replace=False), device=x.device) for _ in range(draws))
        ])  # fmt: skip
        deviation = grads - g_full
        mse.append(float((deviation**2).sum(1).mean()))
        se = grads.std(0, unbiased=True) / math.sqrt(draws)
        z = (grads.mean(0) - g_full).abs() / se.clamp_min(1e-30)
        z_max.append(float(z.max()))
        within.append(float((z < 3).double().mean()))
    sizes = np.asarray(batch_sizes, dtype=float)
    mse = np.asarray(mse)
    fpc = (n - sizes) / (n - 1)
    slope, ci = _loglog_slope(sizes, mse)
    slope_c, ci_c = _loglog_slope(sizes, mse / fpc)
    trace = trace_sigma if trace_sigma is not None else float("nan")
    return VarianceLaw(sizes, mse, trace * fpc / sizes, np.asarray(z_max), np.asarray(within), slope, ci, slope_c,
                       ci_c)  # fmt: skip


# ------------------------------------------------------------------------------------------------ Jensen bias


def jensen_subspace(hessian_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    sizes: list[int], draws: int, damping: float, rng: np.random.Generator,
                    ) -> JensenResult:  # fmt: skip
    """The same on a trained model: ``hessian_of(x, y)`` returns the k x k Hessian of the mean loss over (x, y)
    restricted to a fixed subspace; H_m is the minibatch's, damped by ``damping`` I (a minibatch Hessian of a
    network can be singular or indefinite in any subspace). Compares E[(H_m + d I)^-1] with (H + d I)^-1."""
    full = hessian_of(x, y).double().cpu().numpy()
    k = len(full)
    damped = full + damping * np.eye(k)
    exact_inverse = np.linalg.inv(damped)
    n = len(x)
    out = {key: [] for key in ("bias", "se", "min_eig")}
    for m in sizes:
        inverses = []
        for _ in range(draws):
            index = torch.as_tensor(rng.choice(n, m, replace=False), device=x.device)
            h = hessian_of(x[index], y[index]).double().cpu().numpy()
            inverses.append(np.linalg.inv(h + damping * np.eye(k)))
        inverses = np.asarray(inverses)
        per_draw = np.einsum("dij,ji->d", inverses, damped) / k - 1
        out["bias"].append(per_draw.mean())
        out["se"].append(per_draw.std(ddof=1) / math.sqrt(draws))
        out["min_eig"].append(np.linalg.eigvalsh(inverses.mean(0) - exact_inverse).min())
    return JensenResult(np.asarray(sizes), *(np.asarray(out[key]) for key in ("bias", "se", "min_eig")),
                        np.full(len(sizes), math.nan))  # fmt: skip
