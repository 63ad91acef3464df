"""The standard-benchmark loaders on tiny files written in the real formats, and on damaged files."""

from __future__ import annotations

import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from saal.data import load_dataset
from saal.data.torchvision_sets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    load_cifar10,
    load_cifar100,
    load_fashion_mnist,
    load_kmnist,
    load_mnist,
    load_svhn,
)
from saal.errors import SaalError


def _pixels(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Undo the normalisation: back to 0..255 pixel values."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x * s + m) * 255).round().numpy().astype(np.int64)


def test_fashion_mnist_reads_raw_idx(tmp_path: Path, fmt) -> None:
    written = fmt.write_mnist_like(tmp_path / "FashionMNIST" / "raw", n_train=12, n_test=5)
    b = load_fashion_mnist(str(tmp_path), download=False)
    assert (len(b.train), len(b.test), b.input_shape) == (12, 5, (1, 28, 28))
    assert b.classes[0] == "T-shirt/top" and b.num_classes == 10
    np.testing.assert_array_equal(b.train_targets, written["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(b.test.targets, written["t10k-labels-idx1-ubyte"])
    np.testing.assert_array_equal(
        _pixels(b.train.inputs, MNIST_MEAN, MNIST_STD)[:, 0], written["train-images-idx3-ubyte"]
    )
    assert b.train.inputs.dtype == torch.float32
    assert (b.mean, b.std) == (MNIST_MEAN, MNIST_STD)


def test_kmnist_reads_gzipped_idx(tmp_path: Path, fmt) -> None:
    written = fmt.write_mnist_like(tmp_path / "KMNIST" / "raw", n_train=10, n_test=4, gzipped=True)
    b = load_dataset("kmnist", tmp_path, download=False)
    assert b.name == "kmnist" and b.classes[:3] == ["o", "ki", "su"]
    np.testing.assert_array_equal(
        _pixels(b.test.inputs, MNIST_MEAN, MNIST_STD)[:, 0], written["t10k-images-idx3-ubyte"]
    )
    x, y = b.train[3]
    assert x.shape == (1, 28, 28) and y == 3


def test_cifar10_reads_pickled_batches(tmp_path: Path, fmt) -> None:
    written = fmt.write_cifar10(tmp_path, per_batch=4)
    b = load_cifar10(str(tmp_path), download=False)
    assert (len(b.train), len(b.test), b.input_shape) == (20, 4, (3, 32, 32))
    assert b.classes[0] == "airplane" and b.classes[-1] == "truck"
    np.testing.assert_array_equal(b.train_targets, written["y_train"])
    expected = written["x_train"].reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(_pixels(b.train.inputs, CIFAR10_MEAN, CIFAR10_STD), expected)


def test_cifar10_unpacks_a_downloaded_archive(tmp_path: Path, fmt) -> None:
    staging = tmp_path / "staging"
    fmt.write_cifar10(staging, per_batch=2)
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    b = load_cifar10(str(data), download=False)
    assert len(b.train) == 10 and (data / "cifar-10-batches-py" / "test_batch").is_file()


def test_cifar100_uses_fine_labels(tmp_path: Path, fmt) -> None:
    written = fmt.write_cifar100(tmp_path, n_train=12, n_test=6)
    b = load_cifar100(str(tmp_path), download=False)
    assert (len(b.train), len(b.test), b.num_classes) == (12, 6, 100)
    assert b.classes[7] == "fine_07"
    np.testing.assert_array_equal(b.train_targets, written["y_train"])
    np.testing.assert_array_equal(b.test.targets, written["y_test"])


def test_svhn_reads_mat_and_maps_10_to_0(tmp_path: Path, fmt) -> None:
    written = fmt.write_svhn(tmp_path / "svhn", n_train=12, n_test=5)
    b = load_svhn(str(tmp_path), download=False)
    assert (len(b.train), len(b.test), b.input_shape) == (12, 5, (3, 32, 32))
    assert list(b.train_targets[:11]) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    # X is H x W x C x N in the file: item 2, channel 1, row 5, column 7
    value = written["x_train"][5, 7, 1, 2]
    assert round(float(b.train.inputs[2, 1, 5, 7]) * 0.5 * 255 + 0.5 * 255) == value


def test_missing_files_name_them_and_where(tmp_path: Path) -> None:
    with pytest.raises(SaalError) as info:
        load_mnist(str(tmp_path), download=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert str(tmp_path / "MNIST" / "raw") in msg and "--data-dir" in msg and "SAAL_DATA_DIR" in msg
    with pytest.raises(SaalError, match=r"cifar-100-python.*meta|meta.*cifar-100-python"):
        load_cifar100(str(tmp_path), download=False)
    with pytest.raises(SaalError, match=r"train_32x32\.mat, test_32x32\.mat in .*svhn"):
        load_svhn(str(tmp_path), download=False)


def test_failed_download_is_reported_on_one_line(tmp_path: Path) -> None:
    # a data_dir below a plain file cannot be created, so the download fails without touching the network
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SaalError, match="download failed") as info:
        load_cifar10(str(blocker / "data"), download=True)
    assert "\n" not in str(info.value) and "data_batch_1" in str(info.value)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b"\x00\x00\x09\x03" + b[4:], "wrong magic"),
        (lambda b: b"", "wrong magic"),
    ],
)
def test_corrupt_idx_names_the_file(tmp_path: Path, fmt, damage, match: str) -> None:
    raw = tmp_path / "MNIST" / "raw"
    fmt.write_mnist_like(raw, n_train=6, n_test=3)
    bad = raw / "train-images-idx3-ubyte"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(SaalError, match=match) as info:
        load_mnist(str(tmp_path), download=False)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_corrupt_gzip_and_label_count_mismatch(tmp_path: Path, fmt) -> None:
    raw = tmp_path / "KMNIST" / "raw"
    fmt.write_mnist_like(raw, n_train=6, n_test=3, gzipped=True)
    bad = raw / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:10])
    with pytest.raises(SaalError, match=re.escape(str(bad))):
        load_kmnist(str(tmp_path), download=False)
    fmt.write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8), gzipped=True)
    with pytest.raises(SaalError, match=r"3 images but .* 2 labels"):
        load_kmnist(str(tmp_path), download=False)


def test_corrupt_cifar_and_svhn_files_name_the_file(tmp_path: Path, fmt) -> None:
    fmt.write_cifar10(tmp_path, per_batch=2)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(SaalError, match=re.escape(f"cannot unpickle {bad}")):
        load_cifar10(str(tmp_path), download=False)
    with bad.open("wb") as f:
        pickle.dump({"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(SaalError, match="N x 3072 uint8"):
        load_cifar10(str(tmp_path), download=False)

    fmt.write_svhn(tmp_path / "svhn", n_train=3, n_test=2)
    mat = tmp_path / "svhn" / "test_32x32.mat"
    mat.write_bytes(b"MATLAB 5.0 MAT-file, nonsense" + bytes(200))
    with pytest.raises(SaalError, match=re.escape(f"cannot read {mat}")):
        load_svhn(str(tmp_path), download=False)
