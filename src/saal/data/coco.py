"""COCO annotation files (``coco:PATH``): the JSON file, its images beside it (``file_name`` relative to its folder).

``PATH`` is either a folder holding ``train.json`` and ``test.json``, or one JSON file: the pool, with the test
set from the dataset option ``test=OTHER.json``. The two files must list the same categories. Boxes
(``[x, y, w, h]``) become ``x1, y1, x2, y2``; ``iscrowd`` boxes are treated as VOC's difficult ones (left out
of training, ignored by the metric). Boxes reaching outside their image are clipped to it, zero-size boxes
dropped; both are counted in one warning line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from saal.data.detection import BoxRecord, DetectionBundle, make_bundle
from saal.errors import SaalError


def read_coco(path: Path) -> tuple[list[BoxRecord], list[tuple[int, str]]]:
    """Return the records of a COCO file and its categories as ``(id, name)`` sorted by id.

    Raises:
        SaalError: a missing or corrupt file, a missing key, or an annotation of an unknown image or category.
    """
    if not path.is_file():
        raise SaalError(f"COCO file {path} is missing; give the path of an annotation .json file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SaalError(f"COCO file {path} is not valid JSON ({type(error).__name__}); fix or replace it") from None
    try:
        categories = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
        images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        annotations: list[dict[str, Any]] = list(data.get("annotations", []))
    except (KeyError, TypeError, ValueError):
        raise SaalError(f"COCO file {path} lacks categories, images or their ids and names; fix the file") from None
    names = dict(categories)
    per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
    for ann in annotations:
        try:
            image_id, category = int(ann["image_id"]), int(ann["category_id"])
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            raise SaalError(f"COCO file {path}: an annotation lacks image_id, category_id or a 4-number bbox") from None
        if image_id not in per_image:
            raise SaalError(f"COCO file {path}: an annotation refers to image id {image_id}, which it does not list")
        if category not in names:
            raise SaalError(f"COCO file {path}: an annotation has category id {category}, which it does not list")
        per_image[image_id].append({"box": [x, y, x + w, y + h], "name": names[category], "crowd": ann.get("iscrowd")})
    records = []
    for image_id, filename in images.items():
        anns = per_image[image_id]
        records.append(
            BoxRecord(
                path.parent / filename,
                np.asarray([a["box"] for a in anns], dtype=np.float64).reshape(-1, 4),
                [a["name"] for a in anns],
                np.asarray([bool(a["crowd"]) for a in anns], dtype=bool),
                str(path),
            )
        )
    return records, categories


def load(path: str, test: str | None = None, classes: str | list[str] | None = None) -> DetectionBundle:
    """Load COCO annotation files: the pool from ``path``, the test set from ``test`` (or ``path/test.json``).

    Args:
        path: a ``.json`` file, or a folder holding ``train.json`` and ``test.json``.
        test: the test split's ``.json`` file when ``path`` is a file.
        classes: the class names in label order; default the categories' names in order of their ids.

    Returns:
        A :class:`~saal.data.detection.DetectionBundle`.

    Raises:
        SaalError: a missing or corrupt file or image, categories that differ between the files, an unknown class.
    """
    root = Path(path).expanduser()
    if root.is_dir():
        train_path, test_path = root / "train.json", root / "test.json"
    else:
        if test is None:
            raise SaalError(
                f"give the test split of {root} (dataset option test=PATH.json), or a folder with "
                "train.json and test.json"
            )
        train_path, test_path = root, Path(test).expanduser()
    train, train_categories = read_coco(train_path)
    test_records, test_categories = read_coco(test_path)
    if train_categories != test_categories:
        raise SaalError(
            f"COCO files {train_path.name} and {test_path.name} list different categories "
            f"({train_categories[:3]}... vs {test_categories[:3]}...); use files of one category list"
        )
    names = classes if classes is not None else [n for _, n in train_categories]
    return make_bundle(f"coco:{train_path.stem}", (train, "train"), (test_records, "test"), names)
