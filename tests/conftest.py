"""Shared fixtures: the real data beside the repo, small loaded datasets, and writers of tiny files in the real
formats of the standard datasets."""

from __future__ import annotations

import gzip
import pickle
import shutil
import struct
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from saal.data import DatasetBundle, load_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real MNIST / CIFAR-10 files beside the repo; skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits() -> DatasetBundle:
    return load_dataset("digits")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP spin-waits make them erratic."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CIFAR_JPG_ZIP = SHARED_DATA / "cifar10-jpg.zip"


def write_idx(path: Path, array: np.ndarray, gzipped: bool = False) -> Path:
    """Write a uint8 array as an IDX file (magic 0x0000080N, big-endian dims), as MNIST publishes them."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gzipped:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist_like(
    raw: Path, n_train: int, n_test: int, seed: int = 0, gzipped: bool = False
) -> dict[str, np.ndarray]:
    """Write the four IDX files of an MNIST-style set into ``raw``; return what was written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) + 3) % 10).astype(np.uint8),
    }
    for name, a in arrays.items():
        write_idx(raw / name, a, gzipped)
    return arrays


def _pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, per_batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``root/cifar-10-batches-py`` with five train batches, a test batch and ``batches.meta``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        _pickle(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": y, "data": x})
        xs.append(x)
        ys += y
    x_test = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
    y_test = [int(v) for v in rng.integers(0, 10, per_batch)]
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": y_test, "data": x_test})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})
    return {"x_train": np.concatenate(xs), "y_train": np.array(ys), "x_test": x_test, "y_test": np.array(y_test)}


def write_cifar100(root: Path, n_train: int = 12, n_test: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``root/cifar-100-python`` with ``train``, ``test`` (fine and coarse labels) and ``meta``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [f // 5 for f in fine]
        entry = {"filenames": [f"{i}.png" for i in range(n)], "batch_label": split, "fine_labels": fine}
        _pickle(folder / split, {**entry, "coarse_labels": coarse, "data": x})
        out[f"x_{split}"], out[f"y_{split}"] = x, np.array(fine)
    fine_names = [f"fine_{i:02d}" for i in range(100)]
    _pickle(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": [f"c{i}" for i in range(20)]})
    return out


def write_svhn(folder: Path, n_train: int = 7, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``folder/{train,test}_32x32.mat`` as SVHN does: X is 32 x 32 x 3 x N uint8, y is N x 1 in 1..10."""
    import scipy.io

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 10 stands for the digit 0
        scipy.io.savemat(str(folder / f"{split}_32x32.mat"), {"X": x, "y": y})
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return out


@pytest.fixture(scope="session")
def cifar_jpg_zip() -> Path:
    """The CIFAR-10 JPEG archive beside the repo; skips the test when absent."""
    if not CIFAR_JPG_ZIP.is_file():
        pytest.skip(f"{CIFAR_JPG_ZIP} is absent")
    return CIFAR_JPG_ZIP


@pytest.fixture(scope="session")
def cifar_jpg_folder(cifar_jpg_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image folder cut from the CIFAR-10 JPEGs: 30 per class in train/, 10 per class in test/."""
    root = tmp_path_factory.mktemp("cifar_jpg")
    wanted = {"train": 30, "test": 10}
    taken: dict[tuple[str, str], int] = {}
    with zipfile.ZipFile(cifar_jpg_zip) as z:
        for name in sorted(z.namelist()):
            parts = name.split("/")
            if len(parts) != 3 or not parts[2].endswith(".jpg") or parts[0] not in wanted:
                continue
            key = (parts[0], parts[1])
            if taken.get(key, 0) < wanted[parts[0]]:
                taken[key] = taken.get(key, 0) + 1
                z.extract(name, root)
    return root


def save_image(path: Path, array: np.ndarray) -> Path:
    """Save a uint8 H x W (greyscale) or H x W x 3 array as an image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="session")
def fmt() -> SimpleNamespace:
    """The writers above, for tests (conftest modules are not imported by name)."""
    return SimpleNamespace(
        write_idx=write_idx,
        write_mnist_like=write_mnist_like,
        write_cifar10=write_cifar10,
        write_cifar100=write_cifar100,
        write_svhn=write_svhn,
        save_image=save_image,
    )


# Debian's Chromium, driven by Playwright (never `playwright install`); `.ci/run` installs it on CI.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for a module's browser tests; a missing browser is a failure that says what to install."""
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed (apt-get install chromium; .ci/run does it on CI)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()
