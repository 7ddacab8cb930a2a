"""config/gpu.yaml and its ResNet: valid, the model's size and shapes, a few training steps on CIFAR-shaped data."""

import pytest
import torch
import yaml

from batchscope import config as cfg
from batchscope.engine.training import train
from batchscope.stages import train as stage_train
from batchscope.workloads.models import build_model
from tests.test_data import write_cifar

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cifar")
    write_cifar(directory, per_batch=500)  # 2500 training images, 500 validation
    return directory


def gpu_config(repo, cifar_dir, **overrides):
    config = yaml.safe_load((repo / "config/gpu.yaml").read_text())
    config["workloads"]["cifar_resnet20"]["dataset"]["data_dir"] = str(cifar_dir)
    config.update(overrides)
    return cfg.validate(config)


def test_gpu_config_is_valid_with_a_local_cifar(repo, cifar_dir):
    config = gpu_config(repo, cifar_dir)
    assert config["device"] == "cuda" and config["workloads"]["cifar_resnet20"]["model"]["name"] == "resnet"
    assert max(cfg.profile_batch_sizes(config)) == 32768  # profiled up to the memory limit
    assert config["study"] == "adaptive"  # a real workload: the grid trained around the quick b_opt only


@pytest.mark.parametrize(("blocks", "parameters"), [(1, 78042), (3, 272474)])
def test_resnet_sizes_match_the_cifar_resnets(blocks, parameters):
    """ResNet-8 and ResNet-20 of He et al. 2016 (widths 16, 32, 64; BatchNorm; 1x1 projection shortcuts): the
    parameter counts of this implementation, about 0.08 M and 0.27 M as the paper states."""
    model = build_model({"name": "resnet", "widths": [16, 32, 64], "blocks": blocks, "norm": "batch"}, (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)


def test_resnet_trains_a_few_steps_on_cifar_shaped_data(repo, cifar_dir):
    config = gpu_config(repo, cifar_dir, device="cpu", threads=1)
    config["workloads"]["cifar_resnet20"]["model"]["blocks"] = 1
    config["workloads"]["cifar_resnet20"].update(max_steps=4, eval_interval=2)
    ds, checkpoint = train(stage_train.config_slice(config, "cifar_resnet20"), 32, 0.05, 0, CPU)
    assert int(ds["steps_done"]) == 4 and bool(torch.isfinite(torch.tensor(ds["train_loss"].values)).all())
    assert any("running_mean" in key for key in checkpoint["state_dict"])
