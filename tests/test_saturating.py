"""The saturating step time T_sat(B) = tau_f + tau_d max(B - b_knee, 0) beside the linear one: its fit against the
generating curve, its b_opt against a brute-force minimisation, its agreement with the linear model on linear data,
and the cap at the largest feasible batch size in the fit, the diagnostics, `recommend` and the report."""

import json
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from batchscope import cli  # noqa: E402
from batchscope import figures as report  # noqa: E402
from batchscope.core import scaling  # noqa: E402
from batchscope.stages import fit  # noqa: E402
from batchscope.stages.recommend import recommend_row  # noqa: E402
from batchscope.store import ENGINE, provenance, write_netcdf  # noqa: E402
from tests.test_fit import SPEC, _NoNoise, _write_synthetic_caches  # noqa: E402

SIZES = 2.0 ** np.arange(3, 16)  # 8 to 32768, as a GPU study's grid plus extra sizes
TAU_F, TAU_D, KNEE = 2e-3, 1e-6, 1000.0  # flat at 2 ms up to B = 1000, then 1 us per example


# ------------------------------------------------------------------------------------------------ core


def test_noise_free_curve_is_recovered_exactly():
    t = scaling.saturating_step_time(SIZES, TAU_F, TAU_D, KNEE)
    result = scaling.fit_saturating_step_time(SIZES, t)
    assert (result.tau_f, result.tau_d, result.b_knee) == pytest.approx((TAU_F, TAU_D, KNEE), rel=1e-6)
    assert np.abs(result.residuals / t).max() < 1e-6 and result.r2 == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_noisy_curve_is_recovered_within_tolerance(seed):
    """1% multiplicative noise (the profile's median of rounds shows about that): over 200 seeds the worst errors
    were 1.3% (tau_f), 5% (tau_d) and 9% (b_knee); the tolerances below are those, rounded up."""
    rng = np.random.default_rng(seed)
    observed = scaling.saturating_step_time(SIZES, TAU_F, TAU_D, KNEE) * (1 + 0.01 * rng.standard_normal(SIZES.size))
    shuffled = rng.permutation(SIZES.size)  # the order of the sizes does not matter
    result = scaling.fit_saturating_step_time(SIZES[shuffled], observed[shuffled])
    assert result.tau_f == pytest.approx(TAU_F, rel=0.02)
    assert result.tau_d == pytest.approx(TAU_D, rel=0.06)
    assert result.b_knee == pytest.approx(KNEE, rel=0.10)
    assert result.r2 > 0.999
    fitted = result.tau_f + result.tau_d * np.maximum(SIZES[shuffled] - result.b_knee, 0)
    np.testing.assert_allclose(result.residuals, observed[shuffled] - fitted, rtol=1e-12)


def test_linear_data_give_the_linear_model():
    """tau_f + tau_d B is T_sat with b_knee = 0: the fit finds it (the knee cannot be placed anywhere else)."""
    tau_f, tau_d = 2.5e-4, 1.1e-6
    b = np.array([8, 16, 32, 64, 128, 256, 512])
    result = scaling.fit_saturating_step_time(b, tau_f + tau_d * b)
    assert result.b_knee == 0.0
    assert (result.tau_f, result.tau_d) == pytest.approx((tau_f, tau_d), rel=1e-9)


def test_a_knee_below_the_grid_is_moved_to_the_smallest_that_fits():
    """max(t0, tau_d B) with every size above its knee t0 / tau_d: only the line tau_d B is seen, which meets
    tau_f >= 0 no lower than b_knee = 0."""
    b = np.array([64.0, 128, 256, 512])
    result = scaling.fit_saturating_step_time(b, 1e-6 * b)
    assert result.b_knee == pytest.approx(0.0, abs=1e-9) and result.tau_f == pytest.approx(0.0, abs=1e-12)
    # a line with a negative intercept: the knee is where it crosses zero (tau_f = 0 there)
    result = scaling.fit_saturating_step_time(b, 1e-6 * (b - 20))
    assert result.b_knee == pytest.approx(20, rel=1e-6) and result.tau_f == pytest.approx(0.0, abs=1e-12)


