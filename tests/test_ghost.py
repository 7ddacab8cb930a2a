"""Ghost BatchNorm against nn.BatchNorm and against its definition (groups normalized one by one)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from batchscope.core.ghost import GhostBatchNorm1d, GhostBatchNorm2d


def pair(cls, bn_cls, channels, ghost, seed=0):
    torch.manual_seed(seed)
    ghost_bn = cls(channels, ghost).double()
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        ghost_bn.weight.uniform_(0.5, 1.5)
        ghost_bn.bias.uniform_(-0.5, 0.5)
        ghost_bn.running_mean.uniform_(-1, 1)
        ghost_bn.running_var.uniform_(0.5, 2)
    plain = bn_cls(channels).double()
    plain.load_state_dict(ghost_bn.state_dict())
    return ghost_bn, plain


@pytest.mark.parametrize(
    ("cls", "bn_cls", "shape"),
    [(GhostBatchNorm1d, nn.BatchNorm1d, (64, 5)), (GhostBatchNorm1d, nn.BatchNorm1d, (64, 5, 7)),
     (GhostBatchNorm2d, nn.BatchNorm2d, (64, 3, 4, 4))],
)  # fmt: skip
def test_one_group_equals_batchnorm(cls, bn_cls, shape):
    ghost_bn, plain = pair(cls, bn_cls, shape[1], ghost=64)  # g = 1
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, ref = ghost_bn(x), plain(x2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(ghost_bn.weight.grad, plain.weight.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(ghost_bn.bias.grad, plain.bias.grad, rtol=0, atol=1e-6)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ghost_bn, name), getattr(plain, name), rtol=0, atol=1e-6)


def _by_groups(ghost_bn, x, index_sets):
    """The definition: each group through its own BatchNorm, statistics updated group after group."""
    reference = nn.BatchNorm2d(x.shape[1]).double() if x.dim() == 4 else nn.BatchNorm1d(x.shape[1]).double()
    reference.load_state_dict(dict(ghost_bn.state_dict()))
    reference.train()
    out = torch.empty_like(x)
    for index in index_sets:
        out[index] = reference(x[index])
    return out, reference


@pytest.mark.parametrize(
    ("shape", "ghost", "groups", "tail"),
    [((96, 6), 32, 3, 0), ((100, 6), 32, 3, 4), ((97, 6), 32, 2, 33), ((50, 3, 5, 5), 16, 3, 2),
     ((49, 3, 5, 5), 16, 3, 1)],
    ids=["even", "uneven", "single-leftover-merged", "2d-uneven", "2d-single-leftover"],
)  # fmt: skip
def test_groups_match_the_definition(shape, ghost, groups, tail):
    cls = GhostBatchNorm2d if len(shape) == 4 else GhostBatchNorm1d
    ghost_bn, _ = pair(cls, nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d, shape[1], ghost)
    assert ghost_bn._layout(torch.empty(*shape)) == (groups, tail)
    head = groups * ghost
    index_sets = [torch.arange(j, head, groups) for j in range(groups)]  # interleaved membership
    if tail:
        index_sets.append(torch.arange(head, shape[0]))
    assert sorted(torch.cat(index_sets).tolist()) == list(range(shape[0]))
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    expected, reference = _by_groups(copy.deepcopy(ghost_bn), x, index_sets)
    out = ghost_bn(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # running statistics after one step equal len(index_sets) sequential EMA updates over the groups
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ghost_bn, name), getattr(reference, name), rtol=0, atol=1e-6)


def test_each_ghost_group_is_standardised():
    ghost_bn = GhostBatchNorm2d(4, 16).double()  # weight 1, bias 0
    x = torch.randn(128, 4, 6, 6, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.2, 3.0]).view(1, 4, 1, 1) + 7
    out = ghost_bn(x).view(16, 8, 4, 6, 6)  # example i is in ghost batch i mod 8
    means = out.mean(dim=(0, 3, 4))
    variances = out.var(dim=(0, 3, 4), unbiased=False)
    torch.testing.assert_close(means, torch.zeros_like(means), rtol=0, atol=1e-6)
    # unit variance up to BatchNorm's eps: var/(var + eps), eps = 1e-5
    torch.testing.assert_close(variances, torch.ones_like(variances), rtol=0, atol=1e-3)


def test_eval_mode_equals_batchnorm_eval():
    ghost_bn, plain = pair(GhostBatchNorm2d, nn.BatchNorm2d, 3, ghost=8)
    ghost_bn.eval()
    plain.eval()
    x = torch.randn(40, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ghost_bn(x), plain(x), rtol=0, atol=1e-12)


def test_ghost_noise_variance_ratio_is_g():
    """Var(ghost-batch mean) / Var(full-batch mean) over i.i.d. synthetic batches is g (within 3 standard errors)."""
    from batchscope.core.ghost import mean_variance_ratio

    rng = np.random.default_rng(0)
    population = rng.standard_normal(10**5)
    for g in (2, 8, 32):  # i.i.d. batches (drawn with replacement): the ratio is g
        ratio, standard_error = mean_variance_ratio(population, 256, 256 // g, draws=4000, rng=rng, replace=True)
        assert abs(ratio - g) < 3 * standard_error, (g, ratio, standard_error)
        assert standard_error < 0.1 * g  # and the test has power


def test_finite_population_ratio_follows_the_correction():
    from batchscope.core.ghost import expected_ratio, mean_variance_ratio

    rng = np.random.default_rng(1)
    population = rng.standard_normal((1437, 3))  # digits-sized, three channels
    ratio, standard_error = mean_variance_ratio(population, 1024, 32, draws=3000, rng=rng)
    expected = expected_ratio(1024, 32, 1437)  # 32 * 1405 / 413 = 108.9, not 32
    assert expected == pytest.approx(32 * 1405 / 413)
    assert np.all(np.abs(ratio - expected) < 3 * standard_error), (ratio, expected, standard_error)


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="float momentum"):
        GhostBatchNorm1d(3, 8, momentum=None)
    with pytest.raises(ValueError, match="ghost_batch_size must be at least 1"):
        GhostBatchNorm1d(3, 0)


def test_models_take_a_norm_option():
    from batchscope.workloads.models import build_model

    model = build_model({"name": "cnn", "channels": [4], "hidden": 8, "norm": "ghost", "ghost_batch_size": 16},
                        (1, 8, 8), 10)  # fmt: skip
    assert any(isinstance(m, GhostBatchNorm2d) and m.ghost_batch_size == 16 for m in model.modules())
    mlp = build_model({"name": "mlp", "widths": [8], "norm": "batch"}, (64,), 10)
    assert any(isinstance(m, nn.BatchNorm1d) for m in mlp.modules())
    out = model(torch.randn(50, 1, 8, 8))
    assert out.shape == (50, 10)


def test_variance_experiment_on_digits_cnn_activations():
    """Real activations (the first BatchNorm's input of the digits CNN): the ratio follows g (N - m)/(N - B)."""
    from batchscope.measure.ghost import variance_experiment

    workload = {
        "factory": "batchscope.workloads:builtin",
        "dataset": {"name": "digits", "val_fraction": 0.2, "seed": 0},
        "model": {"name": "cnn", "channels": [8, 16], "hidden": 32, "norm": "batch"},
        "loader": {"stream": False, "workers": 0, "pin_memory": True, "analysis_examples": 4096},
    }
    spec = {"batch_size": 512, "groups": [1, 4, 16, 64], "draws": 1500, "seed": 0, "workload": workload}
    ds = variance_experiment(spec, torch.device("cpu"))
    assert ds.sizes["channel"] == 8 and ds.attrs["population"] == 1437
    np.testing.assert_allclose(ds["ratio"].sel(groups=1).values, 1.0)
    expected = ds["expected"].values[:, None]
    assert np.all(np.abs(ds["ratio"].values - expected) < 4 * ds["ratio_se"].values + 1e-9)
    assert float(ds["expected"].sel(groups=64)) == pytest.approx(64 * (1437 - 8) / (1437 - 512))
