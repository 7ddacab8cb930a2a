"""Datasets: built-in (digits, linreg, teacher) and local files (MNIST, Fashion-MNIST IDX; CIFAR-10 pickles).

``prepare`` turns a dataset spec into a NetCDF cache once per workload, so training and profiling jobs read a
small file instead of importing scikit-learn or parsing raw files, and every job sees the same split.
``load_tensors`` puts the cached arrays on the device: the whole dataset lives there and a batch is an index.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from batchscope.core.jensen import linreg_covariance

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_VAL_BATCH = "test_batch"


class DataError(ValueError):
    """Local data files are missing or malformed; the message names the file."""


# --------------------------------------------------------------------------------------- file readers


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{data_dir / name}: file not found (also looked for {name}.gz); batchscope never downloads")


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read an IDX file (the MNIST format), optionally gzipped, checking its magic number and length."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: unreadable ({err})") from err
    if len(raw) < 4:
        raise DataError(f"{path}: truncated ({len(raw)} bytes, no IDX header)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: wrong magic number {magic:#010x}, expected {expected_magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path}: truncated or padded: {len(raw) - header} data bytes, header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = IDX_FILES[split]
    images = read_idx(_find(data_dir, images_name), IDX_IMAGES_MAGIC)
    labels = read_idx(_find(data_dir, labels_name), IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{data_dir}: {split} split has {len(images)} images but {len(labels)} labels")
    return images[:, None, :, :], labels  # (N, 1, H, W)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            # CIFAR-10 ships as pickles; these are local files the user put there, restricted to plain data
            # by _PlainUnpickler so a crafted file cannot run code.
            batch = _PlainUnpickler(fh, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({err})") from err
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: missing b'data' or b'labels' ({err})") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"{path}: data has shape {data.shape} for {len(labels)} labels, expected (N, 3072)")
    return data.reshape(-1, 3, 32, 32), labels


class _PlainUnpickler(pickle.Unpickler):
    """Allows only numpy arrays and builtin containers: CIFAR batches need nothing else."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar10(data_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    parts = [read_cifar_batch(_find_plain(data_dir, name)) for name in CIFAR_TRAIN_BATCHES]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return {"train": train, "val": read_cifar_batch(_find_plain(data_dir, CIFAR_VAL_BATCH))}


def _find_plain(data_dir: Path, name: str) -> Path:
    path = data_dir / name
    if not path.is_file():
        raise DataError(f"{path}: file not found; batchscope never downloads")
    return path


# ---------------------------------------------------------------------------------- built-in datasets


def _digits(spec: dict[str, Any]):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x, y, test_size=spec["val_fraction"], stratify=y, random_state=spec["seed"]
    )
    return {"train": (x_tr, y_tr), "val": (x_va, y_va)}, {"task": "classification", "num_classes": 10}


def _linreg(spec: dict[str, Any]):
    dim = spec["dim"]
    cov = linreg_covariance(dim, spec["condition_number"], spec["seed"])
    rng = np.random.default_rng(spec["seed"] + 1)
    w_star = rng.standard_normal(dim) / np.sqrt(dim)
    chol = np.linalg.cholesky(cov)

    def draw(n):
        x = rng.standard_normal((n, dim)) @ chol.T
        return x.astype(np.float32), (x @ w_star + spec["noise_std"] * rng.standard_normal(n)).astype(np.float32)

    splits = {"train": draw(spec["n_train"]), "val": draw(spec["n_val"])}
    truth = {"input_covariance": cov, "w_star": w_star}
    return splits, {"task": "regression", "num_classes": 1, "truth": truth}


def _teacher(spec: dict[str, Any]):
    rng = np.random.default_rng(spec["seed"])
    dim, width, classes = spec["dim"], spec["teacher_width"], spec["num_classes"]
    w1 = rng.standard_normal((dim, width)) / np.sqrt(dim)
    w2 = rng.standard_normal((width, classes)) / np.sqrt(width)

    def draw(n):
        x = rng.standard_normal((n, dim))
        y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
        flip = rng.random(n) < spec["label_noise"]
        y[flip] = rng.integers(0, classes, flip.sum())
        return x.astype(np.float32), y.astype(np.int64)

    return {"train": draw(spec["n_train"]), "val": draw(spec["n_val"])}, {
        "task": "classification",
        "num_classes": classes,
    }


