"""What ``saal score`` writes for a detection pool besides its CSV: the pseudo boxes (JSON) and a picture.

* ``OUT.json``: one record per scored image (score order): dataset index, image file, score, whether and when
  it was chosen, and its pseudo boxes (the detections at least ``score_threshold`` confident, width and
  height >= 1 px), each with its class name and detection score.
* ``OUT.png``: the top-scored images with their pseudo boxes and their scores drawn (torchvision's
  ``draw_bounding_boxes``), in a grid.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from saal.core.model_state import model_device, preserved
from saal.tasks.detection import MIN_BOX_SIDE, Detection

PICTURE_ITEMS = 8
PICTURE_SIDE = 320


@dataclass
class ScoredImage:
    """One scored image: its dataset index, score, pick (None: not chosen) and pseudo boxes."""

    index: int
    score: float
    pick: int | None
    boxes: torch.Tensor
    labels: torch.Tensor
    box_scores: torch.Tensor


def pseudo_boxes(
    model: nn.Module, dataset: Dataset[Any], index: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(boxes, labels, scores)`` of one image's detections scoring >= ``threshold`` with sides >= 1 px."""
    image = dataset[index][0]
    with preserved(model), torch.no_grad():
        found = model([image.to(model_device(model))])[0]
    boxes, scores = found["boxes"].cpu(), found["scores"].cpu()
    keep = (scores >= threshold) & ((boxes[:, 2:] - boxes[:, :2]) >= MIN_BOX_SIDE).all(1)
    return boxes[keep], found["labels"].cpu()[keep], scores[keep]


def scored_images(
    model: nn.Module,
    dataset: Dataset[Any],
    indices: np.ndarray,
    scores: np.ndarray | None,
    chosen: np.ndarray,
    threshold: float,
) -> list[ScoredImage]:
    """Return the scored images (all of ``indices``) best first (chosen ones in pick order when unscored)."""
    pick = {int(i): r for r, i in enumerate(chosen)}
    order = np.argsort(-np.asarray(scores), kind="stable") if scores is not None else np.arange(len(indices))
    out = []
    for pos in order:
        idx = int(indices[pos])
        boxes, labels, box_scores = pseudo_boxes(model, dataset, idx, threshold)
        score = float(scores[pos]) if scores is not None else float("nan")
        out.append(ScoredImage(idx, score, pick.get(idx), boxes, labels, box_scores))
    return out


def write_json(path: Path, images: list[ScoredImage], task: Detection, dataset: Dataset[Any]) -> None:
    """Write the records of ``images`` to ``path`` (atomically)."""
    files = getattr(dataset, "paths", None)
    records = []
    for im in images:
        records.append(
            {
                "dataset_index": im.index,
                "file": str(files[im.index]) if files is not None else None,
                "score": None if np.isnan(im.score) else im.score,
                "chosen": im.pick is not None,
                "pick": im.pick,
                "pseudo_boxes": [
                    {
                        "box": [round(float(v), 2) for v in box],
                        "label": int(label),
                        "class": task.classes[int(label) - 1] if 1 <= int(label) <= task.num_classes else None,
                        "score": round(float(s), 4),
                    }
                    for box, label, s in zip(im.boxes, im.labels, im.box_scores, strict=True)
                ],
            }
        )
    _atomic_write(path, json.dumps(records, indent=1).encode())


def picture(
    images: list[ScoredImage], task: Detection, dataset: Dataset[Any], count: int = PICTURE_ITEMS
) -> torch.Tensor:
    """Return a uint8 ``(3, H, W)`` grid of the first ``count`` images with their pseudo boxes drawn, each titled
    by its dataset index and score."""
    from torchvision.transforms.functional import resize
    from torchvision.utils import draw_bounding_boxes, make_grid

    tiles = []
    for im in images[:count]:
        image = (dataset[im.index][0].clamp(0, 1) * 255).to(torch.uint8)
        names = [
            f"{task.classes[int(lab) - 1] if 1 <= int(lab) <= task.num_classes else lab} {float(s):.2f}"
            for lab, s in zip(im.labels, im.box_scores, strict=True)
        ]
        drawn = draw_bounding_boxes(image, im.boxes, labels=names, colors="yellow", width=2) if len(names) else image
        title = f"#{im.index} score {im.score:.4g}" + ("" if im.pick is None else f" pick {im.pick}")
        frame = torch.tensor([[0.0, 0.0, float(image.shape[2]), float(image.shape[1])]])
        drawn = draw_bounding_boxes(drawn, frame, labels=[title], colors="red", width=3)
        scale = PICTURE_SIDE / max(drawn.shape[1:])
        tiles.append(resize(drawn, [int(drawn.shape[1] * scale), int(drawn.shape[2] * scale)], antialias=True))
    height = max(t.shape[1] for t in tiles)
    width = max(t.shape[2] for t in tiles)
    padded = [torch.nn.functional.pad(t, (0, width - t.shape[2], 0, height - t.shape[1])) for t in tiles]
    grid: torch.Tensor = make_grid(torch.stack(padded), nrow=min(4, len(padded)), padding=4, pad_value=255)
    return grid


def write_detection_outputs(
    out: Path,
    model: nn.Module,
    dataset: Dataset[Any],
    task: Detection,
    indices: np.ndarray,
    scores: np.ndarray | None,
    chosen: np.ndarray,
    threshold: float | None = None,
) -> tuple[Path, Path]:
    """Write ``out``'s ``.json`` (every scored image's score and pseudo boxes) and ``.png`` (the top-scored images
    drawn) beside the CSV ``out``.

    Returns:
        The two paths written.
    """
    from torchvision.io import write_png

    images = scored_images(
        model, dataset, indices, scores, chosen, task.score_threshold if threshold is None else threshold
    )
    json_path, png_path = out.with_suffix(".json"), out.with_suffix(".png")
    write_json(json_path, images, task, dataset)
    grid = picture(images, task, dataset)
    tmp = png_path.with_name(f".{png_path.name}.{os.getpid()}.tmp")
    try:
        write_png(grid, str(tmp))
        os.replace(tmp, png_path)
    finally:
        tmp.unlink(missing_ok=True)
    return json_path, png_path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
