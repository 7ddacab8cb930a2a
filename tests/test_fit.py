"""The scaling-model fits against their generating formulas and a brute-force optimum."""

import math

import numpy as np
import pandas as pd
import pytest

from batchscope.core import scaling
from batchscope.stages import fit
from batchscope.store import ENGINE


def test_step_time_fit_recovers_tau_f_and_tau_d():
    rng = np.random.default_rng(0)
    tau_f, tau_d = 2.5e-4, 1.1e-6
    batch_sizes = np.array([8, 16, 32, 64, 128, 256, 512, 1024])
    # 2% multiplicative timing noise, about what the profile's median of repeats shows here
    observed = (tau_f + tau_d * batch_sizes) * (1 + 0.02 * rng.standard_normal(len(batch_sizes)))
    result = scaling.fit_step_time(batch_sizes, observed)
    assert result.intercept == pytest.approx(tau_f, rel=0.05)
    assert result.slope == pytest.approx(tau_d, rel=0.05)
    assert result.r2 > 0.99


def test_steps_fit_recovers_n_iter_and_c_var():
    rng = np.random.default_rng(1)
    n_iter, c_var = 40.0, 2400.0  # B_crit = 60
    batch_sizes = np.array([8, 16, 32, 64, 128, 256, 512, 1024])
    observed = (n_iter + c_var / batch_sizes) * (1 + 0.02 * rng.standard_normal(len(batch_sizes)))
    result = scaling.fit_steps(batch_sizes, observed)
    assert result.intercept == pytest.approx(n_iter, rel=0.05)
    assert result.slope == pytest.approx(c_var, rel=0.05)


def test_fits_are_exact_on_noise_free_data():
    b = np.array([4.0, 32.0, 300.0])
    exact = scaling.fit_steps(b, 10 + 500 / b)
    assert (exact.intercept, exact.slope) == pytest.approx((10, 500), rel=1e-9)
    assert np.abs(exact.residuals).max() < 1e-9


def test_fit_is_non_negative_when_data_slope_down():
    # step time falling with B (noise) must not give a negative tau_d
    result = scaling.fit_step_time([8, 16, 32], [3e-4, 2.9e-4, 2.8e-4])
    assert result.slope >= 0 and result.intercept > 0


def test_fit_needs_two_points():
    with pytest.raises(ValueError, match="at least 2 points"):
        scaling.fit_steps([8], [100])


@pytest.mark.parametrize(
    ("n_iter", "c_var", "tau_f", "tau_d"),
    [(40, 2400, 2.5e-4, 1e-6), (1000, 1e5, 1e-2, 1e-4), (5, 50, 1e-3, 1e-3)],
)
def test_b_opt_matches_brute_force_argmin(n_iter, c_var, tau_f, tau_d):
    grid = np.geomspace(0.01, 1e6, 2_000_001)
    brute = grid[np.argmin(scaling.predicted_time(grid, n_iter, c_var, tau_f, tau_d))]
    assert scaling.b_opt(n_iter, c_var, tau_f, tau_d) == pytest.approx(brute, rel=1e-4)


def test_b_opt_is_infinite_without_per_example_cost():
    assert math.isinf(scaling.b_opt(10, 100, 1e-3, 0.0))


def test_steps_per_batch_size_takes_best_lr_median_and_censors():
    nan = np.nan
    runs = pd.DataFrame(
        [
            # B=8: lr 0.1 median 100 beats lr 0.3 (median inf: one seed censored of 2)
            (8, 0.1, 0, 100),
            (8, 0.1, 1, 120),
            (8, 0.3, 0, 50),
            (8, 0.3, 1, nan),
            # B=64: every run censored -> K = NaN
            (64, 0.1, 0, nan),
            (64, 0.1, 1, nan),
            # B=16: three seeds, median 70
            (16, 0.1, 0, 60),
            (16, 0.1, 1, 70),
            (16, 0.1, 2, 95),
        ],
        columns=["batch_size", "lr", "seed", "steps_to_target"],
    )
    table = scaling.steps_per_batch_size(runs)
    assert table.loc[8, "k"] == 110 and table.loc[8, "best_lr"] == 0.1
    assert table.loc[16, "k"] == 70
    assert np.isnan(table.loc[64, "k"]) and np.isnan(table.loc[64, "best_lr"])


