"""The workload protocol: how batchscope gets a model, its data, its loss and its target metric.

A workload in the config names a *factory* by import path (``factory: mypkg.workloads:make_workload``). Every
stage calls it as ``factory(spec, device)`` with the workload's config entry (``spec["options"]`` holds the
user's own settings) and gets a :class:`Workload` back. The built-in datasets and models are the factory
:func:`builtin`, so profiling, training and the analyses have one code path. See docs/workloads.md.

batchscope seeds torch's global generator with the run's seed just before calling the factory, so the model's
initialisation follows the seed; a factory should draw its data from its own, fixed generator.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

FACTORY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
CHECK_EXAMPLES = 2  # examples of the validation data the loss and metric are tried on before any work


class WorkloadError(ValueError):
    """A factory is not importable or returned something batchscope cannot use; the message says which."""


TensorPair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Workload:
    """What a factory returns.

    - ``model``: an ``nn.Module`` on the device the factory was given.
    - ``train``, ``val``: ``(inputs, targets)`` tensors on that device (the whole set lives there and a batch is
      an index), or a ``torch.utils.data.Dataset`` of ``(input, target)`` pairs for data that does not fit,
      which batchscope streams through a ``DataLoader`` (the ``loader`` config section).
    - ``loss(outputs, targets)``: the mean loss of a batch, a scalar tensor.
    - ``metric(outputs, targets)``: the mean of the target metric over a batch (a number or a 0-d tensor), e.g.
      accuracy; None when the target is the validation loss. ``higher_is_better`` gives its direction.
    """

    model: nn.Module
    train: TensorPair | Dataset
    val: TensorPair | Dataset
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: Callable[[torch.Tensor, torch.Tensor], Any] | None = None
    metric_name: str = "accuracy"
    higher_is_better: bool = True
    spec: dict[str, Any] | None = field(default=None, repr=False)  # set by build(): the slice it came from

    @property
    def streamed(self) -> bool:
        """True when the training data are a Dataset read through a DataLoader."""
        return not isinstance(self.train, tuple)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of examples whose largest output is the target class."""
    return (outputs.argmax(dim=1) == targets).float().mean()


def regression_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(outputs.squeeze(-1), targets)


# ------------------------------------------------------------------------------------------ the built-ins


@cache
def _dataset(data_file: str | None, dataset_json: str):
    """A built-in dataset, once per process (an xarray.Dataset; do not modify it)."""
    from batchscope.store import read_netcdf
    from batchscope.workloads import data

    # the workflow passes the prepare_data cache (reading it costs 60 ms; importing scikit-learn for digits 0.7 s)
    return read_netcdf(data_file) if data_file else data.build(json.loads(dataset_json))


def builtin_dataset(dataset: dict[str, Any], data_file: str | None = None):
    """The built-in dataset of a spec as the factory sees it: prepare_data caches exactly this."""
    return _dataset(data_file, json.dumps(dataset, sort_keys=True))


@cache
def _cached_tensors(data_file: str | None, dataset_json: str, device: str):
    """The built-in data on the device, once per process: a job training a whole lr grid calls the factory per
    point."""
    from batchscope.workloads import data

    return data.load_tensors(_dataset(data_file, dataset_json), device)


def builtin(spec: dict[str, Any], device: torch.device) -> Workload:
    """The built-in datasets (``spec["dataset"]``) and models (``spec["model"]``) as a workload."""
    from batchscope.workloads.models import build_model

    tensors = _cached_tensors(spec.get("data_file"), json.dumps(spec["dataset"], sort_keys=True), str(device))
    model = build_model(spec["model"], tensors.input_shape, tensors.num_classes).to(device)
    classification = tensors.task == "classification"
    return Workload(
        model=model,
        train=(tensors.x_train, tensors.y_train),
        val=(tensors.x_val, tensors.y_val),
        loss=nn.functional.cross_entropy if classification else regression_loss,
        metric=accuracy if classification else None,
        metric_name="accuracy" if classification else "none",
    )


# ------------------------------------------------------------------------------------- loading and checks


