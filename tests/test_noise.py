"""Gradient noise and the Jensen bias against closed forms, a loop over examples and analytic expectations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from batchscope.config import filled
from batchscope.core import jensen, noise
from batchscope.workloads import data
from batchscope.workloads.models import cnn, mlp

CE = nn.functional.cross_entropy


def mse(out, target):
    return nn.functional.mse_loss(out.squeeze(-1), target)


def test_per_example_grads_equal_a_loop():
    torch.manual_seed(0)
    model = mlp(6, [7], 3).double()
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    fast = noise.per_example_grads(model, CE, x, y, chunk=8)
    for n in range(20):
        model.zero_grad()
        CE(model(x[n : n + 1]), y[n : n + 1]).backward()
        loop = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(fast[n], loop, rtol=0, atol=1e-10)


def test_norms_in_one_backward_pass_equal_vmap():
    torch.manual_seed(1)
    model = mlp(6, [9, 5], 4).double()
    x, y = torch.randn(33, 6, dtype=torch.float64), torch.randint(0, 4, (33,))
    linear = noise.per_example_sq_norms(model, CE, x, y, chunk=10, method="linear")
    reference = noise.per_example_sq_norms(model, CE, x, y, method="vmap")
    torch.testing.assert_close(linear, reference, rtol=1e-10, atol=1e-12)
    conv = cnn((1, 8, 8), [3], 4, 10).double()
    assert noise.per_example_sq_norms(conv, CE, torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.arange(5),
                                      method="auto").shape == (5,)  # fmt: skip
    with pytest.raises(ValueError, match="all nn.Linear"):
        noise.per_example_sq_norms(conv, CE, torch.randn(5, 1, 8, 8), torch.arange(5), method="linear")


def test_linreg_noise_has_its_closed_form():
    """Per-example MSE gradients of a linear model are 2 z_n (z_n^T w - y_n) with z = [x, 1]: numpy reference."""
    spec = {**filled("dataset", {"name": "linreg"}), "name": "linreg", "n_train": 500, "dim": 4}
    t = data.load_tensors(data.build(spec), "cpu")
    torch.manual_seed(0)
    model = mlp(4, [], 1).double()
    x, y = t.x_train.double(), t.y_train.double()
    result = noise.noise_scale(model, mse, x, y)
    w = np.concatenate([model[1].weight.detach().numpy().ravel(), model[1].bias.detach().numpy()])
    z = np.column_stack([x.numpy(), np.ones(500)])
    g_n = 2 * z * (z @ w - y.numpy())[:, None]
    g = g_n.mean(0)
    assert result.grad_sq_norm == pytest.approx(g @ g, rel=1e-10)
    assert result.trace_sigma == pytest.approx(((g_n - g) ** 2).sum() / 499, rel=1e-10)
    assert result.method == "per-example (linear)"


def test_minibatch_gradients_are_unbiased_and_follow_the_corrected_variance_law():
    """Synthetic teacher data, N = 20000: means within 3 standard errors, slope -1 +- 0.05 after correction."""
    spec = {**filled("dataset", {"name": "teacher"}), "name": "teacher", "n_train": 20000, "dim": 10}
    t = data.load_tensors(data.build(spec), "cpu")
    torch.manual_seed(0)
    model = mlp(10, [16], 4).double()
    x = t.x_train.double()
    trace = noise.noise_scale(model, CE, x, t.y_train).trace_sigma
    law = noise.variance_law(model, CE, x, t.y_train, [16, 64, 256, 1024, 4096], draws=300,
                             rng=np.random.default_rng(0), trace_sigma=trace)  # fmt: skip
    assert np.all(law.within_3se > 0.98)  # a few coordinates beyond 3 SE are expected among ~260
    assert abs(law.slope_corrected + 1) < 0.05, law.slope_corrected
    assert law.slope < law.slope_corrected  # uncorrected, the large batches fall faster: (N - B)/(N - 1) < 1
    np.testing.assert_allclose(law.mean_sq_error, law.predicted, rtol=0.2)  # 300 draws: ~8% standard error


def test_loglog_slope_and_interval_equal_scipy_linregress():
    """The variance law's slope and 95% interval against scipy.stats.linregress with the t quantile (1e-10), on
    noisy power-law data; two sizes give the exact slope and no interval, one size neither."""
    from scipy import stats

    rng = np.random.default_rng(3)
    sizes = np.array([16.0, 32, 64, 128, 256, 512])
    values = 7.0 * sizes**-0.93 * np.exp(rng.normal(0, 0.1, len(sizes)))
    slope, (low, high) = noise._loglog_slope(sizes, values)
    fit = stats.linregress(np.log(sizes), np.log(values))
    half = stats.t.ppf(0.975, len(sizes) - 2) * fit.stderr
    assert slope == pytest.approx(fit.slope, rel=1e-10)
    assert (low, high) == pytest.approx((fit.slope - half, fit.slope + half), rel=1e-10)
    assert high - low > 0.05  # the noise above widens it: not a zero-width interval
    slope, interval = noise._loglog_slope(sizes[:2], values[:2])
    assert slope == pytest.approx(math.log(values[1] / values[0]) / math.log(2), rel=1e-12)
    assert all(math.isnan(bound) for bound in interval)
    for one in (sizes[:1], np.array([64.0, 64.0])):  # one size (a grid of one) has no slope at all
        slope, interval = noise._loglog_slope(one, values[: len(one)])
        assert math.isnan(slope) and all(math.isnan(bound) for bound in interval)


def test_two_batch_estimate_is_within_15_percent_of_per_example():
    t = data.load_tensors(data.build({"name": "digits", "val_fraction": 0.2, "seed": 0}), "cpu")
    torch.manual_seed(0)
    model = mlp(64, [32], 10).double()
    x = t.x_train.double()
    exact = noise.noise_scale(model, CE, x, t.y_train)
    estimate = noise.two_batch_noise_scale(model, CE, x, t.y_train, 16, 512, pairs=400, rng=np.random.default_rng(0))
    assert estimate.b_simple == pytest.approx(exact.b_simple, rel=0.15)
    assert estimate.method == "two-batch"


@pytest.mark.parametrize("m", [15, 30, 100])
def test_jensen_bias_matches_the_inverse_wishart_mean(m):
    from batchscope.core.jensen import linreg_covariance

    p = 10
    result = jensen.jensen_linreg(linreg_covariance(p, 30.0, 0), [m], draws=4000, rng=np.random.default_rng(m))
    assert result.analytic[0] == pytest.approx((p + 1) / (m - p - 1))
    assert abs(result.relative_bias[0] - result.analytic[0]) < 3 * result.relative_bias_se[0]
    assert result.min_eigenvalue[0] > 0  # E[H_m^-1] - H^-1 is positive definite: Jensen


def test_inverse_wishart_needs_enough_samples():
    with pytest.raises(ValueError, match="m > p \\+ 1"):
        jensen.inverse_wishart_bias(10, 11)
    assert math.isclose(jensen.inverse_wishart_bias(10, 22), 1.0)


# ------------------------------------------------------------------ jensen_subspace on an exact Hessian


def linreg_population(n, p, seed):
    """x ~ N(0, S) rows (S of condition 10) and y = x w* + noise, and ``hessian_of``: the autograd Hessian of the
    mean squared error of a bias-free linear model, exact for a quadratic loss (it is 2 X^T X / m at any w)."""
    from batchscope.core.jensen import linreg_covariance

    covariance = linreg_covariance(p, 10.0, seed)
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.standard_normal((n, p)) @ np.linalg.cholesky(covariance).T)
    y = x @ torch.as_tensor(rng.standard_normal(p)) + 0.1 * torch.as_tensor(rng.standard_normal(n))
    w = torch.zeros(p, dtype=torch.float64)

    def hessian_of(xb, yb):
        return torch.autograd.functional.hessian(lambda v: ((xb @ v - yb) ** 2).mean(), w)

    return x, y, hessian_of


def inverse_wishart_se(p, m, draws):
    """Standard error of the mean of tr(H_m^-1 H)/p over ``draws`` Gaussian designs: m tr(Z^-1) with Z ~ W_p(I, m),
    whose inverse-Wishart variance is 2 p (m - 1) / ((m - p)(m - p - 1)^2 (m - p - 3))."""
    variance = m**2 / p**2 * 2 * p * (m - 1) / ((m - p) * (m - p - 1) ** 2 * (m - p - 3))
    return math.sqrt(variance / draws)


def test_jensen_subspace_reproduces_the_inverse_wishart_bias_on_linear_regression():
    """Squared loss: each minibatch Hessian is exact, so E[H_m^-1] H has the inverse-Wishart mean m/(m - p - 1).
    The population is 200,000 Gaussian rows, minibatches are drawn from it without replacement: against the
    closed form that costs a finite-population factor (N - m)/(N - 1) > 0.9998 and the population's departure
    from a Gaussian (its fourth moments off by ~0.7% at this N). Tolerance: 4 analytic Monte Carlo standard
    errors + 2% of the bias."""
    p, draws = 4, 3000
    x, y, hessian_of = linreg_population(200_000, p, seed=0)
    sizes = [12, 20, 40]
    result = noise.jensen_subspace(hessian_of, x, y, sizes, draws, damping=0.0, rng=np.random.default_rng(0))
    exact_h = hessian_of(x, y).numpy()
    for i, m in enumerate(sizes):
        analytic, se = (p + 1) / (m - p - 1), inverse_wishart_se(p, m, draws)
        assert abs(result.relative_bias[i] - analytic) < 4 * se + 0.02 * analytic, (m, result.relative_bias[i])
        # its own standard error: the sample SD of 3000 draws (m = 12 is too heavy-tailed for a 20% check)
        if m >= 20:
            assert result.relative_bias_se[i] == pytest.approx(se, rel=0.2)
        # Jensen: E[H_m^-1] - H^-1 = bias H^-1 for a Gaussian design, smallest eigenvalue bias / lambda_max(H);
        # the mean matrix's entries carry ~2% Monte Carlo error (se / bias above), so 20% is ~10 of them
        expected_min = analytic / np.linalg.eigvalsh(exact_h).max()
        assert result.min_eigenvalue[i] == pytest.approx(expected_min, rel=0.2)
    assert np.isnan(result.analytic).all()  # a closed form only for jensen_linreg


def test_jensen_subspace_is_zero_when_the_minibatch_is_the_whole_set():
    """m = N without replacement: every H_m is H, so E[H_m^-1] = H^-1 exactly, with any damping."""
    x, y, hessian_of = linreg_population(500, 4, seed=1)
    for damping in (0.0, 0.5):
        result = noise.jensen_subspace(hessian_of, x, y, [500], 3, damping, np.random.default_rng(0))
        assert abs(result.relative_bias[0]) < 1e-12 and result.relative_bias_se[0] < 1e-12
        assert abs(result.min_eigenvalue[0]) < 1e-12


def test_jensen_subspace_damping_against_a_gaussian_design():
    """With damping d, E[(H_m + d I)^-1] against (H + d I)^-1. Reference: 100,000 fresh Gaussian designs drawn
    in numpy (H_m = 2 X^T X / m, no Hessian code, no finite population). Tolerance: 4 combined standard errors +
    2% (the population's departure from a Gaussian). The damped inverse is nearly linear in H_m, so the bias
    is a small second-order term (delta method: 4/(m k) [tr(BSBS) + tr(BS)^2], B = (2S + d I)^-1; the
    neglected higher orders are -2% here), far below the undamped (p + 1)/(m - p - 1)."""
    p, m, d, draws = 4, 12, 1.0, 3000
    x, y, hessian_of = linreg_population(200_000, p, seed=2)
    result = noise.jensen_subspace(hessian_of, x, y, [m], draws, d, np.random.default_rng(2))
    s = (x.T @ x).numpy() / len(x)  # the population's second moment: H = 2 S
    a = 2 * s + d * np.eye(p)
    rng = np.random.default_rng(12345)
    design = rng.standard_normal((100_000, m, p)) @ np.linalg.cholesky(s).T
    h_m = 2 * np.einsum("dmi,dmj->dij", design, design) / m
    per_draw = np.einsum("dij,ji->d", np.linalg.inv(h_m + d * np.eye(p)), a) / p - 1
    reference, reference_se = per_draw.mean(), per_draw.std(ddof=1) / math.sqrt(len(per_draw))
    tolerance = 4 * math.hypot(result.relative_bias_se[0], reference_se) + 0.02 * reference
    assert abs(result.relative_bias[0] - reference) < tolerance, (result.relative_bias[0], reference, tolerance)
    b = np.linalg.inv(a)
    second_order = 4 / (m * p) * (np.trace(b @ s @ b @ s) + np.trace(b @ s) ** 2)
    assert result.relative_bias[0] == pytest.approx(second_order, rel=0.1)
    assert result.relative_bias[0] < 0.2 * (p + 1) / (m - p - 1)
    assert result.min_eigenvalue[0] > 0
