"""Your own workload: the factory protocol, its error messages, schedules, precision and the streaming path."""

import copy
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from batchscope import config as cfg
from batchscope.engine import profiling as profile
from batchscope.engine import runtime
from batchscope.engine.training import train
from batchscope.stages import profile as stage_profile
from batchscope.stages import train as stage_train
from batchscope.workloads.base import WorkloadError, build

CPU = torch.device("cpu")
BAD = "tests.factories.bad:"


def workload_spec(factory: str, **extra) -> dict:
    loader = {"stream": False, "workers": 0, "pin_memory": True, "analysis_examples": 64}
    return {"name": "w", "factory": factory, "options": {}, "loader": loader, "precision": "fp32",
            "compile": False, **extra}  # fmt: skip


def digits_config(**overrides) -> dict:
    return cfg.validate({
        "device": "cpu", "grid": {"batch_sizes": [64]},
        "workloads": {"w": {
            "dataset": {"name": "digits"}, "model": {"name": "mlp", "widths": [32]},
            "target": {"metric": "val_accuracy", "value": 0.9}, "max_steps": 300, "eval_interval": 10,
            "learning_rates": [0.1], **overrides,
        }},
    })  # fmt: skip


def test_a_good_factory_is_built_and_seeded():
    first, again, other = (build(workload_spec(BAD + "good"), CPU, seed=s) for s in (3, 3, 4))
    assert torch.equal(first.model.weight, again.model.weight)  # the seed decides the initialisation
    assert not torch.equal(first.model.weight, other.model.weight)
    assert first.spec["factory"] == BAD + "good" and not first.streamed


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("returns_tuple", "returned a tuple; expected batchscope.Workload"),
        ("data_elsewhere", "train inputs are on meta but the model is on cpu"),
        ("model_elsewhere", "the model has parameters on meta, not on cpu"),
        ("metric_not_a_number", "metric 'vibes' returned 'great' (str); expected a number"),
        ("metric_nan", "metric 'accuracy' returned nan"),
        ("loss_per_example", "loss returned Tensor (2,); expected a scalar tensor"),
        ("not_a_model", "model is a function, not a torch nn.Module"),
        ("list_data", "train is a list; expected (inputs, targets) tensors or a torch.utils.data.Dataset"),
        ("nan_data", "train inputs hold 2 NaN or infinite value(s), the first in example 5"),
        ("NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not a function"),
        ("missing", "module 'tests.factories.bad' has no attribute 'missing'"),
    ],
)
def test_each_bad_factory_gets_its_message(name, message):
    with pytest.raises(WorkloadError, match=re.escape(message)) as caught:
        build(workload_spec(BAD + name), CPU)
    assert BAD + name in str(caught.value)  # the message names the factory


def test_a_module_that_fails_on_import_is_named():
    with pytest.raises(WorkloadError, match=r"module 'tests.factories.broken_import' is not importable \(RuntimeError"):
        build(workload_spec("tests.factories.broken_import:f"), CPU)


@pytest.mark.parametrize(
    ("workload", "message"),
    [
        ({"factory": "nosuch.workloads:make"}, "workloads.w.factory: 'nosuch.workloads:make': module 'nosuch.workloads'"
                                               " is not importable"),
        ({"factory": "mypkg.workloads.make"}, "workloads.w.factory: 'mypkg.workloads.make' is invalid"),
        ({"factory": BAD + "good", "dataset": {"name": "digits"}}, "workloads.w.dataset: a workload with factory"),
        ({"dataset": {"name": "digits"}}, "workloads.w.model: required"),
        ({"dataset": {"name": "digits"}, "model": {"name": "mlp"}, "options": {"a": 1}},
         "workloads.w.options: {'a': 1}: options go to a factory"),
        ({"factory": BAD + "good", "optimizer": {"name": "sgd", "momentum": 0.0, "nesterov": True}},
         "workloads.w.optimizer.nesterov: true needs momentum > 0"),
        ({"factory": BAD + "good", "schedule": {"warmup_steps": 500}}, "workloads.w.schedule.warmup_steps: 500"),
        ({"factory": BAD + "good", "precision": "fp8"}, "workloads.w.precision: 'fp8' is invalid"),
    ],
)  # fmt: skip
def test_bad_workload_configs_are_refused(workload, message):
    config = {
        "grid": {"batch_sizes": [8]},
        "workloads": {
            "w": {
                "target": {"metric": "val_metric", "value": 0.5},
                "max_steps": 100,
                "learning_rates": [0.1],
                **workload,
            }
        },
    }
    with pytest.raises(cfg.ConfigError, match=re.escape(message)):
        cfg.validate(config)


