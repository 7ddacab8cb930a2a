"""Study config: schema validation with its defaults, the checks a schema cannot express, the grid, and the slice
every stage shares (each stage's own slice is in its module under :mod:`batchscope.stages`).

Both the workflow (``workflow/rules/common.smk``) and the command line validate through :func:`validate`, so
a bad config gets the same message wherever it is used, before any job starts.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_FILE = "config.schema.yaml"
DEFAULT_CONFIG = "config/config.yaml"  # the study the Snakefile runs, and recommend reads, when no config is given
BUILTIN_FACTORY = "batchscope.workloads:builtin"  # the built-in datasets and models, through the same protocol

FILE_DATASETS = {"mnist", "fashion_mnist", "cifar10"}
# Training-set size of each file dataset when n_train is not given (the standard splits).
FILE_DATASET_TRAIN_SIZE = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000}
IMAGE_DATASETS = {"digits", "mnist", "fashion_mnist", "cifar10"}
DIGITS_SIZE = 1797


def config_hash(config_slice: object) -> str:
    """A stable hash of a JSON-serialisable config slice (key order does not matter)."""
    text = json.dumps(config_slice, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the value."""


@cache
def schema() -> dict[str, Any]:
    text = resources.files("batchscope").joinpath(SCHEMA_FILE).read_text()
    return yaml.safe_load(text)


