"""The README's and the docs' commands, exactly as typed, from the repository root of a fresh clone.

Every other workflow test runs Snakemake with ``--directory <tmp>``, where the default config file is absent:
that is how ``--configfile X`` deep-merged with config/config.yaml (adding its workload to every study) went
unseen. Here the working directory is a copy of what a clone holds (tracked and untracked, not ignored files),
and the commands are run from its root.
"""

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.test_data import write_cifar

pytestmark = pytest.mark.integration
WORKLOAD = re.compile(r"^    wildcards: .*\bworkload=(\w+)", re.M)
EXAMPLE_ENV = {"PYTHONPATH": "examples/own_workload"}


@pytest.fixture(scope="module")
def clone(repo, tmp_path_factory):
    """The repository as a fresh clone has it (plus uncommitted edits), with a CIFAR-shaped data directory where
    config/gpu.yaml looks for one: 33,000 training images, enough for its largest profiled batch (32,768)."""
    root = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=repo, capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    for name in files:
        if (repo / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, root / name, follow_symlinks=False)
    assert not (root / "results").exists() and (root / "config/config.yaml").is_file()
    cifar = root / "data/cifar-10-batches-py"
    cifar.mkdir(parents=True)
    write_cifar(cifar, per_batch=6600)
    return root


def run(clone, venv_env, command, extra_env=None, check=True):
    """A shell command as a user types it, in the clone's root."""
    env = {**venv_env, **(extra_env or {})}
    result = subprocess.run(command, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stdout}\n{result.stderr}")
    return result


def config_workloads(clone, path):
    return set(yaml.safe_load((clone / path).read_text())["workloads"])


@pytest.mark.parametrize(
    ("command", "config", "extra_env"),
    [
        ("snakemake -n", "config/config.yaml", None),
        ("snakemake --cores all -n", "config/config.yaml", None),
        ("snakemake --cores 8 --resources gpu=1 --config device=cuda -n", "config/config.yaml", None),
        ("snakemake --cores all --configfile config/ghost.yaml -n", "config/ghost.yaml", None),
        ("snakemake --cores 8 --resources gpu=1 --configfile config/gpu.yaml -n", "config/gpu.yaml", None),
        ("snakemake --cores 2 --configfile examples/own_workload/config.yaml -n", "examples/own_workload/config.yaml",
         EXAMPLE_ENV),
    ],
)  # fmt: skip
def test_a_config_file_replaces_the_default(clone, venv_env, command, config, extra_env):
    """The dry run schedules exactly the given config's workloads: a user's file is never merged with the
    default study (which would add digits_mlp to every study and retrain it on the user's grid)."""
    result = run(clone, venv_env, command, extra_env)
    scheduled = set(WORKLOAD.findall(result.stdout + result.stderr))
    assert scheduled == config_workloads(clone, config)
    validated = run(clone, venv_env, f"batchscope validate {config}", extra_env)
    assert f"{config}: valid" in validated.stdout


def test_validate_and_the_workflow_refuse_the_same_sizes(clone, venv_env, tmp_path):
    """A batch size larger than a factory's data set: refused by validate and by the workflow's first step,
    naming the key and the value, with no traceback, and no job started."""
    config = yaml.safe_load((clone / "examples/own_workload/config.yaml").read_text())
    config["grid"]["batch_sizes"] = [16, 4096]
    path = tmp_path / "too_big.yaml"
    path.write_text(yaml.safe_dump(config))
    message = "grid.batch_sizes: 4096 exceeds the 2048 training examples of workload 'spirals'"
    validated = run(clone, venv_env, f"batchscope validate {path}", EXAMPLE_ENV, check=False)
    assert validated.returncode == 2 and message in validated.stderr and "Traceback" not in validated.stderr
    workflow = run(clone, venv_env, f"snakemake --cores 2 --configfile {path}", EXAMPLE_ENV, check=False)
    assert workflow.returncode != 0 and message in workflow.stdout + workflow.stderr
    assert not (clone / "results/profile").exists() and not (clone / "results/train").exists()
    # a CIFAR directory too small for gpu.yaml's Hessian evaluation set, in a copy of gpu.yaml pointing at it
    small = tmp_path / "cifar"
    small.mkdir()
    write_cifar(small, per_batch=300)
    gpu = yaml.safe_load((clone / "config/gpu.yaml").read_text())
    gpu["workloads"]["cifar_resnet20"]["dataset"]["data_dir"] = str(small)
    gpu["profile"]["extra_batch_sizes"] = []
    gpu["grid"]["batch_sizes"] = [32, 64, 128]
    gpu["ghost"]["enabled"] = False  # its physical batch (2048) is not on this smaller grid
    path = tmp_path / "small_cifar.yaml"
    path.write_text(yaml.safe_dump(gpu))
    message = "hessian.eval_size: 2048 exceeds the 1500 training examples of workload 'cifar_resnet20'"
    validated = run(clone, venv_env, f"batchscope validate {path}", check=False)
    assert validated.returncode == 2 and message in validated.stderr
    workflow = run(clone, venv_env, f"snakemake -n --configfile {path}", check=False)
    assert workflow.returncode != 0 and message in workflow.stdout + workflow.stderr


