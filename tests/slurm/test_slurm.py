"""The tiny study on a real single-node SLURM (tests/slurm/cluster.sh) through the Snakemake SLURM executor plugin,
with profiles/slurm: jobs go through sbatch (checked in SLURM's own job records), GPU requests become
`--gpus=1` and are serialized on the node's one GPU, and the results equal a local run's."""

import itertools
import json
import os
import re
import stat
import subprocess
import time
from datetime import datetime

import pytest
import yaml

from tests.helpers import TINY, compare_results

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(repo):
    script = repo / "tests" / "slurm" / "cluster.sh"
    started = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:  # say why, and fail: a SLURM test that cannot run must not pass
        pytest.fail(f"SLURM could not start ({script} start):\n{started.stdout[-2000:]}\n{started.stderr[-3000:]}")
    yield started.stdout.strip()
    subprocess.run([str(script), "stop"], capture_output=True, timeout=60)


def slurm_jobs() -> list[dict[str, str]]:
    """Every job slurmctld remembers (MinJobAge keeps finished ones for an hour), one dict per job."""
    text = subprocess.run(["scontrol", "show", "jobs", "-o"], capture_output=True, text=True, check=True).stdout
    jobs = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("No jobs"):
            jobs.append(dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", line)))
    return jobs


def test_tiny_study_through_slurm(cluster, repo, venv_env, tiny_study, tmp_path, artifacts):
    workdir = tmp_path / "study"
    workdir.mkdir()
    # device auto with an nvidia-smi on PATH: every computing job requests gpu=1 (torch still finds no CUDA and
    # computes on the CPU, so the results must equal the local run's)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    config = yaml.safe_load((repo / TINY).read_text())
    config["device"] = "auto"
    configfile = tmp_path / "slurm.yaml"
    configfile.write_text(yaml.safe_dump(config))
    env = {**venv_env, "PATH": f"{bin_dir}{os.pathsep}{venv_env['PATH']}"}
    before = {job["JobId"] for job in slurm_jobs()}
    cmd = [
        "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(workdir),
        "--profile", str(repo / "profiles" / "slurm"),
        # this test cluster: no accounting (so squeue gives job status), its partition, its 2 cores
        "--slurm-no-account", "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
        "--default-resources", "slurm_partition=debug", "mem_mb=1000", "runtime=30",
        "--configfile", str(configfile),
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - start
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"

    jobs = [job for job in slurm_jobs() if job["JobId"] not in before and job.get("WorkDir") == str(workdir)]
    assert jobs, "no job of this run in SLURM's records: nothing went through sbatch"
    assert all(job["JobState"] == "COMPLETED" for job in jobs), [(j["JobId"], j["JobState"]) for j in jobs]
    rules = sorted({re.sub(r"^rule_|_wildcards_.*$", "", job.get("Comment", "")) for job in jobs})
    # every computing stage went through sbatch; the light rules ran on the submit node
    for rule in ("prepare_data", "profile_hardware", "train_model", "analyze_hessian", "measure_gradient_noise"):
        assert any(rule in name for name in rules), rules
    assert not any(name in ("fit_scaling", "render_report") for name in rules), rules
    # every allocation but prepare_data's (numpy and file parsing) computes with torch and holds exactly one GPU
    gpu_jobs = [job for job in jobs if not job.get("Comment", "").startswith("rule_data")]
    assert gpu_jobs and all(job.get("TresPerJob") == "gres:gpu:1" for job in gpu_jobs), [
        (job.get("Comment"), job.get("TresPerJob")) for job in jobs
    ]

    # one GPU on the node: no two GPU jobs overlapped in time
    def span(job):
        return tuple(datetime.fromisoformat(job[key]) for key in ("StartTime", "EndTime"))

    spans = sorted(map(span, gpu_jobs))
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        assert next_start >= end, spans

    compared = compare_results(tiny_study, workdir, workload_fits=["tiny_mlp", "tiny_cnn"])
    assert (workdir / "results/report/report.html").is_file()
    summary = {"wall_s": round(wall, 1), "sbatch_submissions": len(jobs), "gpu_jobs": len(gpu_jobs),
               "rules": rules, "files_compared": compared, "cluster": cluster}  # fmt: skip
    (artifacts / "slurm.json").write_text(json.dumps(summary, indent=2))
