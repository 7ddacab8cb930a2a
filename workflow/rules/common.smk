# Validation, grid helpers, per-rule config slices and wildcard constraints.
import json
import os
import re
import shutil
import sys

from snakemake.exceptions import IncompleteCheckpointException, WorkflowError
from snakemake.settings.types import RerunTrigger

from batchscope import config as bs_config
from batchscope import stages as bs_stages
from batchscope import store as bs_store
from batchscope.core import selection as bs_selection
from batchscope.stages import adaptive as bs_adaptive
from batchscope.stages import ghost as bs_ghost
from batchscope.stages import noise as bs_noise
from batchscope.stages import prepare as bs_study
from batchscope.stages import train as bs_train


# Jobs run `python -m batchscope`: make that the interpreter running Snakemake (the project's venv), even when
# snakemake was started by path without activating the venv. Done on PATH rather than in the shell command so
# the command (and so Snakemake's code rerun trigger) is the same wherever the venv lives.
envvars:
    "PATH",


_search_path = os.environ["PATH"]
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + _search_path

# The schema (workflow/schemas/config.schema.yaml) plus the checks a schema cannot express; defaults filled in.
# Runs at parse time, so a bad config stops the workflow before any job starts.
# Then the sizes only the data know (a factory's data set, a directory's files), from each workload's
# prepare_data record or, before there is one, by building it as prepare_data does: `batchscope validate` runs
# the same two steps, so it refuses exactly what the workflow refuses.
try:
    _validated = bs_config.validate(config)
    bs_study.check(_validated)
except ValueError as err:  # ConfigError, and a factory's or a data file's own error
    raise WorkflowError(f"invalid config: {err}") from None
config.clear()
config.update(_validated)

# each rule's algorithm version and config slice, declared by its stage module (batchscope.stages)
STAGES = bs_stages.rules()
WORKLOADS = sorted(config["workloads"])
BATCH_SIZES = sorted(config["grid"]["batch_sizes"])
PROFILE_BATCH_SIZES = bs_config.profile_batch_sizes(config)
SEEDS = sorted(config["grid"]["seeds"])
# the branch jobs' fractions as their files name them (wildcards: values, never parsed back from the path)
BRANCH_FRACTIONS = [bs_config.format_fraction(f) for f in config["noise"]["snapshot_fractions"]]
# study: adaptive trains the batch sizes the choose_batch_sizes checkpoint picks around the quick b_opt, the first
# seed's learning rates with a pruning bound, and each later seed the best third of the one before's (successive
# halving, adaptive.halving_rate; batchscope.stages.adaptive)
ADAPTIVE = config["study"] == "adaptive"
PROFILE_FILE = "results/profile/{workload}/B{batch_size}.nc"
HESSIAN_REUSE = (
    "results/reuse/analyze_hessian"  # each checkpoint's analysis, by content (analyze_hessian reads it back)
)
REPORT_NOTEBOOK = os.path.join(workflow.basedir, "workflow", "notebooks", "report.ipynb")
REPORT_TEMPLATE = os.path.join(workflow.basedir, "workflow", "notebooks", "templates", "offline", "index.html.j2")


def _uses_gpu():
    """Whether jobs that compute will hold a GPU: device cuda, or auto on a machine with an NVIDIA driver."""
    if config["device"] == "cuda":
        return True
    return config["device"] == "auto" and shutil.which("nvidia-smi") is not None


GPU = 1 if _uses_gpu() else 0

# Profiling gets the machine to itself when jobs run here: it reserves every core Snakemake may use, so no other
# job competes for the CPU, caches and memory bandwidth while it times steps (torch still uses config threads).
# On a cluster each job has its own allocation, and it asks for what the config says.
_local_cores = workflow._cores if workflow.local_exec and not workflow.remote_exec else None
PROFILE_THREADS = max(config["threads"], _local_cores or 0)


