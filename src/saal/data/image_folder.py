"""A user's own images, one folder per class: ``load_dataset("folder:PATH")``.

Two layouts are read:

* ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``: the given split (both must hold the same classes);
* ``PATH/<class>/*`` (or ``PATH/train/<class>/*`` alone): a seeded, stratified ``test_fraction`` of every
  class is held out as the test split.

Classes are the sorted names of the class folders (label ``i`` is the ``i``-th name); images are found at
any depth below a class folder, with torchvision's image extensions (``.png``, ``.jpg``, ``.jpeg``, ...);
other files are ignored. Images must be square and all of one size, unless ``image_size`` is given, which
resizes them. They keep one channel if every image is greyscale, else three (``channels`` forces either).

The splits are read lazily (:class:`ImageFileDataset`): they hold the file paths and labels, and an image is
decoded, resized, converted and normalised when its item is read, so memory does not grow with the number of
images. What the loader checks up front it learns from each file's header (PIL's ``Image.open``, which does
not decode pixels): that the file is an image PIL can identify, its size (square, one size unless
``image_size``) and its mode (greyscale or not, for the automatic channel count). A file whose header is
damaged is reported when the folder is loaded; one whose pixel data alone is damaged is reported, with the
same one-line :class:`~saal.errors.SaalError` naming the file, when it is first decoded: at load for the
train items the statistics are computed from, else when its item is read.

The inputs are normalised with the per-channel mean and std of ``stats_sample`` train images (all of them,
in order, when the train split holds no more; else a sample drawn with ``seed``), decoded chunk by chunk and
never held all at once. When the sample covers the split, the statistics and therefore every item are
bit-identical to those of saal 0.1.0, which decoded the whole folder into memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

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

_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_CHUNK = 256  # files per thread task: large enough to amortise scheduling, small enough to balance threads
_T = TypeVar("_T")


class ImageFileDataset(Dataset):
    """Images read from their files on demand: ``(normalised float32 C x S x S tensor, int label)`` per item.

    Holds only paths, labels and the decoding recipe (no open file), so it pickles cheaply into
    ``DataLoader`` workers. ``targets`` is the int64 numpy array of labels (reading it decodes nothing).
    """

    def __init__(
        self,
        files: list[str],
        targets: np.ndarray,
        *,
        side: int,
        channels: int,
        force: int | None,
        resize: bool,
        first: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        """
        Args:
            files: image paths, one per item.
            targets: their labels.
            side: the output images' side ``S``.
            channels: output channels, 1 or 3.
            force: the loader's ``channels`` option (None: each image's mode decides greyscale).
            resize: whether images of another size are resized (``image_size`` was given).
            first: the file the common size was taken from (named in size errors).
            mean, std: the per-channel normalisation.

        Raises:
            ValueError: ``files`` and ``targets`` differ in length.
        """
        self.files = list(files)
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(self.files) != len(self.targets):
            raise ValueError(f"{len(self.files)} files but {len(self.targets)} targets")
        self.side, self.channels, self.force, self.resize, self.first = side, channels, force, resize, first
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.files)

    def pixels(self, i: int) -> np.ndarray:
        """Return item ``i``'s decoded ``S x S x C`` uint8 pixels.

        Raises:
            SaalError: the file cannot be decoded or no longer has the size checked at load.
        """
        return _pixels(self.files[i], self.force, self.side, self.resize, self.first, self.channels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Return ``(normalised C x S x S float32 tensor, label)`` of item ``i``.

        Raises:
            SaalError: the file cannot be decoded (the message names it).
        """
        x = to_unit_float(torch.from_numpy(self.pixels(i)).permute(2, 0, 1).contiguous())
        return normalise_(x.unsqueeze(0), self.mean, self.std)[0], int(self.targets[i])