def test_flat_data_have_no_per_example_cost_and_need_three_sizes():
    result = scaling.fit_saturating_step_time([8, 16, 32, 64], [1e-3, 1e-3, 0.99e-3, 0.98e-3])
    assert result.tau_d == 0.0 and result.tau_f == pytest.approx(0.9925e-3, rel=1e-3)
    assert math.isinf(scaling.b_opt_saturating(40, 2400, result.tau_f, result.tau_d, result.b_knee))
    with pytest.raises(ValueError, match="at least 3 points"):
        scaling.fit_saturating_step_time([8, 16], [1e-3, 2e-3])


@pytest.mark.parametrize(
    ("n_iter", "c_var", "tau_f", "tau_d", "b_knee"),
    [
        (40, 2400, 2.5e-4, 1.1e-6, 0.0),  # the linear model: sqrt(C_var tau_f / (N_iter tau_d)) = 117
        (40, 2.4e5, 2e-3, 1e-6, 1000.0),  # above the knee: sqrt(C_var a / (N_iter tau_d)), a = 1 ms -> 1225
        (40, 2400, 2e-3, 1e-6, 1000.0),  # that would be 39, below the knee: the knee
        (40, 2.4e5, 1e-3, 1e-6, 2000.0),  # a < 0 (the line above the knee passes below zero at B = 0): the knee
        (1000, 1e5, 1e-2, 1e-4, 30.0),
    ],
)
def test_b_opt_matches_brute_force_argmin(n_iter, c_var, tau_f, tau_d, b_knee):
    grid = np.geomspace(0.01, 1e7, 2_000_001)
    brute = grid[np.argmin(scaling.predicted_time_saturating(grid, n_iter, c_var, tau_f, tau_d, b_knee))]
    assert scaling.b_opt_saturating(n_iter, c_var, tau_f, tau_d, b_knee) == pytest.approx(brute, rel=1e-4)
    if b_knee == 0:
        assert scaling.b_opt_saturating(n_iter, c_var, tau_f, tau_d, 0.0) == pytest.approx(
            scaling.b_opt(n_iter, c_var, tau_f, tau_d), rel=1e-12
        )


# ------------------------------------------------------------------------------------------- the fit stage


def test_on_linear_data_both_models_agree(tmp_path):
    """The default fixture (linear step time, 1% timing noise, B = 8 to 512): the saturating fit, on the same sizes,
    gives b_opt within 3% of the linear one, and no diagnostic says the model matters."""
    profiles, runs = _write_synthetic_caches(tmp_path, 40.0, 2400.0, 2.5e-4, 1.1e-6, np.random.default_rng(3))
    ds = fit.fit_scaling(profiles, runs, SPEC, "synthetic")
    assert float(ds["b_opt_sat"]) == pytest.approx(float(ds["b_opt"]), rel=0.03)
    assert float(ds["sat_b_knee"]) < 8  # below the grid: the line
    assert not any("step-time model decides" in note for note in fit.diagnose(ds))
    low, high = ds["b_opt_sat_ci"].values
    assert low <= float(ds["b_opt_sat"]) <= high


@pytest.fixture(scope="module")
def saturating(tmp_path_factory):
    """A GPU-like step time, flat at 2 ms up to B = 1000 and 1 us per example above (1% timing noise): trained at
    8 to 512, profiled up to 8192; out of memory from 16384 on. K(B) = 40 + 2.4e5 / B (B_crit = 6000)."""
    root = tmp_path_factory.mktemp("saturating")
    profiles, runs = _write_synthetic_caches(
        root / "caches", 40.0, 2.4e5, TAU_F, TAU_D, np.random.default_rng(7),
        step_time=lambda b: TAU_F + TAU_D * max(b - KNEE, 0.0), extra=(1024, 2048, 4096, 8192, 16384, 32768),
        out_of_memory_from=16384,
    )  # fmt: skip
    ds = fit.fit_scaling(profiles, runs, SPEC, "synthetic")
    ds.attrs.update(provenance("fit_scaling", SPEC))
    write_netcdf(ds, root / "fit" / "synthetic.nc")
    return root, ds


