"""A non-editable install: the wheel built from this repository carries every file the package reads at run time,
and a fresh venv holding that wheel (never the editable source tree) validates a config and dry-runs the workflow.

The fresh venv sees the project venv's already installed dependencies through a ``.pth`` file that names the
project venv's site-packages: a path line in a ``.pth`` adds that directory to ``sys.path`` without processing its
own ``.pth`` files, so the editable install's path hook (``/work/main/src`` on ``sys.path``) stays off and nothing is
downloaded.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import TINY

pytestmark = pytest.mark.integration

# what setuptools reads to build the wheel besides src/ (pyproject.toml's readme; license files when there are any)
BUILD_FILES = ("pyproject.toml", "README.md")
STATS_ROW = re.compile(r"^(\w+)\s+(\d+)$")


def run(cmd, *, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def package_files(repo: Path) -> set[str]:
    """Every file of src/batchscope as a wheel names it (bytecode caches and hidden files aside)."""
    pkg = repo / "src" / "batchscope"
    return {
        f"batchscope/{path.relative_to(pkg).as_posix()}"
        for path in pkg.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and not path.name.startswith(".")
    }


def job_stats(result) -> dict[str, int]:
    """The first "Job stats" table of a dry run: job count per rule, and the total."""
    lines = (result.stdout + result.stderr).splitlines()
    start = lines.index("Job stats:")
    stats = {}
    for line in lines[start + 3 :]:
        row = STATS_ROW.match(line.strip())
        if not row:
            break
        stats[row.group(1)] = int(row.group(2))
    return stats


@pytest.fixture(scope="module")
def wheel(repo, tmp_path_factory) -> Path:
    # Built from a copy of the build's inputs: an in-tree build writes build/ and src/*.egg-info into the checkout,
    # and a stale build/lib would put files into the wheel that src/ no longer has.
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_FILES:
        shutil.copy2(repo / name, source / name)
    for license_file in repo.glob("LICEN[CS]E*"):
        shutil.copy2(license_file, source / license_file.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(repo / "src", source / "src", symlinks=True, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, source], cwd=dist)
    wheels = sorted(dist.glob("batchscope-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=venv.parent)
    python = venv / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv.parent)
    project_paths = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(site.stdout.strip()) / "batchscope_project_deps.pth").write_text("".join(f"{p}\n" for p in project_paths))
    # --ignore-installed: pip would otherwise find the project venv's editable batchscope (same version) through the
    # .pth and try to uninstall it; it refuses (outside this environment), but it must not even look
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], cwd=venv.parent)
    return venv


@pytest.fixture
def env(fresh_venv) -> dict[str, str]:
    """The fresh venv activated: its bin first on PATH, no PYTHONPATH and no user site that could bring src/ back."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(
        VIRTUAL_ENV=str(fresh_venv),
        PATH=f"{fresh_venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PYTHONNOUSERSITE="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return env


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working directory that is not the repository root (so '' on sys.path cannot find src/ or the workflow)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def test_wheel_carries_every_package_file(wheel, repo):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "batchscope/config.schema.yaml" in names  # config.py reads it through importlib.resources
    assert "batchscope/py.typed" in names
    missing = package_files(repo) - names
    assert not missing, f"in src/batchscope but not in the wheel (add to [tool.setuptools.package-data]): {missing}"
    (entry_points,) = (name for name in names if name.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "batchscope = batchscope.cli:main" in entry_points


def test_fresh_venv_imports_the_wheel_not_the_source_tree(fresh_venv, env, outside, repo):
    code = (
        "import sys, batchscope, torch, snakemake\n"
        "from importlib import resources\n"
        "print(batchscope.__file__)\n"
        "print(resources.files('batchscope').joinpath('config.schema.yaml').is_file())\n"
        "print(sys.prefix)\n"
        "print('\\n'.join(sys.path))\n"
    )
    out = run([fresh_venv / "bin" / "python", "-c", code], cwd=outside, env=env).stdout.splitlines()
    module, schema_found, prefix, *search_path = out
    site = Path(fresh_venv / "lib").resolve()
    assert Path(module).resolve().is_relative_to(site), module
    assert not Path(module).resolve().is_relative_to(repo / "src"), module
    assert schema_found == "True"
    assert Path(prefix).resolve() == fresh_venv.resolve()
    assert str(repo / "src") not in search_path  # the editable install's .pth was not processed
    assert shutil.which("batchscope", path=env["PATH"]) == str(fresh_venv / "bin" / "batchscope")


def test_installed_cli_validates_the_default_config(env, outside, repo):
    config = repo / "config" / "config.yaml"
    installed = run(["batchscope", "validate", config], cwd=outside, env=env)
    assert installed.stdout.startswith(f"{config}: valid; ")
    assert re.search(r"valid; [1-9]\d* workload\(s\), [1-9]\d* training run\(s\)", installed.stdout), installed.stdout
    # the same summary as the source tree's (workload and run counts, the data's sizes)
    editable = run([sys.executable, "-m", "batchscope", "validate", config], cwd=outside)
    assert installed.stdout == editable.stdout


def test_installed_package_dry_runs_the_workflow(fresh_venv, env, outside, repo, tmp_path):
    def dry_run(python, workdir, env=None):
        return run(
            [python, "-m", "snakemake", "-n", "-s", repo / "Snakefile", "--directory", workdir, "--cores", "1",
             "--configfile", repo / TINY],
            cwd=outside, env=env,
        )  # fmt: skip

    installed = dry_run(fresh_venv / "bin" / "python", tmp_path / "work", env)
    assert "This was a dry-run" in installed.stdout + installed.stderr
    stats = job_stats(installed)
    assert stats.get("train_model", 0) > 0, stats
    assert stats["total"] == sum(n for rule, n in stats.items() if rule != "total") > 0
    # the same jobs as the source tree schedules
    assert stats == job_stats(dry_run(sys.executable, tmp_path / "work_editable"))
