import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def venv_env() -> dict[str, str]:
    """Environment for subprocesses: the interpreter running the tests first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where tests leave files for people to look at (screenshots, trial summaries): test-artifacts/, ignored by
    git; BATCHSCOPE_TEST_ARTIFACTS overrides it."""
    path = Path(os.environ.get("BATCHSCOPE_TEST_ARTIFACTS", REPO / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_study(repo, venv_env, tmp_path_factory) -> Path:
    """A real Snakemake run of config/test/tiny.yaml, shared by the workflow and the browser tests."""
    from tests.helpers import snakemake

    workdir = tmp_path_factory.mktemp("study")
    snakemake(repo, workdir, env=venv_env)
    return workdir


@pytest.fixture(scope="session")
def adaptive_study(repo, venv_env, tmp_path_factory):
    """A real Snakemake run of config/test/adaptive.yaml (study: adaptive), and what it printed; shared by the
    workflow tests and the budget benchmark's."""
    from tests.helpers import snakemake

    workdir = tmp_path_factory.mktemp("adaptive")
    result = snakemake(repo, workdir, env=venv_env, configfile=repo / "config/test/adaptive.yaml")
    return workdir, result
