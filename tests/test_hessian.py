"""Curvature operator and algorithms against dense references (models small enough to build the matrix)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from batchscope.config import filled
from batchscope.core import hessian
from batchscope.workloads import data
from batchscope.workloads.models import mlp


def tiny_problem(dtype, n=60, seed=0, widths=(8,)):
    torch.manual_seed(seed)
    model = mlp(5, list(widths), 3).to(dtype)
    x = torch.randn(n, 5, dtype=dtype)
    y = torch.randint(0, 3, (n,))
    return model, x, y


def full_loss(op):
    x = torch.cat([xb for xb, _ in op.chunks])
    y = torch.cat([yb for _, yb in op.chunks])
    return lambda flat: op.chunk_loss(flat, x, y)


@pytest.mark.parametrize("mode", hessian.MODES)
def test_autograd_products_equal_torch_func_vjp_of_the_gradient(mode):
    """The cached product (double backward through torch.autograd) against torch.func's vjp(grad(...)) of the same
    chunk loss, float32 on a BatchNorm net in both modes, where rounding would show: equal to 1e-6 relative, and the
    gradient the same to 1e-6 (float32 rounding); the one chunk's linearisation is kept and its products are
    linear in v."""
    from torch.func import grad, vjp

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    op = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y, mode=mode)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2))
    gradient, reference = vjp(grad(lambda p: op.chunk_loss(p, x, y)), op.point)
    ours = op.matvec(v)
    assert op.cached_chunks == 1
    torch.testing.assert_close(ours, reference(v)[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(op.gradient(), gradient, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(op.matvec(2 * v), 2 * ours, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # as a caller inside no_grad would ask for them (torch.func's products work there too)
        torch.testing.assert_close(op.matvec(v), ours, rtol=0, atol=0)
        fresh = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y, mode=mode, cache=False)
        torch.testing.assert_close(fresh.gradient(), gradient, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(fresh.matvec(v), ours, rtol=1e-6, atol=1e-7)
    assert float(torch.linalg.vector_norm(ours)) > 1e-3  # a real product, not zeros


def test_products_inside_inference_mode_and_of_a_loss_linear_in_the_weights():
    """An operator built and used inside inference_mode (and a vector made there) gives the products it gives
    outside; a loss linear in the weights has H = 0: zero products and its gradient, not an error."""
    model, x, y = tiny_problem(torch.float64)
    op = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y, chunk_size=16)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = op.matvec(v)
    with torch.inference_mode():
        inside = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y, chunk_size=16)
        frozen = v.clone()
        torch.testing.assert_close(inside.matvec(frozen), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(op.matvec(frozen), expected, rtol=0, atol=0)

    linear = nn.Linear(5, 1, dtype=torch.float64)
    op = hessian.HessianOperator(linear, lambda out, target: (out.squeeze(1) * target).mean(), x, y.double())
    assert torch.count_nonzero(op.matvec(v[: op.dim])) == 0
    expected_grad = torch.cat([(x * y.double()[:, None]).mean(0), y.double().mean()[None]])
    torch.testing.assert_close(op.gradient(), expected_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", hessian.METHODS)
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_hvp_equals_dense_hessian_times_v(method, chunk_size):
    model, x, y = tiny_problem(torch.float64)
    op = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y, chunk_size=chunk_size, method=method)
    assert op.dim == 5 * 8 + 8 + 8 * 3 + 3 <= 2000
    dense = torch.func.hessian(full_loss(op))(op.point)
    for seed in range(3):
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        exact = dense @ v
        rel = torch.linalg.vector_norm(op.matvec(v) - exact) / torch.linalg.vector_norm(exact)
        assert rel < 1e-10
    assert op.n_matvec == 3


def _spectrum_matrix(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return torch.as_tensor((basis * eigenvalues) @ basis.T, dtype=torch.float32)


@pytest.mark.parametrize("method", ["lanczos", "eigsh"])
def test_top3_on_a_float32_model_matches_eigvalsh(method):
    model, x, y = tiny_problem(torch.float32, n=200, widths=(16, 16))  # ~450 parameters, not at a minimum
    op = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y)
    reference = np.linalg.eigvalsh(op.dense().double().numpy())
    assert reference.min() < 0  # an indefinite Hessian: the negative end is present
    top = hessian.top_eigenvalues(op, op.dim, 3, tol=1e-4, method=method)
    np.testing.assert_allclose(top.values, reference[::-1][:3], rtol=1e-3)


@pytest.mark.parametrize("method", ["lanczos", "eigsh"])
def test_top3_of_a_negative_definite_operator(method):
    eigenvalues = -np.geomspace(0.5, 50.0, 300)  # all negative: the "top" are the least negative
    matrix = _spectrum_matrix(eigenvalues)
    top = hessian.top_eigenvalues(hessian.dense_matvec(matrix), 300, 3, tol=1e-4, method=method)
    np.testing.assert_allclose(top.values, np.sort(eigenvalues)[::-1][:3], rtol=1e-3)


def test_lanczos_stops_early_for_top1():
    eigenvalues = np.concatenate([[10.0], np.linspace(0.0, 5.0, 399)])
    top = hessian.top_eigenvalues(hessian.dense_matvec(_spectrum_matrix(eigenvalues)), 400, 1, tol=1e-3)
    assert top.converged and top.n_matvec < 25
    assert top.values[0] == pytest.approx(10.0, rel=1e-3)


def test_hutchinson_within_three_standard_errors_of_the_trace():
    model, x, y = tiny_problem(torch.float64, n=200, widths=(16,))
    op = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y)
    exact = float(torch.trace(op.dense()))
    for seed in range(3):
        estimate = hessian.hutchinson(op.matvec, op.dim, 200, seed=seed, dtype=torch.float64)
        assert estimate.standard_error > 0
        assert abs(estimate.value - exact) < 3 * estimate.standard_error


def _within_three_standard_errors(density, exact):
    runs = density.run_first_moments()
    standard_error = runs.std(ddof=1) / math.sqrt(len(runs))
    assert abs(runs.mean() - exact) < 3 * standard_error


def test_slq_density_integrates_to_one_and_its_mean_is_trace_over_n():
    # per run, the first moment is u^T H u for a random unit u: its standard deviation is
    # sqrt(2 Var(lambda) / (n + 2)) ~ 1.3% of the mean for this spectrum, so 10 runs resolve 2%
    eigenvalues = np.linspace(1.0, 2.0, 500)
    density = hessian.slq(hessian.dense_matvec(_spectrum_matrix(eigenvalues)), 500, n_runs=10, steps=40, seed=0)
    grid = density.grid(2000)
    values = density.density(grid, sigma=0.005 * (grid[-1] - grid[0]))
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=0.01)
    assert density.first_moment() == pytest.approx(eigenvalues.mean(), rel=0.02)
    assert np.allclose(np.nansum(density.weights, axis=1), 1.0)
    assert density.n_matvec == 10 * 40


def test_slq_on_a_heavy_tailed_spectrum():
    eigenvalues = np.concatenate([np.geomspace(1e-3, 1.0, 480), [5.0, 8.0, 20.0]])
    density = hessian.slq(hessian.dense_matvec(_spectrum_matrix(eigenvalues, 1)), 483, n_runs=10, steps=60)
    grid = density.grid(4000)
    assert np.trapezoid(density.density(grid, 0.005 * (grid[-1] - grid[0])), grid) == pytest.approx(1, abs=0.01)
    _within_three_standard_errors(density, eigenvalues.mean())
    # the outliers are resolved as Ritz values of every run
    assert np.allclose(np.nanmax(density.nodes, axis=1), 20.0, rtol=1e-4)


def test_slq_on_a_model_hessian():
    model, x, y = tiny_problem(torch.float64, n=200, widths=(16,))
    op = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y)
    exact_mean = float(torch.trace(op.dense())) / op.dim
    density = hessian.slq(op.matvec, op.dim, n_runs=30, steps=40, seed=0, dtype=torch.float64)
    grid = density.grid(3000)
    assert np.trapezoid(density.density(grid, 0.005 * (grid[-1] - grid[0])), grid) == pytest.approx(1, abs=0.01)
    _within_three_standard_errors(density, exact_mean)


def test_linreg_hessian_is_the_analytic_one():
    """Linear model on linreg with MSE: H = (2/n) Z^T Z with Z = [X, 1] (weights, then bias)."""
    spec = {**filled("dataset", {"name": "linreg"}), "name": "linreg", "n_train": 2000, "dim": 10}
    tensors = data.load_tensors(data.build(spec), "cpu")
    torch.manual_seed(0)
    model = mlp(10, [], 1)
    loss = lambda out, target: nn.functional.mse_loss(out.squeeze(-1), target)  # noqa: E731
    op = hessian.HessianOperator(model, loss, tensors.x_train, tensors.y_train, chunk_size=512)
    z = torch.cat([tensors.x_train.double(), torch.ones(2000, 1, dtype=torch.float64)], dim=1)
    analytic = (2.0 / 2000) * z.T @ z
    exact = np.linalg.eigvalsh(analytic.numpy())
    top = hessian.top_eigenvalues(op, op.dim, 1, tol=1e-6)
    assert top.values[0] == pytest.approx(exact[-1], rel=1e-4)
    assert float(torch.trace(op.dense())) == pytest.approx(float(torch.trace(analytic)), rel=1e-4)


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _by_hand(net, flat, x, train):
    """The same network written out: a reference independent of nn.BatchNorm and functional_call."""
    sizes = [p.numel() for p in net.parameters()]
    w1, b1, gamma, beta, w2, b2 = (
        part.view(p.shape) for part, p in zip(torch.split(flat, sizes), net.parameters(), strict=True)
    )
    h = x @ w1.T + b1
    if train:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = net.bn.running_mean.double(), net.bn.running_var.double()
    h = (h - mean) / torch.sqrt(var + net.bn.eps) * gamma + beta
    return torch.relu(h) @ w2.T + b2


def test_batchnorm_train_and_eval_hessians_differ_and_match_their_references():
    torch.manual_seed(0)
    net = BatchNormNet().double()
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    net.train()
    for _ in range(5):  # give the running statistics values unlike any one batch's
        net(torch.randn(64, 4, dtype=torch.float64) * 2 + 1)
    running = net.bn.running_mean.clone()
    dense = {}
    for mode in ("train", "eval"):
        op = hessian.HessianOperator(net, nn.functional.cross_entropy, x, y, mode=mode)
        dense[mode] = op.dense()

        def reference_loss(flat, mode=mode):
            return nn.functional.cross_entropy(_by_hand(net, flat, x, mode == "train"), y)

        reference = torch.func.hessian(reference_loss)(op.point)
        assert torch.allclose(dense[mode], reference, rtol=1e-8, atol=1e-10), mode
    assert torch.equal(net.bn.running_mean, running)  # the caller's model is untouched
    gap = torch.linalg.matrix_norm(dense["train"] - dense["eval"]) / torch.linalg.matrix_norm(dense["eval"])
    assert gap > 0.05


def test_operator_refuses_unknown_mode_and_method():
    model, x, y = tiny_problem(torch.float32)
    with pytest.raises(ValueError, match="mode must be one of"):
        hessian.HessianOperator(model, nn.functional.cross_entropy, x, y, mode="test")
    with pytest.raises(ValueError, match="method must be one of"):
        hessian.HessianOperator(model, nn.functional.cross_entropy, x, y, method="finite_differences")


def test_gradient_and_loss_match_autograd():
    model, x, y = tiny_problem(torch.float64)
    op = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y, chunk_size=7)
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(op.gradient(), expected, rtol=1e-10)
    assert math.isclose(op.loss_value(), float(loss.detach()), rel_tol=1e-12)


def test_a_second_start_finds_the_eigenvalue_the_first_krylov_space_missed():
    """A start vector orthogonal to the 5th eigenvector: its Lanczos run meets its own error bound with the 5th
    eigenvalue missing (the 6th reported in its place), as a trained checkpoint once showed. A second start
    finds it; merged, the top 5 equal the dense reference, and the flag says the starts disagreed."""
    eigenvalues = np.array([10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0] + [0.1] * 40)
    matrix = torch.diag(torch.tensor(eigenvalues, dtype=torch.float64))
    matvec = hessian.dense_matvec(matrix)
    blind = torch.ones(50, dtype=torch.float64)
    blind[4] = 0.0  # no component along the eigenvector of 6
    missed = hessian.lanczos(matvec, blind, 50, k=5, tol=1e-8)
    assert missed.converged and 6.0 not in np.round(missed.ritz_values, 6)
    other = hessian.lanczos(matvec, torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
                            50, k=5, tol=1e-8)  # fmt: skip
    merged = hessian.merge_starts([missed, other], 5, 1e-8)
    np.testing.assert_allclose(merged.values, eigenvalues[:5], rtol=1e-8)
    assert not merged.converged  # they disagreed at rank 5: said so, not hidden
    assert merged.n_matvec == missed.n_matvec + other.n_matvec
    agreed = hessian.merge_starts([other, other], 5, 1e-8)
    assert agreed.converged


def test_kept_linearisations_are_bounded_by_cache_mb_not_by_the_number_of_chunks():
    """The operator keeps the linearisations of the first chunks within cache_mb and rebuilds the others in each
    product: with room for 2 chunks it keeps 2 whether there are 10 or 20 chunks, and its products equal the dense
    Hessian's as before, bit for bit the same as with every chunk kept or none."""
    model, x, y = tiny_problem(torch.float64, n=120)
    everything = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y, chunk_size=6, cache_mb=1e6)
    everything.gradient()
    assert everything.cached_chunks == 20
    one_chunk = everything.cached_bytes / 20  # the chunks are alike: each saved the same tensors
    assert one_chunk == hessian.linearisation_bytes(everything._linearised[0], [everything.point, x, y]) > 0
    room_for_two = 2.5 * one_chunk / 2**20
    v = torch.randn(everything.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n in (60, 120):
        op = hessian.HessianOperator(model, nn.functional.cross_entropy, x[:n], y[:n], chunk_size=6,
                                     cache_mb=room_for_two)  # fmt: skip
        assert len(op.chunks) == n // 6
        dense = torch.func.hessian(full_loss(op))(op.point)
        product = op.matvec(v)
        assert op.cached_chunks == len(op._linearised) == 2 and op.cached_bytes == 2 * one_chunk
        exact = dense @ v
        assert torch.linalg.vector_norm(product - exact) / torch.linalg.vector_norm(exact) < 1e-10
        for cache_mb in (0, 1e6):
            other = hessian.HessianOperator(model, nn.functional.cross_entropy, x[:n], y[:n], chunk_size=6,
                                            cache_mb=cache_mb)  # fmt: skip
            assert torch.equal(other.matvec(v), product) and torch.equal(other.gradient(), op.gradient())
        assert other.cached_chunks == n // 6
    nothing = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y, chunk_size=6, cache_mb=0)
    assert torch.equal(nothing.matvec(v), everything.matvec(v)) and nothing.cached_chunks == 0


