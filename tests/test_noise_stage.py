"""The gradient-noise stage (noise_stage.measure_snapshot / measure_variance) on a built digits workload, against
per-example gradients computed here by a plain loop (one torch.autograd.grad per example, in float64)."""

import copy
import math

import numpy as np
import pytest
import torch

from batchscope import config as cfg
from batchscope.core import noise
from batchscope.measure.noise import measure_jensen_subspace, measure_snapshot, measure_variance
from batchscope.stages import noise as noise_stage
from batchscope.workloads.base import build

CPU = torch.device("cpu")
BATCH_SIZES = [8, 32, 128, 512]


def study(norm="none", widths=(32,), **noise):
    return cfg.validate(
        {
            "device": "cpu",
            "grid": {"batch_sizes": BATCH_SIZES},
            "workloads": {
                "w": {
                    "dataset": {"name": "digits"},
                    "model": {"name": "mlp", "widths": list(widths), "norm": norm},
                    "target": {"metric": "val_accuracy", "value": 0.9},
                    "max_steps": 10,
                    "eval_interval": 5,
                    "learning_rates": [0.1],
                }
            },
            "noise": {"pairs": 100, "variance_draws": 200, "seed": 3, **noise},
        }
    )


def workload_and_spec(norm="none", slicer=noise_stage.config_slice, **settings):
    config = study(norm, **settings)
    workload = build(cfg.workload_slice(config, "w"), CPU, seed=0)
    return workload, slicer(config, "w")


def trained_state(workload, steps=30, lr=0.1):
    """A state some way into training (plain SGD on batches of 64), so that G is not the initial gradient."""
    model, (x, y) = workload.model, workload.train
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(x), (64,), generator=generator)
        optimizer.zero_grad()
        workload.loss(model(x[index]), y[index]).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def per_example_gradients(workload, state, data=None):
    """(N, P) float64 gradients of each example's loss (of ``data``, default the training set): the reference, no
    batchscope code."""
    model = copy.deepcopy(workload.model)
    model.load_state_dict(state)
    model = model.double().train()
    x, y = data or workload.train
    x = x.double()
    params = list(model.parameters())
    rows = []
    for n in range(len(x)):
        loss = workload.loss(model(x[n : n + 1]), y[n : n + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows).numpy()


def exact_noise(grads):
    """|G|^2 and tr(Sigma) = sum_n |g_n - G|^2 / (N - 1) from the per-example gradients."""
    g = grads.mean(0)
    return float(g @ g), float(((grads - g) ** 2).sum() / (len(grads) - 1))


def minibatch_sq_norms(grads, size, draws, rng, centre=None):
    """|g_B - centre|^2 for ``draws`` minibatches of ``size`` drawn without replacement (the mean of their per-example
    gradients: exact for a model without BatchNorm)."""
    gram = grads @ grads.T if centre is None else (grads - centre) @ (grads - centre).T
    weights = np.zeros((draws, len(grads)))
    for row in weights:
        row[rng.choice(len(grads), size, replace=False)] = 1 / size
    return np.einsum("dn,dn->d", weights @ gram, weights)


@pytest.fixture(scope="module")
def linear():
    workload, spec = workload_and_spec()
    state = trained_state(workload)
    return workload, spec, state, per_example_gradients(workload, state)


@pytest.fixture(scope="module")
def snapshot(linear):
    workload, spec, state, _ = linear
    return measure_snapshot({"state_dict": state, "step": 30, "fraction": 0.5}, workload, spec, CPU)


def test_snapshot_per_example_noise_equals_a_loop_over_examples(linear, snapshot):
    """|G|^2, tr(Sigma) and B_simple over the whole training set against the float64 loop (the stage computes in
    float32; tr(Sigma) = N/(N - 1)(mean |g_n|^2 - |G|^2) loses a digit to B_simple ~ 90: 1e-5 relative), and the
    loss in eval mode."""
    workload, _, state, grads = linear
    ds = snapshot
    g_sq, trace = exact_noise(grads)
    assert float(ds["grad_sq_norm"]) == pytest.approx(g_sq, rel=1e-5)
    assert float(ds["trace_sigma"]) == pytest.approx(trace, rel=1e-5)
    assert float(ds["b_simple"]) == pytest.approx(trace / g_sq, rel=1e-5)
    assert ds.attrs["method"] == "per-example (linear)"
    assert ds.attrs["step"] == 30 and ds.attrs["fraction"] == 0.5
    model = copy.deepcopy(workload.model)
    model.load_state_dict(state)
    x, y = workload.train
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model.double().eval()(x.double()), y)
    assert float(ds["loss"]) == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.parametrize("big", [None, 512])
