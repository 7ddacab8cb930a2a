"""Readability of the report's figures and noise table: legends that can be read and hide no data, one row per
snapshot, and no unexplained all-NaN columns for BatchNorm models."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from batchscope import figures as report  # noqa: E402
from batchscope.stages import fit
from batchscope.store import write_netcdf  # noqa: E402
from tests.test_fit import profile_dataset  # noqa: E402

BATCH_SIZES = [8, 16, 32, 64, 128, 256, 512]
LR_FACTORS = (0.3, 1.0, 3.0)  # the lr grid at B is base_lr(B) x these: a different set of values at every B
N_ITER, C_VAR, TAU_F, TAU_D = 40.0, 2400.0, 2.5e-4, 1.1e-6


def _base_lr(b: int) -> float:
    return 0.05 * np.sqrt(b / 64)  # square-root scaling, as a study's per-B grid would


def _run(b, lr, seed, steps, *, diverged=False, censored=False):
    reached = not (diverged or censored)
    value = float(np.round(steps)) if reached else np.nan
    return xr.Dataset(
        {
            "steps_to_target": ((), value),
            "reached_target": ((), reached),
            "diverged": ((), diverged),
            "out_of_memory": ((), False),
            "time_to_target": ((), value * (TAU_F + TAU_D * b)),
            "final_train_accuracy": ((), 0.95),
            "final_val_accuracy": ((), 0.9),
            "gap_accuracy": ((), 0.05),
            "gap_loss": ((), 0.1),
            "step_time_median": ((), TAU_F + TAU_D * b),
            "val_metric": ("step", [0.5, 0.9]),
        },
        coords={"step": [10, 20]},
        attrs={"batch_size": b, "lr": lr, "seed": seed},
    )


@pytest.fixture(scope="module")
def scaled_fit(tmp_path_factory) -> xr.Dataset:
    """A fit from caches whose lr grid is scaled per batch size (3 lrs per B, 21 distinct values), with one
    diverged and one censored run."""
    tmp = tmp_path_factory.mktemp("scaled_fit")
    rng = np.random.default_rng(5)
    profiles, run_dirs = [], []
    for b in BATCH_SIZES:
        times = (TAU_F + TAU_D * b) * (1 + 0.01 * rng.standard_normal((3, 3)))
        profiles.append(write_netcdf(profile_dataset(b, times), tmp / "profile" / f"B{b}.nc"))
        run_dir = tmp / "train" / f"B{b}"
        for factor, slowdown in zip(LR_FACTORS, (1.8, 1.0, 1.3), strict=True):
            lr = round(_base_lr(b) * factor, 6)
            for seed in range(3):
                steps = (N_ITER + C_VAR / b) * slowdown * (1 + 0.03 * rng.standard_normal())
                run = _run(b, lr, seed, steps, diverged=(b == 512 and factor == 3.0 and seed == 0),
                           censored=(b == 8 and factor == 0.3 and seed == 1))  # fmt: skip
                write_netcdf(run, run_dir / f"lr{lr}_seed{seed}.nc")
        run_dirs.append(run_dir)
    spec = {"fit": {"bootstrap": 50, "seed": 0, "tolerance": 0.05}, "target": {"metric": "val_accuracy", "value": 0.9}}
    return fit.fit_scaling(profiles, run_dirs, spec, "synthetic")


def test_the_fixture_has_a_different_lr_grid_at_every_batch_size(scaled_fit):
    runs = report.run_table(scaled_fit)
    assert runs["lr"].nunique() == len(BATCH_SIZES) * len(LR_FACTORS)
    assert (runs.groupby("batch_size")["lr"].nunique() == len(LR_FACTORS)).all()


def test_steps_legend_shows_lr_ranks_not_every_lr_value(scaled_fit):
    fig = report.plot_steps(scaled_fit)
    try:
        ax = fig.axes[0]
        legend = ax.get_legend()
        labels = [t.get_text() for t in legend.get_texts()]
        # one entry per lr rank, plus at most: diverged, out of memory, not reached, K(B), the fit
        assert len(labels) <= len(LR_FACTORS) + 5
        rank_labels = [label for label in labels if label.startswith("lr rank")]
        assert rank_labels == [
            f"lr rank 1 of {len(LR_FACTORS)} (smallest)",
            f"lr rank 2 of {len(LR_FACTORS)}",
            f"lr rank 3 of {len(LR_FACTORS)} (largest)",
        ]
        # no raw lr value is a legend entry
        lrs = {f"{lr:g}" for lr in report.run_table(scaled_fit)["lr"]}
        assert not lrs & set(labels)
        # the failed runs, K(B) and the fit are still drawn and labelled
        assert "diverged (NaN/inf or 100x loss)" in labels
        assert "not reached in max_steps" in labels
        assert "K(B): best lr, median over seeds" in labels
        assert any(label.startswith("N_iter + C_var/B") for label in labels)
        # the reader is told where the actual lr values are
        titles = (legend.get_title().get_text() + " " + ax.get_title()).lower()
        assert "run table" in titles
        # the rank colours are distinct
        handles = [h for h, label in zip(legend.legend_handles, labels, strict=True) if label.startswith("lr rank")]
        colours = {tuple(np.round(to_rgb(h.get_color()), 3)) for h in handles}
        assert len(colours) == len(LR_FACTORS)
    finally:
        plt.close(fig)


def test_steps_ranks_the_lrs_within_each_batch_size(scaled_fit):
    """Each rank's line goes through that rank's median steps at every B (not a mix of lr values)."""
    fig = report.plot_steps(scaled_fit)
    try:
        ax = fig.axes[0]
        runs = report.run_table(scaled_fit)
        runs = runs[runs["reached_target"].astype(bool)]
        legend = ax.get_legend()
        colour_of = {
            t.get_text(): h.get_color() for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)
        }
        for rank, factor in enumerate(LR_FACTORS):
            label = next(lab for lab in colour_of if lab.startswith(f"lr rank {rank + 1} of"))
            # the drawn line of that colour (seaborn's legend entries are separate, empty proxies)
            (line,) = [
                line
                for line in ax.get_lines()
                if len(line.get_xdata()) and np.allclose(to_rgb(line.get_color()), to_rgb(colour_of[label]))
            ]
            x, y = line.get_data()
            expected = [
                runs[(runs["batch_size"] == b) & np.isclose(runs["lr"], round(_base_lr(b) * factor, 6))][
                    "steps_to_target"
                ].median()
                for b in BATCH_SIZES
            ]
            np.testing.assert_allclose(x, BATCH_SIZES)
            np.testing.assert_allclose(y, expected)
    finally:
        plt.close(fig)


def _crowded_fit() -> xr.Dataset:
    """What plot_total_time reads, for a nearly flat T(B) (per-step overhead dominates, as for a small model on a
    CPU) whose measured points spread over the whole height of the axes: no corner of the axes is empty."""
    b = 2 ** np.arange(1, 13)
    n_iter, c_var, tau_f, tau_d = 300.0, 300.0, 1e-3, 1e-8
    pred = (n_iter + c_var / b) * (tau_f + tau_d * b)
    from_profile = pred * np.exp(np.resize([0.45, -0.45, 0.15, -0.15], b.size))
    ds = xr.Dataset(
        {
            "time_from_profile": ("batch_size", from_profile),
            "time_from_profile_ci": (("batch_size", "bound"), np.outer(from_profile, [0.9, 1.1])),
            "training_time_to_target": ("batch_size", pred * np.exp(np.resize([-0.3, 0.3, 0.0, 0.5], b.size))),
            "indistinguishable": ("batch_size", from_profile <= 1.05 * from_profile.min()),
            "n_iter": ((), n_iter),
            "c_var": ((), c_var),
            "tau_f": ((), tau_f),
            "tau_d": ((), tau_d),
            "b_opt": ((), np.sqrt(c_var * tau_f / (n_iter * tau_d))),
            "b_opt_ci": ("bound", [150.0, 400.0]),
        },
        coords={"batch_size": b, "bound": ["low", "high"]},
        attrs={"workload": "crowded", "tolerance": 0.05},
    )
    ds["fastest_batch_size"] = ((), int(b[np.argmin(from_profile)]))
    return ds


def _covered_points(fig, ax, box) -> list[tuple[str, float, float]]:
    """The data points (markers and curve vertices, with their drawn radius) that touch ``box``."""
    covered = []
    for line in ax.get_lines():
        x, y = (np.asarray(v, float) for v in line.get_data())
        if x.size >= 2 and np.ptp(x) == 0:  # an axvline spans the axes: a reference, not data
            continue
        size = line.get_linewidth() if line.get_marker() in (None, "None", "", " ") else line.get_markersize()
        r = size * fig.dpi / 72 / 2
        xy = np.column_stack([x, y])
        for px, py in ax.transData.transform(xy[np.isfinite(xy).all(axis=1)]):
            if box.x0 - r <= px <= box.x1 + r and box.y0 - r <= py <= box.y1 + r:
                covered.append((line.get_label(), px, py))
    return covered


@pytest.mark.parametrize("which", ["scaled", "crowded"])
def test_total_time_legend_covers_no_data_point(scaled_fit, which):
    fig = report.plot_total_time(scaled_fit if which == "scaled" else _crowded_fit())
    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        box = ax.get_legend().get_window_extent()
        assert sum(len(line.get_xdata()) for line in ax.get_lines()) > 200  # the points are there to cover
        assert not _covered_points(fig, ax, box)
        # and the legend is not cut off by the figure's edge
        assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 + 1 and box.y0 >= 0 and box.y1 <= fig.bbox.y1 + 1
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------- the noise table


def _snapshot(step: int, fraction: float, batchnorm: bool, rng) -> xr.Dataset:
    two = float(rng.uniform(20, 60))
    exact = np.nan if batchnorm else float(rng.uniform(20, 60))
    values = {
        "two_batch_grad_sq_norm": 1.0,
        "two_batch_trace_sigma": two,
        "two_batch_b_simple": two,
        "grad_sq_norm": np.nan if batchnorm else 1.0,
        "trace_sigma": exact,
        "b_simple": exact,
        "loss": 2.0 / (1 + step),
    }
    method = (
        "two-batch only: per-example gradients are undefined with BatchNorm in train mode"
        if batchnorm
        else "per-example (vmap)"
    )
    ds = xr.Dataset({name: ((), float(value)) for name, value in values.items()})
    ds.attrs.update(step=step, fraction=fraction, method=method, b_small=8, b_big=64, pairs=4)
    return ds


def _noise_dir(tmp_path, batchnorm: bool):
    """Snapshot files as measure_gradient_noise writes them; a run that reached its target early has two
    fractions mapped to the same kept step (the last one), so two files share a step."""
    rng = np.random.default_rng(1)
    out = tmp_path / "noise" / ("bn" if batchnorm else "mlp")
    steps = [(0, 0.0), (40, 0.25), (80, 0.5), (120, 0.9), (120, 1.0)]
    last = None
    for i, (step, fraction) in enumerate(steps):
        ds = _snapshot(step, fraction, batchnorm, rng)
        if last is not None and last.attrs["step"] == step:
            ds = last.copy()
            ds.attrs["fraction"] = fraction
        ds.attrs["workload"] = out.name  # as the stage writes them: the report keys on this, not on the folder
        write_netcdf(ds, out / f"snapshot{i}.nc")
        last = ds
    variance = xr.Dataset({"mean_sq_error": ("batch_size", [1.0, 0.5])}, coords={"batch_size": [8, 16]},
                          attrs={"workload": out.name})  # fmt: skip
    write_netcdf(variance, out / "variance.nc")
    return out


@pytest.mark.parametrize("batchnorm", [True, False])
def test_load_noise_keeps_one_snapshot_per_step(tmp_path, batchnorm):
    path = _noise_dir(tmp_path, batchnorm)
    snapshots = report.load_noise([path])[path.name]["snapshots"]
    assert list(snapshots["step"].values) == [0, 40, 80, 120]


def test_noise_table_for_batchnorm_drops_the_undefined_per_example_columns(tmp_path, scaled_fit):
    path = _noise_dir(tmp_path, batchnorm=True)
    snapshots = report.load_noise([path])[path.name]["snapshots"]
    table = report.noise_table(snapshots, scaled_fit)
    assert table["step"].is_unique
    assert list(table["step"]) == [0, 40, 80, 120]
    assert not table.duplicated().any()
    numeric = table.select_dtypes("number")
    assert not numeric.isna().all().any(), numeric.columns[numeric.isna().all()].tolist()
    assert "B_simple (per example)" not in table.columns
    assert "B_simple (two-batch)" in table.columns
    ratio = table["B_crit / B_simple (two-batch)"]
    np.testing.assert_allclose(ratio, float(scaled_fit["b_crit"]) / table["B_simple (two-batch)"])
    note = "per-example gradients are undefined with BatchNorm in train mode; two-batch estimator only"
    assert table.attrs["note"] == note
    assert (table["note"] == note).all()


def test_noise_table_dedupes_even_a_raw_concatenation(tmp_path, scaled_fit):
    """A table built without load_noise (two snapshots concatenated at the same step) still has one row each."""
    rng = np.random.default_rng(2)
    parts = [_snapshot(s, 0.0, True, rng) for s in (10, 20)]
    parts.append(parts[-1].copy())
    snapshots = xr.concat([s.expand_dims(step=[s.attrs["step"]]) for s in parts], dim="step")
    table = report.noise_table(snapshots, None)
    assert list(table["step"]) == [10, 20]
    assert not table.isna().all().any()


def test_noise_table_keeps_per_example_columns_when_finite(tmp_path, scaled_fit):
    path = _noise_dir(tmp_path, batchnorm=False)
    snapshots = report.load_noise([path])[path.name]["snapshots"]
    table = report.noise_table(snapshots, scaled_fit)
    assert list(table["step"]) == [0, 40, 80, 120]
    assert {"B_simple (per example)", "B_simple (two-batch)", "B_crit (K fit)", "B_crit / B_simple"} <= set(
        table.columns
    )
    assert np.isfinite(table["B_simple (per example)"]).all()
    np.testing.assert_allclose(
        table["B_crit / B_simple"], float(scaled_fit["b_crit"]) / table["B_simple (per example)"]
    )
    assert "note" not in table.columns and "note" not in table.attrs