def profile_dataset(b, times, together=None, feasible=True):
    """A profile cache as profile_hardware writes it, from step times of shape (round, repeat); ``together``: the
    batch sizes timed in the same interleaved rounds (one profile_hardware job). ``feasible=False``: out of memory
    (the times are dropped, as the profiler does)."""
    import xarray as xr

    if not feasible:
        times = np.full_like(times, np.nan)
    rounds = np.median(times, axis=1)
    return xr.Dataset(
        {
            "t_iter": (("round", "repeat"), times),
            "t_iter_round": ("round", rounds),
            "t_iter_median": ((), np.median(rounds)),
            "feasible": ((), feasible),
            "peak_memory": ((), 0.0),
        },
        attrs={"batch_size": b, "device_name": "synthetic", "device_type": "cpu"}
        | ({"profiled_together": str(together)} if together is not None else {}),
    )


def _write_synthetic_caches(tmp_path, n_iter, c_var, tau_f, tau_d, rng, *, step_time=None, extra=(),
                            out_of_memory_from=None):  # fmt: skip
    """Profile and training caches as the stages write them, from a known scaling model.

    ``step_time(B)`` replaces tau_f + tau_d B in the profiles and the runs' clock; ``extra``:
    batch sizes profiled but not trained (profile.extra_batch_sizes); profiled sizes from ``out_of_memory_from``
    up ran out of memory."""
    import xarray as xr

    from batchscope.store import write_netcdf

    batch_sizes = [8, 16, 32, 64, 128, 256, 512]
    profiled = sorted(set(batch_sizes) | set(extra))
    step_time = step_time or (lambda b: tau_f + tau_d * b)
    profiles, run_dirs = [], []
    for b in profiled:
        times = step_time(b) * (1 + 0.01 * rng.standard_normal((3, 3)))  # 3 rounds of 3 repeats
        fits = out_of_memory_from is None or b < out_of_memory_from
        profiles.append(write_netcdf(profile_dataset(b, times, profiled, fits), tmp_path / "profile" / f"B{b}.nc"))
        if b not in batch_sizes:
            continue
        run_dir = tmp_path / "train" / f"B{b}"
        for lr, slowdown in ((0.1, 1.0), (0.03, 1.6)):  # the best lr is 0.1 at every B
            for seed in range(4):
                steps = (n_iter + c_var / b) * slowdown * (1 + 0.03 * rng.standard_normal())
                run = xr.Dataset(
                    {
                        "steps_to_target": ((), float(np.round(steps))),
                        "time_to_target": ((), steps * step_time(b)),
                        "val_metric": ("step", [0.5, 0.9]),
                    },
                    coords={"step": [10, 20]},
                    attrs={"batch_size": b, "lr": lr, "seed": seed},
                )
                write_netcdf(run, run_dir / f"lr{lr}_seed{seed}.nc")
        run_dirs.append(run_dir)
    return profiles, run_dirs


def test_fit_scaling_recovers_the_model_from_caches(tmp_path):
    n_iter, c_var, tau_f, tau_d = 40.0, 2400.0, 2.5e-4, 1.1e-6
    profiles, run_dirs = _write_synthetic_caches(tmp_path, n_iter, c_var, tau_f, tau_d, np.random.default_rng(3))
    spec = {"fit": {"bootstrap": 200, "seed": 0, "tolerance": 0.05}, "target": {"metric": "val_accuracy", "value": 0.9}}
    ds = fit.fit_scaling(profiles, run_dirs, spec, "synthetic")
    assert float(ds["n_iter"]) == pytest.approx(n_iter, rel=0.05)
    assert float(ds["c_var"]) == pytest.approx(c_var, rel=0.05)
    assert float(ds["tau_f"]) == pytest.approx(tau_f, rel=0.05)
    assert float(ds["tau_d"]) == pytest.approx(tau_d, rel=0.05)
    true_b_opt = scaling.b_opt(n_iter, c_var, tau_f, tau_d)  # ~117
    assert float(ds["b_opt"]) == pytest.approx(true_b_opt, rel=0.05)
    low, high = ds["b_opt_ci"].values
    assert low < true_b_opt < high
    assert (ds["best_lr"].values == 0.1).all()
    # the grid point nearest the optimum in log space wins on the noise-free model
    assert int(ds["fastest_batch_size"]) == 128
    assert ds.sizes["run"] == 7 * 2 * 4