def test_snapshot_two_batch_estimate_is_within_its_standard_error_of_the_exact_one(linear, snapshot, big):
    """The two-batch estimator is linear in the pair means of |g_small|^2 and |g_big|^2, each unbiased for
    |G|^2 + tr(Sigma) (N - B)/(B (N - 1)): its estimates of |G|^2 and tr(Sigma) are unbiased, with a standard
    error from the variances of |g_B|^2, simulated here from the per-example gradients (3000 draws per size).
    Tolerance: 4 standard errors. With noise.b_big null (the default) the big batch is the whole evaluation set:
    |G|^2 is then exact (the float32 full gradient against the float64 loop: 1e-5) and the draws are the small
    ones alone; with b_big 512, both sizes are drawn."""
    workload, spec, state, grads = linear
    ds = snapshot
    if big is not None:
        spec = {**spec, "b_big": big}
        ds = measure_snapshot({"state_dict": state, "step": 30, "fraction": 0.5}, workload, spec, CPU)
    g_sq, trace = exact_noise(grads)
    n, small, pairs = len(grads), spec["b_small"], spec["pairs"]
    assert (small, spec["b_big"], pairs) == (8, big, 100)
    size = n if big is None else big
    inv_small, inv_big = (n - small) / (small * (n - 1)), (n - size) / (size * (n - 1))
    rng = np.random.default_rng(99)
    var_small = minibatch_sq_norms(grads, small, 3000, rng).var(ddof=1)
    var_big = 0.0 if big is None else minibatch_sq_norms(grads, big, 3000, rng).var(ddof=1)
    trace_se = math.sqrt((var_small + var_big) / pairs) / (inv_small - inv_big)
    g_sq_se = math.sqrt((inv_big**2 * var_small + inv_small**2 * var_big) / pairs) / (inv_small - inv_big)
    assert trace_se < 0.2 * trace and g_sq_se < 0.2 * g_sq  # the check can tell a broken estimator apart
    assert abs(float(ds["two_batch_trace_sigma"]) - trace) < 4 * trace_se
    if big is None:
        assert float(ds["two_batch_grad_sq_norm"]) == pytest.approx(g_sq, rel=1e-5)
    else:
        assert abs(float(ds["two_batch_grad_sq_norm"]) - g_sq) < 4 * g_sq_se
    two_b = float(ds["two_batch_b_simple"])
    assert two_b == pytest.approx(float(ds["two_batch_trace_sigma"]) / float(ds["two_batch_grad_sq_norm"]), rel=1e-12)
    # B_simple's resamples (the quick estimate's stand-in where G^T H G <= 0): their spread is the estimate's; the
    # standard error of B_simple by the delta method, from trace_se alone with |G|^2 exact (b_big null), is within
    # a factor 2 of their standard deviation (200 resamples of 100 pairs)
    boot = ds["two_batch_b_simple_boot"].values
    assert boot.shape == ds["two_batch_b_noise_boot"].shape and np.isfinite(boot).all()
    if big is None:
        assert 0.5 < boot.std(ddof=1) / (trace_se / g_sq) < 2.0
    assert ds.attrs["b_small"] == small and ds.attrs["b_big"] == size and ds.attrs["pairs"] == pairs


