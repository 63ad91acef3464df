"""Pascal VOC and COCO datasets: boxes, labels and the difficult flag as drawn; clipping and zero-size boxes
counted in one warning; one-line errors for bad files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from detection_cases import SIDE, DrawnBox, voc_xml

from saal.data import load_dataset
from saal.data.detection import DetectionBundle
from saal.errors import SaalError
from saal.tasks.detection import Detection


def test_voc_gives_the_drawn_boxes_labels_and_difficult_flags(
    voc_root: Path, boxes_drawn: list[list[DrawnBox]]
) -> None:
    bundle = load_dataset(f"voc:{voc_root}")
    assert isinstance(bundle, DetectionBundle) and isinstance(bundle.task, Detection)
    assert bundle.classes == ["bar", "square"] and len(bundle.train) == 12 and len(bundle.test) == 4
    for i, drawn in enumerate(boxes_drawn[:12]):
        image, target = bundle.train[i]
        assert (
            image.shape == (3, SIDE[1], SIDE[0])
            and image.dtype == torch.float32
            and 0 <= image.min() <= image.max() <= 1
        )
        expected = torch.tensor([b.box for b in drawn], dtype=torch.float32).reshape(-1, 4)
        assert torch.equal(target["boxes"], expected)
        assert target["labels"].tolist() == [bundle.classes.index(b.name) + 1 for b in drawn]
        assert target["difficult"].tolist() == [b.difficult for b in drawn]
    assert len(bundle.train_targets[3]["boxes"]) == 0  # an image with no box is a valid item
    training = bundle.task.collate_targets([bundle.train_targets[1]])[0]
    assert len(training["boxes"]) == len(boxes_drawn[1]) - 1  # the difficult box is not trained on


def test_voc_clips_boxes_and_drops_zero_size_ones_in_one_warning(voc_copy: Path) -> None:
    boxes = [
        DrawnBox("square", (-5, 10, 30, 40)),
        DrawnBox("bar", (10, 10, 10, 30)),
        DrawnBox("bar", (50, 20, 200, 40)),
    ]
    (voc_copy / "Annotations" / "img000.xml").write_text(voc_xml("img000.png", boxes))
    with pytest.warns(UserWarning) as caught:
        bundle = load_dataset(f"voc:{voc_copy}")
    lines = [str(w.message) for w in caught]
    assert len(lines) == 1 and "2 box(es) reaching outside" in lines[0] and "1 box(es) of zero width" in lines[0]
    assert bundle.train_targets[0]["boxes"].tolist() == [[0.0, 10.0, 30.0, 40.0], [50.0, 20.0, float(SIDE[0]), 40.0]]


def test_voc_takes_a_given_class_list_and_refuses_an_unknown_class(voc_root: Path) -> None:
    bundle = load_dataset(f"voc:{voc_root}", classes="square,bar,circle")
    assert bundle.classes == ["square", "bar", "circle"]
    with pytest.raises(SaalError, match="class 'bar' is not one of the classes"):
        load_dataset(f"voc:{voc_root}", classes="square")


def _spoil(root: Path, how: str) -> None:
    if how == "missing xml":
        (root / "Annotations" / "img002.xml").unlink()
    elif how == "corrupt xml":
        (root / "Annotations" / "img002.xml").write_text("<annotation><object>")
    elif how == "missing image":
        (root / "JPEGImages" / "img002.png").unlink()
    elif how == "corrupt image":
        (root / "JPEGImages" / "img002.png").write_bytes(b"not a png at all")
    elif how == "missing split":
        (root / "ImageSets" / "Main" / "test.txt").unlink()


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing xml", "img002.xml is missing"),
        ("corrupt xml", "is not valid XML"),
        ("missing image", "VOC image of 'img002' is missing"),
        ("corrupt image", "is corrupt or not an image"),
        ("missing split", "test.txt is missing"),
    ],
)
def test_voc_bad_files_are_one_line_errors(voc_copy: Path, how: str, message: str) -> None:
    _spoil(voc_copy, how)
    with pytest.raises(SaalError, match=message) as error:
        load_dataset(f"voc:{voc_copy}")
    assert "\n" not in str(error.value)


def _coco(path: Path, images: list[tuple[int, str, list[DrawnBox]]], categories: list[dict[str, object]]) -> Path:
    ids = {c["name"]: c["id"] for c in categories}
    data = {
        "images": [{"id": i, "file_name": f, "width": SIDE[0], "height": SIDE[1]} for i, f, _ in images],
        "annotations": [
            {
                "id": 100 * i + j,
                "image_id": i,
                "category_id": ids[b.name],
                "bbox": [b.box[0], b.box[1], b.box[2] - b.box[0], b.box[3] - b.box[1]],
                "iscrowd": int(b.difficult),
            }
            for i, _, boxes in images
            for j, b in enumerate(boxes)
        ],
        "categories": categories,
    }
    path.write_text(json.dumps(data))
    return path


def test_coco_files_give_the_same_targets_as_voc(
    voc_root: Path, boxes_drawn: list[list[DrawnBox]], tmp_path: Path
) -> None:
    categories = [{"id": 3, "name": "bar"}, {"id": 7, "name": "square"}]
    folder = voc_root / "JPEGImages"
    rows = [(i, f"img{i:03d}.png", b) for i, b in enumerate(boxes_drawn)]
    train = _coco(folder / "train.json", rows[:12], categories)
    _coco(folder / "test.json", rows[12:], categories)
    coco = load_dataset(f"coco:{folder}")
    voc = load_dataset(f"voc:{voc_root}")
    assert coco.classes == voc.classes
    for a, b in zip(coco.train_targets, voc.train_targets, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["difficult"], b["difficult"])
    assert torch.equal(coco.train[5][0], voc.train[5][0])
    other = _coco(tmp_path / "other.json", rows[12:], [*categories, {"id": 8, "name": "circle"}])
    with pytest.raises(SaalError, match="list different categories"):
        load_dataset(f"coco:{train}", test=str(other))
    bad = json.loads(train.read_text())
    bad["annotations"][0]["category_id"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SaalError, match="category id 99, which it does not list"):
        load_dataset(f"coco:{tmp_path / 'bad.json'}", test=str(folder / "test.json"))
    (tmp_path / "corrupt.json").write_text("{")
    with pytest.raises(SaalError, match="is not valid JSON"):
        load_dataset(f"coco:{tmp_path / 'corrupt.json'}", test=str(folder / "test.json"))


def test_real_bccd_images_read_with_their_zero_size_box_dropped(bccd: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = load_dataset(f"voc:{bccd}")
    assert bundle.classes == ["Platelets", "RBC", "WBC"]
    assert any("1 box(es) of zero width or height were dropped" in str(w.message) for w in caught)
    image, target = bundle.train[0]
    assert image.shape == (3, 480, 640)
    widths = target["boxes"][:, 2:] - target["boxes"][:, :2]
    assert len(target["boxes"]) == 13 and bool((widths >= 1).all())
    assert np.all([len(t["boxes"]) > 0 for t in bundle.train_targets])
