"""Fixtures of the detection tests: a Pascal VOC folder of drawn images with known boxes, real BCCD images copied,
and the ``saal`` command run in this process."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from detection_cases import BCCD, DrawnBox, Result, drawn_images, write_voc

from saal.cli import main


@pytest.fixture(scope="session")
def boxes_drawn() -> list[list[DrawnBox]]:
    """The boxes of the drawn VOC folder: 16 images, a difficult one in image 1, image 3 empty."""
    images = drawn_images(16)
    images[1].append(DrawnBox("square", (60, 50, 80, 70), difficult=True))
    return images


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory: pytest.TempPathFactory, boxes_drawn: list[list[DrawnBox]]) -> Path:
    """A VOC folder of the drawn images: 12 trainval, 4 test."""
    return write_voc(tmp_path_factory.mktemp("voc"), boxes_drawn, 12)


@pytest.fixture
def voc_copy(voc_root: Path, tmp_path: Path) -> Path:
    """A fresh copy of the drawn VOC folder, to spoil."""
    return Path(shutil.copytree(voc_root, tmp_path / "voc"))


@pytest.fixture
def bccd(tmp_path: Path) -> Path:
    """A VOC folder of 6 real BCCD images copied from ../shared/data/BCCD (one with a zero-size box); skips when
    the data are absent."""
    if not BCCD.is_dir():
        pytest.skip(f"BCCD is absent ({BCCD})")
    root = tmp_path / "bccd"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    ids = ["BloodImage_00338", "BloodImage_00000", "BloodImage_00001", "BloodImage_00003", "BloodImage_00004"]
    ids += ["BloodImage_00005"]
    for image_id in ids:
        shutil.copy(BCCD / "Annotations" / f"{image_id}.xml", root / "Annotations")
        shutil.copy(BCCD / "JPEGImages" / f"{image_id}.jpg", root / "JPEGImages")
    (root / "ImageSets/Main/trainval.txt").write_text("\n".join(ids[:4]) + "\n")
    (root / "ImageSets/Main/test.txt").write_text("\n".join(ids[4:]) + "\n")
    return root


@pytest.fixture
def run_saal(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Return a function that runs ``saal ARGS...`` in this process and returns its :class:`Result`."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