def test_snapshot_two_batch_b_noise_against_a_dense_hessian():
    """B_noise = tr(H Sigma) / G^T H G of the stage against the exact one: H the dense float64 Hessian
    (torch.func.hessian) of the mean loss on the first 512 examples of the evaluation set (the stage's curvature
    set, here the training set in its order), G and Sigma from the per-example gradients. With noise.b_big null the
    big batch is the whole set, so G^T H G is exact (float32 against float64: 1e-4) and tr(H Sigma) comes from the
    small batches: E[g_b^T H g_b] = G^T H G + tr(H Sigma) (N - b) / (b (N - 1)). Tolerance: 4 standard errors of
    that, simulated from the per-example gradients (3000 draws). B_noise differs from B_simple here by more than
    that tolerance, so a stage that dropped H (an identity HVP) would fail. The state: 100 SGD steps in, where
    G^T H G > 0 (30 steps in, the other tests' state, G^T H G is negative: B_noise is then inf by definition)."""
    from torch.func import functional_call, hessian

    workload, spec = workload_and_spec()
    state = trained_state(workload, steps=100)
    grads = per_example_gradients(workload, state)
    snapshot = measure_snapshot({"state_dict": state, "step": 100, "fraction": 0.5}, workload, spec, CPU)
    model = copy.deepcopy(workload.model)
    model.load_state_dict(state)
    model = model.double().train()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    x, y = workload.train
    xh, yh = x[:512].double(), y[:512]

    def loss_of(theta):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return workload.loss(functional_call(model, params, (xh,)), yh)

    h = hessian(loss_of)(flat).numpy()
    n, small, pairs = len(grads), spec["b_small"], spec["pairs"]
    g = grads.mean(0)
    centred = grads - g
    g_h_g = float(g @ h @ g)
    trace_h_sigma = float(np.einsum("np,pq,nq->", centred, h, centred) / (n - 1))
    exact = trace_h_sigma / g_h_g
    assert float(snapshot["two_batch_g_h_g"]) == pytest.approx(g_h_g, rel=1e-4)
    inv_small = (n - small) / (small * (n - 1))
    quadratic = grads @ h @ grads.T  # g_b^T H g_b = w^T (grads H grads^T) w for the batch's weights w
    weights = np.zeros((3000, n))
    rng = np.random.default_rng(5)
    for row in weights:
        row[rng.choice(n, small, replace=False)] = 1 / small
    draws = np.einsum("dn,dn->d", weights @ quadratic, weights)
    se = math.sqrt(draws.var(ddof=1) / pairs) / inv_small
    assert se < 0.25 * trace_h_sigma  # the check can tell a broken estimator apart
    assert abs(float(snapshot["two_batch_trace_h_sigma"]) - trace_h_sigma) < 4 * se
    b_noise = float(snapshot["two_batch_b_noise"])
    tolerance = 4 * se / g_h_g
    assert abs(b_noise - exact) < tolerance
    g_sq, trace = exact_noise(grads)
    assert abs(trace / g_sq - exact) > 2 * tolerance  # H matters on this model: B_simple is not B_noise


def test_snapshot_curvature_goes_in_chunks_of_chunk_size(linear, snapshot, monkeypatch):
    """The two-batch B_noise's operator takes noise.chunk_size examples per pass (its memory is a chunk's, not
    AUTO_EVAL_SIZE examples' linearisation): with chunks of 64 every operator built has chunks of at most 64, and
    B_noise equals the one-pass snapshot's to 1e-5 (the model has no BatchNorm: the chunked mean loss is the same
    loss; float32 sums in a different order)."""
    from batchscope.core import hessian

    workload, spec, state, _ = linear
    built = []
    original = hessian.HessianOperator.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(max(len(xb) for xb, _ in self.chunks))

    monkeypatch.setattr(hessian.HessianOperator, "__init__", recording)
    ds = measure_snapshot({"state_dict": state, "step": 30, "fraction": 0.5}, workload, {**spec, "chunk_size": 64}, CPU)
    assert built and max(built) <= 64
    assert float(ds["two_batch_b_noise"]) == pytest.approx(float(snapshot["two_batch_b_noise"]), rel=1e-5)


def test_snapshot_with_batchnorm_in_train_mode_reports_two_batch_only():
    """Per-example gradients are undefined with BatchNorm in train mode: NaN, and the method says so."""
    workload, spec = workload_and_spec(norm="batch")
    state = {k: v.clone() for k, v in workload.model.state_dict().items()}
    ds = measure_snapshot({"state_dict": state, "step": 0, "fraction": 0.0}, workload, spec, CPU)
    for name in ("grad_sq_norm", "trace_sigma", "b_simple"):
        assert np.isnan(float(ds[name])), name
    assert ds.attrs["method"].startswith("two-batch only") and "BatchNorm" in ds.attrs["method"]
    trace, g_sq = float(ds["two_batch_trace_sigma"]), float(ds["two_batch_grad_sq_norm"])
    assert trace > 0 and g_sq > 0 and float(ds["two_batch_b_simple"]) == pytest.approx(trace / g_sq, rel=1e-12)


