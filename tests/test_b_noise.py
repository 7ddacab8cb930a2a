"""B_noise = tr(H Sigma) / G^T H G from the two-batch estimator with one Hessian-vector product per draw, against
the exact value: on linear regression from the closed forms (H = X^T X / N, per-example gradients x_n r_n), and on
a small MLP from per-example gradients (a loop over examples) and the dense Hessian (torch.func.hessian).

The estimator's components (tr(H Sigma) and G^T H G) are linear in the draws' means, so they are unbiased: over R
independent repeats their mean must lie within 4 standard errors of the exact value (the standard error measured
from the repeats). B_noise, their ratio, is then checked at the relative precision those errors allow."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from batchscope.core import noise
from batchscope.core.hessian import HessianOperator

REPEATS, PAIRS = 16, 40


def half_mse(out, target):
    return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()


def exact(per_example: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
    """(tr(H Sigma), G^T H G), Sigma the population covariance of the per-example gradients (1/N, as the
    estimator's finite-population correction assumes)."""
    g = per_example.mean(0)
    centred = per_example - g
    sigma = centred.T @ centred / len(per_example)
    return float(torch.trace(h @ sigma)), float(g @ h @ g)


def repeated(model, loss, x, y, b_small, b_big):
    hvp = HessianOperator(model, loss, x, y).matvec
    runs = [noise.two_batch_noise_scale(model, loss, x, y, b_small, b_big, PAIRS, np.random.default_rng(seed), hvp=hvp)
            for seed in range(REPEATS)]  # fmt: skip
    return np.array([[r.trace_h_sigma, r.g_h_g, r.b_noise, r.trace_sigma] for r in runs])


def assert_within(draws: np.ndarray, truth: float, what: str) -> float:
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    assert se < 0.2 * abs(truth), f"{what}: too noisy to test ({se} against {truth})"
    assert abs(draws.mean() - truth) <= 4 * se, f"{what}: {draws.mean()} vs exact {truth} (SE {se})"
    return se / abs(truth)


def linear_regression():
    """A linear model on n = 400 examples at weights off the optimum, and its exact (tr(H Sigma), G^T H G, B_simple)."""
    torch.manual_seed(0)
    n, d = 400, 5
    x = torch.randn(n, d, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    w_true = torch.randn(d, dtype=torch.float64)
    y = x @ w_true + 0.3 * torch.randn(n, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_true + 0.5 * torch.randn(d, dtype=torch.float64)).unsqueeze(0))
    w = model.weight.detach().reshape(-1)
    residual = x @ w - y
    per_example = x * residual[:, None]  # the gradient of 0.5 (x_n^T w - y_n)^2
    h = x.T @ x / n  # the Hessian of the mean loss: constant in w
    trace_h_sigma, g_h_g = exact(per_example, h)
    b_simple = float((per_example - per_example.mean(0)).pow(2).sum(1).mean() / per_example.mean(0).pow(2).sum())
    return model, x, y, trace_h_sigma, g_h_g, b_simple


def test_linear_regression_b_noise_is_exact():
    model, x, y, trace_h_sigma, g_h_g, b_simple = linear_regression()
    draws = repeated(model, half_mse, x, y, 8, 128)
    rel_trace = assert_within(draws[:, 0], trace_h_sigma, "tr(H Sigma)")
    rel_level = assert_within(draws[:, 1], g_h_g, "G^T H G")
    b_noise = trace_h_sigma / g_h_g
    # the ratio of the means, within the components' combined relative error (4 standard errors each)
    ratio = draws[:, 0].mean() / draws[:, 1].mean()
    assert ratio == pytest.approx(b_noise, rel=4 * (rel_trace + rel_level))
    # and B_noise differs from B_simple here (H is not a multiple of the identity): the test tells them apart
    assert abs(b_noise / b_simple - 1) > 0.1


def test_the_whole_set_as_the_big_batch_gives_g_h_g_exactly_and_an_unbiased_trace():
    """b_big None (the stage's default): the big "batch" is all N examples, so G^T H G and |G|^2 are exact (float64:
    1e-10) and the same in every run, and tr(H Sigma), from the small draws alone, is unbiased (4 standard errors
    over 16 runs), as is B_noise at the precision that allows."""
    model, x, y, trace_h_sigma, g_h_g, _ = linear_regression()
    population = repeated(model, half_mse, x, y, 8, None)
    assert population[:, 1] == pytest.approx(np.full(REPEATS, g_h_g), rel=1e-10)
    rel_trace = assert_within(population[:, 0], trace_h_sigma, "tr(H Sigma)")
    assert population[:, 2].mean() == pytest.approx(trace_h_sigma / g_h_g, rel=4 * rel_trace)
    grad = (x * (x @ model.weight.detach().reshape(-1) - y)[:, None]).mean(0)
    level = noise.two_batch_noise_scale(model, half_mse, x, y, 8, len(x), 4, np.random.default_rng(0))
    assert level.grad_sq_norm == pytest.approx(float(grad @ grad), rel=1e-10)  # b_big = N: the same path


def test_b_noises_interval_from_the_resampled_pairs_covers_the_exact_value():
    """Each run's 95% interval (its pairs resampled) against the exact B_noise: over 16 independent runs of 40 pairs,
    at least 13 cover it (a 95% interval would miss 4 or more of 16 with probability 0.007), and 4x the pairs
    narrows the interval by about 2 (1/sqrt(pairs); between 1.5 and 2.7 here)."""
    model, x, y, trace_h_sigma, g_h_g, _ = linear_regression()
    truth = trace_h_sigma / g_h_g
    hvp = HessianOperator(model, half_mse, x, y).matvec

    def run(seed, pairs):
        return noise.two_batch_noise_scale(model, half_mse, x, y, 8, 128, pairs, np.random.default_rng(seed), hvp=hvp)

    runs = [run(seed, PAIRS) for seed in range(REPEATS)]
    covered = sum(r.interval(1)[0] <= truth <= r.interval(1)[1] for r in runs)
    assert covered >= 13, f"{covered} of {REPEATS} intervals cover B_noise = {truth}"
    assert all(r.boot.shape == (noise.BOOTSTRAP, 2) for r in runs)
    # the point estimate itself, not resampled, sits inside its own interval
    assert all(r.interval(1)[0] <= r.b_noise <= r.interval(1)[1] for r in runs)
    narrow = [run(seed, 4 * PAIRS) for seed in range(4)]
    width = np.median([np.log(r.interval(1)[1] / r.interval(1)[0]) for r in runs])
    narrow_width = np.median([np.log(r.interval(1)[1] / r.interval(1)[0]) for r in narrow])
    assert 1.5 < width / narrow_width < 2.7


def test_small_mlp_b_noise_against_the_dense_hessian():
    torch.manual_seed(1)
    n = 240
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    loss = nn.functional.cross_entropy
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def full_loss(vector):
        params = dict(zip(names, (part.reshape(s) for part, s in zip(vector.split(sizes), shapes, strict=True)),
                          strict=True))  # fmt: skip
        return loss(functional_call(model, params, (x,)), y)

    h = hessian(full_loss)(flat)
    rows = []
    for i in range(n):  # per-example gradients by a plain loop over examples
        model.zero_grad()
        loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    trace_h_sigma, g_h_g = exact(torch.stack(rows), h)
    draws = repeated(model, loss, x, y, 4, 64)
    rel_trace = assert_within(draws[:, 0], trace_h_sigma, "tr(H Sigma)")
    rel_level = assert_within(draws[:, 1], g_h_g, "G^T H G")
    ratio = draws[:, 0].mean() / draws[:, 1].mean()
    assert ratio == pytest.approx(trace_h_sigma / g_h_g, rel=4 * (rel_trace + rel_level))


def test_without_a_hessian_the_curvature_fields_are_absent_and_the_rest_unchanged():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(100, 3, dtype=torch.float64), torch.randint(0, 2, (100,))
    loss = nn.functional.cross_entropy
    plain = noise.two_batch_noise_scale(model, loss, x, y, 4, 32, 20, np.random.default_rng(5))
    with_h = noise.two_batch_noise_scale(model, loss, x, y, 4, 32, 20, np.random.default_rng(5),
                                         hvp=HessianOperator(model, loss, x, y).matvec)  # fmt: skip
    assert np.isnan(plain.b_noise) and np.isnan(plain.g_h_g)
    # the same draws: B_simple does not depend on whether the HVP was taken
    assert (with_h.grad_sq_norm, with_h.trace_sigma) == (plain.grad_sq_norm, plain.trace_sigma)
    assert np.isfinite(with_h.b_noise)
    # no HVP, no B_noise interval (NaN, not an infinite one); B_simple's resamples are the same either way
    assert np.isnan(plain.boot[:, 1]).all() and all(np.isnan(plain.interval(1)))
    np.testing.assert_array_equal(plain.boot[:, 0], with_h.boot[:, 0])
    low, high = with_h.interval(0)
    assert low <= with_h.b_simple <= high
