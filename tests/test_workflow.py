"""Real Snakemake runs of config/test/tiny.yaml: the report, and what each config change reschedules."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from batchscope import config as cfg
from batchscope.store import read_netcdf
from tests.helpers import TINY, snakemake

pytestmark = pytest.mark.integration
HEADER = re.compile(r"^(?:local)?rule (\w+):$", re.M)
WILDCARDS = re.compile(r"^    wildcards: (.*)$", re.M)


def scheduled(result) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job in a dry-run's output."""
    text = result.stdout + result.stderr
    jobs = set()
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", text, flags=re.M):
        header = HEADER.match(block)
        if header:
            wildcards = WILDCARDS.search(block)
            jobs.add((header.group(1), wildcards.group(1) if wildcards else ""))
    return jobs


@pytest.fixture(scope="module")
def study(tiny_study):
    return tiny_study


def variant(repo, tmp_path, change) -> Path:
    config = yaml.safe_load((repo / TINY).read_text())
    change(config)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_report_has_embedded_figures_and_names_b_opt(study):
    html = (study / "results/report/report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]{1000,})"', html)
    # per workload the three critical batch sizes, five scaling, three Hessian and two noise figures; edge of
    # stability; two Ghost; Jensen
    assert len(images) == 2 * (1 + 5 + 3 + 2) + 1 + 2 + 1
    assert "predicted b_opt" in html and "recommended B" in html and "as fast within" in html
    # the three times, named for where they come from, and each stage's share of the compute
    assert "from the profile" in html and "from the fit" in html and "measured in training" in html
    assert "What the study cost" in html and re.search(r"analyses \d+% of it", html)
    assert "larger batch -&gt; sharper minimum" in html and "Dinh et al. 2017" in html
    assert "Edge of stability" in html and "eta = 0.5" in html
    assert "Ghost Batch Normalization" in html and "GBN 16, B = 256" in html
    assert "Gradient noise" in html and "B_crit / B_simple" in html and "The Jensen bias" in html
    assert "<table" in html and "tiny_cnn" in html and "tiny_mlp" in html
    assert "import report" not in html  # code hidden
    figures = sorted((study / "results/report/figures").glob("*.png"))
    assert len(figures) == len(images) == 26  # every embedded figure is a saved file
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000 for f in figures)


def test_one_netcdf_and_checkpoint_per_training_point(study, repo):
    config = cfg.load(repo / TINY)
    for workload in config["workloads"]:
        for b, lr, seed in cfg.train_points(config, workload):
            stem = f"results/train/{workload}/B{b}/seed{seed}/lr{cfg.format_lr(lr)}_seed{seed}"
            ds = read_netcdf(study / f"{stem}.nc")
            assert (ds.attrs["batch_size"], ds.attrs["lr"], ds.attrs["seed"]) == (b, lr, seed)
            assert ds.attrs["config_hash"] and ds.attrs["torch_version"] and ds.attrs["device"] == "cpu"
            assert (study / f"{stem}.pt").stat().st_size > 0
        assert not list(study.glob(f"results/**/{workload}/**/*.tmp"))


def test_fit_agrees_with_the_training_caches(study):
    """K(B) in the fit file equals K(B) recomputed here from the per-point files, independently of the fit's
    code (plain Python: each lr's median over seeds, a censored run counting as never, then the best lr), and
    the fit passes through it."""
    import statistics
    from collections import defaultdict

    fit = read_netcdf(study / "results/fit/tiny_mlp.nc")
    steps = defaultdict(list)
    for path in sorted((study / "results/train/tiny_mlp").glob("B*/seed*/*.nc")):
        ds = read_netcdf(path)
        value = float(ds["steps_to_target"])
        steps[(ds.attrs["batch_size"], ds.attrs["lr"])].append(value if value == value else float("inf"))
    expected = {}
    for (b, _lr), values in steps.items():
        expected[b] = min(expected.get(b, float("inf")), statistics.median(values))
    assert list(fit["k"].values) == [expected[b] for b in fit["batch_size"].values]
    relative = np.abs(fit["k_fitted"] / fit["k"] - 1).values
    assert relative.max() < 0.5  # three noisy points, two parameters: a loose but real check
    assert 16 <= float(fit["b_opt"]) <= 1e4


def test_noop_rerun_does_nothing(study, repo, venv_env):
    result = snakemake(repo, study, "-n", env=venv_env)
    assert "Nothing to be done" in result.stdout + result.stderr


WORKLOADS = ("tiny_cnn", "tiny_mlp")
SEEDS = (0, 1)
REPORT = {("render_report", ""), ("all", "")}


def aggregates(*workloads):
    return {(rule, f"workload={w}") for w in workloads for rule in ("fit_scaling", "aggregate_hessian")} | REPORT


def hessian_jobs(workloads, seeds):
    return {("analyze_hessian", f"workload={w}, seed={s}") for w in workloads for s in seeds}


GHOST_SUMMARY = {("summarize_ghost", "workload=tiny_cnn")}  # tiny_cnn is the Ghost BatchNorm workload


def ghost_jobs(rule, seeds):
    return {(rule, f"workload=tiny_cnn, ghost={g}, seed={s}") for g in (64, 16) for s in seeds}