def test_the_example_study_as_the_docs_type_it(clone, venv_env):
    """docs/workloads.md's commands, run for real: the example's workloads are trained, the default study's
    caches are left alone, and recommend reports this study (and refuses to guess another)."""
    run(clone, venv_env, "snakemake --cores 2 --configfile examples/own_workload/config.yaml", EXAMPLE_ENV)
    assert {p.stem for p in (clone / "results/fit").glob("*.nc")} == {"spirals", "spirals_streamed"}
    assert not (clone / "results/train/digits_mlp").exists()
    text = run(clone, venv_env, "batchscope recommend --configfile examples/own_workload/config.yaml",
               EXAMPLE_ENV).stdout  # fmt: skip
    assert text.startswith("spirals on cpu") and "spirals_streamed on cpu" in text and "as fast within" in text
    rows = json.loads(run(clone, venv_env, "batchscope recommend --configfile examples/own_workload/config.yaml "
                          "--json", EXAMPLE_ENV).stdout)  # fmt: skip
    assert [r["workload"] for r in rows] == ["spirals", "spirals_streamed"]
    html = (clone / "results/report/report.html").read_text()
    for row in rows:
        assert f"for {row['workload']}: batch size {row['batch_size']} at learning rate" in html
    # plain `batchscope recommend` means the default study, which has not run here: said so, no traceback
    default = run(clone, venv_env, "batchscope recommend", EXAMPLE_ENV, check=False)
    assert default.returncode != 0 and "no fit for workload 'digits_mlp' of config/config.yaml" in default.stderr
    assert "Traceback" not in default.stderr
    assert os.path.isfile(clone / "results/report/report.html")


def test_the_gpu_rehearsal_runs_every_stage_from_the_root(clone, venv_env):
    """config/test/gpu_rehearsal.yaml, gpu.yaml's kind of study on the CPU, run as typed from the clone's root on the
    CIFAR-shaped files the fixture wrote: every stage writes its results and the report draws them. (Last in this
    file: the example's test above counts the fits under results/.)"""
    run(clone, venv_env, "snakemake --cores 2 --configfile config/test/gpu_rehearsal.yaml")
    results = clone / "results"
    expected = [
        "data/cifar_resnet.nc", "profile/cifar_resnet/B16.nc", "profile/cifar_resnet/B256.nc",
        "fit/cifar_resnet.nc", "hessian/cifar_resnet.nc", "noise/cifar_resnet/variance.nc",
        "jensen/cifar_resnet.nc", "jensen_linreg.nc", "quick/cifar_resnet.nc", "ghost/cifar_resnet.nc",
        "branch/cifar_resnet/fraction1.nc", "report/report.html",
    ]  # fmt: skip
    missing = [name for name in expected if not (results / name).is_file()]
    assert not missing, missing
    html = (results / "report/report.html").read_text()
    for section in ("The answer, and what it cost", "Gradient noise", "Ghost BatchNorm", "The Jensen bias"):
        assert section in html, section
    rows = json.loads(run(clone, venv_env, "batchscope recommend --json --configfile config/test/gpu_rehearsal.yaml")
                      .stdout)  # fmt: skip
    assert [row["workload"] for row in rows] == ["cifar_resnet"] and rows[0]["batch_size"] in (16, 64)
