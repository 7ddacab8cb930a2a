"""Config validation: defaults, the grid, per-stage slices, and malformed configs refused with their key."""

import copy
from pathlib import Path

import pytest
import yaml

from batchscope import config as cfg
from batchscope.stages import profile as stage_profile
from batchscope.stages import train as stage_train

REPO = Path(__file__).resolve().parents[1]


def base() -> dict:
    return {
        "grid": {"batch_sizes": [8, 64]},
        "workloads": {
            "w": {
                "dataset": {"name": "digits"},
                "model": {"name": "mlp"},
                "target": {"metric": "val_accuracy", "value": 0.9},
                "max_steps": 100,
                "learning_rates": [0.1],
            }
        },
    }


def test_defaults_are_filled_in():
    config = cfg.validate(base())
    assert config["device"] == "auto" and config["threads"] == 1
    assert config["grid"]["seeds"] == [0]
    assert config["profile"] == {
        "extra_batch_sizes": [],
        "warmup": 50,
        "rounds": 6,
        "repeats": 3,
        "min_repeat_time": 0.02,
    }
    assert config["fit"] == {"bootstrap": 300, "seed": 0, "tolerance": 0.05}
    wl = config["workloads"]["w"]
    assert wl["dataset"] == {"name": "digits", "val_fraction": 0.2, "seed": 0}
    assert wl["model"] == {"name": "mlp", "widths": [128], "norm": "none"}
    assert wl["optimizer"]["name"] == "sgd" and wl["optimizer"]["momentum"] == 0.9
    assert wl["eval_interval"] == 10 and wl["stop_at_target"] is True


def test_validate_does_not_modify_its_input():
    config = base()
    before = copy.deepcopy(config)
    cfg.validate(config)
    assert config == before