def test_the_pairs_are_what_the_budget_buys_from_the_reference_run():
    """With noise.b_big null a snapshot costs the evaluation set's gradient (4096 example-gradients here) and one
    HVP on min(512, population) examples (2 gradients each: 1024) once, and a pair a gradient on b_small (8) and one
    HVP: 1032. noise.budget 0.5 of the run's example-gradients, shared by 5 snapshots, buys 50 pairs from 567,200;
    a long run is held at noise.pairs (100), a short one at noise.min_pairs (20 by default, or noise.pairs where that
    is smaller). With b_big 512 set, a pair is a gradient at each size and two HVPs: 2568, 50 pairs from 1,284,000."""
    from batchscope.measure.noise import pairs_within_budget

    _, spec = workload_and_spec()
    assert (spec["b_small"], spec["b_big"], spec["pairs"], spec["min_pairs"], spec["budget"]) == (8, None, 100, 20, 0.5)
    assert pairs_within_budget(spec, 567_200, 5, 4096) == (50, pytest.approx((5120 + 50 * 1032) * 5 / 567_200))
    assert pairs_within_budget(spec, 567_200 - 1, 5, 4096)[0] == 49
    assert pairs_within_budget(spec, 10**9, 5, 4096)[0] == 100
    pairs, share = pairs_within_budget(spec, 7_680, 5, 4096)  # a run of 120 steps at 64: the floor, over budget
    assert pairs == 20 and share == pytest.approx((5120 + 20 * 1032) * 5 / 7_680) and share > 0.5
    # a population of 100: its gradient (100) and HVPs on 100 examples (200), 208 a pair
    assert pairs_within_budget(spec, (300 + 30 * 208) * 5 * 2, 5, 100)[0] == 30
    assert pairs_within_budget({**spec, "budget": None}, 7_680, 5, 4096)[0] == 100
    drawn = {**spec, "b_big": 512}
    assert pairs_within_budget(drawn, 1_284_000, 5, 4096) == (50, pytest.approx(50 * 2568 * 5 / 1_284_000))
    assert pairs_within_budget(drawn, 1_284_000 - 1, 5, 4096)[0] == 49
    assert pairs_within_budget({**spec, "b_big": 4096}, 567_200, 5, 4096)[0] == 50  # b_big = the set: the same
    assert workload_and_spec(pairs=10)[1]["min_pairs"] == 10
    with pytest.raises(cfg.ConfigError, match="noise.min_pairs: 30 exceeds noise.pairs 10"):
        study(pairs=10, min_pairs=30)


def test_a_quick_only_snapshot_is_the_full_ones_two_batch_estimate(linear, snapshot):
    """With the noise stage off (only the quick estimate reads it) the per-example pass is left out; the two-batch
    estimate, drawn first, is the same; ``pairs`` sets the draws."""
    workload, spec, state, _ = linear
    point = {"state_dict": state, "step": 30, "fraction": 0.5}
    quick = measure_snapshot(point, workload, {**spec, "quick_only": True}, CPU)
    assert np.isnan(float(quick["b_simple"])) and "noise.enabled" in quick.attrs["method"]
    for name in ("two_batch_b_noise", "two_batch_trace_sigma", "two_batch_b_simple", "loss"):
        assert float(quick[name]) == float(snapshot[name]), name
    fewer = measure_snapshot(point, workload, spec, CPU, pairs=7)
    assert fewer.attrs["pairs"] == 7 and float(fewer["two_batch_trace_sigma"]) != float(
        snapshot["two_batch_trace_sigma"]
    )


