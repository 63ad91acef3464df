"""Datasets of images with boxes: lazily decoded images, targets as torchvision's detectors expect them.

An item is ``(image, target)``: ``image`` a float32 ``(3, H, W)`` tensor in [0, 1], decoded when the item is
read; ``target`` a dict of ``boxes`` (float32 ``(N, 4)``, ``x1, y1, x2, y2`` in pixels), ``labels`` (int64
``(N,)``, ``1 .. C``: 0 is torchvision's background) and ``difficult`` (bool ``(N,)``). An image with no box
is a valid item (``N = 0``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from saal.data.base import DatasetBundle
from saal.errors import SaalError


@dataclass
class BoxRecord:
    """One image's annotation as read from a file, before checks.

    Attributes:
        path: the image file.
        boxes: ``(N, 4)`` ``x1, y1, x2, y2`` in pixels (float64).
        names: the class name of each box.
        difficult: each box's ``difficult`` flag.
        source: the annotation file (for messages).
    """

    path: Path
    boxes: np.ndarray
    names: list[str]
    difficult: np.ndarray
    source: str


@dataclass
class BoxCleaning:
    """What :func:`clean_records` changed: boxes clipped to their image, zero-size boxes dropped."""

    clipped: int = 0
    dropped: int = 0
    examples: list[str] = field(default_factory=list)

    def warn(self, name: str) -> None:
        """Emit one warning line saying what was clipped and dropped (nothing when nothing was)."""
        if self.clipped or self.dropped:
            where = f" (e.g. {', '.join(self.examples[:3])})" if self.examples else ""
            warnings.warn(
                f"{name}: {self.clipped} box(es) reaching outside their image were clipped to it and "
                f"{self.dropped} box(es) of zero width or height were dropped{where}",
                stacklevel=3,
            )


def image_size(path: Path) -> tuple[int, int]:
    """Return ``(width, height)`` of an image file from its header (the pixels are not decoded).

    Raises:
        SaalError: the file is missing or not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise SaalError(f"image {path} is missing; put it there or remove its annotation")
    try:
        with Image.open(path) as img:
            return int(img.size[0]), int(img.size[1])
    except (OSError, UnidentifiedImageError):
        raise SaalError(f"image {path} is corrupt or not an image; replace it or remove its annotation") from None


def clean_records(records: list[BoxRecord], class_index: dict[str, int], cleaning: BoxCleaning) -> list[dict[str, Any]]:
    """Return one target per record: boxes clipped to the image, zero-size boxes dropped, names as labels ``1..C``.

    Raises:
        SaalError: a missing or corrupt image, or a class name not in ``class_index``.
    """
    targets = []
    for rec in records:
        width, height = image_size(rec.path)
        unknown = [n for n in rec.names if n not in class_index]
        if unknown:
            raise SaalError(
                f"{rec.source}: class {unknown[0]!r} is not one of the classes ({', '.join(class_index)}); "
                "add it to the class list or fix the annotation"
            )
        boxes = rec.boxes.reshape(-1, 4).astype(np.float64)
        clipped = boxes.copy()
        clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
        changed = np.any(clipped != boxes, axis=1)
        keep = (clipped[:, 2] - clipped[:, 0] >= 1) & (clipped[:, 3] - clipped[:, 1] >= 1)
        cleaning.clipped += int((changed & keep).sum())
        cleaning.dropped += int((~keep).sum())
        if (~keep).any() or changed.any():
            cleaning.examples.append(Path(rec.source).name)
        labels = np.array([class_index[n] + 1 for n in rec.names], dtype=np.int64).reshape(-1)
        targets.append(
            {
                "boxes": torch.as_tensor(clipped[keep], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.as_tensor(labels[keep], dtype=torch.int64),
                "difficult": torch.as_tensor(rec.difficult.reshape(-1)[keep], dtype=torch.bool),
                "size": (height, width),
            }
        )
    return targets


class DetectionDataset(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """Images with boxes, decoded lazily; ``targets`` (an object array of target dicts) is the annotator.

    Args:
        paths: one image file per item.
        targets: one target dict per item (``boxes``, ``labels``, ``difficult``, ``size``).
    """

    def __init__(self, paths: list[Path], targets: list[dict[str, Any]]) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} images but {len(targets)} targets")
        self.paths = list(paths)
        self.targets = np.empty(len(targets), dtype=object)
        for i, t in enumerate(targets):
            self.targets[i] = t

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> torch.Tensor:
        """Return item ``i``'s image as a float32 ``(3, H, W)`` tensor in [0, 1].

        Raises:
            SaalError: the file cannot be decoded.
        """
        from torchvision.io import ImageReadMode, decode_image

        path = self.paths[i]
        try:
            with warnings.catch_warnings():  # torchvision 0.29 announces that its decoders move to torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                data = decode_image(str(path), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError):
            raise SaalError(f"image {path} cannot be decoded; replace it or remove its annotation") from None
        return data.to(torch.float32).div_(255.0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.image(int(i)), self.targets[int(i)]


@dataclass
class DetectionBundle(DatasetBundle):
    """A detection dataset's train (pool) and test splits; :attr:`task` is :class:`~saal.tasks.detection.Detection`."""

    @property
    def task(self) -> Any:  # a Detection task (typed Any: the base property is typed Classification)
        from saal.tasks.detection import Detection

        return Detection(self.classes)


def class_list(given: str | list[str] | tuple[str, ...] | None, found: list[str]) -> list[str]:
    """Return the class names: those given (a list or a comma-separated string), else the sorted names found.

    Raises:
        SaalError: an empty or repeated class list, or no class in the data.
    """
    if given is None:
        names = sorted(set(found))
        if not names:
            raise SaalError("the annotations name no class; give the classes (dataset option classes=a,b,c)")
        return names
    names = [n.strip() for n in given.split(",")] if isinstance(given, str) else [str(n).strip() for n in given]
    names = [n for n in names if n]
    if not names or len(set(names)) != len(names):
        raise SaalError(f"classes must be distinct non-empty names, got {given!r}")
    return names


def make_bundle(
    name: str,
    train: tuple[list[BoxRecord], str],
    test: tuple[list[BoxRecord], str],
    classes: str | list[str] | tuple[str, ...] | None,
) -> DetectionBundle:
    """Return the bundle of a train and a test split of :class:`BoxRecord` (each with a split name for messages).

    Raises:
        SaalError: an empty split, a missing or corrupt image, or an unknown class name.
    """
    for records, split in (train, test):
        if not records:
            raise SaalError(f"{name}: the {split} split has no image; check the split's list of images")
    found = [n for recs, _ in (train, test) for r in recs for n in r.names]
    names = class_list(classes, found)
    index = {n: i for i, n in enumerate(names)}
    cleaning = BoxCleaning()
    train_targets = clean_records(train[0], index, cleaning)
    test_targets = clean_records(test[0], index, cleaning)
    cleaning.warn(name)
    train_set = DetectionDataset([r.path for r in train[0]], train_targets)
    test_set = DetectionDataset([r.path for r in test[0]], test_targets)
    return DetectionBundle(
        name=name,
        train=train_set,
        test=test_set,
        train_targets=train_set.targets,
        classes=names,
        channels=3,
        image_size=0,
    )