def load_factory(path: str) -> Callable[..., Any]:
    """Import ``module:function``; every failure names the path and what went wrong."""
    if not isinstance(path, str) or not FACTORY_PATTERN.match(path):
        raise WorkloadError(f"factory {path!r}: expected 'package.module:function'")
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an ImportError, or any error raised while the user's module runs
        raise WorkloadError(
            f"factory {path!r}: module {module_name!r} is not importable ({type(err).__name__}: {err}); "
            "is it installed or on PYTHONPATH?"
        ) from err
    factory = getattr(module, attribute, None)
    if factory is None:
        raise WorkloadError(f"factory {path!r}: module {module_name!r} has no attribute {attribute!r}")
    if not callable(factory):
        raise WorkloadError(f"factory {path!r}: {attribute!r} is a {type(factory).__name__}, not a function")
    return factory


def _devices(module: nn.Module) -> set[torch.device]:
    return {t.device for t in [*module.parameters(), *module.buffers()]}


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 name the same device when the current device is 0."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def _check_split(path: str, name: str, split: Any, device: torch.device) -> None:
    if isinstance(split, tuple):
        if len(split) != 2 or not all(isinstance(t, torch.Tensor) for t in split):
            raise WorkloadError(f"factory {path!r}: {name} must be (inputs, targets) tensors or a torch Dataset")
        x, y = split
        if len(x) != len(y):
            raise WorkloadError(f"factory {path!r}: {name} has {len(x)} inputs but {len(y)} targets")
        if len(x) == 0:
            raise WorkloadError(f"factory {path!r}: {name} is empty")
        for label, tensor in (("inputs", x), ("targets", y)):
            if not _same_device(tensor.device, device):
                raise WorkloadError(
                    f"factory {path!r}: {name} {label} are on {tensor.device} but the model is on {device}: "
                    "put the data on the device the factory was given, or return a Dataset to stream it"
                )
        for label, tensor in (("inputs", x), ("targets", y)):
            # NaN or infinity in the data: every run would diverge, recorded as such, and the study would stop at
            # the fit; one pass over data already in memory says so before any training (a streamed Dataset is
            # read batch by batch, so it is not checked here)
            if not tensor.is_floating_point():
                continue
            bad = ~torch.isfinite(tensor)
            if bool(bad.any()):
                first = int(bad.reshape(len(tensor), -1).any(dim=1).nonzero()[0, 0])
                raise WorkloadError(f"factory {path!r}: {name} {label} hold {int(bad.sum())} NaN or infinite "
                                    f"value(s), the first in example {first}")  # fmt: skip
    elif isinstance(split, Dataset):
        if not hasattr(split, "__len__") or len(split) == 0:
            raise WorkloadError(f"factory {path!r}: {name} Dataset must have a non-zero __len__")
    else:
        raise WorkloadError(
            f"factory {path!r}: {name} is a {type(split).__name__}; expected (inputs, targets) tensors or a "
            "torch.utils.data.Dataset"
        )


def size(split: TensorPair | Dataset) -> int:
    """Number of examples in a split, tensors or Dataset."""
    return len(split[0]) if isinstance(split, tuple) else len(split)


def first_examples(split: TensorPair | Dataset, n: int, device: torch.device) -> TensorPair:
    """The first ``n`` examples of a split as tensors on ``device`` (a Dataset is read through a DataLoader)."""
    if isinstance(split, tuple):
        return split[0][:n], split[1][:n]
    loader = DataLoader(split, batch_size=min(n, len(split)), shuffle=False)
    x, y = next(iter(loader))
    return x.to(device), y.to(device)


def analysis_data(workload: Workload, device: torch.device) -> TensorPair:
    """The training data the analyses (Hessian, gradient noise, ...) work on, as tensors on the device: at most
    ``loader.analysis_examples`` of them, a fixed random subset (seed 0), so an analysis costs the same on any
    data set's size and sees every class of a data set stored sorted by class."""
    limit = workload.spec["loader"]["analysis_examples"]
    n = size(workload.train)
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit] if n > limit else None
    if not isinstance(workload.train, tuple):
        subset = workload.train if keep is None else Subset(workload.train, keep.tolist())
        return first_examples(subset, limit, device)
    x, y = workload.train
    if keep is None:
        return x, y
    keep = keep.to(x.device)
    return x[keep], y[keep]


