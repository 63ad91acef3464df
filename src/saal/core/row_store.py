"""Per-item output matrices (``N x ...`` rows) kept in memory or in a file on disk, read and written by row range.

A pool of a million items has a million embedding rows: held in RAM (or on a GPU) they cost
``N x d`` floats. :class:`FileRows` keeps them in a plain file and moves rows with positioned reads
and writes (never a memory map, whose touched pages would count as the process's resident
memory), so the process holds only the block it works on. :class:`MemoryRows` is the same
interface over a tensor, for small outputs. Both give the same values, so an algorithm written
against :class:`RowStore` returns the same numbers from either.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from saal.errors import SaalError

# Outputs larger than this go to a file (see :func:`new_rows`).
IN_MEMORY_BYTES = 64 * 2**20
TMPDIR_ENV = "SAAL_TMPDIR"


class RowStore(ABC):
    """``rows x shape`` values of one dtype, read and written a block of rows at a time.

    Arithmetic on a block can depend on where its memory starts (vectorised kernels treat an
    unaligned head differently), so code that must give the same bits from every store reads
    blocks starting at multiples of 16 rows, and copies (``clone``) a single row it reuses.
    """

    def __init__(self, rows: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.rows, self.shape, self.dtype = int(rows), tuple(int(s) for s in shape), dtype

    def __len__(self) -> int:
        return self.rows

    @property
    def row_bytes(self) -> int:
        """Bytes per row."""
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()

    @abstractmethod
    def read(self, start: int, stop: int) -> torch.Tensor:
        """Return rows ``start .. stop - 1`` (a tensor of ``stop - start`` rows; may be a view)."""

    @abstractmethod
    def write(self, start: int, values: torch.Tensor) -> None:
        """Store ``values`` as rows ``start .. start + len(values) - 1``."""

    def blocks(self, rows_per_block: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, rows)`` blocks in order, ``rows_per_block`` rows each (the last may be shorter)."""
        for start in range(0, self.rows, rows_per_block):
            yield start, self.read(start, min(start + rows_per_block, self.rows))

    def to_tensor(self) -> torch.Tensor:
        """Return every row as one tensor (use only when it fits in memory)."""
        return self.read(0, self.rows)

    def close(self) -> None:  # noqa: B027 - an optional hook
        """Release what the store holds (its file)."""


class MemoryRows(RowStore):
    """A :class:`RowStore` over a tensor (any device)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__(len(tensor), tuple(tensor.shape[1:]), tensor.dtype)
        self.tensor = tensor

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop]

    def write(self, start: int, values: torch.Tensor) -> None:
        self.tensor[start : start + len(values)] = values

    def to_tensor(self) -> torch.Tensor:
        return self.tensor


class FileRows(RowStore):
    """A :class:`RowStore` in a raw file (C order, no header); rows move by positioned reads and writes.

    Args:
        path: the file; created (sized, sparse) when ``create``, else opened and checked to be long enough.
        delete: remove the file on :meth:`close`.

    Raises:
        SaalError: the file cannot be created, or is shorter than ``rows x shape``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        rows: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        create: bool = True,
        delete: bool = False,
    ) -> None:
        super().__init__(rows, shape, dtype)
        self.path = Path(path)
        self.delete = delete
        self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        try:
            self._fh = open(self.path, "w+b" if create else "r+b")  # noqa: SIM115 - closed by close()
            if create:
                self._fh.truncate(self.rows * self.row_bytes)
        except OSError as exc:
            raise SaalError(f"cannot create the row file {self.path} ({exc.strerror}); free disk space or set "
                            f"${TMPDIR_ENV} to another folder") from None  # fmt: skip
        size = os.fstat(self._fh.fileno()).st_size
        if size < self.rows * self.row_bytes:
            self._fh.close()
            raise SaalError(f"{self.path} holds {size} bytes, fewer than {self.rows} rows of {self.row_bytes}")

    def read(self, start: int, stop: int) -> torch.Tensor:
        n = max(0, stop - start)
        out = torch.empty((n, *self.shape), dtype=self.dtype)  # torch's allocator: aligned as a tensor's rows are
        self._fh.seek(start * self.row_bytes)
        got = self._fh.readinto(out.numpy().data.cast("B")) if n else 0
        if got != n * self.row_bytes:
            raise SaalError(f"{self.path} is truncated: rows {start}..{stop - 1} could not be read")
        return out

    def write(self, start: int, values: torch.Tensor) -> None:
        array = np.ascontiguousarray(values.detach().to("cpu", self.dtype).numpy())
        self._fh.seek(start * self.row_bytes)
        self._fh.write(array.data.cast("B"))

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if self.delete:
            self.path.unlink(missing_ok=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown there is nobody to tell
            self.close()


def temp_dir() -> str | None:
    """Return ``$SAAL_TMPDIR`` if set (where large per-item outputs go), else None (the system's temp folder)."""
    return os.environ.get(TMPDIR_ENV) or None


def new_rows(
    rows: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, on_disk: bool | None = None
) -> RowStore:
    """Return an empty store for ``rows x shape``: in memory (on ``device``) when small, else a temporary file.

    Args:
        on_disk: force the choice; None picks a file above :data:`IN_MEMORY_BYTES`.
    """
    nbytes = rows * math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if on_disk is None:
        on_disk = nbytes > IN_MEMORY_BYTES
    if not on_disk:
        return MemoryRows(torch.empty((rows, *shape), dtype=dtype, device=device))
    fd, name = tempfile.mkstemp(prefix="saal-rows-", suffix=".bin", dir=temp_dir())
    os.close(fd)
    return FileRows(name, rows, shape, dtype, create=True, delete=True)
