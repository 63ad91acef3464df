"""The standard benchmarks, read from the files that torchvision downloads.

Each loader reads ``data_dir`` laid out as below (torchvision's own layout, so a folder that
torchvision already filled works as is):

=============  ==================================================================================
mnist          ``data_dir/MNIST/raw/{train,t10k}-images-idx3-ubyte`` and ``...-labels-idx1-ubyte``
fashion-mnist  ``data_dir/FashionMNIST/raw/`` with the same four file names
kmnist         ``data_dir/KMNIST/raw/`` with the same four file names
svhn           ``data_dir/svhn/train_32x32.mat`` and ``data_dir/svhn/test_32x32.mat``
cifar10        ``data_dir/cifar-10-batches-py/data_batch_1..5``, ``test_batch``, ``batches.meta``
cifar100       ``data_dir/cifar-100-python/train``, ``test``, ``meta``
=============  ==================================================================================

The IDX files may also be gzipped (``*-ubyte.gz``, as published); a CIFAR archive
(``data_dir/cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) is unpacked in place. SVHN gets a
folder of its own because torchvision keeps its ``.mat`` files directly in ``root``.

When files are missing and ``download`` is true, torchvision downloads them into that layout (each
socket operation times out after :data:`DOWNLOAD_TIMEOUT_S` seconds, so a blocked network fails
instead of hanging). The files are checked for format and shape, not checksum, so smaller files in
the same format load too. Pixels become float32 in [0, 1], then are normalised with the mean and std
below (those of the training split, the usual published values).
"""

from __future__ import annotations

import contextlib
import gzip
import pickle
import re
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from torchvision import datasets as tvd

from saal.data.base import ArrayDataset, DatasetBundle, normalise_, to_unit_float
from saal.errors import SaalError

DOWNLOAD_TIMEOUT_S = 30.0
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
SVHN_MEAN, SVHN_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_IDX_UBYTE = 0x08
_WHERE = "--data-dir (or SAAL_DATA_DIR)"


def load_mnist(data_dir: str, download: bool = True) -> DatasetBundle:
    """Return MNIST (60,000 / 10,000, 1 x 28 x 28) from ``data_dir/MNIST/raw``, normalised 0.1307 / 0.3081.

    Raises:
        SaalError: files missing (and not downloadable) or corrupt.
    """
    return _load_idx_set("mnist", tvd.MNIST, data_dir, download)


def load_fashion_mnist(data_dir: str, download: bool = True) -> DatasetBundle:
    """Return Fashion-MNIST from ``data_dir/FashionMNIST/raw``, normalised 0.1307 / 0.3081 as in the SAAL paper.

    Raises:
        SaalError: files missing (and not downloadable) or corrupt.
    """
    return _load_idx_set("fashion-mnist", tvd.FashionMNIST, data_dir, download)


def load_kmnist(data_dir: str, download: bool = True) -> DatasetBundle:
    """Return Kuzushiji-MNIST from ``data_dir/KMNIST/raw``, normalised 0.1307 / 0.3081.

    Raises:
        SaalError: files missing (and not downloadable) or corrupt.
    """
    return _load_idx_set("kmnist", tvd.KMNIST, data_dir, download)


def load_svhn(data_dir: str, download: bool = True) -> DatasetBundle:
    """Return SVHN (73,257 / 26,032, 3 x 32 x 32) from ``data_dir/svhn/*_32x32.mat``, normalised 0.5 / 0.5.

    The ``.mat`` files label the digit 0 as 10; here it is 0. The "extra" split is not used.

    Raises:
        SaalError: files missing (and not downloadable) or corrupt.
    """
    folder = Path(data_dir) / "svhn"
    files = {split: tvd.SVHN.split_list[split][1] for split in ("train", "test")}

    def fetch() -> None:
        for split in files:
            if not (folder / files[split]).is_file():
                tvd.SVHN(str(folder), split=split, download=True)

    _ensure("svhn", folder, list(files.values()), download, fetch, "the folder that holds svhn/")
    (x_train, y_train), (x_test, y_test) = (_read_svhn_mat(folder / files[s]) for s in ("train", "test"))
    return _bundle("svhn", x_train, y_train, x_test, y_test, [str(i) for i in range(10)], SVHN_MEAN, SVHN_STD)


