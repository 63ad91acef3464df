"""The one feature cache: features computed once and kept, keyed by everything they depend on.

Frozen backbones' features cost minutes to compute and nothing to read back. Every consumer reads them through
this module, keyed by a JSON-able mapping of what they depend on (the backbone, a content hash of its weights, a
fingerprint of the data, the input size, the pixel mapping, ...). Three ways of holding them, for three needs:

* :func:`cached`: the features of a whole dataset (the pretrained-head models of
  :mod:`saal.models.frozen_backbone`, the ``"pretrained"`` embedding of :mod:`saal.strategies.embedding_input`):
  one file per key, ``CACHE_DIR/<prefix>-<hash of the key>.pt``, holding the key itself, the named float32 tensors
  and a SHA-256 of their bytes.
* :class:`RowCache`: rows per item id in a folder that grows (``saal label``'s per-image embeddings or pixels):
  a memory-mapped ``<prefix>-<hash of the key>.npy`` and a ``.state.npz`` beside it holding the key, a checksum
  per row and a stamp of each row's source file (size, modification time). Only rows not cached yet, or whose
  file changed, are computed, chunk by chunk: a killed process keeps what it finished.
* :data:`MEMORY_CACHE`: an in-process LRU by image content (the frozen backbone maps of the ``fcos-lite0``
  detector, :mod:`saal.models.detectors`), keyed by the hash of the backbone's key and of the exact input tensor.

Reading checks everything: a file that cannot be read, whose key differs from the one asked for, whose checksum
does not match (a truncated or damaged file) or that lacks a split is *stale*: it is said in one line (a
:class:`FeatureCacheWarning`) and computed and written again (for :class:`RowCache`, only the damaged rows).
Writes go through a temporary file and a rename, under a lock file, so that two processes asking for the same
features at once compute them once and never see half a file.

The cache folder of :func:`cached` is ``$SAAL_FEATURE_CACHE`` when set, else ``features/`` under the default data
folder (``$SAAL_DATA_DIR`` or ``~/.cache/saal``); a :class:`RowCache` lives in the folder it is given.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from saal.data.base import ArrayDataset
from saal.errors import SaalError

CACHE_ENV = "SAAL_FEATURE_CACHE"
FORMAT = "saal-feature-cache/1"
ROW_FORMAT = "saal-feature-rows/1"
ROW_CHUNK = 64  # rows computed (and committed) at a time by RowCache.ensure
MEMORY_ITEMS = 2048  # items kept by MEMORY_CACHE


class FeatureCacheWarning(UserWarning):
    """A cache file was stale (unreadable, damaged or of another key) and is being computed again."""


def default_cache_dir() -> Path:
    """Return ``$SAAL_FEATURE_CACHE`` if set, else ``<default data folder>/features``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from saal.data import default_data_dir  # the registry imports this module's package: imported late

    return default_data_dir() / "features"