def test_the_saturating_fit_uses_every_feasible_size(saturating):
    _, ds = saturating
    assert float(ds["sat_b_knee"]) == pytest.approx(KNEE, rel=0.10)
    assert float(ds["sat_tau_f"]) == pytest.approx(TAU_F, rel=0.02)
    assert float(ds["sat_tau_d"]) == pytest.approx(TAU_D, rel=0.06)
    assert float(ds["t_iter_sat_residual_max"]) < 0.05
    # its b_opt is the closed form at the fitted parameters and the K fit, and near the truth's (1225)
    sat = (float(ds[k]) for k in ("sat_tau_f", "sat_tau_d", "sat_b_knee"))
    fitted = (float(ds["n_iter"]), float(ds["c_var"]), *sat)
    assert float(ds["b_opt_sat"]) == pytest.approx(scaling.b_opt_saturating(*fitted), rel=1e-12)
    truth = scaling.b_opt_saturating(40.0, 2.4e5, TAU_F, TAU_D, KNEE)
    assert float(ds["b_opt_sat"]) == pytest.approx(truth, rel=0.15)
    low, high = ds["b_opt_sat_ci"].values
    assert low < truth < high
    # the out-of-memory sizes: the largest that fits, the smallest that does not, and no fitted value is NaN there
    assert int(ds["largest_feasible_batch_size"]) == 8192 and int(ds["smallest_infeasible_batch_size"]) == 16384
    assert np.isfinite(ds["t_iter_sat_fitted"].values).all()


def test_the_models_disagree_and_the_diagnostic_says_what_to_do(saturating):
    """The linear fit sees only 8 to 512, all on the flat part: a tiny tau_d and a b_opt far above the knee."""
    _, ds = saturating
    assert float(ds["b_opt_capped"]) > 1.5 * float(ds["b_opt_sat_capped"])
    (note,) = [n for n in fit.diagnose(ds) if "step-time model decides" in n]
    assert "the saturating model fits better" in note and "near the knee" in note
    assert "profile.extra_batch_sizes" in note


def test_b_opt_above_the_memory_limit_is_capped(saturating):
    _, ds = saturating
    assert float(ds["b_opt"]) > 8192  # the linear model's, unclamped
    assert float(ds["b_opt_capped"]) == 8192
    assert float(ds["b_opt_sat_capped"]) == float(ds["b_opt_sat"]) < 8192
    notes = fit.diagnose(ds)
    (memory,) = [n for n in notes if "fits in memory" in n]
    assert "(linear T_iter) is above the largest batch size that fits in memory (8192; out of memory at B = 16384)" in (
        memory
    )
    assert "saturating" not in memory  # its b_opt fits
    row = recommend_row(ds)
    assert row["batch_size"] <= row["largest_feasible_batch_size"] == 8192
    assert row["predicted_b_opt_capped"] <= 8192 and row["saturating_b_opt_capped"] <= 8192
    assert row["memory_limit_seen"] and row["smallest_infeasible_batch_size"] == 16384


def test_no_memory_limit_seen_caps_at_the_largest_profiled_size(tmp_path):
    """b_opt (both models) far above the grid, nothing ran out of memory: capped at the largest profiled size,
    and the note says no limit was seen and where to look."""
    profiles, runs = _write_synthetic_caches(tmp_path, 40.0, 1e6, 2.5e-3, 1e-7, _NoNoise())
    ds = fit.fit_scaling(profiles, runs, SPEC, "synthetic")
    assert float(ds["b_opt"]) > 512 and float(ds["b_opt_sat"]) > 512
    assert float(ds["b_opt_capped"]) == float(ds["b_opt_sat_capped"]) == 512
    assert int(ds["smallest_infeasible_batch_size"]) == -1
    (note,) = [n for n in fit.diagnose(ds) if "memory" in n]
    assert "(linear T_iter) and" in note
    assert "(saturating T_iter) are above the largest profiled batch size (512)" in note
    assert "no memory limit was seen" in note and "profile.extra_batch_sizes" in note
    row = recommend_row(ds)
    assert row["batch_size"] <= 512 and not row["memory_limit_seen"] and row["smallest_infeasible_batch_size"] is None


