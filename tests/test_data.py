"""Dataset builders and local-file readers, on tiny files written here."""

import gzip
import pickle

import numpy as np
import pytest

from batchscope.config import filled, train_size
from batchscope.workloads import data


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(directory, n_train=12, n_val=5, gz=False, rng=None):
    rng = rng or np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        image_name, label_name = data.IDX_FILES[split]
        write_idx(directory / (image_name + suffix), images, data.IDX_IMAGES_MAGIC)
        write_idx(directory / (label_name + suffix), labels, data.IDX_LABELS_MAGIC)
        splits[split] = (images, labels)
    return splits


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_dataset_round_trip(tmp_path, name, gz):
    written = write_mnist(tmp_path, gz=gz)
    ds = data.build({"name": name, "data_dir": str(tmp_path)})
    assert ds["x_train"].shape == (12, 1, 28, 28) and ds["x_val"].shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(ds["x_train"].values[:, 0], written["train"][0])
    np.testing.assert_array_equal(ds["y_val"].values, written["val"][1])
    tensors = data.load_tensors(ds, "cpu")
    assert float(tensors.x_train.max()) <= 1.0 and tensors.x_train.dtype.is_floating_point
    assert tensors.input_shape == (1, 28, 28)


def test_idx_subsets(tmp_path):
    write_mnist(tmp_path)
    ds = data.build({"name": "mnist", "data_dir": str(tmp_path), "n_train": 4, "n_val": 2})
    assert ds.sizes["train_example"] == 4 and ds.sizes["val_example"] == 2
    with pytest.raises(data.DataError, match="n_train=50 but the train split has only 12"):
        data.build({"name": "mnist", "data_dir": str(tmp_path), "n_train": 50})


def test_idx_wrong_magic(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    write_idx(path, np.zeros(12), data.IDX_IMAGES_MAGIC)  # a labels file with the images' magic
    with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte: wrong magic number 0x00000803"):
        data.build({"name": "mnist", "data_dir": str(tmp_path)})


def test_idx_labels_past_the_classes_and_mismatched_images_are_refused(tmp_path):
    """A label past the 10 classes failed mid-training inside the loss ("Target 17 is out of bounds"), and images
    of another size in the val split inside the model's first layer: both are refused when the data are read."""
    written = write_mnist(tmp_path)
    labels = written["train"][1].copy()
    labels[5] = 17
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, data.IDX_LABELS_MAGIC)
    with pytest.raises(data.DataError, match="the train split's label 17 at example 5 is not one of the 10 classes"):
        data.build({"name": "mnist", "data_dir": str(tmp_path)})
    write_idx(tmp_path / "train-labels-idx1-ubyte", written["train"][1], data.IDX_LABELS_MAGIC)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 20, 20)), data.IDX_IMAGES_MAGIC)
    with pytest.raises(data.DataError, match=r"train split's examples are \(1, 28, 28\) but the val split's are "
                       r"\(1, 20, 20\)"):  # fmt: skip
        data.build({"name": "mnist", "data_dir": str(tmp_path)})


def test_idx_truncated(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte: truncated or padded"):
        data.build({"name": "mnist", "data_dir": str(tmp_path)})


def test_idx_missing_file_and_dir(tmp_path):
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte: file not found"):
        data.build({"name": "mnist", "data_dir": str(tmp_path)})
    with pytest.raises(data.DataError, match="data directory not found"):
        data.build({"name": "mnist", "data_dir": str(tmp_path / "nope")})


def write_cifar(directory, per_batch=4, rng=None):
    rng = rng or np.random.default_rng(0)
    written = {}
    for name in [*data.CIFAR_TRAIN_BATCHES, data.CIFAR_VAL_BATCH]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [int(x) for x in rng.integers(0, 10, per_batch)],
            b"batch_label": name.encode(),
        }
        with open(directory / name, "wb") as fh:
            pickle.dump(batch, fh)
        written[name] = batch
    return written


def test_cifar10_round_trip_and_standardisation(tmp_path):
    written = write_cifar(tmp_path)
    ds = data.build({"name": "cifar10", "data_dir": str(tmp_path)})
    assert ds["x_train"].shape == (20, 3, 32, 32) and ds["x_val"].shape == (4, 3, 32, 32)
    first = written["data_batch_1"][b"data"].reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(ds["x_train"].values[:4], first)
    np.testing.assert_array_equal(ds["y_train"].values[:4], written["data_batch_1"][b"labels"])
    tensors = data.load_tensors(ds, "cpu")
    per_channel = tensors.x_train.mean(dim=(0, 2, 3))
    assert per_channel.abs().max() < 1e-5  # standardised with training statistics


def test_cifar10_errors(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(data.DataError, match="data_batch_3: not a readable CIFAR-10 batch"):
        data.build({"name": "cifar10", "data_dir": str(tmp_path)})
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(data.DataError, match="data_batch_3: file not found"):
        data.build({"name": "cifar10", "data_dir": str(tmp_path)})


def test_cifar10_refuses_code_in_pickles(tmp_path):
    write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(data.DataError, match="refusing to load builtins.print"):
        data.build({"name": "cifar10", "data_dir": str(tmp_path)})


def test_digits_split_is_fixed_and_stratified():
    spec = {"name": "digits", **filled("dataset", {"name": "digits"})}
    first, second = data.build(spec), data.build(spec)
    np.testing.assert_array_equal(first["y_val"].values, second["y_val"].values)
    assert first.sizes["train_example"] == train_size(spec) == 1437
    train_share = np.bincount(first["y_train"].values) / first.sizes["train_example"]
    val_share = np.bincount(first["y_val"].values) / first.sizes["val_example"]
    assert np.abs(train_share - val_share).max() < 0.01  # stratified: class shares agree within 1 point
    assert first["x_train"].values.max() <= 1.0


def test_linreg_has_its_stated_covariance():
    spec = {
        **filled("dataset", {"name": "linreg"}),
        "name": "linreg",
        "n_train": 50000,
        "dim": 5,
        "condition_number": 10.0,
    }
    ds = data.build(spec)
    cov = ds["truth_input_covariance"].values
    np.testing.assert_allclose(np.linalg.eigvalsh(cov), np.logspace(-1, 0, 5), rtol=1e-10)
    sample = np.cov(ds["x_train"].values.T)
    # sample covariance of 50k draws: entries within 0.03 (about 5 standard errors)
    np.testing.assert_allclose(sample, cov, atol=0.03)
    residual = ds["y_train"].values - ds["x_train"].values @ ds["truth_w_star"].values
    assert np.std(residual) == pytest.approx(spec["noise_std"], rel=0.02)


def test_teacher_labels_follow_the_teacher():
    spec = {**filled("dataset", {"name": "teacher"}), "name": "teacher"}
    ds = data.build(spec)
    assert set(np.unique(ds["y_train"].values)) <= set(range(spec["num_classes"]))
    assert len(np.unique(ds["y_train"].values)) > 1
    np.testing.assert_array_equal(ds["y_train"].values, data.build(spec)["y_train"].values)
    noisy = data.build({**spec, "label_noise": 1.0})
    agree = np.mean(noisy["y_train"].values == ds["y_train"].values)
    assert agree == pytest.approx(1 / spec["num_classes"], abs=0.05)  # fully random labels