def _key(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _with_defaults(validator_class: type) -> type:
    """A validator that fills ``default:`` values in while validating (the jsonschema-documented recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, sub_schema):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if "default" in prop and name not in instance:
                    instance[name] = copy.deepcopy(prop["default"])
        yield from validate_properties(validator, properties, instance, sub_schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft7Validator)


def _schema_message(err: jsonschema.ValidationError) -> str:
    key = _key(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        if "properties" in err.schema:
            where = _key([*err.absolute_path, extra[0]])
            return f"{where}: unknown key {extra[0]!r} (allowed: {', '.join(allowed)})"
        # workloads: additionalProperties is a sub-schema, so this is a bad workload name, handled below
    if "propertyNames" in err.absolute_schema_path:
        return f"{key}: invalid name {err.instance!r}: use letters, digits and '_', starting with a letter"
    if err.validator == "required":
        return f"{key}: {err.message}"
    return f"{key}: {err.instance!r} is invalid: {err.message}"


def _check_finite(value: Any, path: tuple[Any, ...] = ()) -> None:
    """Refuse NaN and infinity anywhere in the config. YAML reads ``.nan`` and ``.inf`` as floats, and the schema's
    bounds cannot catch them (NaN compares false to every bound), so a NaN learning rate would be trained on."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(item, (*path, index))
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{_key(path)}: {value!r} is invalid: a setting must be a finite number")


def _check_schema(config: dict[str, Any]) -> None:
    errors = sorted(_Validator(schema()).iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("values the config schema refuses:\n  " + "\n  ".join(_schema_message(e) for e in errors))


def filled(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` (a ``dataset``, ``model`` or ``optimizer`` of the schema's definitions) with its variant's
    defaults filled in from the schema, the one place they are written."""
    instance = copy.deepcopy(obj)
    definitions = schema()["definitions"]
    errors = list(_Validator({**definitions[kind], "definitions": definitions}).iter_errors(instance))
    if errors:
        raise ConfigError(f"{kind}: " + "; ".join(_schema_message(err) for err in errors))
    return instance


def train_size(dataset: dict[str, Any]) -> int:
    """Number of training examples a dataset spec yields (known before loading anything)."""
    name = dataset["name"]
    if name == "digits":
        return DIGITS_SIZE - math.ceil(DIGITS_SIZE * dataset["val_fraction"])
    if name in FILE_DATASETS:
        return dataset.get("n_train", FILE_DATASET_TRAIN_SIZE[name])
    return dataset["n_train"]


def _check_factory(where: str, path: str) -> None:
    """The factory's module must be findable now, before any job starts (it is imported in the jobs)."""
    module = path.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as err:  # a parent package that is missing or fails to import
        raise ConfigError(f"{where}.factory: {path!r}: module {module!r} is not importable ({err})") from err
    if not found:
        raise ConfigError(
            f"{where}.factory: {path!r}: module {module!r} is not importable; install it or put its directory "
            "on PYTHONPATH"
        )


def _check_workload(name: str, wl: dict[str, Any], importable: bool = True) -> None:
    where = f"workloads.{name}"
    builtin = "factory" not in wl
    given = [key for key in ("dataset", "model") if key in wl]
    if builtin and len(given) < 2:
        missing = "dataset" if "dataset" not in wl else "model"
        raise ConfigError(f"{where}.{missing}: required (or name your own workload with 'factory')")
    if not builtin and given:
        raise ConfigError(
            f"{where}.{given[0]}: a workload with factory {wl['factory']!r} gets its data and model from the "
            f"factory; remove {given[0]!r} (or the factory)"
        )
    opt = wl["optimizer"]  # its variant's defaults are the schema's
    if opt["name"] == "sgd" and opt["nesterov"] and opt["momentum"] == 0:
        raise ConfigError(f"{where}.optimizer.nesterov: true needs momentum > 0, got momentum {opt['momentum']!r}")
    if wl["schedule"]["warmup_steps"] > wl["max_steps"]:
        raise ConfigError(
            f"{where}.schedule.warmup_steps: {wl['schedule']['warmup_steps']} exceeds max_steps {wl['max_steps']}"
        )
    if not builtin:
        if importable:
            _check_factory(where, wl["factory"])
        _check_target(where, wl, regression=False)
        return
    if wl["options"]:
        raise ConfigError(f"{where}.options: {wl['options']!r}: options go to a factory; this workload has none")
    ds, model = wl["dataset"], wl["model"]

    if ds["name"] in FILE_DATASETS:
        if "data_dir" not in ds:
            raise ConfigError(f"{where}.dataset.data_dir: required for dataset {ds['name']!r} (a local directory)")
        if not Path(ds["data_dir"]).is_dir():
            raise ConfigError(
                f"{where}.dataset.data_dir: {ds['data_dir']!r} is not a directory; batchscope reads "
                f"{ds['name']} from local files and never downloads"
            )
    if (model["norm"] == "ghost") != ("ghost_batch_size" in model):
        raise ConfigError(
            f"{where}.model: norm {model['norm']!r} with ghost_batch_size {model.get('ghost_batch_size')!r}: "
            "ghost_batch_size goes with norm 'ghost', and only with it"
        )
    if model["name"] == "resnet" and not model["widths"]:
        raise ConfigError(f"{where}.model.widths: [] is invalid: a resnet needs at least one stage")
    if model["name"] in ("cnn", "resnet") and ds["name"] not in IMAGE_DATASETS:
        raise ConfigError(
            f"{where}.model.name: {model['name']!r} needs image data, but dataset {ds['name']!r} has flat features"
        )
    _check_target(where, wl, regression=ds["name"] == "linreg")


def _check_target(where: str, wl: dict[str, Any], regression: bool) -> None:
    metric, value = wl["target"]["metric"], wl["target"]["value"]
    if regression and metric != "val_loss":
        raise ConfigError(
            f"{where}.target.metric: {metric!r} is undefined for regression dataset 'linreg' (use val_loss)"
        )
    if metric == "val_accuracy" and not 0 < value <= 1:
        raise ConfigError(f"{where}.target.value: {value!r} is out of range for val_accuracy (0, 1]")
    if metric == "val_loss" and not value > 0:
        raise ConfigError(f"{where}.target.value: {value!r} is out of range for val_loss (> 0)")

    has_list, has_rule = "learning_rates" in wl, "lr_scaling" in wl
    if has_list == has_rule:
        raise ConfigError(f"{where}: give exactly one of 'learning_rates' (a list) or 'lr_scaling' (base lr + rule)")
    if wl["eval_interval"] > wl["max_steps"]:
        raise ConfigError(f"{where}.eval_interval: {wl['eval_interval']} exceeds max_steps {wl['max_steps']}")


# The Hessian stage's evaluation set when hessian.eval_size is null: at most this many training examples, so
# the analysis costs the same on a 1,000- and a 1,000,000-example data set (a user's 16,000-example MLP spent
# 15x a training job per analyze_hessian job on the whole set).
AUTO_EVAL_SIZE = 512
MIN_PAIRS = 20  # noise.min_pairs' default (at most noise.pairs)


def static_train_sizes(config: dict[str, Any]) -> dict[str, int]:
    """Training-set sizes known from the config alone (generated and bundled data sets); the others (a factory's
    data, a local directory's files) need the data: :func:`batchscope.stages.prepare.data_records` gives them."""
    return {
        name: train_size(wl["dataset"])
        for name, wl in config["workloads"].items()
        if "dataset" in wl and wl["dataset"]["name"] not in FILE_DATASETS
    }


def check_sizes(config: dict[str, Any], n_train: dict[str, int]) -> None:
    """Every size the study draws from a workload's training set, against that set's size (``n_train`` maps the
    workloads whose size is known). The same check for the static sizes (in :func:`validate`) and the sizes read
    from the data (``batchscope validate`` and the workflow, through :mod:`batchscope.stages.prepare`)."""
    noise, eos = config["noise"], config["edge_of_stability"]
    for name, n in n_train.items():
        if name not in config["workloads"]:
            continue
        drawn = [("grid.batch_sizes", b) for b in sorted(config["grid"]["batch_sizes"])]
        drawn += [("profile.extra_batch_sizes", b) for b in sorted(config["profile"]["extra_batch_sizes"])]
        if config["branch"]["enabled"]:  # the largest branch draws batches of k x the reference batch size
            sizes = branch_batch_sizes(config["branch"]["factors"], config["noise"]["reference_batch_size"])
            drawn.append(("branch.factors", sizes[-1]))
        for key, value in drawn:
            if value > n:
                raise ConfigError(f"{key}: {value} exceeds the {n} training examples of workload {name!r}")
        # the analyses draw from at most loader.analysis_examples of them (batchscope.workloads.base.analysis_data)
        limit = config["workloads"][name]["loader"]["analysis_examples"]
        analysed = []
        if config["hessian"]["enabled"] and config["hessian"]["eval_size"] is not None:
            analysed.append(("hessian.eval_size", config["hessian"]["eval_size"]))
        measured = noise["enabled"] or config["study"] == "adaptive"  # the quick estimate measures B_noise
        if measured:
            if noise["eval_size"] is not None:
                analysed.append(("noise.eval_size", noise["eval_size"]))
            analysed += [("noise.b_big", noise["b_big"])] if noise["b_big"] is not None else []
        if noise["enabled"]:
            analysed += [("noise.variance_batch_sizes", b) for b in noise["variance_batch_sizes"]]
            analysed += [("noise.jensen.subspace_sizes", b) for b in noise["jensen"]["subspace_sizes"]]
        if config["branch"]["enabled"]:
            analysed.append(("branch.eval_size", config["branch"]["eval_size"]))
        if eos["enabled"] and eos["workload"] == name:
            analysed.append(("edge_of_stability.examples", eos["examples"]))
        for key, value in analysed:
            if value > min(n, limit):
                where = f"the {n} training examples" if n <= limit else f"loader.analysis_examples {limit}"
                raise ConfigError(f"{key}: {value} exceeds {where} of workload {name!r}")
        # the small batch must leave examples out of the set it is drawn from: its 1/B term vanishes at the whole set
        population = min(n, limit, noise["eval_size"] or n)
        if measured and noise["b_small"] >= population:
            raise ConfigError(f"noise.b_small: {noise['b_small']} is not smaller than the {population} examples the "
                              f"gradient noise of workload {name!r} is measured over")  # fmt: skip


def validate(config: dict[str, Any], importable: bool = True) -> dict[str, Any]:
    """Return a validated copy of ``config`` with every default filled in, or raise :class:`ConfigError`.

    ``importable``: a factory workload's module must be importable here (what the workflow needs). Reading cached
    results (``recommend``) sets it False: results copied from a cluster need not come with the user's package.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"<top level>: the config must be a mapping, got {type(config).__name__}")
    config = copy.deepcopy(config)
    _check_finite(config)
    _check_schema(config)  # and fills the schema's defaults
    _derive_defaults(config)
    for name, wl in config["workloads"].items():
        _check_workload(name, wl, importable)
    eos = config["edge_of_stability"]
    if eos["workload"] not in config["workloads"]:
        raise ConfigError(
            f"edge_of_stability.workload: {eos['workload']!r} is not a workload ({', '.join(config['workloads'])})"
        )
    if eos["interval"] > eos["steps"]:
        raise ConfigError(f"edge_of_stability.interval: {eos['interval']} exceeds steps {eos['steps']}")
    _check_ghost(config)
    _check_branch(config)
    _check_noise(config)
    check_sizes(config, static_train_sizes(config))
    return config


def _derive_defaults(config: dict[str, Any]) -> None:
    """The defaults that depend on other keys (the grid, the workloads), so a schema cannot state them; every
    other default is the schema's. Filled in before any check, which then only checks."""
    sizes, seeds = sorted(config["grid"]["batch_sizes"]), sorted(config["grid"]["seeds"])
    config["edge_of_stability"].setdefault("workload", next(iter(config["workloads"])))
    ghost = config["ghost"]
    ghost["batch_size"] = ghost["batch_size"] or sizes[-1]
    ghost["small_batch_size"] = ghost["small_batch_size"] or sizes[0]
    noise = config["noise"]
    if noise["reference_batch_size"] is None:  # the grid's size nearest 64, the smaller on a tie
        noise["reference_batch_size"] = min(sizes, key=lambda b: (abs(math.log(b / 64)), b))
    if noise["reference_seed"] is None:
        noise["reference_seed"] = seeds[0]
    noise["min_pairs"] = min(MIN_PAIRS, noise["pairs"]) if noise["min_pairs"] is None else noise["min_pairs"]
    # b_big null: the whole evaluation set. A b_big at most the grid's smallest size: a quarter of that
    noise["b_small"] = noise["b_small"] or (sizes[0] if noise["b_big"] is None or sizes[0] < noise["b_big"]
                                            else max(1, sizes[0] // 4))  # fmt: skip
    noise["variance_batch_sizes"] = noise["variance_batch_sizes"] or [b for b in sizes if b >= 2]


def _check_noise(config: dict[str, Any]) -> None:
    settings = config["noise"]
    sizes = sorted(config["grid"]["batch_sizes"])
    # the reference run: trained in every study (the quick estimate is the report's first section)
    if settings["reference_batch_size"] not in sizes:
        raise ConfigError(f"noise.reference_batch_size: {settings['reference_batch_size']} is not in grid.batch_sizes")
    if settings["reference_seed"] not in config["grid"]["seeds"]:
        raise ConfigError(f"noise.reference_seed: {settings['reference_seed']} is not in grid.seeds")
    index = settings["reference_lr_index"]
    for name, wl in config["workloads"].items():
        count = len(learning_rates(wl, settings["reference_batch_size"]))
        if index is not None and index >= count:
            raise ConfigError(
                f"noise.reference_lr_index: {index} is past workload {name!r}'s learning rates: it has {count} "
                f"(indices 0 to {count - 1})"
            )
    if not settings["enabled"] and config["study"] != "adaptive":  # the adaptive study reads the quick estimate
        return
    if settings["b_big"] is not None and settings["b_small"] >= settings["b_big"]:
        raise ConfigError(f"noise.b_small: {settings['b_small']} is not smaller than noise.b_big {settings['b_big']}")
    if settings["min_pairs"] > settings["pairs"]:
        raise ConfigError(f"noise.min_pairs: {settings['min_pairs']} exceeds noise.pairs {settings['pairs']}")
    jensen = settings["jensen"]
    population = settings["eval_size"]  # the sizes drawn from it against the data: check_sizes
    if population is not None:  # (b_small against it: check_sizes, with the data's own size)
        drawn = [("noise.b_big", settings["b_big"])] if settings["b_big"] is not None else []
        drawn += [("noise.variance_batch_sizes", b) for b in sorted(settings["variance_batch_sizes"])]
        drawn += [("noise.jensen.subspace_sizes", m) for m in sorted(jensen["subspace_sizes"])]
        for key, value in drawn:
            if value > population:
                raise ConfigError(f"{key}: {value} exceeds noise.eval_size {population}, the examples it is drawn from")
    small = [m for m in jensen["sizes"] if m <= jensen["dim"] + 1]
    if small:
        raise ConfigError(f"noise.jensen.sizes: {small[0]} is not above dim + 1 = {jensen['dim'] + 1}")


def kept_fractions(count: int) -> list[float]:
    """The fractions of the reference run at which it keeps its states (noise.kept_snapshots of them)."""
    return [i / (count - 1) for i in range(count)]


def format_fraction(fraction: float) -> str:
    """A snapshot fraction as a path's wildcard (the branch jobs' files): 0.25 -> "0.25", 1.0 -> "1"."""
    return f"{float(fraction):g}"


def branch_batch_sizes(factors: list[float], batch_size: int) -> list[int]:
    """The branches' batch sizes: each factor k (sorted) times the reference batch size, rounded, at least 1."""
    return [max(1, int(round(k * batch_size))) for k in sorted(factors)]


def _check_branch(config: dict[str, Any]) -> None:
    """Distinct factors must give distinct branch batch sizes (the schema sees the factors, not their product), and
    distinct snapshot fractions distinct file names (the branch jobs' wildcards, :func:`format_fraction`)."""
    settings, b_ref = config["branch"], config["noise"]["reference_batch_size"]
    named: dict[str, float] = {}
    for fraction in config["noise"]["snapshot_fractions"]:
        name = format_fraction(fraction)
        if name in named:
            raise ConfigError(f"noise.snapshot_fractions: {fraction} and {named[name]} are both named {name!r} "
                              "(six significant digits): give fractions that differ there")  # fmt: skip
        named[name] = fraction
    if not settings["enabled"]:
        return
    sizes = branch_batch_sizes(settings["factors"], b_ref)
    for k, size, previous in zip(sorted(settings["factors"])[1:], sizes[1:], sizes[:-1], strict=True):
        if size == previous:
            raise ConfigError(f"branch.factors: {k} gives the branch batch size {size} of the factor below it at "
                              f"noise.reference_batch_size {b_ref}")  # fmt: skip


def noise_reference(config: dict[str, Any], workload: str) -> tuple[int, float, int]:
    """(batch size, learning rate, seed) of the run whose snapshots the noise stage measures."""
    settings = config["noise"]
    lrs = learning_rates(config["workloads"][workload], settings["reference_batch_size"])
    index = settings["reference_lr_index"]
    index = len(lrs) // 2 if index is None else index  # validate() refuses one past the grid
    return settings["reference_batch_size"], lrs[index], settings["reference_seed"]


def _check_ghost(config: dict[str, Any]) -> None:
    settings = config["ghost"]
    batch_sizes = sorted(config["grid"]["batch_sizes"])
    if not settings["enabled"]:
        return
    name = settings.get("workload")
    if name not in config["workloads"]:
        raise ConfigError(f"ghost.workload: {name!r} is not a workload ({', '.join(config['workloads'])})")
    if "model" not in config["workloads"][name]:
        raise ConfigError(f"ghost.workload: {name!r} has a factory; the experiment needs a built-in model with norm")
    norm = config["workloads"][name]["model"]["norm"]
    if norm != "batch":
        raise ConfigError(f"ghost.workload: workload {name!r} has model norm {norm!r}; the experiment needs 'batch'")
    for key in ("batch_size", "small_batch_size"):
        if settings[key] not in batch_sizes:
            raise ConfigError(f"ghost.{key}: {settings[key]} is not in grid.batch_sizes {batch_sizes}")
    too_big = [g for g in settings["ghost_sizes"] if g >= settings["batch_size"]]
    if too_big:
        raise ConfigError(
            f"ghost.ghost_sizes: {too_big[0]} is not smaller than the physical batch {settings['batch_size']}"
        )


def load(path: str | Path, overrides: dict[str, Any] | None = None, importable: bool = True) -> dict[str, Any]:
    """Read a YAML config (safe loader: nothing in it is ever evaluated), apply overrides, validate."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    config = config if config is not None else {}
    if isinstance(config, dict):
        config.update(overrides or {})
    return validate(config, importable)


# ---------------------------------------------------------------------------------------------- the grid


def format_lr(lr: float) -> str:
    """The learning rate as it appears in paths: 4 significant digits; the rounded value is the one used."""
    return f"{lr:.4g}"


def learning_rates(workload: dict[str, Any], batch_size: int) -> list[float]:
    """The learning-rate grid at ``batch_size`` (Shallue et al.: tuned per batch size, not one fixed lr)."""
    if "learning_rates" in workload:
        lrs = workload["learning_rates"]
    else:
        rule = workload["lr_scaling"]
        ratio = batch_size / rule["reference_batch_size"]
        factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule["rule"]]
        lrs = [base * factor for base in rule["base_lrs"]]
    return sorted({float(format_lr(lr)) for lr in lrs})


def profile_batch_sizes(config: dict[str, Any]) -> list[int]:
    return sorted(set(config["grid"]["batch_sizes"]) | set(config["profile"]["extra_batch_sizes"]))


def train_points(config: dict[str, Any], workload: str) -> list[tuple[int, float, int]]:
    """(batch_size, lr, seed) of every training run of ``workload``."""
    wl = config["workloads"][workload]
    return [
        (b, lr, seed)
        for b in sorted(config["grid"]["batch_sizes"])
        for lr in learning_rates(wl, b)
        for seed in config["grid"]["seeds"]
    ]


# ------------------------------------------------------------------------------ what every stage's slice shares
# Each stage's own slice (its module under batchscope.stages) holds only what changes its result, so Snakemake's
# params trigger reruns exactly what a config change touches.


def execution(config: dict[str, Any]) -> dict[str, Any]:
    """Where and how a computing stage runs: device, threads and numerics (every computing stage's slice)."""
    return {key: config[key] for key in ("device", "threads", "deterministic", "tf32")}


def workload_slice(config: dict[str, Any], workload: str) -> dict[str, Any]:
    """What the workload's factory is called with: what defines the model, the data and how they are run."""
    wl = config["workloads"][workload]
    spec = {"name": workload, "factory": wl.get("factory", BUILTIN_FACTORY)}
    spec.update({k: wl[k] for k in ("dataset", "model", "options") if k in wl})
    return {**spec, "loader": wl["loader"], "precision": wl["precision"], "compile": wl["compile"]}


def ghost_workload(config: dict[str, Any], workload: str, ghost_size: int) -> dict[str, Any]:
    """The workload slice with its BatchNorm replaced by Ghost BatchNorm of ``ghost_size``."""
    spec = workload_slice(config, workload)
    return {**spec, "model": {**spec["model"], "norm": "ghost", "ghost_batch_size": ghost_size}}
