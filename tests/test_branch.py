"""The local critical batch size by branching: the selection rule against hand-worked cases, and a branch's
training against the same steps written out here with plain torch."""

import math

import numpy as np
import pytest
import torch

from batchscope import config as cfg
from batchscope.measure.branch import branch, critical_interval, local_critical_batch_size, lr_scale
from batchscope.stages import branch as branch_stage
from batchscope.workloads.base import analysis_data, build

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("losses", "expected"),
    [
        ([1.00, 1.00, 1.005, 1.2], (64, 128)),  # within 1% up to 64, then worse: the bracket is [64, 128]
        ([1.00, 0.98, 0.97, 0.975], (128, -1)),  # never worse than the best smaller one: the largest, no bracket
        ([1.00, 1.5, 0.9, 0.9], (16, 32)),  # the search stops at the first loss outside (32), whatever follows
        ([1.00, math.nan, 0.9, 0.9], (16, 32)),  # a diverged branch is outside
    ],
)
def test_the_local_critical_batch_size_is_the_largest_within_tolerance(losses, expected):
    assert local_critical_batch_size([16, 32, 64, 128], losses, 0.01) == expected
    # the order of the inputs does not matter
    assert local_critical_batch_size([128, 64, 32, 16], losses[::-1], 0.01) == expected


def test_with_seeds_a_larger_batch_is_worse_only_clear_of_their_scatter():
    """Three seeds (rows). At 32 the mean 1.2 exceeds 16's 1.0 by 0.19 beyond the 1% tolerance, but its standard
    error is 0.18 / sqrt(3) = 0.104, so twice that (0.208) covers the excess: within. At 64 every seed is 1.3 (no
    scatter): outside. Seed 0 alone (1.02 at 32) would have stopped at 16, as would the mean without the scatter."""
    losses = [[1.0, 1.02, 1.3], [1.0, 1.20, 1.3], [1.0, 1.38, 1.3]]
    assert local_critical_batch_size([16, 32, 64], losses, 0.01) == (32, 64)
    assert local_critical_batch_size([16, 32, 64], losses[0], 0.01) == (16, 32)
    assert local_critical_batch_size([16, 32, 64], losses, 0.01, significance=0.0) == (16, 32)
    # a seed that diverged puts its branch outside, whatever the others did
    assert local_critical_batch_size([16, 32, 64], [[1.0, 1.0, 1.0], [1.0, math.nan, 1.0]], 0.01) == (16, 32)


def test_seeds_find_a_known_critical_batch_size_that_one_seed_misses():
    """Synthetic branches whose true losses are flat up to 128 and 30% worse at 256, each seed's loss off by 10%
    (the scatter measured on the spirals): the rule's answer is 128 in at most 15% of the draws with one seed, in at
    least 65% with three and 80% with five, and the three seeds' 95% interval holds 128 in at least 90% (200 draws
    each: a binomial standard error of 3 points, the bounds about 3 of them from what a run measured: 4%, 81%, 90%,
    96.5%). The interval's lower bound is the smallest branch in at most 40% of the draws (29%; 71% when each
    resample recomputed its standard errors from the seeds it redrew)."""
    sizes = [16, 32, 64, 128, 256, 512]
    truth = np.array([1.0, 1.0, 1.0, 1.0, 1.3, 2.0])
    rng = np.random.default_rng(1)
    hits, intervals = {}, []
    for seeds in (1, 3, 5):
        draws = [truth * (1 + 0.1 * rng.standard_normal((seeds, len(sizes)))) for _ in range(200)]
        hits[seeds] = np.mean([local_critical_batch_size(sizes, d, 0.01)[0] == 128 for d in draws])
        if seeds == 3:
            intervals = [critical_interval(sizes, d, 0.01, np.random.default_rng(0)) for d in draws]
    assert hits[1] <= 0.15 and hits[3] >= 0.65 and hits[5] >= 0.80, hits
    assert np.mean([low <= 128 <= high for low, high in intervals]) >= 0.90
    assert np.mean([low == 16 for low, _ in intervals]) <= 0.40
    assert np.isnan(critical_interval(sizes, truth[None], 0.01, rng)).all()  # one seed: no interval


def test_a_diverged_seed_keeps_its_branch_outside_in_every_resample():
    """64 diverged in one of three seeds: the answer stops below it, and so does every resample, including those
    that happen to leave that seed out."""
    losses = [[1.0, 1.0, math.nan, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.01, 1.0, 1.0]]
    assert local_critical_batch_size([16, 32, 64, 128], losses, 0.01) == (32, 64)
    np.testing.assert_array_equal(critical_interval([16, 32, 64, 128], losses, 0.01, np.random.default_rng(0)),
                                  [32, 32])  # fmt: skip


