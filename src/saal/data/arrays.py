"""A user's own arrays: ``load_dataset("npz:PATH")``.

``PATH`` is either one ``.npz`` file with arrays ``x`` and ``y`` (a seeded, stratified ``test_fraction`` of
every class becomes the test split), or a folder holding ``train.npz`` and ``test.npz`` of that form.
An optional string array ``classes`` names the labels (else they are named ``"0"``, ``"1"``, ...).

``x`` holds N items in one of these shapes (H == W: images are square):

* ``N x D``: flat feature vectors (``image_size`` 0, ``channels`` D, normalised per feature);
* ``N x H x W``: greyscale images;
* ``N x H x W x C`` or ``N x C x H x W``: the rule is that the two equal axes are the image's sides. So
  ``x.shape[1] == x.shape[2] != x.shape[3]`` is channels-last, and ``x.shape[2] == x.shape[3]`` is
  channels-first (also when all three are equal, as in PyTorch).

``uint8`` values are pixels in 0..255 and are scaled to [0, 1]; other numbers are taken as they are.
Every input is then normalised by the per-channel (per-feature) mean and std of ``stats_sample`` train items
(all of them, in order, when the train split holds no more, which gives exactly the statistics of saal 0.1.0;
else a sample drawn with ``seed``). ``y`` holds integer labels ``0..K-1`` (integral floats are accepted); K is
the largest label + 1, or ``len(classes)``.

``x`` is read lazily when the file stores it uncompressed (``np.savez``) in C order: it is memory-mapped
straight from the ``.npz`` (at the member's data offset inside the zip), the statistics are accumulated chunk
by chunk, and each item is converted and normalised when it is read (:class:`NpzArrayDataset`), so memory
does not grow with the number of items. The zip's CRC of ``x`` is then not checked. A compressed file
(``np.savez_compressed``) cannot be read at random, so its ``x`` is loaded whole and normalised up front as
before (an in-memory :class:`~saal.data.base.ArrayDataset`); so is a Fortran-ordered or empty ``x``.
"""

from __future__ import annotations

import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from saal.data.base import (
    DEFAULT_STATS_SAMPLE,
    ArrayDataset,
    DatasetBundle,
    channel_mean_std,
    check_stats_sample,
    normalise_,
    stats_indices,
    stratified_split,
    streamed_mean_std,
    to_unit_float,
)
from saal.errors import SaalError


@dataclass(frozen=True)
class NpyMember:
    """Where an uncompressed ``.npy`` member's data lies inside a ``.npz`` file (C order)."""

    path: str
    offset: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    def open(self) -> np.ndarray:
        """Return a read-only ``np.memmap`` of the array.

        Raises:
            OSError, ValueError: the file is gone or shorter than the array.
        """
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape, order="C")


