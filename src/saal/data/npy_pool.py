"""A pool in plain ``.npy`` files, read a batch at a time: ``load_dataset("npy:FOLDER")``.

``FOLDER`` holds ``x.npy`` (N items, any layout :mod:`saal.data.arrays` accepts: ``N x D``,
``N x H x W``, ``N x H x W x C`` or ``N x C x H x W``; ``uint8`` pixels are scaled to [0, 1]) and
``y.npy`` (N integer labels), and optionally ``test_x.npy`` / ``test_y.npy`` (else a seeded,
stratified ``test_fraction`` of every class is held out). ``np.save`` writes such files, and
``np.lib.format.open_memmap`` writes them in pieces, so a pool larger than memory is easy to make.

Rows are read with positioned file reads, contiguous runs of a batch in one read, never through
a memory map: a mapped file's touched pages count as the process's resident memory, and would
grow with the pool. So memory holds the labels (8 bytes an item) and one batch, whatever N is.
Inputs are normalised like every saal dataset, with the statistics of ``stats_sample`` train items.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from saal.data.arrays import _to_nchw
from saal.data.base import (
    DEFAULT_STATS_SAMPLE,
    DatasetBundle,
    check_stats_sample,
    normalise_,
    stats_indices,
    stratified_split,
    streamed_mean_std,
    to_unit_float,
)
from saal.errors import SaalError


@dataclass(frozen=True)
class NpyFile:
    """Where a C-ordered ``.npy`` file's data starts, and what it holds."""

    path: str
    offset: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        """Bytes per item (row)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @classmethod
    def open(cls, path: Path) -> NpyFile:
        """Read the header of ``path`` and check that the file holds all its data.

        Raises:
            SaalError: not a ``.npy`` file, Fortran order, an object dtype, or a truncated file.
        """
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version in ((2, 0), (3, 0)):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unknown .npy version {version}")
                offset = f.tell()
                f.seek(0, 2)
                size = f.tell()
        except (OSError, ValueError) as exc:
            raise SaalError(
                f"cannot read {path} as a .npy file ({type(exc).__name__}: {exc}); write it with np.save"
            ) from None
        if fortran or dtype.hasobject:
            raise SaalError(f"{path} is Fortran-ordered or holds objects; save a C-ordered numeric array")
        need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size < need:
            raise SaalError(f"{path} is truncated: {size} bytes, {need} expected for shape {shape}; write it again")
        return cls(str(path.resolve()), offset, dtype, tuple(int(d) for d in shape))


class NpyRowsDataset(Dataset):
    """Rows of a ``.npy`` file, read on demand and normalised: ``(tensor, int label)``.

    Item ``i`` is row ``rows[i]`` of the file (row ``i`` when ``rows`` is None), scaled to [0, 1]
    if ``uint8``, laid out as ``D`` or ``C x S x S`` and normalised. :meth:`__getitems__` reads a
    batch with one positioned read per contiguous run of rows. The file is opened on first read in
    each process and never pickled.
    """

    def __init__(
        self,
        file: NpyFile,
        rows: np.ndarray | None,
        targets: np.ndarray,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        """
        Raises:
            ValueError: ``rows`` and ``targets`` differ in length.
        """
        self.file = file
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if self.rows is not None and len(self.rows) != len(self.targets):
            raise ValueError(f"{len(self.rows)} rows but {len(self.targets)} targets")
        self.mean, self.std = tuple(mean), tuple(std)
        self._fh: Any = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fh"] = None
        return state

    def file_rows(self, items: np.ndarray) -> np.ndarray:
        """Return the file rows of dataset items ``items``."""
        return items if self.rows is None else self.rows[items]

    def unit(self, rows: np.ndarray) -> torch.Tensor:
        """Return file rows ``rows`` as one float tensor, not yet normalised (one read per contiguous run).

        Raises:
            SaalError: the file is gone or shorter than expected.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self.file.shape[1:]), dtype=self.file.dtype)
        if len(rows):
            try:
                if self._fh is None:
                    self._fh = open(self.file.path, "rb")  # noqa: SIM115 - kept open for the next batches
                self._read_into(out, rows)
            except OSError as exc:
                raise SaalError(f"cannot read {self.file.path} ({exc.strerror})") from None
        return _to_nchw(to_unit_float(out), Path(self.file.path))

    def _read_into(self, out: np.ndarray, rows: np.ndarray) -> None:
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        rb = self.file.row_bytes
        flat = out.reshape(len(rows), -1)
        start = 0
        for stop in [*breaks.tolist(), len(rows)]:
            first, count = int(sorted_rows[start]), stop - start
            block = np.empty((count, flat.shape[1]), dtype=self.file.dtype)
            self._fh.seek(self.file.offset + first * rb)
            if self._fh.readinto(block.data.cast("B")) != count * rb:
                raise SaalError(f"{self.file.path} is truncated at row {first}; write it again")
            flat[order[start:stop]] = block
            start = stop

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Return ``(normalised input tensor, label)`` of item ``i``."""
        x = self.unit(self.file_rows(np.array([i])))
        return normalise_(x, self.mean, self.std)[0], int(self.targets[i])

    def __getitems__(self, items: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Return the items at ``items``, read as one batch (same values as item by item)."""
        idx = np.asarray(items, dtype=np.int64)
        x = normalise_(self.unit(self.file_rows(idx)), self.mean, self.std)
        return [(x[k], int(self.targets[i])) for k, i in enumerate(idx)]