def test_learning_rate_rules():
    assert lr_scale("sgd", 4) == 4 and lr_scale("adamw", 4) == 2


def _by_hand(config, state, lr, seeds, buffers=None, rates=None):
    """The k = 2 branch (4 steps of 128 from ``state``) with torch's SGD, per seed: the same start, batch order and
    evaluation subset as measure.branch; ``buffers``: the momentum buffers to start from (None: zeros); ``rates``:
    each update's learning rate (None: ``lr`` throughout)."""
    opt = config["workloads"]["tiny_mlp"]["optimizer"]
    fresh = build(cfg.workload_slice(config, "tiny_mlp"), CPU, seed=0)
    model = fresh.model
    x, y = fresh.train
    x_eval, y_eval = (t[:200] for t in analysis_data(fresh, CPU))
    losses = []
    for seed in seeds:
        model.load_state_dict(state)
        sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=opt["momentum"], nesterov=opt["nesterov"],
                              weight_decay=opt["weight_decay"])  # fmt: skip
        for p, buffer in zip(model.parameters(), buffers or [], strict=bool(buffers)):
            sgd.state[p]["momentum_buffer"] = buffer.clone()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        model.train()
        for i in range(4):
            index = order[i * 128 : (i + 1) * 128]
            for group in sgd.param_groups:
                group["lr"] = rates[i] if rates else lr
            sgd.zero_grad()
            fresh.loss(model(x[index]), y[index]).backward()
            sgd.step()
        with torch.no_grad():
            losses.append(float(fresh.loss(model.eval()(x_eval), y_eval)))
    return losses


def test_a_branch_trains_what_it_says():
    config = cfg.load("config/test/tiny.yaml")
    spec = branch_stage.config_slice(config, "tiny_mlp")
    spec = {**spec, "factors": [0.5, 2.0], "examples": 512, "eval_size": 200, "seed": 3, "seeds": 3}
    workload = build(cfg.workload_slice(config, "tiny_mlp"), CPU, seed=0)
    state = {k: v.clone() for k, v in workload.model.state_dict().items()}
    ds = branch(state, workload, spec, (64, 0.1), CPU)
    assert ds["branch_batch_size"].values.tolist() == [32, 128]
    assert ds["steps"].values.tolist() == [16, 4]  # the same 512 examples each
    np.testing.assert_allclose(ds["lr"].values, [0.05, 0.2])  # SGD: linear in k
    assert ds["seed"].values.tolist() == [3, 4, 5]
    by_hand = _by_hand(config, state, 0.2, (3, 4, 5))  # the k = 2 branch
    # rtol 1e-6: float32 training, the same operations in the same order by both, up to the optimizers' kernels
    np.testing.assert_allclose(ds["loss"].sel(branch_batch_size=128).values, by_hand, rtol=1e-6)
    assert len(set(by_hand)) == 3  # the seeds drew different examples
    assert float(ds["loss_mean"].sel(branch_batch_size=128)) == pytest.approx(np.mean(by_hand), rel=1e-6)
    se = np.std(by_hand, ddof=1) / np.sqrt(3)
    # rel 1e-5: the standard error is a difference of near-equal losses, which magnifies their 1e-6 agreement
    assert float(ds["loss_se"].sel(branch_batch_size=128)) == pytest.approx(se, rel=1e-5)
    losses = ds["loss"].transpose("seed", "branch_batch_size").values  # (seeds, sizes), as the rule reads them
    expected = local_critical_batch_size([32, 128], losses, spec["tolerance"])
    assert (int(ds["critical_batch_size"]), int(ds["critical_upper"])) == expected
    interval = critical_interval([32, 128], losses, spec["tolerance"], np.random.default_rng(0))
    np.testing.assert_array_equal(ds["critical_ci"].values, interval)


