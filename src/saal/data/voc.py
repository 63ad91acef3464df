"""Pascal VOC folders (``voc:PATH``): ``Annotations/*.xml``, ``JPEGImages/*``, ``ImageSets/Main/<split>.txt``.

Images are decoded lazily; the XML files are read when the dataset is loaded (they are small). A box's
``difficult`` flag is kept: difficult boxes are left out of training targets and ignored by the metric, as in
VOC's own evaluation. Boxes reaching outside their image are clipped to it; zero-size boxes are dropped; both
are counted in one warning line.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from saal.data.detection import BoxRecord, DetectionBundle, make_bundle
from saal.errors import SaalError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def split_ids(root: Path, split: str) -> list[str]:
    """Return the image ids listed in ``ImageSets/Main/<split>.txt``.

    Raises:
        SaalError: the file is missing.
    """
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise SaalError(
            f"VOC split file {path} is missing; give an existing split (dataset option train_split/test_split)"
        )
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def read_annotation(root: Path, image_id: str) -> BoxRecord:
    """Return the boxes of ``Annotations/<image_id>.xml`` and the path of its image.

    Raises:
        SaalError: a missing or corrupt XML file, a box without numeric coordinates, or no image file.
    """
    xml = root / "Annotations" / f"{image_id}.xml"
    if not xml.is_file():
        raise SaalError(f"VOC annotation {xml} is missing; add it or remove {image_id!r} from the split file")
    try:
        tree = ET.parse(xml).getroot()
    except ET.ParseError as error:
        raise SaalError(f"VOC annotation {xml} is not valid XML ({error}); fix or remove it") from None
    boxes, names, difficult = [], [], []
    for obj in tree.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if not name or bb is None:
            raise SaalError(f"VOC annotation {xml}: an object lacks its name or bndbox; fix the file")
        try:
            coords = [float(bb.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            raise SaalError(f"VOC annotation {xml}: a box has non-numeric coordinates; fix the file") from None
        if not np.all(np.isfinite(coords)):
            raise SaalError(f"VOC annotation {xml}: a box lacks xmin, ymin, xmax or ymax; fix the file")
        boxes.append(coords)
        names.append(name)
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    filename = (tree.findtext("filename") or "").strip()
    candidates = [root / "JPEGImages" / filename] if filename else []
    candidates += [root / "JPEGImages" / f"{image_id}{s}" for s in IMAGE_SUFFIXES]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise SaalError(f"VOC image of {image_id!r} is missing from {root / 'JPEGImages'}; add it or drop the id")
    return BoxRecord(
        path,
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        names,
        np.asarray(difficult, dtype=bool),
        str(xml),
    )


def load(
    path: str,
    train_split: str = "trainval",
    test_split: str = "test",
    classes: str | list[str] | None = None,
) -> DetectionBundle:
    """Load a Pascal VOC folder: ``train_split`` is the pool, ``test_split`` the test set.

    Args:
        path: the folder holding ``Annotations``, ``JPEGImages`` and ``ImageSets/Main``.
        classes: the class names in label order (a list or ``"a,b,c"``); default the sorted names found.

    Returns:
        A :class:`~saal.data.detection.DetectionBundle`.

    Raises:
        SaalError: a missing folder, split file, XML or image; a corrupt XML or image; an unknown class.
    """
    root = Path(path).expanduser()
    if not (root / "Annotations").is_dir():
        raise SaalError(f"{root} is not a VOC folder (no Annotations/ in it); give the folder holding Annotations/")
    train = [read_annotation(root, i) for i in split_ids(root, train_split)]
    test = [read_annotation(root, i) for i in split_ids(root, test_split)]
    return make_bundle(f"voc:{root.name}", (train, train_split), (test, test_split), classes)