def test_a_single_chunk_is_kept_whatever_the_budget():
    """One chunk: a product needs its linearisation alive anyway, so keeping it costs no peak memory."""
    model, x, y = tiny_problem(torch.float64)
    op = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y, cache_mb=0)
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    assert op.cached_chunks == 1


def test_linearisation_bytes_grow_with_the_chunk():
    """The count of saved tensors is of the chunk's activations: twice the examples, about twice the bytes (less
    the weights' share, which does not grow); the data and weights given as held are left out."""
    model, x, y = tiny_problem(torch.float32, n=400, widths=(64, 64))
    sizes = {}
    for chunk in (100, 200):
        op = hessian.HessianOperator(model, nn.functional.cross_entropy, x[:chunk], y[:chunk], cache_mb=0)
        _, product = op._linearise(x[:chunk], y[:chunk])
        sizes[chunk] = hessian.linearisation_bytes(product, [op.point, x, y])
        assert sizes[chunk] >= chunk * (64 + 64) * 4  # at least the hidden activations, float32
    assert 1.6 < sizes[200] / sizes[100] <= 2.0


def test_top_eigenvalues_take_the_operators_dtype_by_default():
    """A float64 operator without a dtype given: the start vectors are float64 too (they were float32, and the first
    product's dot failed), and the eigenvalues match the dense Hessian's to 1e-8."""
    model, x, y = tiny_problem(torch.float64)
    op = hessian.HessianOperator(model, nn.functional.cross_entropy, x, y, chunk_size=50)
    top = hessian.top_eigenvalues(op, op.dim, 3, tol=1e-10)
    dense = torch.linalg.eigvalsh(op.dense()).numpy()[::-1][:3]
    np.testing.assert_allclose(top.values, dense, rtol=1e-8)
