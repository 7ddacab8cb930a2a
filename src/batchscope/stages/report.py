"""Stage ``render_report``: check every input cache, execute the report notebook (its figures and tables are
:mod:`batchscope.figures`) and write offline HTML with the code hidden."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from batchscope import config as cfg
from batchscope.faults import kill_point
from batchscope.stages import Command, Rule, _common, noise, rule
from batchscope.store import CacheError, atomic_write, read_netcdf

# each optional input of the report: the rule that writes it (whose declared variables the notebook reads)
OPTIONAL_INPUTS = {"hessian": "aggregate_hessian", "stability": "edge_of_stability", "ghost": "summarize_ghost",
                   "quick": "quick_estimate", "branch": "branch_checkpoint"}  # fmt: skip


def check_inputs(fit_paths, hessian_paths=(), stability_paths=(), ghost_paths=(), noise_paths=(),
                 expect: dict | None = None, quick_paths=(), branch_paths=()) -> None:  # fmt: skip
    """Refuse (CacheError naming the file) any input that is unreadable, from another stage or algorithm
    version, missing a variable, or, for the fits, computed for another config than ``expect`` says."""
    fit_hashes = (expect or {}).get("fit_scaling", {})
    for path in fit_paths:
        ds = read_netcdf(path, "fit_scaling", rule("fit_scaling").variables)
        workload = ds.attrs.get("workload")
        if expect is not None and workload not in fit_hashes:
            raise CacheError(f"{path}: a fit of workload {workload!r}, which is not in this study "
                             f"({', '.join(sorted(fit_hashes))}); delete it or run its config")  # fmt: skip
        read_netcdf(path, "fit_scaling", (), fit_hashes.get(workload))
    optional = (("hessian", hessian_paths), ("stability", stability_paths), ("ghost", ghost_paths),
                ("quick", quick_paths), ("branch", branch_paths))  # fmt: skip
    for kind, paths in optional:
        stage = OPTIONAL_INPUTS[kind]
        for path in paths:
            read_netcdf(path, stage, rule(stage).variables)
    for path in map(Path, noise_paths):
        if path.is_dir():
            for file in sorted(path.glob("snapshot*.nc")):
                read_netcdf(file, "measure_gradient_noise", noise.SNAPSHOT_VARIABLES)
            read_netcdf(path / "variance.nc", "measure_gradient_noise", noise.VARIANCE_VARIABLES)
        else:
            read_netcdf(path, "measure_jensen_bias", rule("measure_jensen_bias").variables)


def render(
    fit_paths: Sequence[str],
    notebook: str,
    html_out: str,
    figures_dir: str,
    hessian_paths: Sequence[str] = (),
    stability_paths: Sequence[str] = (),
    ghost_paths: Sequence[str] = (),
    quick_paths: Sequence[str] = (),
    branch_paths: Sequence[str] = (),
    noise_paths: Sequence[str] = (),
    expect: dict | None = None,
    benchmarks: dict[str, list[str]] | None = None,
    branch_benchmarks: dict[str, list[str]] | None = None,
) -> Path:
    """Execute the report notebook on ``fit_paths`` (and Hessian aggregates) and write HTML, code hidden.

    Every input cache is checked first (:func:`check_inputs`): a damaged or foreign file stops the report with
    the file's name before anything is drawn, instead of being read into it.
    """
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    check_inputs(fit_paths, hessian_paths, stability_paths, ghost_paths, noise_paths, expect, quick_paths, branch_paths)
    html_out = Path(html_out)
    executed = html_out.with_suffix(".ipynb")
    papermill.execute_notebook(
        notebook,
        str(executed),
        parameters={
            "fit_files": [str(Path(p).resolve()) for p in fit_paths],
            "hessian_files": [str(Path(p).resolve()) for p in hessian_paths],
            "stability_files": [str(Path(p).resolve()) for p in stability_paths],
            "ghost_files": [str(Path(p).resolve()) for p in ghost_paths],
            "quick_files": [str(Path(p).resolve()) for p in quick_paths],
            "branch_files": [str(Path(p).resolve()) for p in branch_paths],
            "noise_files": [str(Path(p).resolve()) for p in noise_paths],
            "benchmark_files": {
                rule: [str(Path(p).resolve()) for p in paths] for rule, paths in (benchmarks or {}).items()
            },
            "branch_benchmark_files": {
                name: [str(Path(p).resolve()) for p in paths] for name, paths in (branch_benchmarks or {}).items()
            },
            "figures_dir": str(Path(figures_dir).resolve()),
        },
        progress_bar=False,
        cwd=str(Path.cwd()),
    )
    kill_point("report_render")  # tests: a kill after the figures, before the HTML
    exporter = HTMLExporter(
        template_name="offline",  # workflow/notebooks/templates/offline: lab without CDN scripts
        extra_template_basedirs=[str(Path(notebook).resolve().parent / "templates")],
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    return atomic_write(html_out, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))


def train_job_benchmarks(listed: Sequence[str], fit_paths: Sequence[str], pattern: str) -> list[str]:
    """The adaptive study's training jobs' benchmark files for the cost table: those the workflow listed (the Ghost
    summary's base sizes, trained whatever the choice), then ``pattern`` (the rule's declared benchmark path, with
    ``{workload}`` and ``{batch_size}``) at each fit's trained batch sizes, read from the fit's ``batch_size``; a
    job in both counts once. The workflow cannot list the fits' sizes itself: an input function that asks the
    choose_batch_sizes checkpoint keeps Snakemake from rebuilding an existing report while a workload's checkpoint
    has not run."""
    from batchscope.store import read_netcdf

    paths = list(listed)
    for path in fit_paths:
        ds = read_netcdf(path)
        paths += [pattern.format(workload=ds.attrs["workload"], batch_size=int(b)) for b in ds["batch_size"].values]
    return list(dict.fromkeys(paths))


def branch_job_benchmarks(branch_paths: Sequence[str], pattern: str | None) -> dict[str, list[str]]:
    """Per workload, the branch jobs' benchmark files (the answer table's branching cost): ``pattern`` (the rule's
    declared benchmark path, with ``{workload}`` and ``{fraction}``) at each branch file's own workload and snapshot
    fraction."""
    by_workload: dict[str, list[str]] = {}
    for path in branch_paths if pattern else ():
        # checked as the report checks its inputs: a file of an older version is refused by name, not misread
        attrs = read_netcdf(path, "branch_checkpoint", rule("branch_checkpoint").variables, attrs_only=True).attrs
        fraction = cfg.format_fraction(attrs["fraction"])
        by_workload.setdefault(attrs["workload"], []).append(pattern.format(workload=attrs["workload"],
                                                                            fraction=fraction))  # fmt: skip
    return by_workload


def run(args: argparse.Namespace) -> None:
    benchmarks = _common.pairs(args.benchmarks, "--benchmarks")
    if args.train_benchmarks:
        benchmarks["train_model"] = train_job_benchmarks(benchmarks.get("train_model", []), args.fits,
                                                         args.train_benchmarks)  # fmt: skip
    html = render(args.fits, args.notebook, args.out, args.figures, hessian_paths=args.hessian,
                  stability_paths=args.edge_of_stability, ghost_paths=args.ghost, noise_paths=args.noise,
                  quick_paths=args.quick, branch_paths=args.branch,
                  expect=_common.expect(args), benchmarks=benchmarks,
                  branch_benchmarks=branch_job_benchmarks(args.branch, args.branch_benchmarks))  # fmt: skip
    print(html)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fits", nargs="+", required=True)
    parser.add_argument("--expect", help='JSON: {"fit_scaling": {workload: config hash}}; other fits are refused')
    parser.add_argument("--hessian", nargs="*", default=[], help="aggregate_hessian outputs (optional)")
    parser.add_argument("--edge-of-stability", nargs="*", default=[], help="edge_of_stability outputs (optional)")
    parser.add_argument("--ghost", nargs="*", default=[], help="summarize_ghost outputs (optional)")
    parser.add_argument("--quick", nargs="*", default=[], help="quick_estimate outputs (optional)")
    parser.add_argument("--branch", nargs="*", default=[], help="branch_checkpoint outputs (optional)")
    parser.add_argument("--noise", nargs="*", default=[], help="gradient-noise directories and Jensen files (optional)")
    parser.add_argument("--benchmarks", nargs="*", default=[], help="RULE=FILE: Snakemake benchmark files, for the "
                        "stages' share of the compute (optional)")  # fmt: skip
    parser.add_argument("--train-benchmarks", metavar="PATTERN", help="adaptive study: the training jobs' benchmark "
                        "path, with {workload} and {batch_size}, taken at each fit's batch sizes")  # fmt: skip
    parser.add_argument("--branch-benchmarks", metavar="PATTERN", help="the branch jobs' benchmark path, with "
                        "{workload} and {fraction}, taken at each branch file's own")  # fmt: skip
    parser.add_argument("--notebook", required=True)
    parser.add_argument("--out", required=True, help="output HTML path")
    parser.add_argument("--figures", required=True, help="directory for the figure PNGs")


# 5: the branched critical batch size in the first section; 6: what the answer saves against the grid's ends, the
# branch jobs billed by their fraction; 7: where the fastest B has lain around the quick b_opt (its model error)
# 8: the quick estimates' warnings among the answer's, the adaptive study's sizes and second round in its paragraph;
# 9: the answer table's savings in recommend's words (recommend.slowdown); 10: the critical-batch figure draws
# B_simple where it stood in for B_noise
RULES = {"render_report": Rule(version=10)}
COMMANDS = (Command("report", "execute the report notebook and write HTML", run, _arguments),)
