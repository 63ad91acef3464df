"""A user's own images, one folder per class: ``load_dataset("folder:PATH")``.

Two layouts are read:

* ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``: the given split (both must hold the same classes);
* ``PATH/<class>/*`` (or ``PATH/train/<class>/*`` alone): a seeded, stratified ``test_fraction`` of every
  class is held out as the test split.

Classes are the sorted names of the class folders (label ``i`` is the ``i``-th name); images are found at
any depth below a class folder, with torchvision's image extensions (``.png``, ``.jpg``, ``.jpeg``, ...);
other files are ignored. Every image is decoded at once into memory. Images must be square and all of one
size, unless ``image_size`` is given, which resizes them. They keep one channel if every image is greyscale,
else three (``channels`` forces either). The inputs are normalised with the per-channel mean and std of the
train split.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from saal.data.base import ArrayDataset, DatasetBundle, channel_mean_std, normalise_, stratified_split, to_unit_float
from saal.errors import SaalError

_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_CHUNK = 256  # images decoded per task: large enough to amortise scheduling, small enough to balance threads


def load(
    path: str,
    image_size: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    channels: int | None = None,
    workers: int = 1,
) -> DatasetBundle:
    """Load an image-folder dataset (see the module docstring for the layouts).

    Args:
        path: the dataset folder.
        image_size: resize every image to ``image_size x image_size``; None keeps their (common, square) size.
        test_fraction: share of each class held out for testing when the folder has no ``test`` split.
        seed: seeds the held-out draw.
        channels: force 1 (greyscale) or 3 (RGB); None picks 1 only if every image is greyscale.
        workers: decoding threads. One by default: for small images PIL spends most of its time in Python
            (holding the GIL), and threads made CIFAR-10's 60,000 JPEGs slower on a 2-core machine; they
            may help for large images on many cores.

    Returns:
        The :class:`DatasetBundle`, named ``folder:<absolute path>``.

    Raises:
        SaalError: missing or empty folder or class, different class sets in train and test, an undecodable
            image, images of different or non-square sizes without ``image_size``, bad arguments.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SaalError(f"image folder {root} does not exist; give folder:PATH with PATH/<class>/*.png")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise SaalError(f"image_size must be a positive integer, got {image_size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise SaalError(f"workers must be a positive integer, got {workers!r}")
    if channels not in (None, 1, 3):
        raise SaalError(f"channels must be 1, 3 or None (automatic), got {channels!r}")
    train_dir, test_dir = root / "train", root / "test"
    if test_dir.is_dir() and not train_dir.is_dir():
        raise SaalError(f"{root} has a test/ folder but no train/ folder; add {train_dir}/<class>/*")
    classes, files, labels = _scan(train_dir if train_dir.is_dir() else root)
    given_test = test_dir.is_dir() and train_dir.is_dir()
    if given_test:
        test_classes, test_files, test_labels = _scan(test_dir)
        if test_classes != classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(classes))
            raise SaalError(
                f"{train_dir} and {test_dir} must hold the same class folders; only in train: "
                f"{only_train or 'none'}, only in test: {only_test or 'none'}"
            )
        n_train = len(files)
        files, labels = files + test_files, np.concatenate([labels, test_labels])
    pixels, grey = _decode_all(files, image_size, channels, workers)
    if given_test:
        tr, te = np.arange(n_train), np.arange(n_train, len(files))
    else:
        tr, te = stratified_split(labels, test_fraction, seed)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # N x H x W x C -> N x C x H x W (a view)
    if grey:
        x = x[:, :1]
    x_train = to_unit_float(x[tr].contiguous())
    x_test = to_unit_float(x[te].contiguous())
    del x, pixels
    mean, std = channel_mean_std(x_train)
    normalise_(x_train, mean, std)
    normalise_(x_test, mean, std)
    return DatasetBundle(
        name=f"folder:{root.resolve()}",
        train=ArrayDataset(x_train, labels[tr]),
        test=ArrayDataset(x_test, labels[te]),
        train_targets=labels[tr].astype(np.int64),
        classes=classes,
        channels=int(x_train.shape[1]),
        image_size=int(x_train.shape[2]),
        mean=mean,
        std=std,
    )


def _scan(folder: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Return ``(sorted class names, image files, their labels)`` for ``folder/<class>/**``."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise SaalError(f"{folder} has no class folders; put images in {folder}/<class>/*.png (one folder per class)")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _images_under(folder / name)
        if not found:
            raise SaalError(
                f"class folder {folder / name} holds no images ({', '.join(IMG_EXTENSIONS)}); add some or remove it"
            )
        files += found
        labels += [label] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def _images_under(folder: Path) -> list[Path]:
    found = []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(parent, n) for n in names if not n.startswith(".") and n.lower().endswith(tuple(IMG_EXTENSIONS))]
    return sorted(found)


def _read(path: Path, channels: int | None) -> tuple[Image.Image, bool]:
    """Return the decoded image, as "L" or "RGB", and whether it is greyscale."""
    try:
        with Image.open(path) as img:
            img.load()
            grey = channels == 1 or (channels is None and img.mode in _GREY_MODES)
            mode = "L" if grey else "RGB"
            return (img if img.mode == mode else img.convert(mode)), grey
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on damaged files
        raise SaalError(f"cannot decode image {path} ({type(e).__name__}: {e}); fix or remove it") from e


def _decode_all(
    files: list[Path], image_size: int | None, channels: int | None, workers: int
) -> tuple[np.ndarray, bool]:
    """Decode every file into one ``N x S x S x 3`` uint8 array; also return whether all were greyscale.

    Greyscale images fill all three channels alike (PIL's L -> RGB), so the caller keeps channel 0 when
    every image was greyscale. Errors name the first offending file in file order.
    """
    first, _ = _read(files[0], channels)
    may_resize = image_size is not None
    if image_size is None:
        w, h = first.size
        if w != h:
            raise SaalError(f"{files[0]} is {w}x{h}; images must be square, or pass image_size=N to resize them")
        image_size = w
    side = image_size
    out = np.empty((len(files), side, side, 3), dtype=np.uint8)
    grey = np.zeros(len(files), dtype=bool)

    def decode(start: int) -> None:
        """Decode ``files[start : start + _CHUNK]`` into ``out``."""
        for i in range(start, min(start + _CHUNK, len(files))):
            img, is_grey = _read(files[i], channels)
            if img.size != (side, side):
                if not may_resize:
                    raise SaalError(
                        f"{files[i]} is {img.size[0]}x{img.size[1]} but {files[0]} is {side}x{side}; "
                        "images must share one size, or pass image_size=N to resize them"
                    )
                img = img.resize((side, side), Image.BILINEAR)
            a = np.asarray(img)
            out[i] = a[..., None] if is_grey else a
            grey[i] = is_grey

    starts = range(0, len(files), _CHUNK)
    if workers <= 1 or len(files) <= _CHUNK:
        for start in starts:
            decode(start)
    else:
        pool = ThreadPoolExecutor(workers)
        try:
            for _ in pool.map(decode, starts):  # in order, so the first failing chunk raises first
                pass
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return out, bool(grey.all())