def evaluation_set(x: torch.Tensor, y: torch.Tensor, size: int | None, seed: int, key: str) -> TensorPair:
    """The fixed evaluation set of an analysis: the first ``size`` examples of a permutation of (x, y) seeded by
    ``seed`` (all of them, in their order, when ``size`` is None or len(x)). ``key`` names the setting in the
    error when ``size`` exceeds the examples there are (``batchscope.config.check_sizes`` refuses it earlier)."""
    n = len(x)
    if size is None or size == n:
        return x, y
    if size > n:
        raise ValueError(f"{key}: {size} exceeds the {n} training examples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].to(x.device)
    return x[order], y[order]


def check(workload: Any, path: str, device: torch.device) -> Workload:
    """Refuse a factory's return value that batchscope cannot use, before any training or timing."""
    if not isinstance(workload, Workload):
        raise WorkloadError(
            f"factory {path!r} returned a {type(workload).__name__}; expected batchscope.Workload(model=..., "
            "train=..., val=..., loss=..., metric=...)"
        )
    if not isinstance(workload.model, nn.Module):
        raise WorkloadError(f"factory {path!r}: model is a {type(workload.model).__name__}, not a torch nn.Module")
    model_devices = _devices(workload.model)
    wrong = [d for d in model_devices if not _same_device(d, device)]
    if wrong:
        raise WorkloadError(f"factory {path!r}: the model has parameters on {wrong[0]}, not on {device}")
    _check_split(path, "train", workload.train, device)
    _check_split(path, "val", workload.val, device)
    if not callable(workload.loss):
        raise WorkloadError(f"factory {path!r}: loss is a {type(workload.loss).__name__}, not a function")
    if workload.metric is not None and not callable(workload.metric):
        raise WorkloadError(f"factory {path!r}: metric is a {type(workload.metric).__name__}, not a function")

    x, y = first_examples(workload.val, CHECK_EXAMPLES, device)
    was_training = workload.model.training
    workload.model.eval()  # running statistics untouched
    try:
        with torch.no_grad():
            out = workload.model(x)
            loss = workload.loss(out, y)
            value = workload.metric(out, y) if workload.metric is not None else None
    except RuntimeError as err:
        raise WorkloadError(
            f"factory {path!r}: the model, loss or metric failed on 2 validation examples: {err}"
        ) from err
    finally:
        workload.model.train(was_training)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise WorkloadError(
            f"factory {path!r}: loss returned {type(loss).__name__} "
            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}; expected a scalar tensor (the mean)"
        )
    if workload.metric is not None:
        number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if isinstance(number, bool) or not isinstance(number, numbers.Real):
            raise WorkloadError(
                f"factory {path!r}: metric {workload.metric_name!r} returned {value!r} "
                f"({type(value).__name__}); expected a number"
            )
        if not math.isfinite(float(number)):
            raise WorkloadError(f"factory {path!r}: metric {workload.metric_name!r} returned {number!r}")
    return workload


def build(spec: dict[str, Any], device: torch.device, seed: int = 0, data_file: str | None = None) -> Workload:
    """Call the workload's factory with torch seeded by ``seed`` and check what it returns.

    ``spec`` is the workload slice (:func:`batchscope.config.workload_slice`); ``data_file`` the prepare_data
    output, which the built-in factory reads instead of rebuilding its dataset.
    """
    path = spec["factory"]
    factory = load_factory(path)
    torch.manual_seed(seed)
    workload = check(factory({**spec, "data_file": data_file} if data_file else spec, device), path, device)
    workload.spec = spec
    return workload


def describe(workload: Workload) -> dict[str, Any]:
    """Figures the prepare_data record keeps of a workload: sizes, shapes, parameters, data path."""
    x, _ = first_examples(workload.train, 1, torch.device("cpu"))
    return {
        "n_train": size(workload.train),
        "n_val": size(workload.val),
        "input_shape": list(x.shape[1:]),
        "parameters": sum(p.numel() for p in workload.model.parameters()),
        "data_path": "stream" if workload.streamed else "device",
        "metric_name": workload.metric_name if workload.metric is not None else "none",
        "higher_is_better": int(workload.higher_is_better),
    }