def test_variance_law_against_the_finite_population_expectation(linear):
    """E|g_B - G|^2 over minibatches drawn without replacement is tr(Sigma) (N - B)/(B (N - 1)), tr(Sigma) from the
    loop. The stage's mean over 200 draws against it within 4 standard errors (the SD of |g_B - G|^2 simulated
    here from the per-example gradients, 2000 draws); its slopes are the log-log fits of its own means."""
    workload, spec, state, grads = linear
    ds = measure_variance(state, workload, spec, CPU)
    n, draws = len(grads), spec["variance_draws"]
    _, trace = exact_noise(grads)
    sizes = np.asarray(BATCH_SIZES, float)
    assert ds["batch_size"].values.tolist() == BATCH_SIZES and ds.attrs["population"] == n
    expected = trace * (n - sizes) / (sizes * (n - 1))
    np.testing.assert_allclose(ds["predicted"].values, expected, rtol=1e-4)
    rng = np.random.default_rng(7)
    for i, size in enumerate(BATCH_SIZES):
        errors = minibatch_sq_norms(grads, size, 2000, rng, centre=grads.mean(0))
        # the simulation agrees with the formula (4 of its own standard errors), then the stage with both
        assert abs(errors.mean() - expected[i]) < 4 * errors.std(ddof=1) / math.sqrt(len(errors))
        se = errors.std(ddof=1) / math.sqrt(draws)
        assert abs(float(ds["mean_sq_error"][i]) - expected[i]) < 4 * se, (size, float(ds["mean_sq_error"][i]))
    mse = ds["mean_sq_error"].values
    fpc = (n - sizes) / (n - 1)
    assert float(ds["slope"]) == pytest.approx(np.polyfit(np.log(sizes), np.log(mse), 1)[0], rel=1e-9)
    assert float(ds["slope_corrected"]) == pytest.approx(np.polyfit(np.log(sizes), np.log(mse / fpc), 1)[0], rel=1e-9)
    assert abs(float(ds["slope_corrected"]) + 1) < 0.1  # the 1/B law once the finite population is divided out


def test_snapshot_loss_with_batchnorm_is_the_snapshots_own():
    """The loss at a snapshot: its weights and running statistics in eval mode (computed here on a copy)."""
    workload, spec = workload_and_spec(norm="batch")
    state = trained_state(workload)
    model = copy.deepcopy(workload.model)
    model.load_state_dict(state)
    x, y = workload.train
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(model.double().eval()(x.double()), y))
    ds = measure_snapshot({"state_dict": state, "step": 30, "fraction": 0.5}, workload, spec, CPU)
    assert float(ds["loss"]) == pytest.approx(expected, rel=1e-5)


def subset(workload, size, seed):
    """The noise stage's evaluation set, drawn here as the stage documents it: the first ``size`` examples of a
    permutation seeded by noise.seed (digits has fewer examples than loader.analysis_examples: all are there)."""
    x, y = workload.train
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
    return x[order], y[order]


def test_noise_eval_size_is_the_population_of_every_measurement():
    """noise.eval_size = 300 of the 1437 examples, in chunks of 64: |G|^2, tr(Sigma), the loss and the variance
    law's population are those of exactly that subset (a loop over its examples), not of the training set."""
    workload, spec = workload_and_spec(eval_size=300, chunk_size=64, b_big=128, variance_batch_sizes=[8, 32, 128])
    assert spec["eval_size"] == 300 and spec["chunk_size"] == 64
    state = trained_state(workload)
    x, y = subset(workload, 300, spec["seed"])
    grads = per_example_gradients(workload, state, (x, y))
    g_sq, trace = exact_noise(grads)
    ds = measure_snapshot({"state_dict": state, "step": 30, "fraction": 0.5}, workload, spec, CPU)
    assert ds.attrs["eval_size"] == 300
    assert float(ds["grad_sq_norm"]) == pytest.approx(g_sq, rel=1e-5)
    assert float(ds["trace_sigma"]) == pytest.approx(trace, rel=1e-5)
    whole_g_sq, _ = exact_noise(per_example_gradients(workload, state))
    assert abs(whole_g_sq / g_sq - 1) > 1e-2  # the whole set's would have been told apart
    model = copy.deepcopy(workload.model)
    model.load_state_dict(state)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model.double().eval()(x.double()), y)
    assert float(ds["loss"]) == pytest.approx(float(loss), rel=1e-5)
    law = measure_variance(state, workload, spec, CPU)
    sizes = np.array([8, 32, 128])
    assert law.attrs["population"] == 300
    np.testing.assert_allclose(law["predicted"].values, trace * (300 - sizes) / (sizes * 299), rtol=1e-4)