wildcard_constraints:
    workload="|".join(WORKLOADS),
    batch_size=r"[1-9][0-9]*",
    seed=r"[0-9]+",
    step_size=r"[0-9.e+-]+",
    ghost=r"[0-9]+",
    fraction="|".join(map(re.escape, BRANCH_FRACTIONS)),


def expected_provenance(*rule_names):
    """Params function: the config hash each input stage's files must carry for the current config; the
    aggregations refuse files computed for another config (copied in, or left by a run with --touch)."""

    def params(wildcards):
        hashes = {s: bs_config.config_hash(STAGES[s].config_slice(config, wildcards.workload)) for s in rule_names}
        return json.dumps(hashes, sort_keys=True)

    return params


def config_slice(rule_name):
    """Params function: the rule's own config slice (declared by its stage module) as canonical JSON; it drives
    the params rerun trigger."""
    slicer = STAGES[rule_name].config_slice

    def params(wildcards):
        return json.dumps(slicer(config, wildcards.workload), sort_keys=True)

    return params


def learning_rates(wildcards):
    """The batch size's learning-rate grid; in the adaptive study in the order it is trained, the likely best first."""
    wl = config["workloads"][wildcards.workload]
    lrs = bs_config.learning_rates(wl, int(wildcards.batch_size))
    if ADAPTIVE:
        lrs = bs_selection.lr_order(lrs, config["noise"]["reference_lr_index"])
    return " ".join(bs_config.format_lr(lr) for lr in lrs)


def trained_batch_sizes(workload):
    """The batch sizes a workload's answer trains: the grid (study: full), or the bracket the choose_batch_sizes
    checkpoint picked around the quick b_opt and the size the extend_bracket checkpoint added past it, if any
    (study: adaptive; read from its file once it exists)."""
    if not ADAPTIVE:
        return BATCH_SIZES
    return chosen_batch_sizes(last_choice(), workload)


def last_choice():
    """The adaptive study's last checkpoint: the second round's, or the bracket's with adaptive.extend off."""
    return "extend_bracket" if config["adaptive"]["extend"] else "choose_batch_sizes"


# the checkpoints' version params (their rerun triggers), here because chosen_batch_sizes compares them with what
# Snakemake recorded; extend_bracket runs the fit on the bracket, so a new fit algorithm reruns it too
CHECKPOINT_VERSIONS = {
    "choose_batch_sizes": STAGES["choose_batch_sizes"].version,
    "extend_bracket": "{}+fit{}".format(STAGES["extend_bracket"].version, STAGES["fit_scaling"].version),
}


def chosen_batch_sizes(stage, workload):
    """The sizes a checkpoint's file holds. A file from another version of its stage (an upgraded batchscope) is
    pending rather than an error where Snakemake will rerun the checkpoint: where params trigger reruns and the
    params it recorded for the file hold another version. Snakemake then evaluates the input functions again on
    the new file. Otherwise nothing would rebuild it, and the error says what to do."""
    done = getattr(checkpoints, stage).get(workload=workload)
    path = done.output[0]
    try:
        return bs_adaptive.read_choice(path, stage)
    except bs_store.VersionError as err:
        # Snakemake records each param as its repr (snakemake.persistence); None: no record, no params trigger
        recorded = workflow.persistence.params(path)
        reruns = RerunTrigger.PARAMS in workflow.dag_settings.rerun_triggers and recorded is not None
        if reruns and repr(CHECKPOINT_VERSIONS[stage]) not in recorded:
            raise IncompleteCheckpointException(done.rule, path) from err
        raise WorkflowError(str(err)) from err


def choice_file(wildcards):
    """The fit's record of why its sizes were trained: the last choice's file (none in the full study)."""
    if not ADAPTIVE:
        return []
    return getattr(checkpoints, last_choice()).get(workload=wildcards.workload).output[0]


def bracket_batch_sizes(workload):
    """The adaptive study's first round: the bracket around the quick b_opt."""
    return chosen_batch_sizes("choose_batch_sizes", workload)


