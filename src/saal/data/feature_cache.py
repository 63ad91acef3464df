"""Feature matrices computed once and kept on disk, keyed by everything they depend on.

A frozen backbone's features of a dataset (:mod:`saal.models.frozen_backbone`) cost minutes to compute and
nothing to read back, so they are stored in one file per key: ``CACHE_DIR/<name>-<hash of the key>.pt``. The
key is a JSON-able mapping (the backbone, a content hash of its weights, a fingerprint of every split's data,
the input size, ...); the file holds the key itself, the named float32 tensors and a SHA-256 of their bytes.

Reading checks all of it: a file that cannot be read, whose key differs from the one asked for, whose checksum
does not match its tensors (a truncated or damaged file) or that lacks a split is *stale*: :func:`cached`
says so in one line (a :class:`FeatureCacheWarning`) and computes and writes it again. Writes go through a
temporary file and a rename, under a lock file, so that two processes asking for the same features at once
compute them once and never see half a file.

The cache folder is ``$SAAL_FEATURE_CACHE`` when set, else ``features/`` under the default data folder
(``$SAAL_DATA_DIR`` or ``~/.cache/saal``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from saal.data.base import ArrayDataset
from saal.errors import SaalError

CACHE_ENV = "SAAL_FEATURE_CACHE"
FORMAT = "saal-feature-cache/1"


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
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    record = {
        "format": FORMAT,
        "key": json.loads(json.dumps(key, default=str)),
        "tensors": plain,
        "sha256": tensors_digest(plain),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
                warnings.warn(f"feature cache {path} is {found}; computing it again", FeatureCacheWarning, stacklevel=2)
            tensors = dict(compute())
            write_features(path, key, tensors)
            return tensors, path, False
    except OSError as error:
        raise SaalError(
            f"cannot use feature cache folder {path.parent} ({error.strerror or type(error).__name__}); "
            f"set ${CACHE_ENV} to a writable folder"
        ) from None


__all__ = [
    "CACHE_ENV",
    "FORMAT",
    "FeatureCacheWarning",
    "cache_path",
    "cached",
    "dataset_fingerprint",
    "default_cache_dir",
    "key_digest",
    "read_features",
    "tensors_digest",
    "write_features",
]