def test_vectorised_bootstrap_matches_the_per_cell_definition():
    """The cube path and the cell-by-cell path resample the same way: same mean K per batch size."""
    rng = np.random.default_rng(5)
    rows = [
        (b, lr, seed, float(rng.integers(20, 400)) if rng.random() > 0.1 else np.nan)
        for b in (8, 32, 128)
        for lr in (0.1, 0.3)
        for seed in range(5)
    ]
    runs = pd.DataFrame(rows, columns=["batch_size", "lr", "seed", "steps_to_target"])
    _, cube = scaling.bootstrap_steps(runs, 20000, np.random.default_rng(0), vectorised=True)
    _, cells = scaling.bootstrap_steps(runs, 600, np.random.default_rng(1), vectorised=False)
    # 600 replicates: the mean's Monte Carlo error is ~2% of K here, so 8% is about 4 standard errors
    np.testing.assert_allclose(np.nanmean(cells, axis=0), np.nanmean(cube, axis=0), rtol=0.08)
    finite = runs["steps_to_target"].dropna()
    assert np.nanmin(cube) >= finite.min() and np.nanmax(cube) <= finite.max()
    irregular = runs.iloc[1:]  # one cell loses a seed: only the per-cell path applies
    assert scaling.bootstrap_steps(irregular, 5, np.random.default_rng(0))[1].shape == (5, 3)
    # against the definition, one replicate at a time: each (B, lr) cell's seeds drawn with replacement, its median,
    # the smallest over lr (a never-reached cell counts as infinitely many steps); mean K within 4 standard errors
    _, fast = scaling.bootstrap_steps(irregular, 4000, np.random.default_rng(2))
    draw, slow = np.random.default_rng(3), []
    cells = {key: g["steps_to_target"].fillna(np.inf).to_numpy() for key, g in irregular.groupby(["batch_size", "lr"])}
    for _ in range(4000):
        medians = {key: np.median(v[draw.integers(0, len(v), len(v))]) for key, v in cells.items()}
        slow.append([min(m for (b2, _), m in medians.items() if b2 == b) for b in (8, 32, 128)])
    slow = np.where(np.isfinite(slow), slow, np.nan)
    spread = np.nanstd(slow, axis=0) / np.sqrt(np.isfinite(slow).sum(axis=0))
    assert (np.abs(np.nanmean(fast, axis=0) - np.nanmean(slow, axis=0)) < 4 * np.sqrt(2) * spread).all()
    # the share of replicates where no lr's median reached the target: two proportions of 4000 replicates, each
    # with a standard error of at most 0.008, so their difference's is at most 0.011; 0.03 is about 3 of those
    assert np.isnan(fast).mean(axis=0) == pytest.approx(np.isnan(slow).mean(axis=0), abs=0.03)
    with pytest.raises(ValueError, match="same number of seeds"):
        scaling.bootstrap_steps(irregular, 5, np.random.default_rng(0), vectorised=True)


class _NoNoise:
    def standard_normal(self, size=None):
        return np.zeros(size) if size is not None else 0.0


SPEC = {"fit": {"bootstrap": 200, "seed": 0, "tolerance": 0.05}, "target": {"metric": "val_accuracy", "value": 0.9}}


def _exact_time(b, n_iter=40.0, c_var=2400.0, tau_f=2.5e-4, tau_d=1.1e-6):
    """K(B) T_iter(B) of the noise-free caches: steps rounded to whole numbers, as the writer stores them."""
    return np.round(n_iter + c_var / b) * (tau_f + tau_d * b)


@pytest.mark.parametrize("tolerance", [0.05, 0.1, 0.2])
def test_indistinguishable_sizes_are_those_within_the_tolerance(tmp_path, tolerance):
    """Noise-free caches: every bootstrap resample equals the data, so the set is exactly the sizes whose time
    is within the tolerance of the fastest (computed here from the generating formula)."""
    profiles, runs = _write_synthetic_caches(tmp_path, 40.0, 2400.0, 2.5e-4, 1.1e-6, _NoNoise())
    spec = {**SPEC, "fit": {**SPEC["fit"], "tolerance": tolerance}}
    ds = fit.fit_scaling(profiles, runs, spec, "synthetic")
    grid = np.array([8, 16, 32, 64, 128, 256, 512])
    times = _exact_time(grid)
    expected = grid[times <= (1 + tolerance) * times.min() * (1 + 1e-12)]
    assert list(ds["batch_size"].values[ds["indistinguishable"].values]) == list(expected)
    assert int(ds["fastest_batch_size"]) == 128 and float(ds["p_fastest"].sel(batch_size=128)) == 1.0
    np.testing.assert_allclose(ds["time_from_profile"].values, times, rtol=1e-9)
    np.testing.assert_allclose(ds["time_from_profile_ci"].values, np.column_stack([times, times]), rtol=1e-9)


