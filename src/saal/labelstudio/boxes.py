"""A ``<RectangleLabels>`` project: the mirror of :mod:`saal.labelstudio.mirror` with boxes for labels.

A label is the JSON of the annotation's rectangles in pixels of the mirrored image
(``{"boxes": [[x1, y1, x2, y2], ...], "labels": [class, ...]}``; an annotation without rectangles says the image holds
nothing), recorded in the app's history like a class name. The app project's ``task`` is ``detection``, so the model
job runs with the detection trainer (:mod:`saal.labelstudio.box_job`): ``fcos-lite0`` trained on the boxes, the
unlabelled images ordered by ``det-saal`` (``--box-strategy``), their pseudo boxes pushed as pre-labels in Label
Studio's percent coordinates (:func:`saal.labelstudio.predictions.box_result`).
"""

from __future__ import annotations

import json
from typing import Any

from PIL import Image

from saal.labelstudio.mirror import Mirror
from saal.labelstudio.predictions import BadAnnotation, annotation_boxes, box_result


class BoxMirror(Mirror):
    """The mirror of a ``<RectangleLabels>`` project (see the module docstring)."""

    job_module = "saal.labelstudio.box_job"
    task = "detection"

    def strategy(self) -> str | None:
        return self.options.box_strategy

    def image_size(self, task: int) -> tuple[int, int]:
        """Return the (width, height) of the task's mirrored image.

        Raises:
            BadAnnotation: the task has no readable image.
        """
        row = self.store.known_tasks(self.id).get(task)
        if row is None or not row["path"]:
            raise BadAnnotation(f"task {task} has no image saal could read")
        try:
            with Image.open(self.folder / str(row["path"])) as image:
                return image.size
        except OSError as error:
            raise BadAnnotation(f"the image of task {task} cannot be read ({error})") from None

    def label_of(self, task: int, result: Any) -> str | None:
        found = annotation_boxes(self.config, result, self.image_size(task))
        names = [self.config.classes[i - 1] for i in found["labels"]]
        return json.dumps({"boxes": [[round(v, 2) for v in b] for b in found["boxes"]], "labels": names})

    def classes_for(self, label: str) -> list[str]:
        return [label]  # any box label is a label of this project (the trainer reads its classes)

    def result_of(self, row: Any, version: int) -> list[dict[str, Any]]:
        if version <= 0 or not row.predicted:
            return []
        try:
            value = json.loads(row.predicted)
            size = value.get("size")
            if not size:
                return []
            return box_result(self.config, value["boxes"], value["labels"], value["scores"], (size[0], size[1]))
        except (ValueError, KeyError, TypeError):
            return []
