"""Helpers of the detection tests: drawn images with known boxes written as a Pascal VOC folder, and what a
``saal`` command run in this process returned."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BCCD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "BCCD"
SIDE = (96, 80)  # width, height of the drawn images
COLOURS = {"square": (230, 40, 40), "bar": (40, 40, 230)}


@dataclass
class DrawnBox:
    """A box drawn in an image: class name, x1 y1 x2 y2, difficult flag."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool = False


def drawn_images(count: int) -> list[list[DrawnBox]]:
    """Return the boxes of ``count`` images, seeded: squares and bars at random places, one image empty."""
    rng = np.random.default_rng(7)
    images = []
    for i in range(count):
        boxes = []
        for _ in range(0 if i == 3 else int(rng.integers(1, 4))):
            name = "square" if rng.random() < 0.5 else "bar"
            w, h = (20, 20) if name == "square" else (34, 12)
            x, y = int(rng.integers(2, SIDE[0] - w - 2)), int(rng.integers(2, SIDE[1] - h - 2))
            boxes.append(DrawnBox(name, (x, y, x + w, y + h)))
        images.append(boxes)
    return images


def write_image(path: Path, boxes: list[DrawnBox]) -> None:
    """Draw ``boxes`` as filled rectangles on grey noise and save the image at ``path``."""
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = (110 + 20 * rng.random((SIDE[1], SIDE[0], 3))).astype(np.uint8)
    for b in boxes:
        x1, y1, x2, y2 = (int(v) for v in b.box)
        pixels[max(y1, 0) : y2, max(x1, 0) : x2] = COLOURS.get(b.name, (0, 200, 0))
    Image.fromarray(pixels).save(path)


def voc_xml(filename: str, boxes: list[DrawnBox]) -> str:
    """Return a VOC annotation of ``boxes``."""
    objects = "".join(
        f"<object><name>{b.name}</name><difficult>{int(b.difficult)}</difficult><bndbox>"
        f"<xmin>{b.box[0]}</xmin><ymin>{b.box[1]}</ymin><xmax>{b.box[2]}</xmax><ymax>{b.box[3]}</ymax>"
        "</bndbox></object>"
        for b in boxes
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{SIDE[0]}</width><height>{SIDE[1]}</height>"
        f"<depth>3</depth></size>{objects}</annotation>"
    )


def write_voc(root: Path, images: list[list[DrawnBox]], train: int) -> Path:
    """Write a VOC folder of ``images`` (the first ``train`` the trainval split, the rest test); return it."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"img{i:03d}" for i in range(len(images))]
    for image_id, boxes in zip(ids, images, strict=True):
        write_image(root / "JPEGImages" / f"{image_id}.png", boxes)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.png", boxes))
    (root / "ImageSets/Main/trainval.txt").write_text("\n".join(ids[:train]) + "\n")
    (root / "ImageSets/Main/test.txt").write_text("\n".join(ids[train:]) + "\n")
    return root


@dataclass
class Result:
    """What one ``saal`` command did: its exit code and what it wrote to stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str