def key_digest(key: Mapping[str, Any]) -> str:
    """Return a short SHA-256 of the canonical JSON of ``key`` (sorted keys)."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cache_path(
    key: Mapping[str, Any], cache_dir: str | os.PathLike[str] | None = None, prefix: str = "features"
) -> Path:
    """Return the file that holds the features of ``key`` in ``cache_dir`` (default :func:`default_cache_dir`)."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"{prefix}-{key_digest(key)}.pt"


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Return the SHA-256 of the named tensors' dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def content_digest(tensor: torch.Tensor) -> str:
    """Return a digest of a tensor's exact content, shape and dtype (what :data:`MEMORY_CACHE` items are keyed by)."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def dataset_fingerprint(dataset: Dataset[Any]) -> str:
    """Return a fingerprint of what ``dataset``'s items are, without decoding images where possible.

    * an image folder (:class:`~saal.data.image_folder.ImageFileDataset`): every file's path, size and
      modification time, its labels and the decoding recipe (side, channels, normalisation);
    * an in-memory :class:`~saal.data.base.ArrayDataset`: the bytes of its inputs and targets;
    * a memory-mapped ``.npz`` (:class:`~saal.data.arrays.NpzArrayDataset`): the file's path, size and
      modification time, the rows, targets and normalisation;
    * any other dataset: the bytes of every item (reads the whole dataset once).

    Returns:
        A hex SHA-256.
    """
    digest = hashlib.sha256(type(dataset).__name__.encode())
    files = getattr(dataset, "files", None)
    if isinstance(files, list) and hasattr(dataset, "side"):
        for f in files:
            st = os.stat(f)
            digest.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        recipe = [getattr(dataset, a, None) for a in ("side", "channels", "force", "resize", "mean", "std")]
        digest.update(repr(recipe).encode())
        digest.update(np.asarray(dataset.targets, dtype=np.int64).tobytes())  # type: ignore[attr-defined]
        return digest.hexdigest()
    if isinstance(dataset, ArrayDataset):
        digest.update(tensors_digest({"inputs": dataset.inputs}).encode())
        digest.update(dataset.targets.tobytes())
        return digest.hexdigest()
    member = getattr(dataset, "member", None)
    if member is not None and hasattr(dataset, "rows"):
        path = getattr(member, "path", None) or getattr(member, "file", None)
        if path is not None and os.path.exists(str(path)):
            st = os.stat(str(path))
            digest.update(f"{os.path.abspath(str(path))}|{st.st_size}|{st.st_mtime_ns}|{member!r}".encode())
            digest.update(np.asarray(dataset.rows, dtype=np.int64).tobytes())
            digest.update(np.asarray(getattr(dataset, "targets", ()), dtype=np.int64).tobytes())
            digest.update(repr((getattr(dataset, "mean", None), getattr(dataset, "std", None))).encode())
            return digest.hexdigest()
    for i in range(len(dataset)):  # type: ignore[arg-type]
        x, y = dataset[i]
        t = torch.as_tensor(x).contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}{y!r}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_features(path: Path, key: Mapping[str, Any], names: tuple[str, ...] = ()) -> dict[str, torch.Tensor] | str:
    """Return the tensors ``names`` (every stored tensor when empty) stored at ``path`` for ``key``, or why
    the file cannot be used.

    Returns:
        The named tensors, or a short reason (``"missing"``, ``"unreadable (...)"``, ``"of another key"``,
        ``"damaged (checksum)"``, ``"lacks split ..."``) when the file does not hold them.
    """
    if not path.is_file():
        return "missing"
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle, ...: every failure means "compute again"
        return f"unreadable ({type(error).__name__})"
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        return "not a saal feature cache"
    if stored.get("key") != json.loads(json.dumps(key, default=str)):
        return "of another key"
    tensors = stored.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        return "damaged (no tensors)"
    missing = [n for n in names if n not in tensors]
    if missing:
        return f"lacks split {missing[0]!r}"
    if stored.get("sha256") != tensors_digest(tensors):
        return "damaged (checksum)"
    return {n: tensors[n] for n in names} if names else dict(tensors)


def write_features(path: Path, key: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` for ``key`` to ``path`` atomically (a temporary file, fsync, a rename)."""
    plain = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    record = {
        "format": FORMAT,
        "key": json.loads(json.dumps(key, default=str)),
        "tensors": plain,
        "sha256": tensors_digest(plain),
    }
    _atomic_write(path, lambda fh: torch.save(record, fh))


def _atomic_write(path: Path, write: Callable[[Any], object]) -> None:
    """Write ``path`` through ``write(file)`` on a temporary file, fsync and a rename: all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _stale(path: Path, why: str, what: str = "computing it again") -> None:
    """Say in one line that the cache file ``path`` cannot be used as it is (a :class:`FeatureCacheWarning`)."""
    warnings.warn(f"feature cache {path} is {why}; {what}", FeatureCacheWarning, stacklevel=3)


def _unusable(folder: Path, error: OSError) -> SaalError:
    """Return the one-line error for a cache folder that cannot be created or written."""
    return SaalError(
        f"cannot use feature cache folder {folder} ({error.strerror or type(error).__name__}); "
        f"set ${CACHE_ENV} to a writable folder"
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path.lock`` (waiting for it) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def cached(
    key: Mapping[str, Any],
    compute: Callable[[], Mapping[str, torch.Tensor]],
    cache_dir: str | os.PathLike[str] | None = None,
    prefix: str = "features",
) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """Return the tensors of ``key`` from the cache, computing and storing them when absent or stale.

    Args:
        key: everything the tensors depend on (JSON-able).
        compute: returns the named tensors; called at most once, only when the cache cannot serve them.
        cache_dir: the cache folder (default :func:`default_cache_dir`).
        prefix: the start of the file name (says what the file holds).

    Returns:
        ``(tensors, path, hit)``: ``hit`` is True when they were read from ``path``.

    Raises:
        SaalError: the cache folder cannot be created or written (a file in its place, no permission).
    """
    path = cache_path(key, cache_dir, prefix)
    try:
        with _locked(path):
            found = read_features(path, key)
            if isinstance(found, dict):
                return found, path, True
            if found != "missing":
                _stale(path, found)
            tensors = dict(compute())
            write_features(path, key, tensors)
            return tensors, path, False
    except OSError as error:
        raise _unusable(path.parent, error) from None


# -- rows per item id, in a folder that grows ----------------------------------------------------
def row_checksum(row: np.ndarray) -> int:
    """Return a nonzero 64-bit checksum of one row's bytes (0 marks a row not cached)."""
    digest = hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def source_stamp(path: str | os.PathLike[str]) -> int:
    """Return a nonzero 64-bit stamp of a file's size and modification time, or 0 when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    digest = hashlib.blake2b(f"{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


@dataclass
class RowState:
    """What a :class:`RowCache` knows of its rows: per row id, the row's checksum (0: not cached) and its source
    file's stamp (:func:`source_stamp`; 0: not known, taken as it is found next)."""

    checksum: np.ndarray
    source: np.ndarray

    @classmethod
    def empty(cls, size: int = 0) -> RowState:
        """Return the state of ``size`` rows, none cached."""
        return cls(np.zeros(size, dtype=np.uint64), np.zeros(size, dtype=np.uint64))

    def grow(self, size: int) -> None:
        """Extend to ``size`` rows (the new ones not cached)."""
        extra = size - len(self.checksum)
        if extra > 0:
            self.checksum = np.concatenate([self.checksum, np.zeros(extra, dtype=np.uint64)])
            self.source = np.concatenate([self.source, np.zeros(extra, dtype=np.uint64)])


