"""The adaptive study: the batch sizes chosen around the quick b_opt (against hand-worked brackets), the learning
rates' order and survivors, the pruning bound in the training loop and the train stage, and the fit on the
irregular grid it leaves (pruned runs, a later seed's single survivor, batch sizes missing)."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

from batchscope import config as cfg
from batchscope.core import selection
from batchscope.engine import runtime
from batchscope.engine.training import train
from batchscope.stages import adaptive, extend, fit
from batchscope.stages import train as stage_train
from batchscope.store import read_netcdf, write_netcdf
from tests.test_fit import profile_dataset
from tests.test_train import spec

GRID = [8, 16, 32, 64, 128, 256, 512, 1024]
NAN = math.nan
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------- the batch sizes


def test_a_band_inside_the_grid_gives_the_nearest_size_and_one_neighbour_each_side():
    # b_opt 100: log distance to 128 is 0.25, to 64 0.45; the band [70, 130] rounds to 64 and 128, inside
    choice = selection.choose(GRID, 100.0, [70.0, 130.0], largest_feasible=1024)
    assert choice.batch_sizes == [64, 128, 256] and choice.centre == 128
    assert "widened" not in choice.reason


def test_a_wide_band_widens_the_bracket_to_the_grid_sizes_nearest_its_ends():
    # the band [30, 600] rounds to 32 (log distance 0.06) and 512 (0.16): two sizes more than 64..256
    choice = selection.choose(GRID, 100.0, [30.0, 600.0], largest_feasible=1024)
    assert choice.batch_sizes == [32, 64, 128, 256, 512]
    assert "widened to 32, 512" in choice.reason
    # a band end just past a grid size rounds to it, not to the next doubling (514 -> 512, not 1024): the
    # numbers of the default digits study's quick estimate
    assert selection.choose(GRID, 252.4, [155.7, 513.9], largest_feasible=1024).batch_sizes == [128, 256, 512]


def test_b_opt_above_the_largest_feasible_size_gives_the_largest_feasible_sizes():
    # out of memory above 300: 512 and 1024 are never chosen, whatever the estimate says
    choice = selection.choose(GRID, 900.0, [600.0, 2000.0], largest_feasible=300)
    assert choice.batch_sizes == [64, 128, 256] and choice.centre == 256
    assert "capped at 256" in choice.reason and "does not fit in memory" in choice.reason
    assert max(selection.choose(GRID, 5000.0, [NAN, NAN], largest_feasible=512).batch_sizes) == 512


def test_b_opt_below_the_smallest_grid_size_gives_the_smallest_sizes():
    # the bracket is shifted inward at the grid's end and keeps its three sizes
    choice = selection.choose(GRID, 3.0, [2.0, 5.0], largest_feasible=1024)
    assert choice.batch_sizes == [8, 16, 32] and choice.centre == 8


def test_wider_brackets_no_estimate_and_no_memory():
    assert selection.choose(GRID, 100.0, [90.0, 110.0], 1024, neighbours=2).batch_sizes == [32, 64, 128, 256, 512]
    # a tie in log distance (sqrt(64 x 128) = 90.5) goes to the smaller size
    assert selection.choose(GRID, math.sqrt(64 * 128), [NAN, NAN], 1024).centre == 64
    # no usable noise measurement: nothing to bracket, the whole feasible grid
    assert selection.choose(GRID, NAN, [NAN, NAN], 256).batch_sizes == [8, 16, 32, 64, 128, 256]
    assert selection.choose(GRID, 100.0, [90.0, 110.0], -1).batch_sizes == [8, 16, 32]  # nothing fitted
    assert selection.choose([16, 64], 100.0, [90.0, 110.0], 1024).batch_sizes == [16, 64]  # a grid of two


def test_the_checkpoint_file_holds_the_choice(tmp_path):
    import xarray as xr

    quick = xr.Dataset({"b_noise": ("step", [1.0]), "b_opt": ((), 100.0), "b_opt_band": ("bound", [30.0, 600.0]),
                        "b_opt_sat": ((), 120.0), "b_opt_sat_band": ("bound", [60.0, 400.0]),
                        "b_crit_band": ("bound", [1.0, 2.0]), "tau_f": ((), 1e-3),
                        "tau_d": ((), 1e-5), "total_cost_s": ((), 1.0),
                        "largest_feasible_batch_size": ((), 1024)})  # fmt: skip
    path = write_netcdf(quick, tmp_path / "quick.nc")
    version = str(adaptive.RULES["choose_batch_sizes"].version)

    def chosen(ds):  # through the checkpoint's file, as the workflow reads it
        out = write_netcdf(ds.assign_attrs(stage="choose_batch_sizes", algorithm_version=version), tmp_path / "c.nc")
        return adaptive.read_choice(str(out))

    ds = adaptive.estimate_choice({"batch_sizes": GRID, "neighbours": 1, "inputs": {}}, str(path))
    assert chosen(ds) == [32, 64, 128, 256, 512]
    assert int(ds["centre_batch_size"]) == 128 and ds["feasible"].values.all()
    assert "saturating" not in ds.attrs["reason"]  # 60 to 400 lies inside the band already
    # the saturating step time's b_opt over the run reaching far above the band (a GPU's flat step time, as the
    # linear one's is capped): the bracket covers its range too
    write_netcdf(quick.assign(b_opt_sat=((), 700.0), b_opt_sat_band=("bound", [300.0, 1000.0])), path)
    assert adaptive.bracket_band(read_netcdf(path)) == [30.0, 1000.0]
    ds = adaptive.estimate_choice({"batch_sizes": GRID, "neighbours": 1, "inputs": {}}, str(path))
    assert chosen(ds) == [32, 64, 128, 256, 512, 1024]
    assert int(ds["centre_batch_size"]) == 128 and "saturating step time's b_opt over the run" in ds.attrs["reason"]
    assert ds["b_opt_band"].values.tolist() == [30.0, 600.0]  # the quick band as measured
    # no saturating fit (NaN band): the linear band alone
    write_netcdf(quick.assign(b_opt_sat=((), NAN), b_opt_sat_band=("bound", [NAN, NAN])), path)
    assert adaptive.bracket_band(read_netcdf(path)) == [30.0, 600.0]


# ----------------------------------------------------------------------------------- the learning rates


def test_learning_rates_are_tried_from_the_likely_best_outward():
    assert selection.lr_order([0.3, 0.03, 0.1]) == [0.1, 0.03, 0.3]  # the middle, then the smaller, the larger
    assert selection.lr_order([0.01, 0.03, 0.1, 0.3]) == [0.1, 0.03, 0.3, 0.01]
    assert selection.lr_order([0.01, 0.03, 0.1, 0.3], centre=0) == [0.01, 0.03, 0.1, 0.3]
    assert selection.lr_order([0.01, 0.03], centre=5) == [0.03, 0.01]  # an index past the grid: its largest


def test_successive_halving_keeps_the_best_fraction_by_steps_then_loss_ties_kept():
    # one seed each, rate 3: of three, the fastest (the old single cut); rate 2: two
    first = {0.03: [(NAN, 0.9)], 0.1: [(30.0, 0.4)], 0.3: [(20.0, 0.5)]}
    assert selection.survivors(first) == [0.3] and selection.survivors(first, rate=2) == [0.1, 0.3]
    # nine learning rates, rate 3: three go on; a tie in steps with the last kept is kept too (counted at evaluations)
    nine = {0.001 * 2**i: [(10.0 * (i + 1), 0.5)] for i in range(9)}
    assert selection.survivors(nine) == [0.001, 0.002, 0.004]
    assert selection.survivors({**nine, 0.008: [(30.0, 0.9)]}) == [0.001, 0.002, 0.004, 0.008]  # 40 -> 30 steps
    # a pruned run (not reached) ranks below any that reached; the unreached by their final loss
    unreached = {0.01: [(NAN, 0.7)], 0.03: [(NAN, 0.6)], 0.1: [(40.0, 0.4)], 0.3: [(NAN, 2.0)]}
    assert selection.survivors(unreached, rate=2) == [0.03, 0.1]
    assert selection.survivors({0.01: [(NAN, 0.7)], 0.03: [(NAN, 0.6)], 0.3: [(NAN, 2.0)]}) == [0.03]  # none reached
    # later rounds rank by the median over the seeds so far: 0.1's second seed (60 steps) puts it behind 0.3
    assert selection.survivors({0.1: [(20.0, 0.4), (60.0, 0.4)], 0.3: [(30.0, 0.5), (30.0, 0.5)]}) == [0.3]
    # one seed that did not reach the target makes two seeds' median "never"
    assert selection.survivors({0.1: [(20.0, 0.4), (NAN, 0.6)], 0.3: [(40.0, 0.5), (40.0, 0.5)]}) == [0.3]
    assert selection.survivors({0.1: [(20.0, 0.4)]}) == [0.1]  # one left: it stays


# ------------------------------------------------------------------------------------- the pruning bound


def test_a_run_is_stopped_at_the_best_runs_steps_and_flagged():
    runtime.setup(1, CPU)
    best, _ = train(spec(), 32, 0.1, seed=0, device=CPU)
    bound = int(best["steps_to_target"])
    slow, _ = train(spec(), 32, 0.01, seed=0, device=CPU)  # the same lr without the bound: slower than the best
    assert float(slow["steps_to_target"]) > bound or not bool(slow["reached_target"])
    pruned, _ = train(spec(), 32, 0.01, seed=0, device=CPU, prune_at=bound)
    assert bool(pruned["pruned"]) and not bool(pruned["reached_target"])
    assert math.isnan(float(pruned["steps_to_target"])) and math.isnan(float(pruned["time_to_target"]))
    assert int(pruned["steps_done"]) == bound and float(pruned["prune_at"]) == bound
    # up to the bound it is the same run (the schedule still spans max_steps): bitwise on the CPU
    n = pruned.sizes["step"]
    np.testing.assert_array_equal(pruned["val_metric"].values, slow["val_metric"].values[:n])
    np.testing.assert_array_equal(pruned["train_loss"].values, slow["train_loss"].values[:n])
    # a run that reaches the target within the bound is not pruned, and the unbounded run is unflagged
    tie, _ = train(spec(), 32, 0.1, seed=0, device=CPU, prune_at=bound)
    assert float(tie["steps_to_target"]) == bound and not bool(tie["pruned"])
    assert not bool(best["pruned"]) and math.isnan(float(best["prune_at"]))


def _train_job(outs, lrs, seeds, adaptive=False, reuse=None, settings=None, rate=3):
    args = argparse.Namespace(spec=json.dumps(settings or spec()), config=None, workload=None, data=None,
                              batch_size=32, lrs=lrs, seeds=seeds, snapshot_lr=None, snapshot_fractions=None,
                              out=[str(out) for out in outs], adaptive=adaptive, reuse=reuse,
                              halving_rate=rate)  # fmt: skip
    stage_train.run(args)
    return [{float(read_netcdf(p).attrs["lr"]): read_netcdf(p) for p in sorted(out.glob("*.nc"))} for out in outs]


def test_the_first_seed_prunes_and_the_later_seeds_train_the_survivors_in_one_job(tmp_path):
    first, later, last = _train_job([tmp_path / f"seed{s}" for s in (0, 1, 2)], [0.1, 0.01, 0.3], [0, 1, 2], True,
                                    rate=2)  # fmt: skip
    assert not bool(first[0.1]["pruned"]) and math.isnan(float(first[0.1]["prune_at"]))  # the first is unbounded
    assert bool(first[0.01]["pruned"]) and int(first[0.01]["steps_done"]) == int(first[0.1]["steps_to_target"])

    def record(ds):
        return float(ds["steps_to_target"]), float(ds["final_val_loss"])

    # successive halving at rate 2 (given here; adaptive.halving_rate): seed 1 trains the better half of seed 0's
    # three (2), seed 2 the better of those (1)
    second = selection.survivors({lr: [record(ds)] for lr, ds in first.items()}, rate=2)
    third = selection.survivors({lr: [record(first[lr]), record(later[lr])] for lr in second}, rate=2)
    assert (len(second), len(third)) == (2, 1)  # halved each round, or this test would not test it
    for runs, seed, expected in ((later, 1, second), (last, 2, third)):
        assert sorted(runs) == expected and not any(bool(ds["pruned"]) for ds in runs.values())
        assert {int(ds.attrs["seed"]) for ds in runs.values()} == {seed}  # each seed in its own directory
    # the full grid's job, same points: every lr at every seed, nothing pruned, and the same unpruned runs bitwise
    (full,) = _train_job([tmp_path / "full"], [0.1, 0.01, 0.3], [0])
    assert len(full) == 3 and not any(bool(ds["pruned"]) for ds in full.values())
    np.testing.assert_array_equal(full[0.1]["val_metric"].values, first[0.1]["val_metric"].values)


def test_the_reference_runs_point_is_copied_where_it_is_the_same_run(tmp_path):
    """--reuse: the reference run's record and checkpoint (here a job's run at lr 0.1, seed 0) are copied, byte for
    byte, into the adaptive job where they are its point, and the other points are what the job trains without it.
    Not copied: a point of another config (another hash), or one whose run did not reach the target within the bound
    the job had set by then (the capped run is trained, and pruned)."""
    (reference,) = _train_job([tmp_path / "reference"], [0.1], [0])
    plain = _train_job([tmp_path / "plain" / f"seed{s}" for s in (0, 1)], [0.1, 0.01, 0.3], [0, 1], True)
    reused = _train_job([tmp_path / "reused" / f"seed{s}" for s in (0, 1)], [0.1, 0.01, 0.3], [0, 1], True,
                        reuse=str(tmp_path / "reference"))  # fmt: skip
    name = "lr0.1_seed0"
    for suffix in (".nc", ".pt"):
        copied = (tmp_path / "reused" / "seed0" / f"{name}{suffix}").read_bytes()
        assert copied == (tmp_path / "reference" / f"{name}{suffix}").read_bytes()
    trained = (tmp_path / "plain" / "seed0" / f"{name}.nc").read_bytes()
    assert trained != (tmp_path / "reference" / f"{name}.nc").read_bytes()  # trained: another creation time
    for runs, same in zip(plain, reused, strict=True):
        assert sorted(runs) == sorted(same)
        for lr in runs:
            np.testing.assert_array_equal(runs[lr]["val_metric"].values, same[lr]["val_metric"].values)
            assert bool(runs[lr]["pruned"]) == bool(same[lr]["pruned"])
    # another GPU model (or CPU name) than this job's: the fit would refuse to mix them, so the point is trained
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    record = read_netcdf(tmp_path / "reference" / f"{name}.nc")
    record.attrs["device_name"] = "another accelerator"
    write_netcdf(record, elsewhere / f"{name}.nc")
    (elsewhere / f"{name}.pt").write_bytes((tmp_path / "reference" / f"{name}.pt").read_bytes())
    (moved,) = _train_job([tmp_path / "moved"], [0.1], [0], True, reuse=str(elsewhere))
    assert moved[0.1].attrs["device_name"] != "another accelerator"
    # another config: its hash differs, so the point is trained
    other = {**spec(), "eval_interval": spec()["eval_interval"] * 2}
    _train_job([tmp_path / "other"], [0.1], [0], True, reuse=str(tmp_path / "reference"), settings=other)
    assert (tmp_path / "other" / f"{name}.nc").read_bytes() != (tmp_path / "reference" / f"{name}.nc").read_bytes()
    # a reference run (lr 0.01) that took longer than the bound the job's first lr (0.1) set: trained, capped
    (slow,) = _train_job([tmp_path / "slow"], [0.01], [0])
    bound = float(reference[0.1]["steps_to_target"])
    assert not float(slow[0.01]["steps_to_target"]) <= bound  # else this part would check nothing
    (capped,) = _train_job([tmp_path / "capped"], [0.1, 0.01], [0], True, reuse=str(tmp_path / "slow"))
    assert bool(capped[0.01]["pruned"]) and int(capped[0.01]["steps_done"]) == int(bound)


def test_one_directory_for_every_seed_and_a_single_seed(tmp_path):
    """Every seed's runs in one --out directory: the later seed still trains the better half of the first seed's
    runs alone. One seed: its runs, pruned, and nothing else."""
    (shared,) = _train_job([tmp_path / "all"], [0.1, 0.01, 0.3], [0, 1], True)  # keyed by lr: the later seed's
    runs = {(float(read_netcdf(p).attrs["lr"]), int(read_netcdf(p).attrs["seed"])): read_netcdf(p)
            for p in (tmp_path / "all").glob("*.nc")}  # fmt: skip
    first = {lr: [(float(ds["steps_to_target"]), float(ds["final_val_loss"]))] for (lr, seed), ds in runs.items()
             if seed == 0}  # fmt: skip
    assert sorted(first) == [0.01, 0.1, 0.3]
    assert sorted(lr for lr, seed in runs if seed == 1) == selection.survivors(first)
    (alone,) = _train_job([tmp_path / "one"], [0.1, 0.01, 0.3], [0], True)
    assert sorted(alone) == [0.01, 0.1, 0.3] and bool(alone[0.01]["pruned"])


def test_the_train_command_refuses_out_directories_that_do_not_match_the_seeds(tmp_path):
    with pytest.raises(SystemExit, match="--out names 2 directories for 3 seeds"):
        _train_job([tmp_path / "a", tmp_path / "b"], [0.1], [0, 1, 2])
    with pytest.raises(SystemExit, match=r"--seeds \[0, 0\] repeats a seed"):
        _train_job([tmp_path / "a", tmp_path / "b"], [0.1], [0, 0])


def test_the_fit_reads_the_adaptive_studys_irregular_runs(tmp_path):
    """Batch sizes 64 to 256 of a grid of 8 to 512 trained; at each, the first seed tried three learning rates (one
    pruned, one slower than the survivor) and three later seeds trained the survivor only: cells of 1 and 4 seeds.
    The slower one's single run beats the survivor's median over seeds (the survivor's first seed was its luckiest)
    but K(B) is taken from the learning rates trained at every seed."""
    import xarray as xr

    n_iter, c_var, tau_f, tau_d = 40.0, 2400.0, 2.5e-4, 1.1e-6
    rng = np.random.default_rng(0)
    grid, trained = [8, 16, 32, 64, 128, 256, 512], [64, 128, 256]
    profiles, run_dirs, expected_k = [], [], {}
    for b in grid:
        times = (tau_f + tau_d * b) * (1 + 0.01 * rng.standard_normal((3, 3)))
        profiles.append(write_netcdf(profile_dataset(b, times, grid), tmp_path / "profile" / f"B{b}.nc"))
    for b in trained:
        steps = [float(np.round((n_iter + c_var / b) * f)) for f in (0.9, 1.0, 1.05, 1.1)]
        expected_k[b] = float(np.median(steps))
        slower = float(np.round((n_iter + c_var / b) * 0.95))  # between the survivor's seed 0 and its median
        points = [(0.1, seed, s, False) for seed, s in enumerate(steps)] + [
            (0.03, 0, NAN, True),
            (0.05, 0, slower, False),
        ]
        for lr, seed, s, pruned in points:
            run = xr.Dataset({"steps_to_target": ((), s), "time_to_target": ((), s * (tau_f + tau_d * b)),
                              "val_metric": ("step", [0.5, 0.9]), "pruned": ((), pruned)}, coords={"step": [10, 20]},
                             attrs={"batch_size": b, "lr": lr, "seed": seed})  # fmt: skip
            write_netcdf(run, tmp_path / "train" / f"B{b}" / f"seed{seed}" / f"lr{lr}_seed{seed}.nc")
            run_dirs.append(tmp_path / "train" / f"B{b}" / f"seed{seed}")
    spec_ = {"fit": {"bootstrap": 100, "seed": 0, "tolerance": 0.05}, "study": "adaptive",
             "target": {"metric": "val_accuracy", "value": 0.9}, "inputs": {"batch_sizes": grid}}  # fmt: skip
    ds = fit.fit_scaling(profiles, sorted(set(run_dirs)), spec_, "synthetic")
    assert ds["batch_size"].values.tolist() == trained  # sizes not trained are not in the fit's grid
    assert ds["profile_batch_size"].values.tolist() == grid  # the profile timed them all
    assert ds["k"].values.tolist() == [expected_k[b] for b in trained] and (ds["best_lr"].values == 0.1).all()
    assert ds.sizes["run"] == 3 * 6 and int(ds["pruned"].values.sum()) == 3
    assert ds["run_at_best_lr"].values.sum() == 3 * 4  # the survivor's runs
    assert np.isfinite(ds["boot_b_opt"].values).all()  # the bootstrap resamples the irregular cells one by one
    assert ds.attrs["study"] == "adaptive" and json.loads(ds.attrs["grid_batch_sizes"]) == grid
    assert float(ds["b_opt"]) == pytest.approx(math.sqrt(c_var * tau_f / (n_iter * tau_d)), rel=0.15)
    # the full grid's rule (every cell's median, one seed or four) would have taken the slower lr's single run
    table = fit.halving_survivors(fit.pd.DataFrame({"batch_size": [64] * 3, "lr": [0.1, 0.1, 0.05], "seed": [0, 1, 0],
                                                    "steps_to_target": [10.0, 30.0, 15.0]}))  # fmt: skip
    assert table["lr"].tolist() == [0.1, 0.1]


def test_an_edge_of_the_trained_bracket_is_not_called_the_grids_edge():
    """The fastest at the bracket's smallest size: the grid has smaller sizes, so the note says to train the next
    one (or the full grid), not to extend grid.batch_sizes."""
    import xarray as xr

    b = np.array([64, 128, 256])
    ds = xr.Dataset(
        {"t_iter_r2": ((), 1.0), "t_iter_residual_max": ((), 0.0), "t_iter_round_spread": ("batch_size", [0.0] * 3),
         "k_r2": ((), 1.0), "k_residual_max": ((), 0.0), "k": ("batch_size", [400.0, 250.0, 180.0]),
         "best_lr": ("batch_size", [0.1] * 3),
         "indistinguishable": ("batch_size", [True, False, False]), "fastest_batch_size": ((), 64),
         "b_opt": ((), 80.0), "b_opt_ci": ("bound", [70.0, 90.0]), "largest_feasible_batch_size": ((), 512),
         "run_batch_size": ("run", b), "run_lr": ("run", [0.1] * 3)},
        coords={"batch_size": b}, attrs={"study": "adaptive", "grid_batch_sizes": json.dumps(GRID)},
    )  # fmt: skip
    notes = fit.diagnose(ds)
    assert any("the smallest trained size 64 is the fastest" in n and "train the grid's next size 32 too" in n
               for n in notes)  # fmt: skip
    # as fast as its inner neighbour: the optimum lies between them (the extension's rule), no advice to go further
    between = ds.assign(indistinguishable=("batch_size", [True, True, False]))
    assert not any("may not hold the optimum" in n or "next size" in n for n in fit.diagnose(between))
    # the fastest inner, b_opt below the trained sizes with both step-time models: the second round's fit rule
    # names the size to train, in place of the generic "add batch sizes below it"
    inner = ds.assign(indistinguishable=("batch_size", [False, True, False]), fastest_batch_size=((), 128),
                      b_opt=((), 40.0), b_opt_sat=((), 30.0))  # fmt: skip
    notes = fit.diagnose(inner)
    assert any("the fit predicts b_opt 40 (linear step time) and 30 (saturating step time), below the trained "
               "sizes (64 to 256); train the grid's next size 32 too" in n for n in notes)  # fmt: skip
    assert not any("lies outside" in n for n in notes)
    disagree = fit.diagnose(inner.assign(b_opt_sat=((), 90.0)))  # the models disagree: no size, the generic note
    assert not any("next size" in n for n in disagree) and any("lies outside the trained sizes" in n for n in disagree)
    ds.attrs["grid_batch_sizes"] = json.dumps([64, 128, 256])  # the bracket is the whole grid: the grid's edge
    assert any("the grid's smallest batch size 64 is the fastest" in n for n in fit.diagnose(ds))
    # the same rule at the grid's edge (either study): as fast as its neighbour, the optimum is between them
    between.attrs.update(grid_batch_sizes=json.dumps([64, 128, 256]), study="full")
    assert not any("grid's smallest" in n or "extend grid" in n for n in fit.diagnose(between))
    assert any("grid's smallest" in n for n in fit.diagnose(ds.assign_attrs(study="full")))
    # only the fastest edge points past itself: the far edge, indistinguishable on its own, gets no note
    apart = ds.assign(indistinguishable=("batch_size", [True, False, True])).assign_attrs(study="full")
    notes = fit.diagnose(apart)
    assert any("grid's smallest batch size 64 is the fastest" in n for n in notes)
    assert not any("largest" in n and "extend grid" in n for n in notes)
    # the fastest at the grid's top, the next size up out of memory: the device bounds the answer, not the grid
    top = ds.assign(indistinguishable=("batch_size", [False, False, True]), fastest_batch_size=((), 256),
                    largest_feasible_batch_size=((), 256), smallest_infeasible_batch_size=((), 512),
                    b_opt=((), 250.0), b_opt_ci=("bound", [240.0, 260.0])).assign_attrs(study="full")  # fmt: skip
    notes = fit.diagnose(top)
    assert any("larger sizes run out of memory (at B = 512)" in n and "use 256" in n for n in notes)
    assert not any("extend grid.batch_sizes upward" in n for n in notes)
    no_limit = top.drop_vars("smallest_infeasible_batch_size")
    assert any("extend grid.batch_sizes upward" in n for n in fit.diagnose(no_limit))


def test_the_study_is_in_the_fits_config_hash_and_full_is_unchanged(repo):
    config = cfg.load(repo / "config/test/adaptive.yaml")
    adaptive_slice = fit.config_slice(config, "tiny_mlp")
    assert adaptive_slice["study"] == "adaptive" and "choose_batch_sizes" in adaptive_slice["inputs"]
    full = fit.config_slice({**config, "study": "full"}, "tiny_mlp")
    assert "study" not in full and "choose_batch_sizes" not in full["inputs"]  # the full grid's hash as before
    assert cfg.config_hash(full) != cfg.config_hash(adaptive_slice)
    assert cfg.load(repo / "config/config.yaml")["study"] == "full"  # the default study is the full grid


# ------------------------------------------------------------------------------- the second round (extension)
def test_equal_times_to_the_target_put_b_opt_at_their_geometric_mean():
    """What the extension's rule rests on: under T(B) = (N_iter + C_var/B)(tau_f + tau_d B), two sizes with equal
    times have b_opt = sqrt(b1 b2), so one is below it and one above (closed form against scaling.b_opt)."""
    from batchscope.core import scaling

    rng = np.random.default_rng(0)
    for _ in range(20):
        n_iter, c_var = rng.uniform(10, 1000), rng.uniform(100, 1e5)
        tau_f, tau_d = rng.uniform(1e-4, 1e-2), rng.uniform(1e-7, 1e-4)
        best = scaling.b_opt(n_iter, c_var, tau_f, tau_d)
        b1 = best * rng.uniform(0.1, 0.9)
        b2 = best**2 / b1
        time = [(n_iter + c_var / b) * (tau_f + tau_d * b) for b in (b1, b2)]
        assert time[0] == pytest.approx(time[1], rel=1e-12)


FEASIBLE = [8, 16, 32, 64, 128, 256, 512]


@pytest.mark.parametrize(
    ("trained", "fastest", "same", "feasible", "expected"),
    [
        ([64, 128, 256], 64, [True, False, False], FEASIBLE, 32),  # the smallest wins beyond noise: one below
        ([64, 128, 256], 256, [False, False, True], FEASIBLE, 512),  # the largest: one above
        ([64, 128, 256], 64, [True, True, False], FEASIBLE, None),  # as fast as its neighbour: b_opt between them
        ([64, 128, 256], 128, [False, True, False], FEASIBLE, None),  # inside the bracket
        ([8, 16, 32], 8, [True, False, False], FEASIBLE, None),  # the grid's smallest: nothing below
        ([64, 128, 256], 256, [False, False, True], [8, 16, 32, 64, 128, 256], None),  # 512 does not fit in memory
        ([64, 256], 256, [False, True], FEASIBLE, 512),  # two sizes: the other one is the inner neighbour
        ([128], 128, [True], FEASIBLE, None),  # one size: nothing to compare
    ],
)
def test_the_bracket_is_extended_past_an_edge_that_wins(trained, fastest, same, feasible, expected):
    size, reason = selection.extension(trained, fastest, same, feasible)
    assert size == expected and reason
    if expected is not None:
        assert "beyond the fit's noise: the optimum lies at or beyond it" in reason


INSIDE = ([64, 128, 256], 128, [False, True, False])  # the fastest inside the bracket, its neighbours slower


@pytest.mark.parametrize(
    ("bracket", "b_opts", "feasible", "expected"),
    [
        (INSIDE, (26.0, 20.0), FEASIBLE, 32),  # both step-time models put b_opt below the bracket: one size below
        (INSIDE, (600.0, 700.0), FEASIBLE, 512),  # both above: one size above
        (INSIDE, (NAN, 20.0), FEASIBLE, 32),  # one model has no b_opt: the other decides
        (INSIDE, (26.0, 300.0), FEASIBLE, None),  # the models disagree on the side: the measured fastest stands
        (INSIDE, (26.0, 90.0), FEASIBLE, None),  # one inside
        (INSIDE, (NAN, NAN), FEASIBLE, None),  # no prediction
        (INSIDE, (), FEASIBLE, None),  # none given (the measured rule alone)
        (INSIDE, (600.0, 700.0), [8, 16, 32, 64, 128, 256], None),  # 512 does not fit in memory
        (INSIDE, (0.0, 0.0), FEASIBLE, 32),  # K flat, the knee at 0: the smallest step time wins, b_opt 0
        (INSIDE, (math.inf, math.inf), FEASIBLE, 512),  # K(B) ~ 1/B: no per-step floor, b_opt unbounded
        (([64, 128, 256], 256, [False, False, True]), (20.0, 20.0), FEASIBLE, 512),  # the measured rule first
        # a fastest edge is the measured rule's alone: as fast as its neighbour (the optimum between them), or with
        # nothing past it, the fit does not send the study to the far side
        (([64, 128, 256], 256, [False, True, True]), (20.0, 20.0), FEASIBLE, None),
        (([64, 128, 256], 256, [False, False, True]), (20.0, 20.0), [8, 16, 32, 64, 128, 256], None),
        # as fast as its neighbour, with every model's b_opt past that same edge: one more size is the check (a
        # user's BatchNorm CNN: 64 fastest, 128 as fast, b_opt 59 and 54; digits_adamw: 128, 64, b_opt 239 and 279)
        (([64, 128, 256], 64, [True, True, False]), (59.0, 54.0), FEASIBLE, 32),
        (([32, 64, 128], 128, [False, True, True]), (239.0, 279.0), FEASIBLE, 256),
        (([32, 64, 128], 128, [False, True, True]), (239.0, 100.0), FEASIBLE, None),  # one model inside: between
        (([64, 128, 256], 64, [True, True, False]), (59.0, 54.0), [64, 128, 256], None),  # nothing past it
    ],
)
def test_the_bracket_is_extended_towards_the_fits_b_opt(bracket, b_opts, feasible, expected):
    """Failing the measured rule, with the fastest an inner size, the fit decides: every step-time model's b_opt
    beyond one edge trains the feasible grid's next size past it; models that disagree, or no prediction, train
    nothing more."""
    size, reason = selection.extension(*bracket, feasible, b_opts)
    assert size == expected and reason
    trained, fastest, same = bracket
    if fastest in (trained[0], trained[-1]) and same[1 if fastest == trained[0] else -2]:
        inner = trained[1] if fastest == trained[0] else trained[-2]
        if expected is not None:
            side = "smallest" if fastest == trained[0] else "largest"
            assert reason.startswith(f"the {side} trained size {fastest} is the fastest and {inner} as fast within "
                                     "the fit's noise; the fit predicts b_opt ")  # fmt: skip
        elif feasible == FEASIBLE:
            assert reason.endswith("the optimum lies between them")
    if expected is not None and bracket is INSIDE:
        named = [f"{b:.0f} ({model} step time)" for model, b in zip(selection.MODELS, b_opts, strict=True)
                 if not math.isnan(b)]  # fmt: skip
        assert reason.endswith(f"the fit predicts b_opt {' and '.join(named)}, "
                               f"{'below' if expected < 64 else 'above'} the trained sizes (64 to 256)")  # fmt: skip


def test_an_edge_that_never_reached_the_target_is_not_extended_past():
    """b_opt below a smallest size whose runs never reached the target: a smaller one would not either."""
    size, reason = selection.extension(*INSIDE, FEASIBLE, (20.0, 20.0), reached=[False, True, True])
    assert size is None and reason.endswith("but 64 did not reach the target")
    assert selection.extension(*INSIDE, FEASIBLE, (20.0, 20.0), reached=[True, True, True])[0] == 32


@pytest.mark.parametrize(
    ("reached", "out_of_steps", "diverged", "expected", "says"),
    [
        # a quick estimate far below the answer: the bracket's small sizes ran out of steps, one size reached
        ([False, False, True], [True, True, False], [False, False, False], 512, "64, 128 ran out of steps"),
        ([False, False, False], [True, True, True], [False, False, False], 512, "reached at 0 of the trained sizes"),
        # the large sizes diverged at their learning rates: a smaller size, with a smaller one
        ([True, False, False], [False, False, False], [False, True, True], 32, "128, 256 diverged"),
        # one diverged, one neither ran out of steps nor diverged (pruned, out of memory): down, past the diverged
        ([True, False, False], [False, False, False], [False, True, False], 32, "128 diverged"),
        # nothing known of why the sizes fell short (pruned, out of memory): no direction
        ([True, False, False], [False, False, False], [False, False, False], None, "K(B) needs two"),
        # the smallest ran out of steps and the largest diverged: neither way
        (
            [False, True, False],
            [True, False, False],
            [False, False, True],
            None,
            "64 ran out of steps and 256 diverged: neither a larger nor a smaller batch",
        ),
        # both ways open (64 diverged, 256 ran out of steps): the largest ran out of steps, so up
        ([False, True, False], [False, False, True], [True, False, False], 512, "256 ran out of steps"),
    ],
)
def test_a_bracket_without_a_fit_is_extended_the_way_its_runs_point(reached, out_of_steps, diverged, expected, says):
    size, reason = selection.extension_without_a_fit([64, 128, 256], reached, out_of_steps, diverged, FEASIBLE)
    assert size == expected and says in reason, reason
    # at the feasible grid's ends there is nowhere to go, and the reason says so
    for bracket, way in (([128, 256, 512], "above"), ([8, 16, 32], "below")):
        size, reason = selection.extension_without_a_fit(bracket, reached, out_of_steps, diverged, FEASIBLE)
        if expected is not None and (expected > 256) == (way == "above"):
            assert size is None and reason.endswith(f"but the feasible grid has no size {way} them"), reason


def test_a_bracket_without_a_fit_reads_real_training_records(tmp_path):
    """The second round on records the training engine wrote (no field set by hand). On the digits MLP at lr 0.1,
    steps to the target fall with B (120, 80 and 60 at 16, 32 and 64): with max_steps 70, 16 and 32 run out of
    steps and only 64 reaches the target, so 128 is trained too. With 64 at lr 0.1 and 128 and 256 at lr 100 (both
    diverge within 10 steps), 32 is trained instead."""
    import xarray as xr

    grid, tau_f, tau_d = FEASIBLE, 1e-4, 1e-5
    profiles = [write_netcdf(profile_dataset(b, np.full((3, 3), tau_f + tau_d * b), grid),
                             tmp_path / "profile" / f"B{b}.nc") for b in grid]  # fmt: skip
    settings = spec(max_steps=70)

    def bracket_runs(name, lrs):
        dirs = []
        for b, lr in lrs.items():
            for seed in (0, 1):
                ds, _ = train(settings, b, lr, seed=seed, device=CPU)
                dirs.append(write_netcdf(ds.assign_attrs(batch_size=b, lr=lr, seed=seed),
                                         tmp_path / name / f"B{b}" / f"seed{seed}" / "run.nc").parent)  # fmt: skip
        return dirs

    def choice(bracket):
        ds = xr.Dataset(
            {"chosen": ("grid_batch_size", np.isin(grid, bracket)), "feasible": ("grid_batch_size", np.ones(7, bool)),
             "b_opt": ((), 32.0), "b_opt_band": ("bound", [32.0, 32.0]), "largest_feasible_batch_size": ((), 512)},
            coords={"grid_batch_size": grid, "bound": ["low", "high"]}, attrs={"reason": "by hand"},
        )  # fmt: skip
        return str(write_netcdf(ds, tmp_path / f"choice{bracket[0]}.nc"))

    spec_ = {"fit": {"bootstrap": 50, "seed": 0, "tolerance": 0.05}, "study": "adaptive", "extend": True,
             "target": {"metric": "val_accuracy", "value": 0.9}, "inputs": {"batch_sizes": grid}}  # fmt: skip
    short = bracket_runs("short", {16: 0.1, 32: 0.1, 64: 0.1})
    up = extend.extend_choice(spec_, choice([16, 32, 64]), profiles, short, "w")
    assert int(up["extended_batch_size"]) == 128, up.attrs["reason"]
    assert "reached at 1 of the trained sizes (64)" in up.attrs["reason"]
    assert "16, 32 ran out of steps" in up.attrs["reason"]
    blown = bracket_runs("blown", {64: 0.1, 128: 100.0, 256: 100.0})
    down = extend.extend_choice(spec_, choice([64, 128, 256]), profiles, blown, "w")
    assert int(down["extended_batch_size"]) == 32 and "128, 256 diverged" in down.attrs["reason"], down.attrs


def test_the_extension_is_recorded_and_off_means_the_bracket(tmp_path):
    """extend_choice on synthetic caches: the bracket 64 to 256 of 8 to 512 at K flat (so the smallest wins by its
    step time); the file keeps the bracket and adds 32, and read_choice reads it. With adaptive.extend off, or with
    a bracket where the target was reached at one size (no fit), the bracket alone, with the reason. With the
    fastest inside the bracket and the fit's b_opt below it, 32 again."""
    import xarray as xr

    grid, bracket = FEASIBLE, [64, 128, 256]
    tau_f, tau_d = 1e-4, 1e-5
    rng = np.random.default_rng(0)
    profiles = [write_netcdf(profile_dataset(b, (tau_f + tau_d * b) * (1 + 0.01 * rng.standard_normal((3, 3))), grid),
                             tmp_path / "profile" / f"B{b}.nc") for b in grid]  # fmt: skip

    def runs(steps, ran_out=False):
        """Two seeds per bracket size; ``ran_out``: with the records of runs that stop at max_steps (reached_target,
        diverged), which the synthetic runs otherwise leave out."""
        dirs = []
        for b, s in zip(bracket, steps, strict=True):
            for seed in (0, 1):
                run = xr.Dataset({"steps_to_target": ((), s), "time_to_target": ((), s * (tau_f + tau_d * b)),
                                  "val_metric": ("step", [0.5, 0.9]), "pruned": ((), False)}, coords={"step": [10, 20]},
                                 attrs={"batch_size": b, "lr": 0.1, "seed": seed})  # fmt: skip
                if ran_out:
                    run["reached_target"], run["diverged"] = ((), bool(np.isfinite(s))), ((), False)
                path = tmp_path / f"train{len(steps)}{s}{ran_out}" / f"B{b}" / f"s{seed}" / "r.nc"
                dirs.append(write_netcdf(run, path).parent)
        return dirs

    choice = selection.choose(grid, 128.0, [128.0, 128.0], 512)
    assert choice.batch_sizes == bracket
    choice_ds = xr.Dataset(
        {"chosen": ("grid_batch_size", np.isin(grid, bracket)), "feasible": ("grid_batch_size", np.ones(7, bool)),
         "b_opt": ((), 128.0), "b_opt_band": ("bound", [128.0, 128.0]), "largest_feasible_batch_size": ((), 512)},
        coords={"grid_batch_size": grid, "bound": ["low", "high"]}, attrs={"reason": "by hand"},
    )  # fmt: skip
    path = str(write_netcdf(choice_ds, tmp_path / "choice.nc"))
    spec_ = {"fit": {"bootstrap": 50, "seed": 0, "tolerance": 0.05}, "study": "adaptive", "extend": True,
             "target": {"metric": "val_accuracy", "value": 0.9}, "inputs": {"batch_sizes": grid}}  # fmt: skip
    flat = runs([100.0, 100.0, 100.0])
    out = extend.extend_choice(spec_, path, profiles, flat, "synthetic")
    assert int(out["extended_batch_size"]) == 32 and int(out["bracket_fastest_batch_size"]) == 64
    assert out["bracket"].values.tolist() == np.isin(grid, bracket).tolist()
    version = str(extend.RULES["extend_bracket"].version)
    written = write_netcdf(out.assign_attrs(stage="extend_bracket", algorithm_version=version), tmp_path / "e.nc")
    assert adaptive.read_choice(str(written), "extend_bracket") == [32, *bracket]
    off = extend.extend_choice({**spec_, "extend": False}, path, profiles, flat, "synthetic")
    assert int(off["extended_batch_size"]) == -1 and off["chosen"].values.sum() == 3 and "off" in off.attrs["reason"]
    once = extend.extend_choice(spec_, path, profiles, runs([100.0, NAN, NAN]), "synthetic")
    assert int(once["extended_batch_size"]) == -1 and once.attrs["reason"].startswith("no fit on the bracket")
    # the same with the runs' records saying why 128 and 256 fell short: they ran out of steps, so 512 is trained
    short = runs([NAN, NAN, 100.0], ran_out=True)
    up = extend.extend_choice(spec_, path, profiles, short, "synthetic")
    assert int(up["extended_batch_size"]) == 512 and up.attrs["reason"] == (
        "no fit on the bracket: the target was reached at 1 of the trained sizes (256), and K(B) needs two; 64, 128 "
        "ran out of steps short of it, and a larger batch needs fewer, so 512 is trained too"
    )
    assert adaptive.read_choice(str(write_netcdf(up.assign_attrs(stage="extend_bracket", algorithm_version=version),
                                                 tmp_path / "up.nc")), "extend_bracket") == [*bracket, 512]  # fmt: skip
    # the fastest inside the bracket (128: steps 100, 40, 60), but K(B) = N_iter + C_var/B fitted on the three
    # sizes puts b_opt below it (the fit's relative least squares by hand, residuals over K: b_opt 30): 32 is trained
    steps = np.array([100.0, 40.0, 60.0])
    c_var, n_iter = np.polyfit(1 / np.array(bracket), steps, 1, w=1 / steps)
    expected = math.sqrt(c_var / n_iter * tau_f / tau_d)
    assert expected == pytest.approx(30.3, abs=0.1)
    dip = extend.extend_choice(spec_, path, profiles, runs(steps.tolist()), "synthetic")
    assert int(dip["bracket_fastest_batch_size"]) == 128 and int(dip["extended_batch_size"]) == 32
    assert "the fit predicts b_opt" in dip.attrs["reason"] and dip.attrs["reason"].endswith("so 32 is trained too")
    # 15%: the profiles' 1% timing noise moves the fitted tau_f / tau_d (b_opt by its square root)
    assert float(dip["bracket_b_opt"]) == pytest.approx(expected, rel=0.15) and float(dip["bracket_b_opt_sat"]) < 64
    assert np.isnan(float(off["bracket_b_opt"]))  # no fit, no prediction