class NpzArrayDataset(Dataset):
    """Rows of a memory-mapped ``.npz`` member, converted and normalised when read: ``(tensor, int label)``.

    Item ``i`` is row ``rows[i]`` of the array, scaled to [0, 1] if ``uint8``, laid out as ``D`` or
    ``C x S x S`` and normalised, bit-identical to the same row of an eagerly loaded set. The memory map is
    opened on first read in each process and never pickled (``DataLoader`` workers reopen it).
    """

    def __init__(
        self,
        member: NpyMember,
        rows: np.ndarray,
        targets: np.ndarray,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        """
        Raises:
            ValueError: ``rows`` and ``targets`` differ in length.
        """
        self.member = member
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(self.rows) != len(self.targets):
            raise ValueError(f"{len(self.rows)} rows but {len(self.targets)} targets")
        self.mean, self.std = tuple(mean), tuple(std)
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None  # a memory map is reopened, not pickled (that would copy the whole array)
        return state

    def unit(self, rows: np.ndarray | slice) -> torch.Tensor:
        """Return the given rows of the file's array as one contiguous float tensor, not yet normalised.

        Raises:
            SaalError: the file can no longer be mapped.
        """
        if self._array is None:
            try:
                self._array = self.member.open()
            except (OSError, ValueError) as e:
                raise SaalError(f"cannot read {self.member.path} ({type(e).__name__}: {e})") from e
        return _to_nchw(to_unit_float(np.asarray(self._array[rows])), Path(self.member.path))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Return ``(normalised input tensor, label)`` of item ``i``."""
        r = int(self.rows[i])
        return normalise_(self.unit(slice(r, r + 1)), self.mean, self.std)[0], int(self.targets[i])

    def __getitems__(self, items: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Return the items at ``items``, read and converted as one batch (same values as item by item)."""
        x = normalise_(self.unit(self.rows[np.asarray(items, dtype=np.int64)]), self.mean, self.std)
        return [(x[k], int(self.targets[i])) for k, i in enumerate(items)]


def load(
    path: str, test_fraction: float = 0.2, seed: int = 0, stats_sample: int = DEFAULT_STATS_SAMPLE
) -> DatasetBundle:
    """Load arrays from ``PATH.npz`` (split here) or ``PATH/{train,test}.npz`` (see the module docstring).

    Args:
        path: the file, or the folder holding ``train.npz`` and ``test.npz``.
        test_fraction: share of each class held out for testing from a single file.
        seed: seeds the held-out draw and the statistics sample.
        stats_sample: how many train items the normalisation statistics are computed from (all when the
            train split holds no more).

    Returns:
        The :class:`DatasetBundle`, named ``npz:<absolute path>``; its splits are :class:`NpzArrayDataset` s
        when ``x`` is stored uncompressed, else in-memory :class:`~saal.data.base.ArrayDataset` s.

    Raises:
        SaalError: missing or unreadable file, missing ``x`` / ``y``, mismatched lengths, an unsupported
            shape, non-integer or negative labels, train and test items of different shapes, a bad
            ``stats_sample``.
    """
    stats_sample = check_stats_sample(stats_sample)
    source = Path(path).expanduser()
    read = _read_splits(source, test_fraction, seed)
    x_train, y_train, m_train, r_train = read.x_train, read.y_train, read.m_train, read.r_train
    where = read.where
    classes = _class_names(read.names, read.y_all, where)
    item_shape = tuple(_to_nchw(torch.empty((0, *x_train.shape[1:])), where).shape[1:])  # checks the shape
    n_train = len(y_train)
    sample = stats_indices(n_train, stats_sample, seed)
    train_eager: torch.Tensor | None = None
    if m_train is None:
        train_eager = _to_nchw(to_unit_float(_take(x_train, r_train)), where)
        # exactly as saal 0.1.0 when the sample is the whole split
        mean, std = channel_mean_std(train_eager if len(sample) == n_train else train_eager[torch.from_numpy(sample)])
    else:
        rows = np.arange(n_train, dtype=np.int64) if r_train is None else r_train
        reader = NpzArrayDataset(m_train, rows, y_train, (0.0,), (1.0,))
        mean, std = streamed_mean_std(lambda idx: reader.unit(rows[idx]), sample)
        del reader

    def split(
        x: np.ndarray, member: NpyMember | None, rows: np.ndarray | None, y: np.ndarray, eager: torch.Tensor | None
    ) -> Dataset:
        if member is not None:
            return NpzArrayDataset(member, np.arange(len(y)) if rows is None else rows, y, mean, std)
        inputs = eager if eager is not None else _to_nchw(to_unit_float(_take(x, rows)), where)
        return ArrayDataset(normalise_(inputs, mean, std), y)

    train = split(x_train, m_train, r_train, y_train, train_eager)
    test = split(read.x_test, read.m_test, read.r_test, read.y_test, None)
    return DatasetBundle(
        name=f"npz:{source.resolve()}",
        train=train,
        test=test,
        train_targets=y_train,
        classes=classes,
        channels=int(item_shape[0]),
        image_size=0 if len(item_shape) == 1 else int(item_shape[1]),
        mean=mean,
        std=std,
    )


@dataclass
class _Splits:
    """The arrays of an npz source as read: each split's array, labels, memory-mappable member (None: compressed)
    and rows of the array (None: every row, in order); the class names stored, every label, the file to name."""

    x_train: np.ndarray
    y_train: np.ndarray
    m_train: NpyMember | None
    r_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray
    m_test: NpyMember | None
    r_test: np.ndarray | None
    names: np.ndarray | None
    y_all: np.ndarray
    where: Path


def _read_splits(source: Path, test_fraction: float, seed: int) -> _Splits:
    """Return the splits of ``source``: a folder's ``train.npz`` and ``test.npz``, or one file split here by
    :func:`stratified_split` (``test_fraction`` of each class, drawn with ``seed``).

    Raises:
        SaalError: a missing or unreadable file, or train and test items of different shapes.
    """
    if source.is_dir():
        files = [source / "train.npz", source / "test.npz"]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise SaalError(f"{source} lacks {' and '.join(absent)}; give npz:FILE.npz or a folder with both files")
        (x_train, y_train, names, m_train), (x_test, y_test, test_names, m_test) = (_read(f) for f in files)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise SaalError(
                f"items in {files[0]} have shape {x_train.shape[1:]} but in {files[1]} {x_test.shape[1:]}; "
                "make them match"
            )
        names = names if names is not None else test_names
        y_all = np.concatenate([y_train, y_test])
        # every row, in order
        return _Splits(x_train, y_train, m_train, None, x_test, y_test, m_test, None, names, y_all, files[0])
    if source.is_file():
        x, y_all, names, member = _read(source)
        r_train, r_test = stratified_split(y_all, test_fraction, seed)
        return _Splits(x, y_all[r_train], member, r_train, x, y_all[r_test], member, r_test, names, y_all, source)
    raise SaalError(f"{source} does not exist; give npz:FILE.npz (arrays x and y) or a folder with train/test.npz")


def _class_names(names: np.ndarray | None, y_all: np.ndarray, where: Path) -> list[str]:
    """Return the class names: those stored (at least one per label), else ``"0"``, ``"1"``, ...

    Raises:
        SaalError: fewer stored names than classes in the labels.
    """
    num_classes = int(y_all.max()) + 1
    if names is None:
        return [str(i) for i in range(num_classes)]
    if len(names) < num_classes:
        raise SaalError(f"{where}: 'classes' names {len(names)} classes but labels go up to {num_classes - 1}")
    return [str(c) for c in names]


def _take(x: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """Return ``x`` itself for every row in order (``rows`` None), else the rows ``x[rows]`` (a copy)."""
    return x if rows is None else x[rows]


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, NpyMember | None]:
    """Return ``(x, y as int64, class names or None, where x lies if memory-mapped)`` from one ``.npz``, checked.

    ``x`` is a read-only ``np.memmap`` when it is stored uncompressed (see :func:`_stored_npy`), else the
    loaded array.

    Raises:
        SaalError: the file is unreadable or its arrays break the rules in the module docstring.
    """
    member = None
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise SaalError(f"{path} holds a single array, not a .npz; save with np.savez(path, x=images, y=labels)")
        with loaded as npz:
            keys = set(npz.files)
            if not {"x", "y"} <= keys:
                raise SaalError(
                    f"{path} must hold arrays 'x' and 'y' (found {', '.join(sorted(keys)) or 'none'}); "
                    "save with np.savez(path, x=images, y=labels)"
                )
            member = _stored_npy(path, "x")
            x = member.open() if member is not None else npz["x"]
            y = npz["y"]
            names = npz["classes"] if "classes" in keys else None
    except SaalError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SaalError(f"cannot read {path} as a .npz file ({type(e).__name__}: {e}); re-save it with np.savez") from e
    if x.ndim < 2 or x.ndim > 4:
        raise SaalError(f"{path}: 'x' must be N x D, N x H x W, N x H x W x C or N x C x H x W; got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise SaalError(f"{path}: 'x' must be numeric, got dtype {x.dtype}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != len(x):
        raise SaalError(f"{path}: 'y' must hold one label per item of 'x' ({len(x)}), got shape {y.shape}")
    if len(y) == 0:
        raise SaalError(f"{path} holds no items")
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise SaalError(
            f"{path}: labels 'y' must be integers 0..K-1, got dtype {y.dtype}; "
            "map class names to integers and store the names as 'classes'"
        )
    if y.min() < 0:
        raise SaalError(f"{path}: labels 'y' must be integers 0..K-1, found {y.min()}")
    if names is not None and names.ndim != 1:
        raise SaalError(f"{path}: 'classes' must be a 1-d array of names, got shape {names.shape}")
    return x, y.astype(np.int64), names, member


def _stored_npy(path: Path, name: str) -> NpyMember | None:
    """Locate the uncompressed ``.npy`` member ``name`` (``name.npy``, else ``name``) of the zip ``path``.

    The data starts after the zip's local file header (30 bytes, the name and the extra field, whose lengths
    are read from that header itself) and the ``.npy`` header.

    Returns:
        The member's :class:`NpyMember`; None when it must be loaded eagerly: compressed or encrypted, not a
        version 1/2 ``.npy``, Fortran order, object or empty dtype, no items, or anything unexpected (the
        eager load then reports real damage as before).
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            info = z.getinfo(f"{name}.npy" if f"{name}.npy" in names else name)
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            offset = f.tell()
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, struct.error):
        return None
    size = math.prod(shape)
    if fortran or dtype.hasobject or dtype.itemsize == 0 or size == 0:
        return None
    if offset - start + size * dtype.itemsize > info.file_size:
        return None
    return NpyMember(str(Path(path).resolve()), offset, dtype, tuple(int(d) for d in shape))


def _to_nchw(x: torch.Tensor, where: Path) -> torch.Tensor:
    """Return ``x`` as ``N x D`` or ``N x C x S x S`` by the rule in the module docstring."""
    if x.dim() == 2:
        return x
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.shape[1] == x.shape[2] and x.shape[3] != x.shape[1]:
        x = x.permute(0, 3, 1, 2).contiguous()
    if x.shape[2] != x.shape[3]:
        raise SaalError(
            f"{where}: images must be square (N x S x S, N x S x S x C or N x C x S x S), got items of shape "
            f"{tuple(x.shape[1:])}; resize them or flatten to N x D"
        )
    return x