def test_a_slow_spell_of_the_machine_moves_no_answer(tmp_path):
    """Each profiling round scaled by a common factor (the machine 0.6x to 1.6x as fast from round to round):
    the rounds are resampled together across batch sizes, so b_opt (a ratio of tau_f and tau_d) and the ranking
    hold still: the interval stays within 5% of the truth, however large the drift."""
    import xarray as xr

    from batchscope.store import write_netcdf

    tau_f, tau_d = 2.5e-4, 1.1e-6
    profiles, runs = _write_synthetic_caches(tmp_path, 40.0, 2400.0, tau_f, tau_d, _NoNoise())
    drift = np.array([0.6, 1.0, 1.6, 0.8, 1.3, 1.1])
    sizes = [8, 16, 32, 64, 128, 256, 512]

    def write(together):
        for path in profiles:
            b = xr.open_dataset(path, engine=ENGINE).load().attrs["batch_size"]
            times = np.outer(drift, np.ones(3)) * (tau_f + tau_d * b)
            write_netcdf(profile_dataset(b, times, together), path)
        return fit.fit_scaling(profiles, runs, SPEC, "synthetic")

    ds = write(together=sizes)
    truth = scaling.b_opt(40.0, 2400.0, tau_f, tau_d)
    # K is exact, so b_opt's only uncertainty is the timing's: a common factor cancels in tau_f / tau_d
    low, high = ds["b_opt_ci"].values
    assert truth * 0.95 < low <= high < truth * 1.05
    assert set(ds["batch_size"].values[ds["indistinguishable"].values]) == {128}
    assert float(ds["p_fastest"].sel(batch_size=128)) == 1.0
    # the drift fell on every size alike: no "noisy timing" warning for what the pairing cancels
    assert float(ds["t_iter_round_spread"].max()) < 1e-9
    assert not any("noisy timing" in note for note in fit.diagnose(ds))
    # the same times from separate jobs (no shared rounds): resampled apart, the drift is not cancelled
    apart = write(together=None)
    low_apart, high_apart = apart["b_opt_ci"].values
    assert high_apart - low_apart > 4 * (high - low) and low_apart < truth * 0.9


def test_a_size_slowed_alone_is_reported_as_noisy_timing(tmp_path):
    import xarray as xr

    from batchscope.store import write_netcdf

    profiles, runs = _write_synthetic_caches(tmp_path, 40.0, 2400.0, 2.5e-4, 1.1e-6, _NoNoise())
    sizes = [8, 16, 32, 64, 128, 256, 512]
    for path in profiles:
        b = xr.open_dataset(path, engine=ENGINE).load().attrs["batch_size"]
        alone = np.array([1.0, 1.0, 1.6, 1.0, 1.4, 1.0]) if b == 64 else np.ones(6)  # B = 64 slowed alone
        write_netcdf(profile_dataset(b, np.outer(alone, np.ones(3)) * (2.5e-4 + 1.1e-6 * b), sizes), path)
    ds = fit.fit_scaling(profiles, runs, SPEC, "synthetic")
    assert int(np.argmax(ds["t_iter_round_spread"].values)) == sizes.index(64)
    assert any("noisy timing" in note and "B = 64" in note for note in fit.diagnose(ds))