def test_the_quick_target_schedules_only_the_quick_estimates_inputs(repo, venv_env, tmp_path):
    """`snakemake quick` in a fresh directory: per workload the data, the profile, the reference run, its gradient
    noise and the estimate; no grid training, no Hessian, no report."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    jobs = scheduled(snakemake(repo, fresh, "-n", "quick", env=venv_env))
    per_workload = ("prepare_data", "profile_hardware", "train_reference", "measure_gradient_noise", "quick_estimate")
    assert jobs == {(rule, f"workload={w}") for w in WORKLOADS for rule in per_workload} | {("quick", "")}


def test_adding_a_batch_size_schedules_only_that_size(study, repo, venv_env, tmp_path):
    path = variant(repo, tmp_path, lambda c: c["grid"]["batch_sizes"].append(32))
    jobs = scheduled(snakemake(repo, study, "-n", env=venv_env, configfile=path))
    # profiling times every size of a workload in interleaved rounds: the workload is reprofiled
    profiles = {("profile_hardware", f"workload={w}") for w in WORKLOADS}
    training = {("train_model", f"workload={w}, batch_size=32, seed={s}") for w in WORKLOADS for s in SEEDS}
    # the Hessian stage runs one job per (workload, seed): a new batch size reanalyses each of them, and the
    # Ghost summary reads the base workload's Hessian results; the variance law takes in the new size
    noise_jobs = {("measure_gradient_noise", f"workload={w}") for w in WORKLOADS}
    # the quick estimate fits T_iter on the grid's sizes; its reference run (B = 64) is not retrained
    quick_jobs = {("quick_estimate", f"workload={w}") for w in WORKLOADS}
    expected = profiles | training | hessian_jobs(WORKLOADS, SEEDS) | aggregates(*WORKLOADS) | GHOST_SUMMARY
    assert jobs == expected | noise_jobs | quick_jobs


def test_adding_a_snapshot_fraction_adds_its_branch_job_and_retrains_nothing(study, repo, venv_env, tmp_path):
    """The reference run keeps its states whatever the fractions: a new fraction adds one branch job per workload;
    the noise stage (one job for all of a workload's snapshots), the quick estimate that reads it and the report
    follow; no training, no other branch job."""
    path = variant(repo, tmp_path, lambda c: c["noise"].update(snapshot_fractions=[0.0, 0.25, 0.5, 0.6, 0.75, 1.0]))
    jobs = scheduled(snakemake(repo, study, "-n", env=venv_env, configfile=path))
    branch = {("branch_checkpoint", f"workload={w}, fraction=0.6") for w in WORKLOADS}
    follow = {(rule, f"workload={w}") for w in WORKLOADS for rule in ("measure_gradient_noise", "quick_estimate")}
    assert jobs == branch | follow | REPORT


def test_adding_a_seed_runs_only_the_new_train_and_hessian_jobs(study, repo, venv_env, tmp_path):
    path = variant(repo, tmp_path, lambda c: c["grid"]["seeds"].append(7))
    jobs = scheduled(snakemake(repo, study, "-n", env=venv_env, configfile=path))
    training = {("train_model", f"workload={w}, batch_size={b}, seed=7") for w in WORKLOADS for b in (16, 64, 256)}
    ghost = ghost_jobs("train_ghost", (7,)) | ghost_jobs("analyze_ghost_hessian", (7,)) | GHOST_SUMMARY
    assert jobs == training | hessian_jobs(WORKLOADS, (7,)) | aggregates(*WORKLOADS) | ghost


def test_changing_learning_rates_reruns_only_that_workloads_training(study, repo, venv_env, tmp_path):
    path = variant(repo, tmp_path, lambda c: c["workloads"]["tiny_mlp"].update(learning_rates=[0.05, 0.1]))
    jobs = scheduled(snakemake(repo, study, "-n", env=venv_env, configfile=path))
    training = {("train_model", f"workload=tiny_mlp, batch_size={b}, seed={s}") for b in (16, 64, 256) for s in SEEDS}
    # the noise, Jensen and quick-estimate stages read the reference run (lr 0.1 still), which is not retrained
    assert jobs == training | hessian_jobs(["tiny_mlp"], SEEDS) | aggregates("tiny_mlp")


FITS = {("fit_scaling", f"workload={w}") for w in WORKLOADS}
# the Hessian aggregate reads the fit (the best learning rates, decided there once): it follows every fit
FIT_READERS = {("aggregate_hessian", f"workload={w}") for w in WORKLOADS}


def test_fit_settings_rerun_only_fits_and_report(study, repo, venv_env, tmp_path):
    path = variant(repo, tmp_path, lambda c: c["fit"].update(bootstrap=41))
    jobs = scheduled(snakemake(repo, study, "-n", env=venv_env, configfile=path))
    assert jobs == FITS | FIT_READERS | REPORT


def test_hessian_settings_rerun_no_training(study, repo, venv_env, tmp_path):
    path = variant(repo, tmp_path, lambda c: c["hessian"].update(hutchinson_probes=9))
    jobs = scheduled(snakemake(repo, study, "-n", env=venv_env, configfile=path))
    hessian_aggregates = {("aggregate_hessian", f"workload={w}") for w in WORKLOADS}
    ghost = ghost_jobs("analyze_ghost_hessian", SEEDS) | GHOST_SUMMARY
    assert jobs == hessian_jobs(WORKLOADS, SEEDS) | hessian_aggregates | REPORT | ghost


def bumped_library(repo, tmp_path, module: str, rule: str) -> Path:
    """A copy of the library (for PYTHONPATH) whose stage ``module`` declares version 99 of ``rule``."""
    copy = tmp_path / "lib"
    shutil.copytree(repo / "src", copy)
    stage = copy / f"batchscope/stages/{module}.py"
    text = stage.read_text()
    bumped = re.sub(rf'"{rule}": Rule\(version=\d+', f'"{rule}": Rule(version=99', text)
    assert bumped != text
    stage.write_text(bumped)
    return copy


def test_algorithm_version_bump_reruns_that_stage(study, repo, venv_env, tmp_path):
    """A copy of the library whose fit algorithm version is bumped, first on the path."""
    env = dict(venv_env, PYTHONPATH=str(bumped_library(repo, tmp_path, "fit", "fit_scaling")))
    jobs = scheduled(snakemake(repo, study, "-n", env=env))
    assert jobs == FITS | FIT_READERS | REPORT


def test_report_only_rebuild_runs_no_training(study, repo, venv_env, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(study, workdir, symlinks=True)  # copy2 keeps mtimes
    (workdir / "results/report/report.html").unlink()
    result = snakemake(repo, workdir, "render_report", env=venv_env)
    ran = re.findall(r"^(?:local)?rule (\w+):", result.stdout + result.stderr, re.M)
    assert ran == ["render_report"]
    assert (workdir / "results/report/report.html").stat().st_size > 10000


def test_snakemakes_own_report_has_the_figures(study, repo, venv_env, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(study, workdir, symlinks=True)
    snakemake(repo, workdir, "--report", str(workdir / "snakemake_report.zip"), env=venv_env)
    import zipfile

    names = zipfile.ZipFile(workdir / "snakemake_report.zip").namelist()
    assert sum(name.endswith(".png") for name in names) >= 24


def test_bad_config_stops_before_any_job(repo, venv_env, tmp_path):
    path = variant(repo, tmp_path, lambda c: c["workloads"]["tiny_mlp"].update(max_steps=-5))
    workdir = tmp_path / "bad"
    workdir.mkdir()
    result = snakemake(repo, workdir, env=venv_env, configfile=path, check=False)
    assert result.returncode != 0
    assert "workloads.tiny_mlp.max_steps: -5 is invalid" in result.stderr + result.stdout
    assert "invalid config: invalid config" not in result.stderr + result.stdout  # said once
    assert not (workdir / "results").exists()


def test_one_hessian_netcdf_per_checkpoint_and_the_aggregate(study, repo):
    config = cfg.load(repo / TINY)
    for workload in config["workloads"]:
        for b, lr, seed in cfg.train_points(config, workload):
            ds = read_netcdf(study / f"results/hessian/{workload}/seed{seed}/B{b}_lr{cfg.format_lr(lr)}_seed{seed}.nc")
            assert (ds.attrs["batch_size"], ds.attrs["lr"], ds.attrs["seed"]) == (b, lr, seed)
            assert ds.attrs["mode"] == "eval" and ds.attrs["stage"] == "analyze_hessian"
            assert ds.attrs["eval_size"] == min(cfg.AUTO_EVAL_SIZE, 1437)
            if not ds.attrs["skipped"]:
                assert float(ds["lambda_max"]) > 0 and int(ds["n_hvp_top"]) > 0 and ds.sizes["rank"] == 3
        aggregate = read_netcdf(study / f"results/hessian/{workload}.nc")
        assert aggregate.sizes["run"] == len(cfg.train_points(config, workload))
        assert -1 <= float(aggregate["rho_batch_size_sharpness"]) <= 1
        assert int(aggregate["n_runs_compared"]) == 3 * 2  # batch sizes x seeds at each best lr


def test_ghost_settings_rerun_only_the_ghost_jobs(study, repo, venv_env, tmp_path):
    path = variant(repo, tmp_path, lambda c: c["ghost"].update(ghost_sizes=[64, 16, 8]))
    jobs = scheduled(snakemake(repo, study, "-n", env=venv_env, configfile=path))
    new = {(rule, f"workload=tiny_cnn, ghost=8, seed={s}") for rule in ("train_ghost", "analyze_ghost_hessian")
           for s in SEEDS}  # fmt: skip
    assert jobs == new | {("profile_ghost", "workload=tiny_cnn, ghost=8"), ("ghost_variance", "workload=tiny_cnn")} | (
        GHOST_SUMMARY | REPORT
    )


def test_ghost_summary_compares_the_variants(study):
    ds = read_netcdf(study / "results/ghost/tiny_cnn.nc")
    assert list(ds["variant"].values) == ["BN, B = 16", "BN, B = 256", "GBN 64, B = 256", "GBN 16, B = 256"]
    assert float(ds["step_time_over_bn"].sel(variant="BN, B = 256")) == 1.0
    assert np.isfinite(ds["lambda_max"].values).all() and np.isfinite(ds["val_accuracy"].values).all()
    # the variance experiment: within 4 bootstrap standard errors of the finite-population expectation
    ratio, expected = ds["variance_ratio_mean"].values, ds["variance_expected"].values
    se = np.sqrt((ds["variance_ratio_se"].values ** 2).mean(axis=1) / ds.sizes["channel"])
    assert np.all(np.abs(ratio - expected) < 4 * se + 1e-9), (ratio, expected, se)


def test_noise_settings_rerun_only_the_noise_jobs(study, repo, venv_env, tmp_path):
    path = variant(repo, tmp_path, lambda c: c["noise"].update(pairs=21))
    jobs = scheduled(snakemake(repo, study, "-n", env=venv_env, configfile=path))
    noise_jobs = {("measure_gradient_noise", f"workload={w}") for w in WORKLOADS}
    assert jobs == noise_jobs | {("quick_estimate", f"workload={w}") for w in WORKLOADS} | REPORT


def test_noise_results(study):
    for workload in WORKLOADS:
        snapshots = sorted((study / f"results/noise/{workload}").glob("snapshot*.nc"))
        assert len(snapshots) == 5  # the default fractions 0, 0.25, 0.5, 0.75, 1
        steps = [read_netcdf(p).attrs["step"] for p in snapshots]
        assert steps[0] == 0 and steps == sorted(steps)
        first = read_netcdf(snapshots[0])
        assert float(first["two_batch_b_simple"]) > 0
        if workload == "tiny_cnn":  # BatchNorm in train mode: per-example gradients undefined, said so
            assert np.isnan(float(first["b_simple"])) and first.attrs["method"].startswith("two-batch only")
        else:
            assert first.attrs["method"] == "per-example (linear)" and float(first["b_simple"]) > 0
    linreg = read_netcdf(study / "results/jensen_linreg.nc")
    assert np.all(np.abs(linreg["relative_bias"] - linreg["analytic"]) < 4 * linreg["relative_bias_se"])


def test_the_branch_jobs_measure_each_snapshot(study, repo):
    """One branch job per snapshot of the reference run: its step, its branches at k x the reference batch size,
    the seeds branch.seeds asks for, and a bracket and interval among the branches' sizes."""
    config = cfg.load(repo / "config/test/tiny.yaml")
    settings = config["branch"]
    for workload in WORKLOADS:
        b_ref = cfg.noise_reference(config, workload)[0]
        fractions = config["noise"]["snapshot_fractions"]
        # one file per fraction, named by it; the noise stage's files are in the fractions' order
        files = [study / f"results/branch/{workload}/fraction{cfg.format_fraction(f)}.nc" for f in fractions]
        noise = [study / f"results/noise/{workload}/snapshot{i}.nc" for i in range(len(fractions))]
        assert len(list((study / f"results/branch/{workload}").glob("*.nc"))) == len(fractions)
        for path, snapshot, fraction in zip(files, noise, fractions, strict=True):
            ds = read_netcdf(path)
            assert ds.attrs["step"] == read_netcdf(snapshot).attrs["step"] and ds.attrs["fraction"] == fraction
            assert ds.attrs["optimizer_state"] == int(ds.attrs["step"] > 0)  # momentum from the run's first update
            sizes = ds["branch_batch_size"].values.tolist()
            assert sizes == [round(k * b_ref) for k in sorted(settings["factors"])]
            assert ds["seed"].values.tolist() == list(range(settings["seed"], settings["seed"] + settings["seeds"]))
            assert ds["loss"].shape == (len(sizes), settings["seeds"])
            critical, upper = int(ds["critical_batch_size"]), int(ds["critical_upper"])
            above = sizes[sizes.index(critical) + 1 :]
            assert upper == (above[0] if above else -1)
            low, high = ds["critical_ci"].values
            assert low in sizes and high in sizes and low <= high
        # the report's first section: the curve beside the quick estimate's B_noise, and its cost in the table
        assert (study / f"results/report/figures/{workload}_critical_batch.png").is_file()
    html = (study / "results/report/report.html").read_text()
    first = html[html.index("The answer, and what it cost") : html.index("Recommendation")]
    assert "branching: local critical B over the run" in first and "branching: cost (reference runs)" in first
    assert "against the grid&#x27;s smallest B" in first or "against the grid's smallest B" in first


def test_recommend_reads_the_studys_fits_and_agrees_with_the_report(study, repo, tmp_path, capsys):
    """recommend --configfile reads the config's workloads only; a fit of another study is listed by --all,
    labelled, and a fit of the same workload made with another config is refused by name."""
    import json

    from batchscope import cli

    results = tmp_path / "results"
    shutil.copytree(study / "results/fit", results / "fit")
    stray = read_netcdf(results / "fit/tiny_mlp.nc")
    stray.attrs.update(workload="other_study", config_hash="0123456789abcdef")
    from batchscope.store import write_netcdf

    write_netcdf(stray, results / "fit/other_study.nc")
    assert cli.main(["recommend", str(results), "--configfile", str(repo / TINY), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["workload"] for r in rows] == ["tiny_cnn", "tiny_mlp"]
    html = (study / "results/report/report.html").read_text()
    for row in rows:  # the report's summary shows the same recommendation
        sentence = f"for {row['workload']}: batch size {row['batch_size']} at learning rate {row['learning_rate']:g}"
        assert sentence in html
    assert cli.main(["recommend", str(results), "--configfile", str(repo / TINY), "--all", "--json"]) == 0
    listed = {r["workload"]: r["current"] for r in json.loads(capsys.readouterr().out)}
    assert listed == {"tiny_cnn": True, "tiny_mlp": True, "other_study": False}
    changed = variant(repo, tmp_path, lambda c: c["fit"].update(bootstrap=41))
    with pytest.raises(SystemExit, match=r"tiny_cnn.nc: computed for another config"):
        cli.main(["recommend", str(results), "--configfile", str(changed)])


def test_a_workload_named_like_an_experiment_has_its_own_files(repo, venv_env, tmp_path):
    """Files are named so that no workload name can collide with another stage's file: a workload called
    "linreg" gets results/jensen/linreg.nc while the linear-regression experiment writes results/jensen_linreg.nc."""
    path = variant(repo, tmp_path, lambda c: c["workloads"].update(linreg=c["workloads"].pop("tiny_mlp"))
                   or c["edge_of_stability"].update(workload="linreg"))  # fmt: skip
    workdir = tmp_path / "named"
    workdir.mkdir()
    jobs = scheduled(snakemake(repo, workdir, "-n", env=venv_env, configfile=path))
    assert ("measure_jensen_bias", "workload=linreg") in jobs and ("measure_jensen_linreg", "") in jobs


# ------------------------------------------------------------------------------------------ the adaptive study
ADAPTIVE = "config/test/adaptive.yaml"


def test_the_adaptive_study_trains_only_the_chosen_batch_sizes(adaptive_study, repo):
    from batchscope.core import selection
    from batchscope.stages import adaptive

    workdir, result = adaptive_study
    config = cfg.load(repo / ADAPTIVE)
    grid, seeds = sorted(config["grid"]["batch_sizes"]), sorted(config["grid"]["seeds"])
    quick = read_netcdf(workdir / "results/quick/tiny_mlp.nc")
    expected = selection.choose(grid, float(quick["b_opt"]), adaptive.bracket_band(quick),
                               int(quick["largest_feasible_batch_size"])).batch_sizes  # fmt: skip
    bracket = adaptive.read_choice(str(workdir / "results/adaptive/tiny_mlp.nc"))
    assert bracket == expected and len(bracket) < len(grid)  # seven sizes: a bracket of 3, widened by its band
    # the sizes trained in the end: the bracket and the second round's extension, if the fit on the bracket asked
    extension = read_netcdf(workdir / "results/adaptive/tiny_mlp.extended.nc")
    chosen = adaptive.read_choice(str(workdir / "results/adaptive/tiny_mlp.extended.nc"), "extend_bracket")
    assert chosen == sorted(bracket + ([int(extension["extended_batch_size"])] if extension["extended_batch_size"] > 0
                                       else []))  # fmt: skip
    # one job per chosen size trains every seed (the full grid's per-seed train_model is never scheduled)
    jobs = scheduled(result)
    trained = sorted(w for rule, w in jobs if rule == "train_batch_size")
    assert trained == sorted(f"workload=tiny_mlp, batch_size={b}" for b in chosen)
    assert not any(rule == "train_model" for rule, _ in jobs)
    assert all((workdir / f"results/train/tiny_mlp/B{b}/seed{s}").is_dir() for b in chosen for s in seeds)
    assert sorted(int(p.name[1:]) for p in (workdir / "results/train/tiny_mlp").iterdir()) == chosen
    lrs = config["workloads"]["tiny_mlp"]["learning_rates"]
    pruned = 0
    for b in chosen:
        first = {
            read_netcdf(p).attrs["lr"]: read_netcdf(p)
            for p in (workdir / f"results/train/tiny_mlp/B{b}/seed0").glob("*.nc")
        }
        assert sorted(first) == sorted(lrs)  # the first seed tries every learning rate
        steps = {lr: float(ds["steps_to_target"]) for lr, ds in first.items()}
        for ds in first.values():  # a pruned run stopped at an earlier run's steps to the target, not reached
            if bool(ds["pruned"]):
                pruned += 1
                assert int(ds["steps_done"]) == float(ds["prune_at"]) and float(ds["prune_at"]) in steps.values()
                assert not bool(ds["reached_target"]) and np.isnan(float(ds["steps_to_target"]))
        later = [read_netcdf(p).attrs["lr"] for p in (workdir / f"results/train/tiny_mlp/B{b}/seed1").glob("*.nc")]
        # the second seed trains the best 1/adaptive.halving_rate of the first seed's learning rates
        records = {lr: [(float(ds["steps_to_target"]), float(ds["final_val_loss"]))] for lr, ds in first.items()}
        rate = config["adaptive"]["halving_rate"]
        assert sorted(later) == selection.survivors(records, rate) and len(later) < len(lrs)
    assert pruned > 0  # lr 0.03 is the slowest at every size (training is bitwise reproducible on the CPU)
    # the Hessian stage analysed the chosen sizes' checkpoints only
    analysed = {read_netcdf(p).attrs["batch_size"] for p in (workdir / "results/hessian/tiny_mlp").glob("seed*/*.nc")}
    assert analysed == set(chosen)


def test_the_adaptive_studys_fit_report_and_recommendation(adaptive_study, repo, capsys):
    import json

    from batchscope import cli

    workdir, _ = adaptive_study
    fit = read_netcdf(workdir / "results/fit/tiny_mlp.nc")
    chosen = [int(b) for b in fit["batch_size"].values]
    assert fit.attrs["study"] == "adaptive" and np.isfinite(fit["k"].values).sum() >= 2
    # its bill: the quick estimate's jobs and the choice, then the chosen sizes' training
    jobs = list(fit["job"].values)
    assert {"train_reference", "measure_gradient_noise", "quick_estimate", "choose_batch_sizes", "train_model"} <= set(
        jobs
    )
    assert np.isfinite(fit["cost_s"].values).all()
    assert cli.main(["recommend", str(workdir / "results"), "--configfile", str(repo / ADAPTIVE), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["study"] == "adaptive" and row["batch_size"] in chosen and row["trained_batch_sizes"] == chosen
    assert cli.main(["recommend", str(workdir / "results"), "--configfile", str(repo / ADAPTIVE)]) == 0
    assert "adaptive study: trained B = " + ", ".join(map(str, chosen)) in capsys.readouterr().out
    html = (workdir / "results/report/report.html").read_text()
    assert "adaptive: recommended B" in html and "adaptive: trained B" in html
    # the cost table's training jobs: one per chosen size, from the fit's sizes and the rule's benchmark path
    assert "train_model" in html
    assert f"for tiny_mlp: batch size {row['batch_size']} at learning rate" in html
    # the recommendation's paragraph names the sizes trained and what the second round did, as recommend prints them
    import html as markup

    extension = read_netcdf(workdir / "results/adaptive/tiny_mlp.extended.nc").attrs["reason"]
    text = markup.unescape(html)
    assert "Adaptive study: trained B = " + ", ".join(map(str, chosen)) + " of the grid " in text
    assert "Second round: " in text and extension in text


def test_a_workload_added_to_the_adaptive_study_rebuilds_the_report(adaptive_study, repo, venv_env, tmp_path):
    """An existing report is rebuilt when a workload whose choice has not run joins the study: the report's inputs
    never ask the choose_batch_sizes checkpoint (Snakemake takes an output downstream of an unfinished checkpoint
    as up to date), its training jobs' benchmarks come from the fits."""
    import yaml

    workdir, _ = adaptive_study
    config = yaml.safe_load((repo / ADAPTIVE).read_text())
    config["workloads"]["tiny_mlp_b"] = config["workloads"]["tiny_mlp"]
    grown = tmp_path / "grown.yaml"
    grown.write_text(yaml.safe_dump(config))
    jobs = scheduled(snakemake(repo, workdir, "-n", env=venv_env, configfile=grown))
    # (the checkpoint's own job prints as "checkpoint", which scheduled() does not read)
    assert ("quick_estimate", "workload=tiny_mlp_b") in jobs and ("fit_scaling", "workload=tiny_mlp_b") in jobs
    assert ("render_report", "") in jobs
    assert not any("workload=tiny_mlp," in w or w == "workload=tiny_mlp" for _, w in jobs)  # the first one is done


def test_the_adaptive_cost_table_counts_the_ghost_base_runs_once(repo, venv_env, tmp_path):
    """The adaptive study with Ghost BatchNorm: the report's cost table takes the training jobs of the Ghost summary's
    plain-BatchNorm sizes (8 and 512, trained whatever the bracket), listed by the workflow without asking the
    checkpoint; the report adds the fit's trained sizes and counts a job listed twice once. The gradient-noise job,
    which the quick estimate needs whether or not the noise stage's results are on, is in the table too."""
    import xarray as xr

    from batchscope import store
    from batchscope.stages import report

    config = yaml.safe_load((repo / ADAPTIVE).read_text())
    config["workloads"]["tiny_bn"] = {**config["workloads"]["tiny_mlp"],
                                      "model": {"name": "mlp", "widths": [32], "norm": "batch"}}  # fmt: skip
    config["ghost"] = {"enabled": True, "workload": "tiny_bn", "ghost_sizes": [16], "batch_size": 512,
                       "small_batch_size": 8, "draws": 10}  # fmt: skip
    path = tmp_path / "ghost.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(repo, tmp_path, "-n", "-p", "render_report", env=venv_env, configfile=path)
    text = result.stdout + result.stderr
    command = text[text.index("python -m batchscope report") :].split("\n\n")[0]
    for size in (8, 512):
        assert f"train_model=results/benchmarks/train_batch_size/tiny_bn/B{size}.tsv" in command
    assert "train_batch_size/tiny_mlp/" not in command  # the bracket's come from the fits
    # the quick estimate's noise job runs with the noise stage's own results off, and is billed
    assert not config["noise"]["enabled"]
    assert "measure_gradient_noise=results/benchmarks/measure_gradient_noise/tiny_bn.tsv" in command
    # the report's side: a fit that trained 128, 256 and 512 adds two jobs; B512 is in both lists and counts once
    fit = tmp_path / "fit.nc"
    ds = xr.Dataset(coords={"batch_size": [128, 256, 512]}, attrs={"workload": "tiny_bn"})
    store.write_netcdf(ds, fit)
    pattern = "results/benchmarks/train_batch_size/{workload}/B{batch_size}.tsv"
    listed = [pattern.format(workload="tiny_bn", batch_size=b) for b in (8, 512)]
    merged = report.train_job_benchmarks(listed, [str(fit)], pattern)
    assert [p.rsplit("/B", 1)[1] for p in merged] == ["8.tsv", "512.tsv", "128.tsv", "256.tsv"]


def test_the_adaptive_studys_noise_job_measures_what_the_quick_estimate_reads(adaptive_study, repo):
    """With the noise stage off, its job measures the two-batch B_noise alone (no per-example pass, no variance law,
    not at step 0, which the quick estimate leaves out) with the pairs the budget buys from the reference run (its
    steps x batch size), computed here by hand."""
    import torch

    from batchscope.measure.noise import pairs_within_budget

    workdir, _ = adaptive_study
    config = cfg.load(repo / ADAPTIVE)
    noise = config["noise"]
    assert not noise["enabled"]
    from batchscope.engine.training import pick_saved

    saved = torch.load(next((workdir / "results/reference/tiny_mlp").glob("*.snapshots")), weights_only=False)
    run_examples = saved["steps_done"] * saved["batch_size"]
    snapshots = sorted((workdir / "results/noise/tiny_mlp").glob("snapshot*.nc"))
    # one record per kept fraction (noise.kept_snapshots; a short run's repeat states), the fractions pick from them
    assert len(saved["snapshots"]) == noise["kept_snapshots"]
    picked = pick_saved(saved, noise["snapshot_fractions"])
    later = [snapshot["step"] for snapshot in picked if snapshot["fraction"] > 0]
    assert len(later) == len(picked) - 1  # the default fractions: 0 to 1 in quarters
    assert [read_netcdf(path).attrs["step"] for path in snapshots] == later
    assert not (workdir / "results/noise/tiny_mlp/variance.nc").exists()
    first = read_netcdf(snapshots[0])
    # the budget's arithmetic is tested on its own (test_noise_stage); here, that the job gave it the run's inputs
    pairs, share = pairs_within_budget(noise, run_examples, len(snapshots), first.attrs["eval_size"])
    recorded = tuple(first.attrs[key] for key in ("pairs", "cost_share", "run_examples"))
    assert recorded == (pairs, share, run_examples)
    assert first.attrs["run_steps_to_target"] == saved["steps_to_target"] == saved["steps_done"]  # it stopped there
    assert np.isnan(float(first["b_simple"])) and "noise.enabled" in first.attrs["method"]
    assert np.isfinite(float(first["two_batch_trace_h_sigma"])) and first["two_batch_b_noise_boot"].size > 0


def test_the_adaptive_study_copies_the_reference_run_into_its_grid(adaptive_study, repo):
    """The reference run (64, the middle learning rate, seed 0) is one of the grid's points: the B = 64 job copies its
    record and checkpoint (the same file, its creation time included) instead of training it again, and the fit
    reads it as one of its runs."""
    from batchscope.engine.training import point_name

    workdir, _ = adaptive_study
    config = cfg.load(repo / ADAPTIVE)
    b_ref, lr_ref, seed_ref = cfg.noise_reference(config, "tiny_mlp")
    assert b_ref in adaptive_choice(workdir)  # else this test would check nothing
    name = point_name(lr_ref, seed_ref)
    reference = workdir / "results/reference/tiny_mlp" / f"{name}.nc"
    copied = workdir / f"results/train/tiny_mlp/B{b_ref}/seed{seed_ref}" / f"{name}.nc"
    assert copied.read_bytes() == reference.read_bytes()
    assert copied.with_suffix(".pt").read_bytes() == reference.with_suffix(".pt").read_bytes()
    log = (workdir / f"logs/train_batch_size/tiny_mlp/B{b_ref}.log").read_text()
    assert log.count("the reference run's, copied") == 1
    fit = read_netcdf(workdir / "results/fit/tiny_mlp.nc")
    at = (fit["run_batch_size"] == b_ref) & (fit["run_lr"] == lr_ref) & (fit["run_seed"] == seed_ref)
    assert int(at.sum()) == 1
    assert float(fit["steps_to_target"][at.values.argmax()]) == float(read_netcdf(reference)["steps_to_target"])


def adaptive_choice(workdir):
    from batchscope.stages import adaptive

    return adaptive.read_choice(str(workdir / "results/adaptive/tiny_mlp.extended.nc"), "extend_bracket")


EXTEND = "config/test/adaptive_extend.yaml"


def test_the_adaptive_study_trains_past_a_bracket_edge_that_wins(repo, venv_env, tmp_path, capsys):
    """config/test/adaptive_extend.yaml makes K(B) flat (tiny learning rates), so the time to the target follows the
    step time and the bracket's smallest size wins beyond noise: the extend_bracket checkpoint trains the grid's
    next smaller size, the fit covers all four, and a rerun does nothing. The decision is checked against the fit on
    the bracket's runs alone, computed here."""
    from batchscope.stages import adaptive, fit

    result = snakemake(repo, tmp_path, "results/fit/tiny_mlp.nc", env=venv_env, configfile=repo / EXTEND)
    config = cfg.load(repo / EXTEND)
    grid = sorted(config["grid"]["batch_sizes"])
    bracket = adaptive.read_choice(str(tmp_path / "results/adaptive/tiny_mlp.nc"))
    profiles = sorted((tmp_path / "results/profile/tiny_mlp").glob("B*.nc"))
    runs = [tmp_path / f"results/train/tiny_mlp/B{b}/seed0" for b in bracket]
    on_bracket = fit.fit_scaling(profiles, runs, fit.config_slice(config, "tiny_mlp"), "tiny_mlp")
    times = on_bracket["time_from_profile"].values
    assert int(on_bracket["fastest_batch_size"]) == bracket[0] and times[0] < times[1]  # the edge wins
    assert not bool(on_bracket["indistinguishable"].values[1])  # beyond the fit's noise
    expected = grid[grid.index(bracket[0]) - 1]
    extension = read_netcdf(tmp_path / "results/adaptive/tiny_mlp.extended.nc")
    assert int(extension["extended_batch_size"]) == expected
    assert int(extension["bracket_fastest_batch_size"]) == bracket[0]
    assert extension["bracket"].values.sum() == len(bracket)
    assert f"so {expected} is trained too" in extension.attrs["reason"]
    # the extension's job ran after the checkpoint, and the fit and its bill take every trained size
    assert ("train_batch_size", f"workload=tiny_mlp, batch_size={expected}") in scheduled(result)
    final = read_netcdf(tmp_path / "results/fit/tiny_mlp.nc")
    assert final["batch_size"].values.tolist() == sorted([expected, *bracket])
    assert "extend_bracket" in final["job"].values.tolist() and np.isfinite(final["cost_s"].values).all()
    # the fit records why, and recommend says it
    assert final.attrs["extended_batch_size"] == expected
    assert final.attrs["extension_reason"] == extension.attrs["reason"]
    from batchscope import cli

    assert cli.main(["recommend", str(tmp_path / "results"), "--configfile", str(repo / EXTEND)]) == 0
    assert f"second round: the smallest trained size {bracket[0]} is the fastest" in capsys.readouterr().out
    rerun = snakemake(repo, tmp_path, "results/fit/tiny_mlp.nc", "-n", env=venv_env, configfile=repo / EXTEND)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
    # adaptive.extend off: the fit is redone on the bracket alone, no second checkpoint
    settings = yaml.safe_load((repo / EXTEND).read_text())
    (off_config := tmp_path / "off.yaml").write_text(yaml.safe_dump({**settings, "adaptive": {"extend": False}}))
    off = snakemake(repo, tmp_path, "results/fit/tiny_mlp.nc", "-n", env=venv_env, configfile=off_config)
    assert ("fit_scaling", "workload=tiny_mlp") in scheduled(off)
    assert "checkpoint extend_bracket:" not in off.stdout + off.stderr  # (its slice has extend: it would rerun)


def test_an_upgraded_checkpoint_reruns_rather_than_failing(adaptive_study, repo, venv_env, tmp_path):
    """A batchscope whose extend_bracket algorithm is newer than the cached second round's (a copy of the library,
    first on the path): the checkpoint reruns and its new file decides the fit's sizes, rather than the DAG failing
    on the stale file. Back on this library with params off the rerun triggers, nothing would rebuild the file the
    copy wrote: the error names it before any job."""
    workdir = tmp_path / "copy"
    shutil.copytree(adaptive_study[0], workdir, symlinks=True)  # copy2 keeps mtimes
    env = dict(venv_env, PYTHONPATH=str(bumped_library(repo, tmp_path, "extend", "extend_bracket")))
    target = "results/fit/tiny_mlp.nc"
    planned = snakemake(repo, workdir, target, "-n", env=env, configfile=repo / ADAPTIVE)
    assert "checkpoint extend_bracket:" in planned.stdout + planned.stderr
    snakemake(repo, workdir, target, env=env, configfile=repo / ADAPTIVE)
    second = read_netcdf(workdir / "results/adaptive/tiny_mlp.extended.nc")
    assert second.attrs["algorithm_version"] == "99"
    fit = read_netcdf(workdir / target)
    assert fit["batch_size"].values.tolist() == sorted(
        int(b) for b in second["grid_batch_size"].values[second["chosen"].values.astype(bool)]
    )
    stale = snakemake(repo, workdir, target, "-n", "--rerun-triggers", "mtime", env=venv_env,
                      configfile=repo / ADAPTIVE, check=False)  # fmt: skip
    said = stale.stdout + stale.stderr
    assert stale.returncode != 0 and "tiny_mlp.extended.nc: computed by version '99' of the extend_bracket" in said


def test_the_adaptive_study_reruns_nothing(adaptive_study, repo, venv_env):
    workdir, _ = adaptive_study
    result = snakemake(repo, workdir, "-n", env=venv_env, configfile=repo / ADAPTIVE)
    assert "Nothing to be done" in result.stdout + result.stderr
