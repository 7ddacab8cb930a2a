"""Generated malformed configs (hypothesis): every one is refused with a message naming the key and the value,
and no string in a config is ever run as code."""

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchscope import config as cfg

BASE = {
    "device": "cpu",
    "threads": 1,
    "grid": {"batch_sizes": [16, 64], "seeds": [0, 1]},
    "profile": {"warmup": 2, "repeats": 3},
    "hessian": {"top_k": 3},
    "noise": {"pairs": 10},
    "workloads": {
        "w": {
            "dataset": {"name": "digits"},
            "model": {"name": "mlp", "widths": [32]},
            "target": {"metric": "val_accuracy", "value": 0.9},
            "max_steps": 100,
            "eval_interval": 10,
            "learning_rates": [0.1],
        }
    },
}
# (path, how the value must look): positions whose wrong type, sign or size the generator tries
INTEGER_PATHS = [
    ("threads",), ("profile", "warmup"), ("profile", "repeats"), ("hessian", "top_k"), ("noise", "pairs"),
    ("workloads", "w", "max_steps"), ("workloads", "w", "eval_interval"),
]  # fmt: skip
MINIMUM = dict(zip(INTEGER_PATHS, [1, 0, 1, 1, 2, 1, 1], strict=True))  # each path's smallest valid value
LIST_PATHS = [("grid", "batch_sizes"), ("grid", "seeds"), ("workloads", "w", "learning_rates")]
DICT_PATHS = [(), ("grid",), ("profile",), ("hessian",), ("noise",), ("workloads", "w"), ("workloads", "w", "target"),
              ("workloads", "w", "dataset"), ("workloads", "w", "model")]  # fmt: skip
CODE = [
    "__import__('os').system('touch {marker}')",
    "exec(\"open('{marker}', 'w')\")",
    "{{{{ __import__('os').system('touch {marker}') }}}}",
    "$(touch {marker})",
    "`touch {marker}`",
]
OUTCOMES: list[dict] = []  # for the summary the last test writes


def put(config: dict, path: tuple, value) -> dict:
    config = copy.deepcopy(config)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


wrong_types = st.one_of(
    st.text(min_size=1, max_size=8).filter(lambda s: not s.strip().lstrip("-").isdigit()),
    st.booleans(),
    st.dictionaries(st.text(min_size=1, max_size=3), st.integers(), min_size=1, max_size=2),
    st.lists(st.text(max_size=3), min_size=1, max_size=2),
)


def schema_keys(path: tuple) -> set[str]:
    """Every key the schema allows at ``path`` (any variant's, for the tagged dataset and model)."""
    definitions = cfg.schema()["definitions"]
    if path[:2] == ("workloads", "w"):
        node = definitions["workload"] if len(path) == 2 else definitions.get(path[2])
        node = node or definitions["workload"]["properties"][path[2]]
    else:
        node = cfg.schema()
        for part in path:
            node = node["properties"][part]
    keys = set(node.get("properties", {}))
    for branch in node.get("allOf", []):
        keys |= set(branch["then"]["properties"])
    return keys


