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
Every input is then normalised by the train split's per-channel (per-feature) mean and std. ``y`` holds
integer labels ``0..K-1`` (integral floats are accepted); K is the largest label + 1, or ``len(classes)``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from saal.data.base import ArrayDataset, DatasetBundle, channel_mean_std, normalise_, stratified_split, to_unit_float
from saal.errors import SaalError


def load(path: str, test_fraction: float = 0.2, seed: int = 0) -> DatasetBundle:
    """Load arrays from ``PATH.npz`` (split here) or ``PATH/{train,test}.npz`` (see the module docstring).

    Returns:
        The :class:`DatasetBundle`, named ``npz:<absolute path>``.

    Raises:
        SaalError: missing or unreadable file, missing ``x`` / ``y``, mismatched lengths, an unsupported
            shape, non-integer or negative labels, train and test items of different shapes.
    """
    source = Path(path).expanduser()
    if source.is_dir():
        files = [source / "train.npz", source / "test.npz"]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise SaalError(f"{source} lacks {' and '.join(absent)}; give npz:FILE.npz or a folder with both files")
        (x_train, y_train, names), (x_test, y_test, test_names) = (_read(f) for f in files)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise SaalError(
                f"items in {files[0]} have shape {x_train.shape[1:]} but in {files[1]} {x_test.shape[1:]}; "
                "make them match"
            )
        names = names if names is not None else test_names
        y_all = np.concatenate([y_train, y_test])
        where = files[0]
    elif source.is_file():
        x, y_all, names = _read(source)
        tr, te = stratified_split(y_all, test_fraction, seed)
        x_train, y_train, x_test, y_test = x[tr], y_all[tr], x[te], y_all[te]
        where = source
    else:
        raise SaalError(f"{source} does not exist; give npz:FILE.npz (arrays x and y) or a folder with train/test.npz")
    num_classes = int(y_all.max()) + 1
    if names is not None:
        if len(names) < num_classes:
            raise SaalError(f"{where}: 'classes' names {len(names)} classes but labels go up to {num_classes - 1}")
        classes = [str(c) for c in names]
    else:
        classes = [str(i) for i in range(num_classes)]
    train, test = _to_nchw(to_unit_float(x_train), where), _to_nchw(to_unit_float(x_test), where)
    mean, std = channel_mean_std(train)
    normalise_(train, mean, std)
    normalise_(test, mean, std)
    flat = train.dim() == 2
    return DatasetBundle(
        name=f"npz:{source.resolve()}",
        train=ArrayDataset(train, y_train),
        test=ArrayDataset(test, y_test),
        train_targets=y_train,
        classes=classes,
        channels=int(train.shape[1]),
        image_size=0 if flat else int(train.shape[2]),
        mean=mean,
        std=std,
    )


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return ``(x, y as int64, class names or None)`` from one ``.npz`` file, checked."""
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
            x, y = npz["x"], npz["y"]
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
    return x, y.astype(np.int64), names


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