def load(
    path: str, test_fraction: float = 0.2, seed: int = 0, stats_sample: int = DEFAULT_STATS_SAMPLE
) -> DatasetBundle:
    """Load ``FOLDER/x.npy`` and ``FOLDER/y.npy`` (and ``test_x.npy`` / ``test_y.npy`` if present) lazily.

    Args:
        path: the folder.
        test_fraction: share of each class held out for testing when there is no ``test_x.npy``.
        seed: seeds the held-out draw and the statistics sample.
        stats_sample: how many train items the normalisation statistics are computed from.

    Returns:
        The :class:`DatasetBundle` named ``npy:<absolute folder>``, with :class:`NpyRowsDataset` splits.

    Raises:
        SaalError: a missing folder or file, a truncated or unreadable file, labels that are not integers
            ``>= 0``, or ``x`` and ``y`` of different lengths.
    """
    stats_sample = check_stats_sample(stats_sample)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SaalError(f"{root} is not a folder; give npy:FOLDER holding x.npy and y.npy")
    x, y = _pair(root, "x.npy", "y.npy")
    if (root / "test_x.npy").exists() or (root / "test_y.npy").exists():
        tx, ty = _pair(root, "test_x.npy", "test_y.npy")
        if tx.shape[1:] != x.shape[1:]:
            raise SaalError(f"items in {tx.path} have shape {tx.shape[1:]} but in {x.path} {x.shape[1:]}")
        train_rows, test_rows, test_file = None, None, tx
        y_train, y_test = _labels(y), _labels(ty)
    else:
        y_all = _labels(y)
        train_rows, test_rows = stratified_split(y_all, test_fraction, seed)
        y_train, y_test, test_file = y_all[train_rows], y_all[test_rows], x
    reader = NpyRowsDataset(x, train_rows, y_train, (0.0,), (1.0,))
    item_shape = tuple(reader.unit(np.empty(0, dtype=np.int64)).shape[1:])
    sample = stats_indices(len(y_train), stats_sample, seed)
    mean, std = streamed_mean_std(lambda idx: reader.unit(reader.file_rows(idx)), sample)
    train = NpyRowsDataset(x, train_rows, y_train, mean, std)
    test = NpyRowsDataset(test_file, test_rows, y_test, mean, std)
    num_classes = int(max(y_train.max(), y_test.max() if len(y_test) else 0)) + 1
    return DatasetBundle(
        name=f"npy:{root.resolve()}",
        train=train,
        test=test,
        train_targets=train.targets,
        classes=[str(i) for i in range(num_classes)],
        channels=int(item_shape[0]),
        image_size=0 if len(item_shape) == 1 else int(item_shape[1]),
        mean=mean,
        std=std,
    )


def _pair(root: Path, x_name: str, y_name: str) -> tuple[NpyFile, NpyFile]:
    missing = [n for n in (x_name, y_name) if not (root / n).is_file()]
    if missing:
        raise SaalError(f"{root} lacks {' and '.join(missing)}; write them with np.save")
    x, y = NpyFile.open(root / x_name), NpyFile.open(root / y_name)
    if len(x.shape) < 2 or len(x.shape) > 4:
        raise SaalError(f"{x.path}: x must be N x D, N x H x W, N x H x W x C or N x C x H x W; got {x.shape}")
    if len(y.shape) != 1 or y.shape[0] != x.shape[0] or x.shape[0] == 0:
        raise SaalError(f"{y.path} must hold one label per item of {x.path} ({x.shape[0]}), got shape {y.shape}")
    return x, y


def _labels(y: NpyFile) -> np.ndarray:
    values = np.load(y.path, allow_pickle=False)
    if not np.issubdtype(values.dtype, np.integer) or (len(values) and values.min() < 0):
        raise SaalError(f"{y.path}: labels must be integers 0..K-1, got dtype {values.dtype}")
    return values.astype(np.int64)
