"""Datasets by name: each gives train and test splits and what a model needs to know.

``load_dataset("digits")`` needs nothing; the torchvision sets read ``data_dir`` (or the
``SAAL_DATA_DIR`` environment variable, or ``~/.cache/saal``), downloading when the network
allows; user data comes from an image folder (``folder:PATH``) or a ``.npz`` file
(``npz:PATH``).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path

from saal.data.base import ArrayDataset, DatasetBundle, normalise
from saal.errors import SaalError

# name -> "module:function"; imported lazily so that `saal --help` stays fast.
_REGISTRY: dict[str, str] = {
    "digits": "saal.data.digits:load",
    "mnist": "saal.data.torchvision_sets:load_mnist",
    "fashion-mnist": "saal.data.torchvision_sets:load_fashion_mnist",
    "kmnist": "saal.data.torchvision_sets:load_kmnist",
    "svhn": "saal.data.torchvision_sets:load_svhn",
    "cifar10": "saal.data.torchvision_sets:load_cifar10",
    "cifar100": "saal.data.torchvision_sets:load_cifar100",
}
USER_PREFIXES = ("folder:", "npz:", "voc:", "coco:", "npy:")
# prefix -> the module whose ``load(path, **options)`` reads such data
_USER_MODULES = {
    "folder:": "saal.data.image_folder",
    "npz:": "saal.data.arrays",
    "voc:": "saal.data.voc",
    "coco:": "saal.data.coco",
    "npy:": "saal.data.npy_pool",
}
DATA_DIR_ENV = "SAAL_DATA_DIR"


def dataset_names() -> list[str]:
    """Return the registered dataset names."""
    return sorted(_REGISTRY)


def default_data_dir() -> Path:
    """Return ``$SAAL_DATA_DIR`` if set, else ``~/.cache/saal``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saal"


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **options: object) -> DatasetBundle:
    """Load a dataset by registry name, or user data as ``folder:PATH`` / ``npz:PATH``.

    Args:
        name: a name from :func:`dataset_names`, ``folder:ROOT`` (``ROOT/train/<class>/*`` and
            ``ROOT/test/<class>/*``, or ``ROOT/<class>/*`` with a held-out fraction) or
            ``npz:PATH`` (arrays ``x`` and ``y``; ``PATH`` may also be a folder with
            ``train.npz`` and ``test.npz``) or ``npy:FOLDER`` (``x.npy`` and ``y.npy`` read a batch at a
            time, see :mod:`saal.data.npy_pool`).
        data_dir: where the standard files are (or will be downloaded to).
        options: loader-specific options (e.g. ``image_size`` for image folders).

    Returns:
        The loaded :class:`DatasetBundle`.

    Raises:
        SaalError: unknown name, missing or corrupt files.
    """
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    for prefix in USER_PREFIXES:
        if name.startswith(prefix):
            path = name[len(prefix) :]
            if not path:
                raise SaalError(f"{prefix}PATH needs a path after the colon, e.g. {prefix}/data/my_set")
            return _call(name, importlib.import_module(_USER_MODULES[prefix]).load, path, options)
    if name not in _REGISTRY:
        raise SaalError(
            f"unknown dataset {name!r}; choose one of {', '.join(dataset_names())}, or folder:PATH or npz:PATH"
        )
    return _call(name, _resolve(_REGISTRY[name]), str(root), options)


def _call(name: str, loader: Callable[..., DatasetBundle], first: str, options: dict[str, object]) -> DatasetBundle:
    """Call ``loader(first, **options)``, turning an option it does not take into a :class:`SaalError`."""
    accepted = list(inspect.signature(loader).parameters)[1:]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise SaalError(
            f"dataset {name!r} takes no option {', '.join(unknown)}; it takes: {', '.join(accepted) or 'none'}"
        )
    return loader(first, **options)


def _resolve(target: str) -> Callable[..., DatasetBundle]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


# the lazy file-backed datasets, imported on first use (they pull in PIL and torchvision)
_LAZY_EXPORTS = {
    "ImageFileDataset": "saal.data.image_folder",
    "NpzArrayDataset": "saal.data.arrays",
    "NpyRowsDataset": "saal.data.npy_pool",
}


def __getattr__(name: str) -> object:
    """Return a lazily imported export (``ImageFileDataset``, ``NpzArrayDataset``).

    Raises:
        AttributeError: ``name`` is not an attribute of this module.
    """
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ArrayDataset",
    "DatasetBundle",
    "ImageFileDataset",
    "NpyRowsDataset",
    "NpzArrayDataset",
    "dataset_names",
    "default_data_dir",
    "load_dataset",
    "normalise",
]