def load(
    path: str,
    image_size: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    channels: int | None = None,
    workers: int = 1,
    stats_sample: int = DEFAULT_STATS_SAMPLE,
) -> DatasetBundle:
    """Load an image-folder dataset lazily (see the module docstring for the layouts and what is checked when).

    Args:
        path: the dataset folder.
        image_size: resize every image to ``image_size x image_size``; None keeps their (common, square) size.
        test_fraction: share of each class held out for testing when the folder has no ``test`` split.
        seed: seeds the held-out draw and the statistics sample.
        channels: force 1 (greyscale) or 3 (RGB); None picks 1 only if every image is greyscale.
        workers: threads reading headers and decoding the statistics sample. One by default: for small
            images PIL spends most of its time in Python (holding the GIL), and threads made CIFAR-10's
            60,000 JPEGs slower on a 2-core machine; they may help for large images on many cores.
        stats_sample: how many train images the normalisation statistics are computed from (all when the
            train split holds no more).

    Returns:
        The :class:`DatasetBundle`, named ``folder:<absolute path>``, whose ``train`` and ``test`` are
        :class:`ImageFileDataset` s.

    Raises:
        SaalError: missing or empty folder or class, different class sets in train and test, an image whose
            header cannot be read (or, among the statistics sample, whose pixels cannot be decoded), images
            of different or non-square sizes without ``image_size``, bad arguments.
    """
    root = Path(path).expanduser()
    stats_sample = _check_arguments(root, image_size, channels, workers, stats_sample)
    classes, files, labels, n_train = _scan_splits(root)
    side, out_channels = _check_headers(files, image_size, channels, workers)
    if n_train is not None:
        tr, te = np.arange(n_train), np.arange(n_train, len(files))
    else:
        tr, te = stratified_split(labels, test_fraction, seed)

    def make(idx: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> ImageFileDataset:
        return ImageFileDataset(
            [files[i] for i in idx],
            labels[idx],
            side=side,
            channels=out_channels,
            force=channels,
            resize=image_size is not None,
            first=files[0],
            mean=mean,
            std=std,
        )

    unnormalised = make(tr, (0.0,) * out_channels, (1.0,) * out_channels)

    def read(idx: np.ndarray) -> torch.Tensor:
        """Decode the train items ``idx`` into one contiguous ``N x C x S x S`` float tensor in [0, 1]."""
        out = np.empty((len(idx), side, side, out_channels), dtype=np.uint8)

        def decode(start: int) -> None:
            for k in range(start, min(start + _CHUNK, len(idx))):
                out[k] = unnormalised.pixels(int(idx[k]))

        for _ in _in_order(decode, range(0, len(idx), _CHUNK), workers):
            pass
        return to_unit_float(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous())

    mean, std = streamed_mean_std(read, stats_indices(len(tr), stats_sample, seed))
    return DatasetBundle(
        name=f"folder:{root.resolve()}",
        train=make(tr, mean, std),
        test=make(te, mean, std),
        train_targets=labels[tr].astype(np.int64),
        classes=classes,
        channels=out_channels,
        image_size=side,
        mean=mean,
        std=std,
    )


def _check_arguments(root: Path, image_size: int | None, channels: int | None, workers: int, stats_sample: int) -> int:
    """Check :func:`load`'s arguments.

    Returns:
        ``stats_sample``, checked.

    Raises:
        SaalError: a missing folder or a bad argument, naming it.
    """
    if not root.is_dir():
        raise SaalError(f"image folder {root} does not exist; give folder:PATH with PATH/<class>/*.png")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise SaalError(f"image_size must be a positive integer, got {image_size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise SaalError(f"workers must be a positive integer, got {workers!r}")
    if channels not in (None, 1, 3):
        raise SaalError(f"channels must be 1, 3 or None (automatic), got {channels!r}")
    return check_stats_sample(stats_sample)


def _scan_splits(root: Path) -> tuple[list[str], list[str], np.ndarray, int | None]:
    """Return ``(class names, image files, their labels, train count)`` of ``root``: the files of ``train/``
    then ``test/`` when both exist (train count: how many are train's), else of ``root`` itself (None).

    Raises:
        SaalError: a test split without a train split, different class sets, or a scan error of :func:`_scan`.
    """
    train_dir, test_dir = root / "train", root / "test"
    if test_dir.is_dir() and not train_dir.is_dir():
        raise SaalError(f"{root} has a test/ folder but no train/ folder; add {train_dir}/<class>/*")
    classes, files, labels = _scan(train_dir if train_dir.is_dir() else root)
    if not (test_dir.is_dir() and train_dir.is_dir()):
        return classes, files, labels, None
    test_classes, test_files, test_labels = _scan(test_dir)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise SaalError(
            f"{train_dir} and {test_dir} must hold the same class folders; only in train: "
            f"{only_train or 'none'}, only in test: {only_test or 'none'}"
        )
    return classes, files + test_files, np.concatenate([labels, test_labels]), len(files)


def _scan(folder: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Return ``(sorted class names, image files, their labels)`` for ``folder/<class>/**``.

    Raises:
        SaalError: no class folder, or a class folder without images.
    """
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise SaalError(f"{folder} has no class folders; put images in {folder}/<class>/*.png (one folder per class)")
    files: list[str] = []
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


def _images_under(folder: Path) -> list[str]:
    """Return the image files at any depth below ``folder`` (hidden ones skipped), sorted as paths."""
    found = []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(parent, n) for n in names if not n.startswith(".") and n.lower().endswith(tuple(IMG_EXTENSIONS))]
    return [str(f) for f in sorted(found)]


def _undecodable(path: str, e: Exception) -> SaalError:
    return SaalError(f"cannot decode image {path} ({type(e).__name__}: {e}); fix or remove it")


def _header(path: str) -> tuple[tuple[int, int], str] | SaalError:
    """Return ``((width, height), mode)`` of an image file from its header, without decoding its pixels.

    Returns (rather than raises) the :class:`SaalError` naming the file when PIL cannot identify it, so that
    the caller reports the first offending file in file order.
    """
    try:
        with Image.open(path) as img:
            return img.size, img.mode
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on damaged files
        return _undecodable(path, e)


def _check_headers(files: list[str], image_size: int | None, channels: int | None, workers: int) -> tuple[int, int]:
    """Check every file's header; return ``(side, output channels)``.

    Errors name the first offending file in file order, as a decoding pass would.

    Raises:
        SaalError: an unreadable header, a non-square first image or an image of another size (both only
            without ``image_size``).
    """

    def read(start: int) -> list[tuple[tuple[int, int], str] | SaalError]:
        return [_header(f) for f in files[start : start + _CHUNK]]

    all_grey = True
    side = image_size
    i = 0
    for chunk in _in_order(read, range(0, len(files), _CHUNK), workers):
        for found in chunk:
            if isinstance(found, SaalError):
                raise found
            (w, h), mode = found
            if side is None:
                if w != h:
                    raise SaalError(
                        f"{files[0]} is {w}x{h}; images must be square, or pass image_size=N to resize them"
                    )
                side = w
            if image_size is None and (w, h) != (side, side):
                raise SaalError(
                    f"{files[i]} is {w}x{h} but {files[0]} is {side}x{side}; "
                    "images must share one size, or pass image_size=N to resize them"
                )
            all_grey = all_grey and (channels == 1 or (channels is None and mode in _GREY_MODES))
            i += 1
    if side is None:  # cannot happen: every class folder holds an image
        raise SaalError("no images found")
    return side, 1 if all_grey else 3


def _in_order(fn: Callable[[int], _T], starts: Iterable[int], workers: int) -> Iterator[_T]:
    """Yield ``fn(s)`` for each of ``starts`` in order, computed on ``workers`` threads when more than one.

    Raises:
        Exception: whatever ``fn`` raises first in the order of ``starts``.
    """
    starts = list(starts)
    if workers <= 1 or len(starts) <= 1:
        for s in starts:
            yield fn(s)
        return
    pool = ThreadPoolExecutor(workers)
    try:
        yield from pool.map(fn, starts)  # in order, so the first failing chunk raises first
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pixels(path: str, force: int | None, side: int, resize: bool, first: str, channels: int) -> np.ndarray:
    """Decode one image into ``side x side x channels`` uint8 pixels, exactly as saal 0.1.0 decoded it.

    The image becomes "L" when ``force`` is 1 or (``force`` None) its mode is greyscale, else "RGB"; a
    greyscale image in a 3-channel set fills all three channels alike (PIL's L -> RGB).

    Raises:
        SaalError: the file cannot be decoded, or has another size than checked at load (without ``resize``).
    """
    try:
        with Image.open(path) as img:
            img.load()
            grey = force == 1 or (force is None and img.mode in _GREY_MODES)
            mode = "L" if grey else "RGB"
            out = img if img.mode == mode else img.convert(mode)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on damaged files
        raise _undecodable(path, e) from e
    if out.size != (side, side):
        if not resize:
            raise SaalError(
                f"{path} is {out.size[0]}x{out.size[1]} but {first} is {side}x{side}; "
                "images must share one size, or pass image_size=N to resize them"
            )
        out = out.resize((side, side), Image.Resampling.BILINEAR)
    a = np.array(out)  # a writable copy: torch refuses to wrap read-only memory silently
    if not grey:
        return a if channels == 3 else a[..., :1]
    return np.repeat(a[..., None], channels, axis=2)