@st.composite
def malformed(draw) -> tuple[dict, str, str]:
    """(config, key that must be named, text of the value that must be named)."""
    kind = draw(st.sampled_from(["type", "too_small", "empty", "unknown_key", "enum", "data_dir", "lr", "target"]))
    if kind == "type":
        path = draw(st.sampled_from(INTEGER_PATHS + LIST_PATHS))
        value = draw(wrong_types)
        if path in LIST_PATHS and isinstance(value, list):  # a list of wrong items: the first is named
            return put(BASE, path, value), path[-1], repr(value[0])
        return put(BASE, path, value), path[-1], repr(value)
    if kind == "too_small":
        path = draw(st.sampled_from(INTEGER_PATHS))
        value = draw(st.integers(max_value=MINIMUM[path] - 1, min_value=-(10**6)))
        return put(BASE, path, value), path[-1], repr(value)
    if kind == "empty":
        path = draw(st.sampled_from(LIST_PATHS))
        return put(BASE, path, []), path[-1], "[]"
    if kind == "unknown_key":
        path = draw(st.sampled_from(DICT_PATHS))
        key = draw(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True))
        node = BASE
        for part in path:
            node = node[part]
        if key in node or key in schema_keys(path):  # a key the schema knows is not unknown
            key = f"zz_{key}"
        return put(BASE, (*path, key), 1), key, key
    if kind == "enum":
        where = draw(st.sampled_from([("workloads", "w", "dataset", "name"), ("workloads", "w", "model", "name"),
                                      ("device",), ("workloads", "w", "target", "metric")]))  # fmt: skip
        value = draw(st.text(min_size=1, max_size=12))
        allowed = {"digits", "linreg", "teacher", "mnist", "fashion_mnist", "cifar10", "mlp", "cnn", "auto", "cpu",
                   "cuda", "val_accuracy", "val_loss", "val_metric"}  # fmt: skip
        value = value if value not in allowed else value + "x"
        return put(BASE, where, value), where[-1], repr(value)
    if kind == "data_dir":
        name = draw(st.sampled_from(["mnist", "fashion_mnist", "cifar10"]))
        missing = "/nonexistent/" + draw(st.from_regex(r"[a-z]{1,8}", fullmatch=True))
        return put(BASE, ("workloads", "w", "dataset"), {"name": name, "data_dir": missing}), "data_dir", missing
    if kind == "lr":
        value = draw(st.one_of(st.just(0.0), st.floats(max_value=0, allow_nan=False, allow_infinity=False)))
        return put(BASE, ("workloads", "w", "learning_rates"), [0.1, value]), "learning_rates", repr(value)
    metric = draw(st.sampled_from(["val_accuracy", "val_loss"]))
    if metric == "val_accuracy":
        value = draw(st.one_of(st.floats(min_value=1.0, exclude_min=True, max_value=1e6),
                               st.floats(max_value=0.0, min_value=-1e6)))  # fmt: skip
    else:
        value = draw(st.floats(max_value=0.0, min_value=-1e6))
    return put(BASE, ("workloads", "w", "target"), {"metric": metric, "value": value}), "target", repr(value)


def test_the_base_config_is_valid():
    cfg.validate(BASE)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed())
def test_malformed_configs_are_refused_naming_key_and_value(case):
    config, key, value = case
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.validate(config)
    message = str(caught.value)
    named = key in message and (value in message or value.strip("'") in message)
    OUTCOMES.append({"refused": True, "named": named})
    assert key in message, message
    assert value in message or value.strip("'") in message, message


@settings(max_examples=60, deadline=None)
@given(
    template=st.sampled_from(CODE),
    where=st.sampled_from([("device",), ("workloads", "w", "dataset", "name"), ("workloads", "w", "model", "name"),
                           ("workloads", "w", "target", "metric"), ("workloads", "w", "factory")]),
)  # fmt: skip
def test_config_strings_are_never_run_as_code(tmp_path_factory, template, where):
    marker = tmp_path_factory.mktemp("code") / "ran"
    text = template.format(marker=marker)
    config = put(BASE, where, text)
    if where[-1] == "factory":
        config["workloads"]["w"].pop("dataset")
        config["workloads"]["w"].pop("model")
    with pytest.raises(cfg.ConfigError):
        cfg.validate(config)
    # where any string is allowed (a factory's options), it is kept as data
    accepted = cfg.validate(put(BASE, ("workloads", "w"), {**{k: v for k, v in BASE["workloads"]["w"].items()
                                                              if k not in ("dataset", "model")},
                                                           "factory": "tests.factories.bad:good",
                                                           "options": {"x": text}}))  # fmt: skip
    assert cfg.workload_slice(accepted, "w")["options"]["x"] == text
    assert not marker.exists()


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "config.yaml"
    path.write_text(f"device: !!python/object/apply:os.system ['touch {marker}']\ngrid: {{batch_sizes: [8]}}\n")
    with pytest.raises(cfg.ConfigError, match="not valid YAML"):
        cfg.load(path)
    assert not marker.exists()


def test_write_the_generated_config_summary(artifacts):
    """Runs last in this file: how many malformed configs were generated and refused (for the closing note)."""
    assert OUTCOMES, "the property test did not run"
    summary = {"generated": len(OUTCOMES), "refused": sum(o["refused"] for o in OUTCOMES),
               "named_key_and_value": sum(o["named"] for o in OUTCOMES)}  # fmt: skip
    Path(artifacts / "malformed_configs.json").write_text(json.dumps(summary))
    assert summary["refused"] == summary["generated"] == summary["named_key_and_value"]