def _files(spec: dict[str, Any]):
    data_dir = Path(spec["data_dir"])
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found; batchscope never downloads")
    if spec["name"] == "cifar10":
        splits = read_cifar10(data_dir)
    else:
        splits = {split: read_idx_split(data_dir, split) for split in ("train", "val")}
    limits = {"train": spec.get("n_train"), "val": spec.get("n_val")}
    out = {}
    for split, (x, y) in splits.items():
        n = limits[split] or len(x)
        if n > len(x):
            raise DataError(f"{data_dir}: n_{split}={n} but the {split} split has only {len(x)} examples")
        labels = y[:n].astype(np.int64)
        out[split] = (x[:n], labels)
        outside = np.flatnonzero((labels < 0) | (labels >= 10))
        if len(outside):  # a label past the classes fails inside the loss, mid-training, with torch's own message
            raise DataError(f"{data_dir}: the {split} split's label {int(labels[outside[0]])} at example "
                            f"{int(outside[0])} is not one of the 10 classes 0 to 9")  # fmt: skip
    if out["train"][0].shape[1:] != out["val"][0].shape[1:]:
        raise DataError(f"{data_dir}: the train split's examples are {out['train'][0].shape[1:]} but the val split's "
                        f"are {out['val'][0].shape[1:]}")  # fmt: skip
    return out, {"task": "classification", "num_classes": 10}


_BUILDERS = {"digits": _digits, "linreg": _linreg, "teacher": _teacher}


def build(spec: dict[str, Any]) -> xr.Dataset:
    """Materialise a dataset spec (as validated by :mod:`batchscope.config`) as an ``xarray.Dataset``.

    Images from files are kept as uint8 (4x smaller caches) and scaled to [0, 1] in :func:`load_tensors`;
    CIFAR-10 is additionally standardised per channel there with training-set statistics.
    """
    splits, meta = _BUILDERS.get(spec["name"], _files)(spec)
    data_vars = {}
    for split, (x, y) in splits.items():
        feature_dims = [f"{split}_{d}" for d in (["channel", "height", "width"] if x.ndim == 4 else ["feature"])]
        data_vars[f"x_{split}"] = ([f"{split}_example", *feature_dims], x)
        data_vars[f"y_{split}"] = ([f"{split}_example"], y)
    for name, value in meta.get("truth", {}).items():
        dims = [f"truth_dim{i}" for i in range(np.ndim(value))]
        data_vars[f"truth_{name}"] = (dims, np.asarray(value))
    ds = xr.Dataset(data_vars)
    ds.attrs.update(dataset=spec["name"], task=meta["task"], num_classes=meta["num_classes"])
    ds.attrs["pixel_scale"] = 255.0 if ds["x_train"].dtype == np.uint8 else 1.0
    return ds


@dataclass
class Tensors:
    """A dataset on the device. ``x_*`` are float32; ``y_*`` int64 classes or float32 regression targets."""

    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any
    task: str
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_tensors(ds: xr.Dataset, device: Any) -> Tensors:
    import torch

    def x(split):
        arr = ds[f"x_{split}"].values.astype(np.float32) / np.float32(ds.attrs["pixel_scale"])
        return arr

    x_train, x_val = x("train"), x("val")
    if ds.attrs["dataset"] == "cifar10":
        mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
        std = x_train.std(axis=(0, 2, 3), keepdims=True)
        x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    return Tensors(
        x_train=torch.as_tensor(x_train, device=device),
        y_train=torch.as_tensor(ds["y_train"].values, device=device),
        x_val=torch.as_tensor(x_val, device=device),
        y_val=torch.as_tensor(ds["y_val"].values, device=device),
        task=ds.attrs["task"],
        num_classes=int(ds.attrs["num_classes"]),
    )