def test_a_branch_continues_the_runs_momentum():
    """From a checkpoint five updates into a run with momentum 0.9, each branch starts from the run's momentum
    buffers (not zeros): the k = 2 branch against torch's SGD given the same buffers. Reset buffers would give other
    losses (checked), lower at the larger k (the build-up lost)."""
    from batchscope.engine import runtime

    config = cfg.load("config/test/tiny.yaml")
    spec = branch_stage.config_slice(config, "tiny_mlp")
    spec = {**spec, "factors": [0.5, 2.0], "examples": 512, "eval_size": 200, "seed": 3, "seeds": 2}
    workload = build(cfg.workload_slice(config, "tiny_mlp"), CPU, seed=0)
    x, y = workload.train
    run = runtime.make_optimizer(spec["optimizer"], workload.model.parameters(), 0.1)
    for i in range(5):  # the reference run so far: five updates at B = 64
        run.zero_grad()
        workload.loss(workload.model(x[i * 64 : (i + 1) * 64]), y[i * 64 : (i + 1) * 64]).backward()
        run.step()
    state = {k: v.clone() for k, v in workload.model.state_dict().items()}
    saved = run.state_dict()
    ds = branch(state, workload, spec, (64, 0.1), CPU, saved, start=5)
    np.testing.assert_allclose(ds["lr"].values, [0.05, 0.2])  # a constant schedule: 0.1 x k
    assert config["workloads"]["tiny_mlp"]["optimizer"]["momentum"] == 0.9
    by_hand = _by_hand(config, state, 0.2, (3, 4), saved["momentum_buffer"])
    # rtol 1e-6: float32, the same operations in the same order, up to the optimizers' kernels
    np.testing.assert_allclose(ds["loss"].sel(branch_batch_size=128).values, by_hand, rtol=1e-6)
    assert ds.attrs["optimizer_state"] == 1 and ds.attrs["start"] == 5
    reset = branch(state, workload, spec, (64, 0.1), CPU, None, start=5)
    carried, zeroed = ds["loss_mean"].values, reset["loss_mean"].values
    assert np.all(np.abs(carried - zeroed) > 1e-4 * carried)  # 100x the 1e-6 to which two equal runs agree
    assert zeroed[1] > carried[1]  # 4 steps from a zero buffer make less progress than 4 with the run's momentum


def test_a_branch_continues_the_runs_schedule_along_the_examples():
    """With a warm-up of 20 updates and a cosine decay over 100, a branch from update 10 at k = 2 takes its update i
    at the run's update 10 + 2 i (the same examples): rates 0.2 x lr_factor(10), (12), (14), (16), still warming up;
    against torch's SGD given those rates. From the run's last update (cosine at 0) every branch stands still."""
    from batchscope.engine import runtime

    config = cfg.load("config/test/tiny.yaml")
    schedule = {"warmup_steps": 20, "decay": "cosine", "min_factor": 0.0, "gamma": 0.1, "step_size": 1000}
    spec = branch_stage.config_slice(config, "tiny_mlp")
    spec = {**spec, "factors": [0.5, 2.0], "examples": 512, "eval_size": 200, "seed": 3, "seeds": 2,
            "schedule": schedule, "max_steps": 100}  # fmt: skip
    workload = build(cfg.workload_slice(config, "tiny_mlp"), CPU, seed=0)
    state = {k: v.clone() for k, v in workload.model.state_dict().items()}
    ds = branch(state, workload, spec, (64, 0.1), CPU, None, start=10)
    rates = [0.2 * runtime.lr_factor(schedule, 10 + 2 * i, 100) for i in range(4)]
    # the warm-up's linear factor (step + 1) / 20 at steps 10 and 16, in float64: rel 1e-12 is rounding only
    assert rates[0] == pytest.approx(0.2 * 11 / 20, rel=1e-12) and rates[-1] == pytest.approx(0.2 * 17 / 20, rel=1e-12)
    by_hand = _by_hand(config, state, 0.2, (3, 4), rates=rates)
    # rtol 1e-6: float32, the same operations in the same order, up to the optimizers' kernels
    np.testing.assert_allclose(ds["loss"].sel(branch_batch_size=128).values, by_hand, rtol=1e-6)
    held = _by_hand(config, state, 0.2 * 11 / 20, (3, 4))  # the rate held at the checkpoint's: another answer
    assert not np.allclose(held, by_hand, rtol=1e-4)
    ended = branch(state, workload, spec, (64, 0.1), CPU, None, start=100)
    with torch.no_grad():
        x_eval, y_eval = (t[:200] for t in analysis_data(workload, CPU))
        workload.model.load_state_dict(state)
        at_start = float(workload.loss(workload.model.eval()(x_eval), y_eval))
    np.testing.assert_allclose(ended["loss"].values, at_start, rtol=1e-6)


