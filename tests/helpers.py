"""Helpers shared by the tests that run Snakemake."""

import subprocess

TINY = "config/test/tiny.yaml"


def snakemake(repo, workdir, *args, env, configfile=None, check=True):
    # --configfile takes several values: it goes last so it cannot swallow a target
    cmd = [
        "snakemake",
        "-s",
        str(repo / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        "2",
        *args,
        "--configfile",
        str(configfile or repo / TINY),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result