def test_the_cli_refuses_a_bad_factory_before_any_work(tmp_path, venv_env, repo):
    spec = json.dumps({"workload": workload_spec(BAD + "metric_not_a_number")})
    result = subprocess.run(
        [sys.executable, "-m", "batchscope", "prepare-data", "--spec", spec, "--out", str(tmp_path / "w.nc")],
        capture_output=True, text=True, env={**venv_env, "PYTHONPATH": str(repo)}, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "metric 'vibes' returned 'great'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "w.nc").exists()


@pytest.mark.parametrize("decay", ["constant", "cosine", "step"])
def test_schedule_follows_its_closed_form_in_a_real_optimizer(decay):
    spec = {"warmup_steps": 5, "decay": decay, "min_factor": 0.1, "step_size": 7, "gamma": 0.5}
    total = 40

    def expected(t):  # written out independently of runtime.lr_factor
        if t < 5:
            return (t + 1) / 5
        if decay == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min((t - 5) / 35, 1.0)))
        return 0.5 ** ((t - 5) // 7) if decay == "step" else 1.0

    parameter = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    sgd = {"name": "sgd", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
    optimizer = runtime.make_optimizer(sgd, [parameter], lr=0.2)
    scheduler = runtime.make_schedule(optimizer, spec, total)
    used, moved = [], []
    for _ in range(total + 3):
        used.append(optimizer.lr)  # the rate this update uses
        parameter.grad = torch.ones(1, dtype=torch.float64)
        before = parameter.item()
        optimizer.step()
        moved.append(before - parameter.item())  # and the update it made: lr x gradient 1
        scheduler.step()
    rates = [0.2 * expected(t) for t in range(total + 3)]
    # the rates: the same products in another order, so equal to rounding (1e-16); 1e-12 leaves room for that only
    np.testing.assert_allclose(used, rates, rtol=1e-12)
    # the moves: a difference of two float64 weights of size up to the summed rates (~5), so its rounding is up to
    # ~1e-15 x 5 against a move of >= 0.004 (the first warm-up step): about 1e-12 relative; 1e-9 is well above it
    np.testing.assert_allclose(moved, rates, rtol=1e-9)
    assert runtime.make_schedule(optimizer, {**spec, "warmup_steps": 0, "decay": "constant"}, total) is None


OPTIMIZERS = [
    {"name": "sgd", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"name": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4},
    {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
    {"name": "adamw", "betas": [0.9, 0.999], "weight_decay": 0.01},
]
OPTIMIZER_IDS = ["sgd", "momentum", "nesterov", "adamw"]


def assert_updates_as_torch_optim(spec: dict, device: torch.device) -> None:
    """runtime.Optimizer (torch.optim's functional updates, without the classes' dynamo import) against
    torch.optim.SGD / AdamW themselves: the same weights, bit for bit, after 30 updates of an MLP under a warm-up
    and cosine schedule (torch's LambdaLR on the classes), a parameter without a gradient on some steps (the first
    included) among them. On CUDA both take torch's foreach path (tests/test_cuda.py)."""
    schedule = {"warmup_steps": 5, "decay": "cosine", "min_factor": 0.1, "step_size": 7, "gamma": 0.5}
    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(device)
    extra = torch.nn.Parameter(torch.randn(4, device=device))  # updated on odd steps only
    theirs_model = copy.deepcopy(ours_model)
    theirs_extra = torch.nn.Parameter(extra.detach().clone())
    initial = extra.detach().clone()
    ours = runtime.make_optimizer(spec, [*ours_model.parameters(), extra], lr=0.05)
    ours_schedule = runtime.make_schedule(ours, schedule, 30)
    kwargs = (
        {"momentum": spec["momentum"], "nesterov": spec["nesterov"], "weight_decay": spec["weight_decay"]}
        if spec["name"] == "sgd"
        else {"betas": tuple(spec["betas"]), "weight_decay": spec["weight_decay"]}
    )
    kind = torch.optim.SGD if spec["name"] == "sgd" else torch.optim.AdamW
    theirs = kind([*theirs_model.parameters(), theirs_extra], lr=0.05, **kwargs)
    theirs_schedule = torch.optim.lr_scheduler.LambdaLR(theirs, lambda t: runtime.lr_factor(schedule, t, 30))
    generator = torch.Generator().manual_seed(1)
    for t in range(30):
        x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        x, y = x.to(device), y.to(device)
        for model, p, optimizer, scheduler in ((ours_model, extra, ours, ours_schedule),
                                               (theirs_model, theirs_extra, theirs, theirs_schedule)):  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if t % 2 == 1:  # its first gradient at the second update: its state starts then
                loss = loss + (p**2).sum()
            loss.backward()
            optimizer.step()
            scheduler.step()
    for a, b in zip([*ours_model.parameters(), extra], [*theirs_model.parameters(), theirs_extra], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(extra, initial)  # the parameter without a gradient on even steps moved on the others


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_the_optimizer_updates_as_torch_optim_bit_for_bit(spec):
    assert_updates_as_torch_optim(spec, CPU)


def test_warmup_and_cosine_train_and_are_recorded():
    config = digits_config(schedule={"warmup_steps": 20, "decay": "cosine"},
                           optimizer={"name": "sgd", "momentum": 0.9, "nesterov": True})  # fmt: skip
    ds, _ = train(stage_train.config_slice(config, "w"), 64, 0.1, 0, CPU)
    assert bool(ds["reached_target"]) and ds.attrs["optimizer"] == "sgd"
    assert json.loads(ds.attrs["schedule"])["decay"] == "cosine"


def test_adamw_trains():
    config = digits_config(optimizer={"name": "adamw"})
    ds, _ = train(stage_train.config_slice(config, "w"), 64, 0.003, 0, CPU)
    assert bool(ds["reached_target"]) and ds.attrs["optimizer"] == "adamw"


def test_streaming_path_trains_like_the_device_path_and_is_profiled():
    """The same digits workload read through a DataLoader: the same batches cannot be promised (the loader
    draws its own permutation), but the run reaches the target within a similar number of steps, and the
    record and the profile say which path was used."""
    device_run, _ = train(stage_train.config_slice(digits_config(), "w"), 64, 0.1, 0, CPU)
    config = digits_config(loader={"stream": True, "workers": 1})
    stream_run, _ = train(stage_train.config_slice(config, "w"), 64, 0.1, 0, CPU)
    assert device_run.attrs["data_path"] == "device" and stream_run.attrs["data_path"] == "stream"
    assert bool(stream_run["reached_target"])
    assert 0.5 <= float(stream_run["steps_to_target"]) / float(device_run["steps_to_target"]) <= 2.0
    settings = {**stage_profile.config_slice(config, "w"), "profile": {"warmup": 2, "rounds": 3, "repeats": 1,
                                                              "min_repeat_time": 0.002}}  # fmt: skip
    prof = profile.profile(settings, [64], CPU)[64]
    assert prof.attrs["data_path"] == "stream" and prof.attrs["loader_workers"] == 1 and bool(prof["feasible"])


def test_a_batch_larger_than_a_factorys_data_is_refused():
    spec = stage_train.config_slice(digits_config(), "w")
    spec["workload"] = workload_spec(BAD + "good")
    with pytest.raises(ValueError, match="batch size 64 exceeds the 32 training examples"):
        train(spec, 64, 0.1, 0, CPU)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_step_runs_the_forward_pass_in_the_asked_precision(precision, dtype):
    """What the layers compute in, seen from inside the forward pass (a hook on the first Linear): bf16 under
    autocast, fp32 otherwise; the weights and their gradients stay fp32 either way."""
    from batchscope.engine import runtime

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    seen = []
    model[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = runtime.make_step(model, optimizer, torch.nn.functional.cross_entropy, CPU, precision=precision)
    step(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    assert seen == [dtype]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


def test_bf16_autocast_trains_and_is_recorded():
    config = digits_config(precision="bf16")
    ds, checkpoint = train(stage_train.config_slice(config, "w"), 64, 0.1, 0, CPU)
    assert bool(ds["reached_target"]) and ds.attrs["precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in checkpoint["state_dict"].values())  # weights stay fp32
    settings = {**stage_profile.config_slice(config, "w"), "profile": {"warmup": 2, "rounds": 3, "repeats": 1,
                                                              "min_repeat_time": 0.002}}  # fmt: skip
    assert profile.profile(settings, [64], CPU)[64].attrs["precision"] == "bf16"


@pytest.mark.slow
def test_compiled_step_matches_eager(monkeypatch):
    """torch.compile of the step (inductor; ~20 s to compile here) trains to the same step count within one
    evaluation interval (compiled kernels round differently)."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    runtime.setup(1, CPU)  # as the stage does: the CPU's default, deterministic (alone, this test had no one set it)
    eager, _ = train(stage_train.config_slice(digits_config(), "w"), 64, 0.1, 0, CPU)
    counters.clear()
    monkeypatch.setattr(torch._inductor.config, "deterministic", False)  # restored for the later tests
    compiled, _ = train(stage_train.config_slice(digits_config(compile=True), "w"), 64, 0.1, 0, CPU)
    # the CPU's deterministic default reaches the compiled kernels (setup leaves inductor's flag to the compile)
    assert torch._inductor.config.deterministic is True
    # dynamo really captured the forward (an attribute copied from the spec would pass with compile a no-op)
    assert counters["stats"]["unique_graphs"] >= 1 and compiled.attrs["compiled"] == 1
    assert abs(float(compiled["steps_to_target"]) - float(eager["steps_to_target"])) <= 10


@pytest.mark.integration
def test_the_example_factories_run_through_the_whole_workflow(repo, venv_env, tmp_path):
    """examples/own_workload as a user runs it: two factory workloads (one streamed) through every stage."""
    from batchscope.store import read_netcdf

    env = {**venv_env, "PYTHONPATH": str(repo / "examples" / "own_workload")}
    cmd = ["snakemake", "-s", str(repo / "Snakefile"), "--directory", str(tmp_path), "--cores", "2",
           "--configfile", str(repo / "examples/own_workload/config.yaml")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = tmp_path / "results"
    for name, path in (("spirals", "device"), ("spirals_streamed", "stream")):
        record = read_netcdf(results / "data" / f"{name}.nc")
        assert record.attrs["data_path"] == path and int(record.attrs["n_train"]) == 2048
        assert record.attrs["metric_name"] == "macro_f1" and int(record.attrs["parameters"]) == 2307
        assert read_netcdf(results / "profile" / name / "B128.nc").attrs["data_path"] == path
        fit = read_netcdf(results / "fit" / f"{name}.nc")
        assert fit.attrs["data_path"] == path and np.isfinite(float(fit["b_opt"]))
        assert (results / "hessian" / f"{name}.nc").is_file() and (results / "jensen" / f"{name}.nc").is_file()
    # the cosine schedule with AdamW reached macro-F1 0.9 at every batch size
    assert np.isfinite(read_netcdf(results / "fit" / "spirals.nc")["k"].values).all()
    html = (results / "report" / "report.html").read_text()
    assert "spirals_streamed" in html and "stream" in html
    out = subprocess.run([sys.executable, "-m", "batchscope", "recommend", str(results), "--json", "--configfile",
                          str(repo / "examples/own_workload/config.yaml")],
                         capture_output=True, text=True, env=env, check=True)  # fmt: skip
    rows = json.loads(out.stdout)
    assert {row["workload"] for row in rows} == {"spirals", "spirals_streamed"}