def test_a_branch_out_of_memory_is_recorded_and_the_rule_reads_the_branches_that_fit(monkeypatch):
    """Batches of 128 raise torch's out-of-memory error (a real one cannot be provoked safely here): that branch and
    the larger ones are recorded as out of memory, and the critical batch size comes from the ones below."""
    from batchscope.engine import runtime

    real, limit = runtime.make_step, {"examples": 128}

    def limited(*args, **kwargs):
        step = real(*args, **kwargs)

        def guarded(x, y):
            if len(x) >= limit["examples"]:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return step(x, y)

        return guarded

    monkeypatch.setattr(runtime, "make_step", limited)
    config = cfg.load("config/test/tiny.yaml")
    spec = branch_stage.config_slice(config, "tiny_mlp")
    spec = {**spec, "factors": [0.5, 1.0, 2.0, 4.0], "examples": 512, "eval_size": 200, "seed": 0, "seeds": 2}
    workload = build(cfg.workload_slice(config, "tiny_mlp"), CPU, seed=0)
    state = {k: v.clone() for k, v in workload.model.state_dict().items()}
    ds = branch(state, workload, spec, (64, 0.1), CPU)
    assert ds["out_of_memory"].values.tolist() == [False, False, True, True]
    losses = ds["loss"].transpose("seed", "branch_batch_size").values
    assert np.isfinite(losses[:, :2]).all() and np.isnan(losses[:, 2:]).all()
    expected = local_critical_batch_size([32, 64], losses[:, :2], spec["tolerance"])
    assert (int(ds["critical_batch_size"]), int(ds["critical_upper"])) == expected
    limit["examples"] = 1  # every size out of memory
    with pytest.raises(RuntimeError, match="the smallest branch, B = 32, ran out of memory"):
        branch(state, workload, spec, (64, 0.1), CPU)


def test_the_report_bills_each_branch_file_by_its_own_workload_and_fraction(tmp_path):
    """The report's branch jobs' benchmark files come from each branch file's own attributes put into the rule's
    declared pattern (never parsed from the file's path), the fraction as the workflow names it (1.0 -> "1");
    a file of the rule's older version is refused by name."""
    import xarray as xr

    from batchscope import store
    from batchscope.stages.report import branch_job_benchmarks
    from batchscope.store import VersionError

    ds = xr.Dataset({name: ((), 0.0) for name in branch_stage.RULES["branch_checkpoint"].variables})
    paths = []
    for workload, fraction in (("w1", 0.0), ("w1", 0.75), ("w2", 1.0)):
        ds.attrs = {**store.provenance("branch_checkpoint", {}), "workload": workload, "fraction": fraction}
        paths.append(store.write_netcdf(ds, tmp_path / f"anything{len(paths)}.nc"))
    pattern = "bench/{workload}/fraction{fraction}.tsv"
    assert branch_job_benchmarks([str(p) for p in paths], pattern) == {
        "w1": ["bench/w1/fraction0.tsv", "bench/w1/fraction0.75.tsv"],
        "w2": ["bench/w2/fraction1.tsv"],
    }
    assert branch_job_benchmarks([str(p) for p in paths], None) == {}  # branching off: nothing to bill
    ds.attrs = {**ds.attrs, "algorithm_version": "1"}
    old = store.write_netcdf(ds, tmp_path / "old.nc")
    with pytest.raises(VersionError, match="old.nc"):
        branch_job_benchmarks([str(old)], pattern)


def test_the_report_reads_each_workloads_branch_files_over_the_run(tmp_path):
    """figures.load_branch: per workload (its files' own attribute), the answers in step order, and the smallest
    branch each was compared against (an answer equal to it is an upper bound: figures.at_the_smallest_branch)."""
    import xarray as xr

    from batchscope import store
    from batchscope.figures import at_the_smallest_branch, load_branch

    paths = []
    for workload, step, critical in (("w", 40, 32), ("w", 0, 16), ("v", 10, 64)):
        ds = xr.Dataset({"critical_batch_size": ((), critical), "critical_upper": ((), 2 * critical),
                         "critical_ci": ("bound", [16.0, 64.0]), "loss": ("branch_batch_size", [1.0, 1.0, 2.0])},
                        coords={"branch_batch_size": [16, 32, 64], "bound": ["low", "high"]},
                        attrs={"workload": workload, "step": step})  # fmt: skip
        paths.append(store.write_netcdf(ds, tmp_path / f"{workload}{step}.nc"))
    loaded = load_branch(paths)
    assert sorted(loaded) == ["v", "w"]
    assert loaded["w"]["step"].values.tolist() == [0, 40] and loaded["w"]["critical_batch_size"].values.tolist() == [
        16,
        32,
    ]
    assert at_the_smallest_branch(loaded["w"]).tolist() == [True, False]