def load_cifar10(data_dir: str, download: bool = True) -> DatasetBundle:
    """Return CIFAR-10 (50,000 / 10,000, 3 x 32 x 32) from ``data_dir/cifar-10-batches-py``.

    Raises:
        SaalError: files missing (and not downloadable) or corrupt.
    """
    return _load_cifar("cifar10", tvd.CIFAR10, data_dir, download, CIFAR10_MEAN, CIFAR10_STD)


def load_cifar100(data_dir: str, download: bool = True) -> DatasetBundle:
    """Return CIFAR-100 with its 100 fine labels from ``data_dir/cifar-100-python``.

    Raises:
        SaalError: files missing (and not downloadable) or corrupt.
    """
    return _load_cifar("cifar100", tvd.CIFAR100, data_dir, download, CIFAR100_MEAN, CIFAR100_STD)


# --- MNIST family -------------------------------------------------------------------------------


def _load_idx_set(name: str, cls: type[tvd.MNIST], data_dir: str, download: bool) -> DatasetBundle:
    folder = Path(data_dir) / cls.__name__ / "raw"
    stems = {split: (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte") for split in ("train", "t10k")}

    def fetch() -> None:
        cls(str(data_dir), train=True, download=True)

    names = [n for pair in stems.values() for n in pair]
    _ensure(name, folder, names, download, fetch, f"the folder that holds {cls.__name__}/raw", gz_ok=True)
    splits = []
    for images_name, labels_name in stems.values():
        images_path, labels_path = _idx_path(folder, images_name), _idx_path(folder, labels_name)
        images, labels = _read_idx(images_path, ndim=3), _read_idx(labels_path, ndim=1)
        if len(images) != len(labels):
            raise SaalError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                "replace the damaged file"
            )
        _check_labels(labels, len(cls.classes), labels_path)
        splits.append((images[:, None], labels))
    (x_train, y_train), (x_test, y_test) = splits
    return _bundle(name, x_train, y_train, x_test, y_test, list(cls.classes), MNIST_MEAN, MNIST_STD)


def _idx_path(folder: Path, name: str) -> Path:
    plain = folder / name
    return plain if plain.is_file() else folder / f"{name}.gz"


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Return the uint8 array in an IDX file (gzipped if it ends in .gz), checking header and length."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise SaalError(f"cannot read {path} ({e}); replace the file") from e
    header = 4 + 4 * ndim
    if len(data) < header or data[:2] != b"\0\0" or data[2] != _IDX_UBYTE or data[3] != ndim:
        raise SaalError(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes (wrong magic number); replace the damaged file"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise SaalError(
            f"{path} is truncated or padded: {len(data)} bytes where its header promises {expected}; "
            "replace the damaged file"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


# --- SVHN ---------------------------------------------------------------------------------------


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images N x 3 x 32 x 32 uint8, labels 0..9)`` from an SVHN ``.mat`` file (X is H x W x C x N)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as e:  # scipy raises a zoo of types on damaged files; all mean "unreadable"
        raise SaalError(f"cannot read {path} as a MATLAB file ({type(e).__name__}: {e}); replace the file") from e
    if "X" not in mat or "y" not in mat:
        raise SaalError(f"{path} lacks the arrays X and y of an SVHN file; replace the file")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8 or x.shape[3] != len(y):
        raise SaalError(
            f"{path}: X must be H x W x 3 x N uint8 with N labels in y, got X {x.shape} {x.dtype} and {len(y)} labels"
        )
    y = y.astype(np.int64)
    y[y == 10] = 0
    _check_labels(y, 10, path)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


# --- CIFAR --------------------------------------------------------------------------------------


def _load_cifar(
    name: str,
    cls: type[tvd.CIFAR10],
    data_dir: str,
    download: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> DatasetBundle:
    root = Path(data_dir)
    folder = root / cls.base_folder
    train_names = [n for n, _ in cls.train_list]
    test_names = [n for n, _ in cls.test_list]
    meta_name = cls.meta["filename"]
    names = [*train_names, *test_names, meta_name]
    archive = root / cls.filename
    if _missing(folder, names) and archive.is_file():
        _unpack(archive, root)

    def fetch() -> None:
        cls(str(root), train=True, download=True)

    _ensure(name, folder, names, download, fetch, f"the folder that holds {cls.base_folder}/")
    classes = _read_cifar_meta(folder / meta_name, cls.meta["key"])
    splits = []
    for group in (train_names, test_names):
        parts = [_read_cifar_batch(folder / n, len(classes)) for n in group]
        splits.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    (x_train, y_train), (x_test, y_test) = splits
    return _bundle(name, x_train, y_train, x_test, y_test, classes, mean, std)


def _unpickle(path: Path) -> object:
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:  # any failure to unpickle means a damaged or foreign file
        raise SaalError(f"cannot unpickle {path} ({type(e).__name__}: {e}); replace the damaged file") from e


def _read_cifar_meta(path: Path, key: str) -> list[str]:
    meta = _unpickle(path)
    if not isinstance(meta, dict) or key not in meta:
        raise SaalError(f"{path} has no {key!r} entry; replace the damaged file")
    return [str(c) for c in meta[key]]


def _read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images N x 3 x 32 x 32 uint8, labels)`` from one pickled CIFAR batch."""
    entry = _unpickle(path)
    if not isinstance(entry, dict):
        entry = {}
    labels_key = next((k for k in ("labels", "fine_labels") if k in entry), None)
    if labels_key is None or "data" not in entry:
        raise SaalError(f"{path} lacks the 'data' and 'labels' / 'fine_labels' entries of a CIFAR batch")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[labels_key], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise SaalError(
            f"{path}: 'data' must be N x 3072 uint8 with N labels, got {data.shape} {data.dtype} "
            f"and {len(labels)} labels; replace the damaged file"
        )
    _check_labels(labels, num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels


# --- shared -------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise SaalError(
            f"{path} holds labels outside 0..{num_classes - 1} ({labels.min()}..{labels.max()}); replace the file"
        )


def _bundle(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    classes: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> DatasetBundle:
    train = normalise_(to_unit_float(x_train), mean, std)
    test = normalise_(to_unit_float(x_test), mean, std)
    y_train = np.asarray(y_train, dtype=np.int64)
    return DatasetBundle(
        name=name,
        train=ArrayDataset(train, y_train),
        test=ArrayDataset(test, np.asarray(y_test, dtype=np.int64)),
        train_targets=y_train,
        classes=classes,
        channels=int(train.shape[1]),
        image_size=int(train.shape[2]),
        mean=mean,
        std=std,
    )


def _missing(folder: Path, names: list[str], gz_ok: bool = False) -> list[str]:
    return [n for n in names if not ((folder / n).is_file() or (gz_ok and (folder / f"{n}.gz").is_file()))]


def _ensure(
    name: str,
    folder: Path,
    names: list[str],
    download: bool,
    fetch: Callable[[], None],
    point_at: str,
    gz_ok: bool = False,
) -> None:
    """Make sure ``folder`` holds ``names``, downloading them with ``fetch`` if allowed.

    Raises:
        SaalError: files still missing, naming them, the folder, and how to provide them.
    """
    missing = _missing(folder, names, gz_ok)
    if not missing:
        return
    if download:
        created = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                fetch()
            reason = "the download left them missing"
        except Exception as e:  # torchvision raises RuntimeError, URLError, OSError, ...
            reason = f"download failed: {_one_line(e)}"
        for p in created:  # remove the empty folders that a failed download left behind
            with contextlib.suppress(OSError):
                p.rmdir()
        missing = _missing(folder, names, gz_ok)
        if not missing:
            return
    else:
        reason = "download=False"
    listed = ", ".join(missing) + (" (or .gz)" if gz_ok else "")
    raise SaalError(
        f"{name}: missing {listed} in {folder} ({reason}); put the files there, or point {_WHERE} at {point_at}"
    )


def _unpack(archive: Path, root: Path) -> None:
    try:
        tvd.utils.extract_archive(str(archive), str(root))
    except Exception as e:  # tarfile / OS errors
        raise SaalError(f"cannot unpack {archive} ({_one_line(e)}); delete it and download again") from e


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if previous is None else previous)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    network = re.findall(r"<urlopen error [^>]*>", text)
    if network:  # torchvision lists every mirror it tried; the last network error says enough
        text = network[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