def bracket_train_dirs(wildcards):
    sizes = bracket_batch_sizes(wildcards.workload)
    return expand(rules.train_model.output[0], workload=wildcards.workload, batch_size=sizes, seed=SEEDS)


def ghost_base_batch_sizes(workload):
    """The batch sizes the Ghost BatchNorm summary trains plain BatchNorm at: its physical and its small batch (in
    the grid, so the full study trains them anyway; the adaptive study trains them, pruned as its own, even when they
    lie outside its bracket)."""
    if not GHOST["enabled"] or workload != GHOST["workload"]:
        return []
    return sorted({GHOST["small_batch_size"], GHOST["batch_size"]})


def analysed_batch_sizes(workload):
    """The batch sizes whose checkpoints the Hessian stage analyses: the trained ones and the Ghost summary's."""
    return sorted(set(trained_batch_sizes(workload)) | set(ghost_base_batch_sizes(workload)))


def profile_files(wildcards):
    return expand(PROFILE_FILE, workload=wildcards.workload, batch_size=PROFILE_BATCH_SIZES)


def hessian_dirs(wildcards):
    return expand(rules.analyze_hessian.output[0], workload=wildcards.workload, seed=SEEDS)


def seed_train_dirs(wildcards):
    sizes = analysed_batch_sizes(wildcards.workload)
    return expand(rules.train_model.output[0], workload=wildcards.workload, batch_size=sizes, seed=wildcards.seed)


def hessian_aggregates(wildcards):
    """The report's Hessian inputs: none when the stage is disabled."""
    if not config["hessian"]["enabled"]:
        return []
    return expand(rules.aggregate_hessian.output[0], workload=WORKLOADS)


def stability_files(wildcards):
    """The report's edge-of-stability inputs: none unless enabled."""
    eos = config["edge_of_stability"]
    if not eos["enabled"]:
        return []
    sizes = [bs_config.format_lr(eta) for eta in eos["step_sizes"]]
    return expand(rules.edge_of_stability.output[0], workload=eos["workload"], step_size=sizes)


def reference_point(wildcards):
    """The reference run's (batch size, learning rate, seed): the noise, Jensen and quick-estimate stages read it."""
    return bs_config.noise_reference(config, wildcards.workload)


def reference_run_if_in(wildcards):
    """The reference run's directory where a training job's batch size is the reference run's (its point is then
    one of the job's, already trained), else nothing. Ancient: a rerun of the reference run (new snapshot
    fractions) does not retrain the batch size; the job checks the copy's config hash, version and device itself."""
    if int(wildcards.batch_size) != reference_point(wildcards)[0]:
        return []
    return ancient(rules.train_reference.output[0].format(workload=wildcards.workload))


def reference_file(wildcards, run_dir, suffix):
    """A file of the reference run's directory, named from the config (never parsed back from a path)."""
    _, lr, seed = reference_point(wildcards)
    return os.path.join(run_dir, f"lr{bs_config.format_lr(lr)}_seed{seed}{suffix}")


def noise_outputs(wildcards):
    """The report's gradient-noise inputs: none when the stage is disabled."""
    if not config["noise"]["enabled"]:
        return []
    return (
        expand(rules.measure_gradient_noise.output[0], workload=WORKLOADS)
        + expand(rules.measure_jensen_bias.output[0], workload=WORKLOADS)
        + [rules.measure_jensen_linreg.output[0]]
    )


GHOST = config["ghost"]


def ghost_learning_rates(workload):
    """The base workload's learning-rate grid at the large physical batch."""
    lrs = bs_config.learning_rates(config["workloads"][workload], GHOST["batch_size"])
    return " ".join(bs_config.format_lr(lr) for lr in lrs)


