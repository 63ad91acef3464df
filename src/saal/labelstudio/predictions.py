"""saal's ranking and predictions as Label Studio predictions, and Label Studio's annotations as saal labels.

**Score = acquisition order.** Each prediction's ``score`` is the task's place in saal's acquisition order, as a
number in (0, 1): the ``r``-th task saal would have labelled next (from 0, of ``n`` unlabelled tasks) gets
``(r + 1) / (n + 1)``, and a labelled task gets 1. Sorting the Data Manager by "Prediction score" **ascending**
(lowest first) therefore lists the tasks in saal's order, and a project whose sampling is "Uncertainty sampling"
(``sampling = "Uncertainty sampling"``, lowest score first) hands them out in that order too. The score is a rank,
not the model's confidence: the confidence of each box is kept in the box's own ``score``.

**Results.** For a ``<Choices>`` config, the current model's class (``type: choices``); before the first model
(the cold-start ranking) the result is empty. For ``<RectangleLabels>``, the model's boxes above the score threshold
(``type: rectanglelabels``), in percent of the image: ``x = 100 * x1 / width``, ``y = 100 * y1 / height``,
``width = 100 * (x2 - x1) / width``, ``height = 100 * (y2 - y1) / height``, ``rotation`` 0, with
``original_width`` / ``original_height``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from saal.errors import SaalError
from saal.labelstudio.labelconfig import BOXES, CHOICES, LabelConfig


class BadAnnotation(SaalError):
    """An annotation saal cannot read as a label of the project (a class it does not know, a malformed result)."""


def order_scores(order: Sequence[int]) -> dict[int, float]:
    """Return ``{task: score}`` for tasks in acquisition order (first = next to label): ``(r + 1) / (n + 1)``."""
    n = len(order)
    return {int(task): (r + 1) / (n + 1) for r, task in enumerate(order)}


def choice_result(config: LabelConfig, label: str | None) -> list[dict[str, Any]]:
    """Return the result of a ``<Choices>`` prediction of class ``label`` (empty when None)."""
    if label is None:
        return []
    return [
        {
            "from_name": config.from_name,
            "to_name": config.to_name,
            "type": CHOICES,
            "value": {"choices": [label]},
        }
    ]


def box_result(
    config: LabelConfig,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
    scores: Sequence[float],
    size: tuple[int, int],
) -> list[dict[str, Any]]:
    """Return the result of a ``<RectangleLabels>`` prediction: ``boxes`` (``x1, y1, x2, y2`` pixels) of an image
    of ``size`` (width, height), in percent, clipped to the image."""
    width, height = size
    out = []
    for k, (box, label, score) in enumerate(zip(boxes, labels, scores, strict=True)):
        x1, y1 = max(0.0, float(box[0])), max(0.0, float(box[1]))
        x2, y2 = min(float(width), float(box[2])), min(float(height), float(box[3]))
        if x2 <= x1 or y2 <= y1:
            continue
        out.append(
            {
                "id": f"saal{k}",
                "from_name": config.from_name,
                "to_name": config.to_name,
                "type": BOXES,
                "original_width": int(width),
                "original_height": int(height),
                "image_rotation": 0,
                "score": round(float(score), 4),
                "value": {
                    "x": 100.0 * x1 / width,
                    "y": 100.0 * y1 / height,
                    "width": 100.0 * (x2 - x1) / width,
                    "height": 100.0 * (y2 - y1) / height,
                    "rotation": 0,
                    "rectanglelabels": [label],
                },
            }
        )
    return out


def annotation_choice(config: LabelConfig, result: Any) -> str | None:
    """Return the class an annotation's ``result`` chose (None: it chose none).

    Raises:
        BadAnnotation: a class that is not one of the project's, or a malformed result.
    """
    if not isinstance(result, list):
        raise BadAnnotation("the annotation's result is not a list")
    for region in result:
        if not isinstance(region, dict) or region.get("type") != CHOICES:
            continue
        if region.get("from_name") not in (None, config.from_name):
            continue
        chosen = (region.get("value") or {}).get("choices") or []
        if not chosen:
            return None
        label = str(chosen[0])
        if label not in config.classes:
            raise BadAnnotation(
                f"class {label!r} is not one of the project's classes when saal connected "
                f"({', '.join(config.classes)}); reconnect the model after changing the classes"
            )
        return label
    return None


def annotation_boxes(config: LabelConfig, result: Any, size: tuple[int, int]) -> dict[str, list[Any]]:
    """Return the boxes of an annotation's ``result`` in pixels of an image of ``size`` (width, height):
    ``{"boxes": [[x1, y1, x2, y2], ...], "labels": [class index from 1, ...]}``.

    Raises:
        BadAnnotation: a class that is not one of the project's, or a malformed result.
    """
    if not isinstance(result, list):
        raise BadAnnotation("the annotation's result is not a list")
    width, height = size
    boxes, labels = [], []
    for region in result:
        if not isinstance(region, dict) or region.get("type") != BOXES:
            continue
        value = region.get("value") or {}
        names = value.get("rectanglelabels") or []
        if not names:
            continue
        if names[0] not in config.classes:
            raise BadAnnotation(
                f"class {names[0]!r} is not one of the project's classes when saal connected "
                f"({', '.join(config.classes)}); reconnect the model after changing the classes"
            )
        try:
            x, y = float(value["x"]), float(value["y"])
            w, h = float(value["width"]), float(value["height"])
        except (KeyError, TypeError, ValueError):
            raise BadAnnotation("a rectangle of the annotation lacks x, y, width or height") from None
        x1, y1 = max(0.0, x * width / 100.0), max(0.0, y * height / 100.0)
        x2, y2 = min(float(width), (x + w) * width / 100.0), min(float(height), (y + h) * height / 100.0)
        if x2 - x1 >= 1.0 and y2 - y1 >= 1.0:
            boxes.append([x1, y1, x2, y2])
            labels.append(config.classes.index(names[0]) + 1)
    return {"boxes": boxes, "labels": labels}