def test_jensen_eval_size_is_the_set_of_the_full_hessian_and_the_draws():
    """The trained-model Jensen experiment on noise.eval_size = 200 examples in chunks of 48: the same result as
    a reference built here from dense Hessians (torch.func.hessian) of that subset and of minibatches drawn from it
    with the stage's generator; the bias is invariant to the basis chosen within the top-k eigenspace."""
    workload, spec = workload_and_spec(widths=(8,), slicer=noise_stage.jensen_slice, eval_size=200, chunk_size=48,
                                       jensen={"subspace_dim": 2, "subspace_sizes": [32, 64], "subspace_draws": 3},
                                       variance_batch_sizes=[8, 32, 128], b_big=128)  # fmt: skip
    settings = {**spec["jensen"], "seed": spec["seed"], "eval_size": spec["eval_size"], "chunk_size": 48}
    state = trained_state(workload)
    ds = measure_jensen_subspace(state, workload, settings, CPU)
    assert ds.attrs["eval_size"] == 200 and ds.attrs["chunk_size"] == 48
    x, y = subset(workload, 200, spec["seed"])
    model = copy.deepcopy(workload.model)
    model.load_state_dict(state)
    model = model.double().eval()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def dense(xb, yb):
        def loss_of(w):
            parts = torch.split(w, [int(np.prod(shape)) for shape in shapes])
            params = {n: part.reshape(shape) for n, part, shape in zip(names, parts, shapes, strict=True)}
            return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (xb.double(),)), yb)

        return torch.func.hessian(loss_of)(flat)

    k = settings["subspace_dim"]
    basis = torch.linalg.eigh(dense(x, y)).eigenvectors[:, -k:]
    reference = noise.jensen_subspace(lambda xb, yb: basis.T @ dense(xb, yb) @ basis, x, y, settings["subspace_sizes"],
                                      settings["subspace_draws"], settings["damping"],
                                      np.random.default_rng(spec["seed"]))  # fmt: skip
    np.testing.assert_allclose(ds["relative_bias"].values, reference.relative_bias, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(ds["min_eigenvalue"].values, reference.min_eigenvalue, rtol=1e-2, atol=1e-3)


def test_two_fractions_at_one_step_are_measured_once(tmp_path, monkeypatch):
    """A short run's thinned states can give two fractions the same step: the stage measures it once (both files
    hold its values, each with its own fraction) and the budget counts the distinct steps (2 here, not 3)."""
    import argparse
    import json

    import batchscope.measure.noise as measure
    from batchscope.stages._common import workload as built
    from batchscope.store import read_netcdf

    config = study(pairs=100, variance_draws=3)
    spec = noise_stage.config_slice(config, "w")
    wl_spec = cfg.workload_slice(config, "w")
    workload = built(wl_spec, CPU, None)
    start = {k: v.detach().clone() for k, v in workload.model.state_dict().items()}
    state = trained_state(workload)
    # the states the run kept: 0.5 and 0.6 of its 4815 steps both pick the one at step 30
    snapshots = [{"step": 0, "state_dict": start}, {"step": 30, "state_dict": state}]
    path = tmp_path / "run.snapshots"
    # a run of 4815 steps at 64 buys 30 pairs at each of 2 snapshots (a pair: 2568 example-gradients), 20 at 3
    spec = {**spec, "b_big": 512, "snapshot_fractions": [0.0, 0.5, 0.6]}
    torch.save({"workload": wl_spec, "snapshots": snapshots, "steps_done": 4815, "batch_size": 64, "lr": 0.1,
                "seed": 0, "state_dict": state, "steps_to_target": 4815.0}, path)  # fmt: skip
    calls = []
    original = measure.measure_snapshot
    monkeypatch.setattr(measure, "measure_snapshot", lambda snapshot, *a, **k: calls.append(snapshot["step"]) or
                        original(snapshot, *a, **k))  # fmt: skip
    args = argparse.Namespace(spec=json.dumps(spec), config=None, workload=None, data=None, snapshots=str(path),
                              out=str(tmp_path / "out"))  # fmt: skip
    noise_stage.run(args)
    assert calls == [0, 30]
    files = [read_netcdf(tmp_path / "out" / f"snapshot{i}.nc") for i in range(3)]
    assert [ds.attrs["fraction"] for ds in files] == [0.0, 0.5, 0.6] and files[2].attrs["step"] == 30
    assert float(files[1]["two_batch_b_noise"]) == float(files[2]["two_batch_b_noise"])
    population = len(measure.evaluation_data(workload, spec, CPU)[0])
    expected = measure.pairs_within_budget(spec, 4815 * 64, 2, population)
    assert (
        files[1].attrs["pairs"] == expected[0] == 30
        and measure.pairs_within_budget(spec, 4815 * 64, 3, population)[0] == 20
    )
    assert files[1].attrs["cost_share"] == pytest.approx(expected[1])