def ghost_summary_inputs(wildcards):
    w, big, small = wildcards.workload, GHOST["batch_size"], GHOST["small_batch_size"]
    sizes = GHOST["ghost_sizes"]
    inputs = {
        "base_runs": expand(rules.train_model.output[0], workload=w, batch_size=sorted({small, big}), seed=SEEDS),
        "ghost_runs": expand(rules.train_ghost.output[0], workload=w, ghost=sizes, seed=SEEDS),
        "base_profile": expand(PROFILE_FILE, workload=w, batch_size=big),
        "ghost_profiles": expand(rules.profile_ghost.output[0], workload=w, ghost=sizes),
        "variance": rules.ghost_variance.output[0].format(workload=w),
        "base_hessian": [],
    }
    if config["hessian"]["enabled"]:
        inputs["base_hessian"] = expand(rules.analyze_hessian.output[0], workload=w, seed=SEEDS)
        inputs["ghost_hessian"] = expand(rules.analyze_ghost_hessian.output[0], workload=w, ghost=sizes, seed=SEEDS)
    return inputs


def ghost_pairs(rule, workload, seeds=None):
    """SIZE=PATH arguments for the summary, built from the config's ghost sizes (never read back from a path:
    a workload named G2 would otherwise map every file to ghost size 2)."""
    pairs = []
    for size in GHOST["ghost_sizes"]:
        for seed in seeds if seeds is not None else [None]:
            keys = {"workload": workload, "ghost": size} | ({} if seed is None else {"seed": seed})
            pairs.append(f"{size}={rule.output[0].format(**keys)}")
    return " ".join(pairs)


def ghost_summaries(wildcards):
    """The report's Ghost BatchNorm input: none unless enabled."""
    if not GHOST["enabled"]:
        return []
    return [rules.summarize_ghost.output[0].format(workload=GHOST["workload"])]


def train_dirs(wildcards):
    sizes = trained_batch_sizes(wildcards.workload)
    return expand(rules.train_model.output[0], workload=wildcards.workload, batch_size=sizes, seed=SEEDS)


def answer_benchmarks(wildcards):
    """{rule: benchmark files} of the jobs a workload's answer needed: its cost, recorded by the fit. The adaptive
    study's answer also needed the quick estimate's jobs and the choice."""
    w = wildcards.workload
    jobs = {
        "prepare_data": [rules.prepare_data.benchmark.format(workload=w)],
        "profile_hardware": [rules.profile_hardware.benchmark.format(workload=w)],
    }
    if ADAPTIVE:
        jobs["train_reference"] = [rules.train_reference.benchmark.format(workload=w)]
        jobs["measure_gradient_noise"] = [rules.measure_gradient_noise.benchmark.format(workload=w)]
        jobs["quick_estimate"] = [rules.quick_estimate.benchmark.format(workload=w)]
        jobs["choose_batch_sizes"] = [rules.choose_batch_sizes.benchmark.format(workload=w)]
        if config["adaptive"]["extend"]:
            jobs["extend_bracket"] = [rules.extend_bracket.benchmark.format(workload=w)]
    jobs["train_model"] = train_benchmarks(w, trained_batch_sizes(w))
    return jobs


def train_benchmarks(workload, sizes):
    """The benchmark files of a workload's training jobs at ``sizes``: one per (batch size, seed), or in the
    adaptive study one per batch size (train_batch_size). The cost tables list both as train_model."""
    if ADAPTIVE:
        return expand(rules.train_batch_size.benchmark, workload=workload, batch_size=sizes)
    return expand(rules.train_model.benchmark, workload=workload, batch_size=sizes, seed=SEEDS)


def branch_files(wildcards):
    """The report's branched critical batch sizes: one per workload and snapshot, none unless enabled."""
    if not config["branch"]["enabled"]:
        return []
    return expand(rules.branch_checkpoint.output[0], workload=WORKLOADS, fraction=BRANCH_FRACTIONS)


def quick_benchmarks(wildcards):
    """{rule: benchmark files} of the jobs a workload's quick estimate needed: its cost."""
    w = wildcards.workload
    return {
        "prepare_data": [rules.prepare_data.benchmark.format(workload=w)],
        "profile_hardware": [rules.profile_hardware.benchmark.format(workload=w)],
        "train_reference": [rules.train_reference.benchmark.format(workload=w)],
        "measure_gradient_noise": [rules.measure_gradient_noise.benchmark.format(workload=w)],
    }