# The rows compute(): given (id, file) pairs, return the ids it computed, their rows (in that order) and {id: why}
# for those it could not.
RowCompute = Callable[[list[tuple[int, Path]]], tuple[list[int], np.ndarray, dict[int, str]]]


class RowCache:
    """Rows of features per item id, cached in ``folder`` and grown as items are added.

    The rows live in a memory-mapped ``<prefix>-<hash of key>.npy`` (one row per id, ``row_shape`` of ``dtype``)
    and ``<prefix>-<hash of key>.state.npz`` (the key, a checksum per row and its source file's stamp).
    :meth:`ensure` computes the rows of the items that are not cached, or whose file changed since, under a lock,
    ``ROW_CHUNK`` at a time, committing each chunk (rows flushed, then the state replaced atomically): a killed
    process keeps the chunks it finished. The first :meth:`ensure` of an instance checks every cached row against
    its checksum and computes the damaged ones again; a state or rows file that cannot be used is computed again
    whole, each with a one-line :class:`FeatureCacheWarning`.

    Args:
        folder: where the files are.
        key: everything a row depends on but its source file (JSON-able): the extractor, the weights' hash, the
            input size, the pixel mapping.
        row_shape, dtype: one row.
        prefix: the start of the file names (says what they hold).
        legacy: ``(rows .npy, done-mask .npy)`` of an earlier, unchecked format of the same rows: adopted (its
            rows kept, not computed again) when this cache has no file yet.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        key: Mapping[str, Any],
        row_shape: Sequence[int],
        dtype: Any,
        prefix: str = "rows",
        legacy: tuple[Path, Path] | None = None,
    ) -> None:
        self.key = json.loads(json.dumps(key, default=str))
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = np.dtype(dtype)
        stem = f"{prefix}-{key_digest(key)}"
        self.path = Path(folder) / f"{stem}.npy"
        self.state_path = Path(folder) / f"{stem}.state.npz"
        self.legacy = legacy
        self.checked = False  # every cached row was checked against its checksum by this instance

    def ensure(
        self,
        items: Sequence[tuple[int, Path]],
        size: int,
        compute: RowCompute,
        progress: Callable[[int, int], None] | None = None,
        chunk: int = ROW_CHUNK,
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Compute the rows of ``items`` (id, source file) that are not cached, or whose file changed.

        Args:
            items: the items whose rows are wanted.
            size: the number of ids (rows) the cache must hold, at least every item's id + 1.
            compute: computes rows (see :data:`RowCompute`); called only for items not cached.
            progress: called with (done, to do) after each chunk.
            chunk: items per call of ``compute`` (and per commit).

        Returns:
            The rows (a read-only memory map of at least ``size`` rows; only the cached ones mean anything) and
            ``{id: why}`` for the items ``compute`` could not do (their rows stay uncached).

        Raises:
            SaalError: the folder cannot be created or written.
        """
        size = max([size, *(int(i) + 1 for i, _ in items)])
        try:
            with _locked(self.path):
                rows, state = self._open(size)
                todo = self._todo(state, items)
                failed = self._fill(rows, state, todo, compute, progress, chunk)
                del rows
            return np.load(self.path, mmap_mode="r"), failed
        except OSError as error:
            raise _unusable(self.path.parent, error) from None

    def _open(self, size: int) -> tuple[np.memmap, RowState]:
        """Return the rows (writable, at least ``size``) and their state, rebuilding or adopting as needed."""
        state = self._read_state()
        if state == "missing" and self.legacy is not None:
            state = self._adopt(*self.legacy)
        rows = self._open_rows(state) if isinstance(state, RowState) else state
        if isinstance(rows, str):
            if rows != "missing":
                _stale(self.path, rows)
            rows, state = None, RowState.empty()
        assert isinstance(state, RowState)
        if rows is None or len(rows) < size:
            rows = self._grow(rows, max(size, len(state.checksum)))
        if len(state.checksum) < len(rows):
            state.grow(len(rows))
            self._save_state(state)
        if not self.checked:
            self._check(rows, state)
        return rows, state

    def _read_state(self) -> RowState | str:
        """Return the state file's contents, or why it cannot be used (``"missing"`` when there is none)."""
        if not self.state_path.is_file():
            return "missing"
        try:
            with np.load(self.state_path, allow_pickle=False) as data:
                fmt, key = str(data["format"]), json.loads(str(data["key"]))
                checksum, source = np.asarray(data["checksum"]), np.asarray(data["source"])
        except Exception as error:  # truncated zip, foreign file, missing array: every failure means "compute again"
            return f"unreadable ({type(error).__name__})"
        if fmt != ROW_FORMAT:
            return "not a saal feature cache"
        if key != self.key:
            return "of another key"
        if (
            checksum.dtype != np.uint64
            or checksum.ndim != 1
            or source.dtype != np.uint64
            or source.shape != checksum.shape
        ):
            return "damaged (state)"
        return RowState(checksum.copy(), source.copy())

    def _save_state(self, state: RowState) -> None:
        """Replace the state file atomically."""
        key = np.array(json.dumps(self.key, sort_keys=True))
        _atomic_write(
            self.state_path,
            lambda fh: np.savez(fh, format=np.array(ROW_FORMAT), key=key, checksum=state.checksum, source=state.source),
        )

    def _open_rows(self, state: RowState) -> np.memmap | str | None:
        """Return the rows file opened for writing (None when absent and no row is cached), or why it is unusable."""
        if not self.path.is_file():
            return "missing rows" if state.checksum.any() else None
        try:
            np.lib.format.open_memmap(self.path, mode="r")  # fails on a truncated file ("r+" would extend it)
            rows = np.lib.format.open_memmap(self.path, mode="r+")
        except Exception as error:  # a truncated file or header: mmap, value and format errors
            return f"unreadable ({type(error).__name__})"
        if rows.dtype != self.dtype or tuple(rows.shape[1:]) != self.row_shape or len(rows) < len(state.checksum):
            return f"of another shape ({rows.dtype} {tuple(rows.shape)})"
        return rows

    def _grow(self, rows: np.memmap | None, size: int) -> np.memmap:
        """Return the rows file grown to ``size`` rows (the cached ones copied), replaced atomically."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp.npy")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        grown = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(size, *self.row_shape))
        if rows is not None:
            grown[: len(rows)] = rows
            del rows
        grown.flush()
        del grown
        os.replace(tmp, self.path)
        return np.lib.format.open_memmap(self.path, mode="r+")

    def _check(self, rows: np.memmap, state: RowState) -> None:
        """Mark every cached row whose bytes do not match its checksum as not cached (one warning for them all)."""
        cached_ids = np.flatnonzero(state.checksum)
        bad = [int(i) for i in cached_ids if row_checksum(rows[i]) != int(state.checksum[i])]
        if bad:
            _stale(self.path, f"damaged in {len(bad)} of {len(cached_ids)} rows (checksum)", "computing them again")
            state.checksum[bad] = 0
            self._save_state(state)
        self.checked = True

    def _todo(self, state: RowState, items: Sequence[tuple[int, Path]]) -> list[tuple[int, Path, int]]:
        """Return ``(id, file, stamp)`` of the items to compute; record the stamps of rows that had none."""
        ids = np.fromiter((int(i) for i, _ in items), dtype=np.int64, count=len(items))
        stamps = np.fromiter((source_stamp(p) for _, p in items), dtype=np.uint64, count=len(items))
        checksum, source = state.checksum[ids], state.source[ids]
        unknown = (checksum != 0) & (source == 0)
        if unknown.any():  # adopted rows: their files are taken as they are now
            state.source[ids[unknown]] = stamps[unknown]
            self._save_state(state)
        todo = (checksum == 0) | ((source != 0) & (source != stamps))
        return [(int(ids[k]), Path(items[int(k)][1]), int(stamps[k])) for k in np.flatnonzero(todo)]

    def _fill(
        self,
        rows: np.memmap,
        state: RowState,
        todo: list[tuple[int, Path, int]],
        compute: RowCompute,
        progress: Callable[[int, int], None] | None,
        chunk: int,
    ) -> dict[int, str]:
        """Compute the rows of ``todo`` ``chunk`` at a time, committing each chunk; return ``{id: why}`` of failures."""
        failed: dict[int, str] = {}
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            state.checksum[[i for i, _, _ in part]] = 0  # a changed file's old row is not its row any more
            ids, values, bad = compute([(i, p) for i, p, _ in part])
            failed.update(bad)
            if ids:
                stamps = {i: s for i, _, s in part}
                values = np.asarray(values, dtype=self.dtype).reshape(len(ids), *self.row_shape)
                rows[np.asarray(ids, dtype=np.int64)] = values
                rows.flush()
                for item_id, row in zip(ids, values, strict=True):
                    state.checksum[item_id] = row_checksum(row)
                    state.source[item_id] = stamps[item_id]
            self._save_state(state)
            if progress is not None:
                progress(min(start + chunk, len(todo)), len(todo))
        return failed

    def _adopt(self, old_rows: Path, old_done: Path) -> RowState | str:
        """Take over the rows of the earlier format (rows ``.npy`` + done mask): checksum the done rows, move the
        rows file to this cache's name, write the state; return the state, or ``"missing"`` when there is none."""
        if not (old_rows.is_file() and old_done.is_file()):
            return "missing"
        state: RowState | str = "missing"
        try:
            done = np.asarray(np.load(old_done, allow_pickle=False), dtype=bool).reshape(-1)
            rows = np.lib.format.open_memmap(old_rows, mode="r")
            if rows.dtype == self.dtype and tuple(rows.shape[1:]) == self.row_shape:
                state = RowState.empty(len(rows))
                for i in np.flatnonzero(done[: len(rows)]):
                    state.checksum[i] = row_checksum(rows[i])
            del rows
            why = "of an earlier saal"
        except Exception as error:  # a damaged earlier file: computed again
            why = f"unreadable ({type(error).__name__}), of an earlier saal"
        if isinstance(state, RowState):
            os.replace(old_rows, self.path)
            self._save_state(state)
            _stale(old_rows, why, f"kept its {np.count_nonzero(state.checksum)} rows as {self.path.name}")
            self.checked = True
        else:
            old_rows.unlink(missing_ok=True)
            _stale(old_rows, why, "computing it again")
        old_done.unlink(missing_ok=True)
        return state