def test_diagnostics_name_what_to_change(tmp_path):
    profiles, runs = _write_synthetic_caches(tmp_path / "good", 40.0, 2400.0, 2.5e-4, 1.1e-6, _NoNoise())
    notes = fit.diagnose(fit.fit_scaling(profiles, runs, SPEC, "synthetic"))
    # the generator's best lr (0.1) is the larger of the two tried: the only warning, with its remedy
    assert len(notes) == 1 and "the largest lr won at B = 128" in notes[0] and "upward" in notes[0]
    # b_opt far below the grid: C_var tiny, so even B = 8 needs no more steps than the largest
    profiles, runs = _write_synthetic_caches(tmp_path / "low", 400.0, 40.0, 2.5e-5, 1.1e-5, _NoNoise())
    ds = fit.fit_scaling(profiles, runs, SPEC, "synthetic")
    notes = " | ".join(fit.diagnose(ds))
    assert float(ds["b_opt"]) < 8 and int(ds["fastest_batch_size"]) == 8
    assert "lies outside the grid (8 to 512); add batch sizes below it" in notes
    assert "the grid's smallest batch size 8 is the fastest" in notes and "downward" in notes
    # a step time that saturates (flat, then steep): the linear model fits badly and says so
    profiles, runs = _write_synthetic_caches(tmp_path / "bent", 40.0, 2400.0, 2.5e-4, 1.1e-6, _NoNoise())
    import xarray as xr

    from batchscope.store import write_netcdf

    for path in profiles:
        b = xr.open_dataset(path, engine=ENGINE).load().attrs["batch_size"]
        write_netcdf(profile_dataset(b, np.full((3, 3), 1e-3 * max(1.0, (b / 128) ** 2))), path)
    ds = fit.fit_scaling(profiles, runs, SPEC, "synthetic")
    assert any(note.startswith("poor T_iter fit") for note in fit.diagnose(ds))
    assert float(ds["t_iter_residual_max"]) > fit.RESIDUAL_MAX


def test_a_flat_k_is_named_not_given_as_a_nan_r2(tmp_path):
    """Every batch size reaching the target at the same step (C_var = 0 here): R^2 of K is 0/0, and the note says
    what happened and what to change instead of 'R^2 = nan'."""
    profiles, runs = _write_synthetic_caches(tmp_path, 40.0, 0.0, 2.5e-4, 1.1e-6, _NoNoise())
    ds = fit.fit_scaling(profiles, runs, SPEC, "synthetic")
    assert np.unique(ds["k"].values).size == 1
    notes = fit.diagnose(ds)
    assert any("K(B) is 40 steps at every batch size" in n and "make the target harder" in n for n in notes), notes
    assert not any("R^2 = nan" in n for n in notes)


@pytest.mark.parametrize(
    ("r2", "residual", "says"),
    [(0.88, 0.27, "largest residual 27% (want <= 25%)"), (0.5, 0.1, "R^2 = 0.50 (want >= 0.8)"), (0.95, 0.1, None)],
)
def test_a_poor_k_fit_states_both_criteria(tmp_path, r2, residual, says):
    """A K(B) fit fails on its R^2 or on its largest residual; the note states each beside its bound, so a reader
    sees which one failed (R^2 0.88 passes, a 27% residual does not)."""
    profiles, runs = _write_synthetic_caches(tmp_path, 40.0, 2400.0, 2.5e-4, 1.1e-6, _NoNoise())
    ds = fit.fit_scaling(profiles, runs, SPEC, "synthetic").assign(k_r2=r2, k_residual_max=residual)
    notes = [note for note in fit.diagnose(ds) if note.startswith("poor K fit")]
    if says is None:
        assert notes == []
    else:
        assert len(notes) == 1 and says in notes[0] and "seeds (grid.seeds)" in notes[0]


@pytest.mark.parametrize(
    ("diverged", "advice"),
    [(False, "Lower the target or raise max_steps."), (True, "diverged: lower the learning rates, or check the data")],
)
def test_a_fit_without_two_sizes_at_the_target_says_why(tmp_path, diverged, advice):
    """Fewer than two sizes reached the target: the fit stops, and its advice follows what the other runs did (runs
    that diverged, as on data with NaN in it, are not helped by a lower target or more steps)."""
    import xarray as xr

    from batchscope.store import write_netcdf

    profiles, runs = _write_synthetic_caches(tmp_path, 40.0, 2400.0, 2.5e-4, 1.1e-6, _NoNoise())
    for run_dir in runs[1:]:  # every size but the smallest falls short
        for path in sorted(run_dir.glob("*.nc")):
            ds = xr.open_dataset(path, engine=ENGINE).load()
            write_netcdf(ds.assign(steps_to_target=np.nan, diverged=diverged), path)
    with pytest.raises(ValueError, match="the target was reached at 1 batch size") as err:
        fit.fit_scaling(profiles, runs, SPEC, "synthetic")
    assert advice in str(err.value)
    if diverged:
        assert "48 of the 48 runs short of it diverged" in str(err.value)