def quick_estimates(wildcards):
    """The report's quick estimates: one per workload (the profile, one reference run, its gradient noise)."""
    return expand(rules.quick_estimate.output[0], workload=WORKLOADS)


def job_benchmarks(wildcards):
    """{rule: benchmark files} of every job the report summarises: the report states each stage's share of the
    study's compute from Snakemake's own benchmark files (declared here, so none of another study is read)."""
    w = WORKLOADS
    jobs = {
        "prepare_data": expand(rules.prepare_data.benchmark, workload=w),
        "profile_hardware": expand(rules.profile_hardware.benchmark, workload=w),
        "train_reference": expand(rules.train_reference.benchmark, workload=w),
        # the quick estimate's B_noise: measured whether or not the noise stage's own results are on
        "measure_gradient_noise": expand(rules.measure_gradient_noise.benchmark, workload=w),
        "quick_estimate": expand(rules.quick_estimate.benchmark, workload=w),
        "fit_scaling": expand(rules.fit_scaling.benchmark, workload=w),
    }
    if ADAPTIVE:
        jobs["choose_batch_sizes"] = expand(rules.choose_batch_sizes.benchmark, workload=w)
        if config["adaptive"]["extend"]:
            jobs["extend_bracket"] = expand(rules.extend_bracket.benchmark, workload=w)
        # the training jobs: the report takes them at each fit's trained sizes (--train-benchmarks). Asking the
        # checkpoint here would make Snakemake keep an existing report while a workload's choice has not run.
        # The Ghost BatchNorm summary's plain-BatchNorm sizes are trained whatever the choice: known here.
        jobs["train_model"] = [path for name in w for path in train_benchmarks(name, ghost_base_batch_sizes(name))]
    else:
        jobs["train_model"] = [path for name in w for path in train_benchmarks(name, analysed_batch_sizes(name))]
    if config["hessian"]["enabled"]:
        jobs["analyze_hessian"] = expand(rules.analyze_hessian.benchmark, workload=w, seed=SEEDS)
        jobs["aggregate_hessian"] = expand(rules.aggregate_hessian.benchmark, workload=w)
    if config["noise"]["enabled"]:
        jobs["measure_jensen_bias"] = expand(rules.measure_jensen_bias.benchmark, workload=w)
        jobs["measure_jensen_linreg"] = [rules.measure_jensen_linreg.benchmark]
    if config["branch"]["enabled"]:
        jobs["branch_checkpoint"] = expand(rules.branch_checkpoint.benchmark, workload=w, fraction=BRANCH_FRACTIONS)
    eos = config["edge_of_stability"]
    if eos["enabled"]:
        sizes = [bs_config.format_lr(eta) for eta in eos["step_sizes"]]
        jobs["edge_of_stability"] = expand(rules.edge_of_stability.benchmark, workload=eos["workload"], step_size=sizes)
    if GHOST["enabled"]:
        g, sizes = GHOST["workload"], GHOST["ghost_sizes"]
        jobs["train_ghost"] = expand(rules.train_ghost.benchmark, workload=g, ghost=sizes, seed=SEEDS)
        jobs["profile_ghost"] = expand(rules.profile_ghost.benchmark, workload=g, ghost=sizes)
        jobs["ghost_variance"] = expand(rules.ghost_variance.benchmark, workload=g)
        jobs["summarize_ghost"] = expand(rules.summarize_ghost.benchmark, workload=g)
        if config["hessian"]["enabled"]:
            jobs["analyze_ghost_hessian"] = expand(
                rules.analyze_ghost_hessian.benchmark, workload=g, ghost=sizes, seed=SEEDS
            )
    return jobs


def benchmark_pairs(jobs):
    """RULE=FILE arguments for the report, from the mapping above (the rule comes from it, not from the path)."""
    return " ".join(f"{rule}={path}" for rule, paths in jobs.items() for path in paths)