def test_two_profiled_sizes_leave_the_saturating_model_empty(tmp_path):
    """3 parameters need 3 sizes: with 2 the linear fit stands alone, and nothing downstream breaks."""
    import xarray as xr

    profiles, runs = _write_synthetic_caches(tmp_path, 40.0, 2400.0, 2.5e-4, 1.1e-6, _NoNoise())
    keep = [p for p in profiles if xr.open_dataset(p, engine=ENGINE).attrs["batch_size"] in (8, 512)]
    ds = fit.fit_scaling(keep, [r for r in runs if r.name in ("B8", "B512")], SPEC, "synthetic")
    assert np.isnan(float(ds["b_opt_sat"])) and np.isnan(float(ds["sat_b_knee"]))
    assert np.isfinite(float(ds["b_opt"]))
    fit.diagnose(ds)
    row = recommend_row(ds)
    assert math.isnan(row["saturating_b_opt"])
    assert "none with the saturating step time" in report.recommendation(ds)


# -------------------------------------------------------------------------------------- recommend and report


def test_recommend_json_and_text_carry_both_models(saturating, capsys):
    root, ds = saturating
    assert cli.main(["recommend", str(root), "--all", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["saturating_b_opt"] == pytest.approx(float(ds["b_opt_sat"]))
    assert len(row["saturating_b_opt_ci"]) == 2
    assert row["saturating_b_opt_capped"] == pytest.approx(row["saturating_b_opt"])
    assert row["predicted_b_opt_capped"] == 8192 and row["largest_feasible_batch_size"] == 8192
    assert row["memory_limit_seen"] is True and row["smallest_infeasible_batch_size"] == 16384
    assert cli.main(["recommend", str(root), "--all"]) == 0
    text = capsys.readouterr().out
    assert "with the linear T_iter" in text and "capped at 8192" in text and "with the saturating T_iter" in text
    assert "largest feasible B 8192 (out of memory at B = 16384)" in text
    assert "warning: the step-time model decides b_opt" in text


def test_step_time_figure_draws_both_models(saturating):
    _, ds = saturating
    fig = report.plot_step_time(ds)
    try:
        ax, res = fig.axes[:2]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(label.startswith("linear tau_f + tau_d B") for label in labels)
        (sat_label,) = [label for label in labels if label.startswith("saturating")]
        assert f"b_knee = {float(ds['sat_b_knee']):.0f}" in sat_label
        (line,) = [line for line in ax.get_lines() if line.get_label() == sat_label]
        x, y = line.get_data()
        expected = scaling.saturating_step_time(x, *(float(ds[k]) for k in ("sat_tau_f", "sat_tau_d", "sat_b_knee")))
        np.testing.assert_allclose(y, 1e3 * expected, rtol=1e-12)
        assert [t.get_text() for t in res.get_legend().get_texts()] == ["linear", "saturating"]
    finally:
        plt.close(fig)


def test_summary_and_recommendation_mention_the_saturating_b_opt(saturating):
    _, ds = saturating
    table = report.summary({"synthetic": ds})
    assert table["predicted b_opt, saturating T_iter"].iloc[0] == pytest.approx(float(ds["b_opt_sat"]))
    text = report.recommendation(ds)
    assert "with the saturating one" in text
    assert "the largest feasible batch size is 8192 (out of memory at B = 16384), so the linear b_opt is capped" in text