# -- the in-process cache, by input content ------------------------------------------------------
class MemoryCache:
    """Tensors by ``(key digest, content digest)`` kept in this process: an LRU of at most ``max_items`` items.

    What varies per input (an image's exact tensor) is in the content digest (:func:`content_digest`); what the
    tensors depend on besides it (the backbone, its weights) in the key digest (:func:`key_digest`).
    """

    def __init__(self, max_items: int = MEMORY_ITEMS) -> None:
        self.max_items = max_items
        self.items: OrderedDict[tuple[str, str], list[torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str]) -> list[torch.Tensor] | None:
        """Return the cached tensors of ``key`` (and mark them recently used), or None."""
        found = self.items.get(key)
        if found is not None:
            self.items.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return found

    def put(self, key: tuple[str, str], tensors: list[torch.Tensor]) -> None:
        """Store ``tensors`` under ``key``, dropping the least recently used beyond ``max_items``."""
        self.items[key] = tensors
        self.items.move_to_end(key)
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)

    def get_or_compute(self, key: tuple[str, str], compute: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        """Return the tensors of ``key``, computing and storing them when absent."""
        found = self.get(key)
        if found is None:
            found = compute()
            self.put(key, found)
        return found

    def clear(self) -> None:
        """Forget every cached item."""
        self.items.clear()


MEMORY_CACHE = MemoryCache()


__all__ = [
    "CACHE_ENV",
    "FORMAT",
    "MEMORY_CACHE",
    "ROW_FORMAT",
    "FeatureCacheWarning",
    "MemoryCache",
    "RowCache",
    "RowCompute",
    "RowState",
    "cache_path",
    "cached",
    "content_digest",
    "dataset_fingerprint",
    "default_cache_dir",
    "key_digest",
    "read_features",
    "row_checksum",
    "source_stamp",
    "tensors_digest",
    "write_features",
]