@pytest.mark.parametrize("path", sorted((REPO / "config").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path, tmp_path):
    """Valid as shipped; a config reading local files (config/gpu.yaml: CIFAR-10) is refused only for its missing
    data directory, and valid once that exists."""
    config = yaml.safe_load(path.read_text())
    local = [w for w in config["workloads"].values() if "data_dir" in w.get("dataset", {})]
    if any(not Path(w["dataset"]["data_dir"]).is_dir() for w in local):
        with pytest.raises(cfg.ConfigError, match="data_dir: .* is not a directory; batchscope reads"):
            cfg.load(path)
        for workload in local:
            workload["dataset"]["data_dir"] = str(tmp_path)
        cfg.validate(config)
    else:
        cfg.load(path)


def _set(config, dotted, value):
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()

MALFORMED = [
    # (dotted key, bad value, text the message must contain)
    ("device", "tpu", "device: 'tpu'"),
    ("threads", 0, "threads: 0"),
    ("grid.batch_sizes", [], "grid.batch_sizes: []"),
    ("grid.batch_sizes", [8, -4], "grid.batch_sizes.1: -4"),
    ("grid.batch_sizes", [8, "64"], "grid.batch_sizes.1: '64'"),
    ("grid.seeds", [0, 0], "grid.seeds: [0, 0]"),
    ("grid.color", "red", "grid.color: unknown key 'color'"),
    ("profile", {"repeats": 0}, "profile.repeats: 0"),
    ("profile", {"rounds": 2}, "profile.rounds: 2"),
    ("workloads.w.dataset", {"name": "imagenet"}, "workloads.w.dataset.name: 'imagenet'"),
    ("workloads.w.model", {"name": "transformer"}, "workloads.w.model.name: 'transformer'"),
    ("workloads.w.learning_rates", [0.1, 0.0], "workloads.w.learning_rates.1: 0.0"),
    ("workloads.w.learning_rates", [-1], "workloads.w.learning_rates.0: -1"),
    ("workloads.w.max_steps", 0, "workloads.w.max_steps: 0"),
    ("workloads.w.max_steps", 2.5, "workloads.w.max_steps: 2.5"),
    ("workloads.w.target", {"metric": "val_accuracy", "value": 1.5}, "workloads.w.target.value: 1.5"),
    ("workloads.w.target", {"metric": "val_loss", "value": -1}, "workloads.w.target.value: -1"),
    ("workloads.w.target", {"metric": "f1", "value": 0.5}, "workloads.w.target.metric: 'f1'"),
    ("workloads.w.dataset", {"name": "mnist"}, "workloads.w.dataset.data_dir: required"),
    (
        "workloads.w.dataset",
        {"name": "mnist", "data_dir": "/no/such/dir"},
        "'/no/such/dir' is not a directory",
    ),
    ("workloads.w.dataset", {"name": "digits", "noise_std": 1}, "workloads.w.dataset.noise_std"),
    ("workloads.w.model", {"name": "mlp", "channels": [4]}, "workloads.w.model.channels"),
    (
        "workloads.w.lr_scaling",
        {"base_lrs": [0.1], "reference_batch_size": 32, "rule": "sqrt"},
        "exactly one of",
    ),
    ("workloads.w.learning_rates", _DELETE, "exactly one of"),
    ("workloads.w.eval_interval", 500, "workloads.w.eval_interval: 500 exceeds max_steps 100"),
    ("workloads.w.momentum", 0.9, "workloads.w.momentum: unknown key 'momentum'"),
    ("grid.batch_sizes", [8, 4096], "grid.batch_sizes: 4096 exceeds the 1437 training examples"),
    ("noise", {"eval_size": 5000}, "noise.eval_size: 5000 exceeds the 1437 training examples of workload 'w'"),
    ("noise", {"eval_size": 32, "b_big": 64}, "noise.b_big: 64 exceeds noise.eval_size 32"),
    (
        "noise",
        {"eval_size": 128, "b_small": 128, "jensen": {"subspace_sizes": [32]}},
        "noise.b_small: 128 is not smaller than the 128 examples",
    ),
    ("noise", {"b_small": 1437}, "noise.b_small: 1437 is not smaller than the 1437 examples"),
    (
        "noise",
        {"eval_size": 100, "jensen": {"subspace_sizes": [32, 256]}},
        "noise.jensen.subspace_sizes: 256 exceeds noise.eval_size 100",
    ),
    ("noise", {"eval_size": 1}, "noise.eval_size: 1"),
    ("noise", {"chunk_size": 0}, "noise.chunk_size: 0"),
    ("hessian", {"cache_mb": -1}, "hessian.cache_mb: -1"),
    # NaN and infinity: YAML's .nan and .inf are floats the schema's bounds let through (NaN compares false)
    ("workloads.w.learning_rates", [0.1, float("nan")], "workloads.w.learning_rates.1: nan is invalid: a setting"),
    ("workloads.w.learning_rates", [float("inf")], "workloads.w.learning_rates.0: inf is invalid"),
    ("workloads.w.target", {"metric": "val_accuracy", "value": float("nan")}, "workloads.w.target.value: nan"),
    ("profile", {"min_repeat_time": float("inf")}, "profile.min_repeat_time: inf is invalid"),
    ("fit", {"tolerance": float("-inf")}, "fit.tolerance: -inf is invalid"),
    ("noise", {"reference_lr_index": 1}, "noise.reference_lr_index: 1 is past workload 'w''s learning rates: it has 1"),
    # the reference run is trained with the noise stage off too (the quick estimate): checked then as well
    ("noise", {"enabled": False, "reference_lr_index": 5}, "noise.reference_lr_index: 5 is past workload 'w''s"),
    ("workloads", {}, "workloads: {} is invalid"),
    ("workloads", {"1bad": base()["workloads"]["w"]}, "invalid name '1bad'"),
]


@pytest.mark.parametrize(("key", "value", "expected"), MALFORMED, ids=[m[0] + "=" + repr(m[1])[:20] for m in MALFORMED])
def test_malformed_config_is_refused_naming_key_and_value(key, value, expected):
    config = base()
    _set(config, key, value)
    with pytest.raises(cfg.ConfigError) as err:
        cfg.validate(config)
    assert expected in str(err.value)


def test_cnn_needs_images():
    config = base()
    config["workloads"]["w"].update(
        dataset={"name": "linreg"}, model={"name": "cnn"}, target={"metric": "val_loss", "value": 0.5}
    )
    with pytest.raises(cfg.ConfigError, match="'cnn' needs image data, but dataset 'linreg'"):
        cfg.validate(config)


def test_yaml_is_never_evaluated(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("device: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(cfg.ConfigError, match="not valid YAML"):
        cfg.load(path)
    assert not (tmp_path / "pwned").exists()


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(cfg.ConfigError, match="must be a mapping"):
        cfg.load(path)


@pytest.mark.parametrize(("rule", "expected"), [("none", 0.1), ("linear", 0.4), ("sqrt", 0.2)])
def test_lr_scaling_rules(rule, expected):
    wl = {"lr_scaling": {"base_lrs": [0.1], "reference_batch_size": 32, "rule": rule}}
    assert cfg.learning_rates(wl, 128) == [pytest.approx(expected)]


def test_scaled_lrs_are_rounded_to_their_path_form():
    wl = {"lr_scaling": {"base_lrs": [0.1], "reference_batch_size": 32, "rule": "sqrt"}}
    (lr,) = cfg.learning_rates(wl, 64)
    assert cfg.format_lr(lr) == "0.1414" and lr == 0.1414


def test_slices_isolate_what_each_stage_depends_on():
    config = cfg.validate(base())
    changed = copy.deepcopy(config)
    changed["workloads"]["w"]["learning_rates"] = [0.05, 0.2]
    changed["workloads"]["w"]["target"]["value"] = 0.8
    # learning rates live in the paths/params, not the slices; the target does not touch profiling
    assert stage_profile.config_slice(config, "w") == stage_profile.config_slice(changed, "w")
    assert stage_train.config_slice(config, "w") != stage_train.config_slice(changed, "w")  # target changed
    changed["workloads"]["w"]["target"]["value"] = 0.9
    assert stage_train.config_slice(config, "w") == stage_train.config_slice(changed, "w")
    changed["profile"]["repeats"] = 30
    assert stage_profile.config_slice(config, "w") != stage_profile.config_slice(changed, "w")
    assert stage_train.config_slice(config, "w") == stage_train.config_slice(changed, "w")


def test_default_config_grid(repo):
    config = cfg.load(repo / "config" / "config.yaml")
    points = cfg.train_points(config, "digits_mlp")
    assert len(points) == 8 * 3 * 3
    assert yaml.safe_load((repo / "config" / "config.yaml").read_text())["device"] == "auto"


def test_edge_of_stability_names_an_existing_workload():
    config = base()
    config["edge_of_stability"] = {"enabled": True, "workload": "nope"}
    with pytest.raises(cfg.ConfigError, match="edge_of_stability.workload: 'nope' is not a workload"):
        cfg.validate(config)
    assert cfg.validate(base())["edge_of_stability"]["workload"] == "w"  # defaults to the first workload


def _with_ghost(**ghost):
    config = base()
    config["workloads"]["w"]["model"] = {"name": "cnn", "norm": "batch"}
    config["ghost"] = {"enabled": True, "workload": "w", **ghost}
    return config


def test_ghost_defaults_to_the_grid_ends():
    config = cfg.validate(_with_ghost(ghost_sizes=[16]))
    assert (config["ghost"]["batch_size"], config["ghost"]["small_batch_size"]) == (64, 8)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"ghost_sizes": [64]}, "ghost.ghost_sizes: 64 is not smaller than the physical batch 64"),
     ({"batch_size": 128}, "ghost.batch_size: 128 is not in grid.batch_sizes"),
     ({"workload": "x"}, "ghost.workload: 'x' is not a workload")],
)  # fmt: skip
def test_ghost_errors(change, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.validate(_with_ghost(**change))


def test_ghost_needs_a_batchnorm_workload():
    config = _with_ghost()
    config["workloads"]["w"]["model"]["norm"] = "none"
    with pytest.raises(cfg.ConfigError, match="has model norm 'none'; the experiment needs 'batch'"):
        cfg.validate(config)


def test_branch_factors_that_round_to_one_batch_size_are_refused():
    config = base()
    config["noise"] = {"reference_batch_size": 2}
    config["branch"] = {"enabled": True, "factors": [0.25, 0.5, 1.0, 2.0]}
    with pytest.raises(cfg.ConfigError, match=r"branch.factors: 0.5 gives the branch batch size 1 of the factor below "
                       r"it at noise.reference_batch_size 2"):  # fmt: skip
        cfg.validate(config)
    config["noise"] = {"reference_batch_size": 8}  # 2, 4, 8, 16: distinct
    assert cfg.branch_batch_sizes(cfg.validate(config)["branch"]["factors"], 8) == [2, 4, 8, 16]


def test_snapshot_fractions_that_share_a_name_are_refused():
    config = base()
    config["noise"] = {"snapshot_fractions": [0.0, 0.3333331, 0.3333332, 1.0]}
    with pytest.raises(cfg.ConfigError, match=r"noise.snapshot_fractions: 0.3333332 and 0.3333331 are both named "
                       r"'0.333333'"):  # fmt: skip
        cfg.validate(config)
    assert [cfg.format_fraction(f) for f in (0.0, 0.25, 1.0, 1e-05)] == ["0", "0.25", "1", "1e-05"]
