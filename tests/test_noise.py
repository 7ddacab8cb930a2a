"""Gradient noise and the Jensen bias against closed forms, a loop over examples and analytic expectations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from batchscope.config import DATASET_DEFAULTS
from batchscope.core import noise
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
    spec = {**DATASET_DEFAULTS["linreg"], "name": "linreg", "n_train": 500, "dim": 4}
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
    spec = {**DATASET_DEFAULTS["teacher"], "name": "teacher", "n_train": 20000, "dim": 10}
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
    from batchscope.workloads.data import linreg_covariance

    p = 10
    result = noise.jensen_linreg(linreg_covariance(p, 30.0, 0), [m], draws=4000, rng=np.random.default_rng(m))
    assert result.analytic[0] == pytest.approx((p + 1) / (m - p - 1))
    assert abs(result.relative_bias[0] - result.analytic[0]) < 3 * result.relative_bias_se[0]
    assert result.min_eigenvalue[0] > 0  # E[H_m^-1] - H^-1 is positive definite: Jensen


def test_inverse_wishart_needs_enough_samples():
    with pytest.raises(ValueError, match="m > p \\+ 1"):
        noise.inverse_wishart_bias(10, 11)
    assert math.isclose(noise.inverse_wishart_bias(10, 22), 1.0)
