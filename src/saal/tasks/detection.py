"""Object detection: a label is an image's boxes, the model is a torchvision detector, the metric is mAP.

A label value is a dict of ``boxes`` (float32 ``(N, 4)``, ``x1, y1, x2, y2`` in pixels) and ``labels``
(int64 ``(N,)`` in ``1 .. C``; 0 is background), optionally ``difficult`` (bool ``(N,)``: left out of
training, ignored by the metric). ``N = 0`` is a valid label (an image with nothing in it).

Pseudo targets are the eval-mode detections scoring at least ``score_threshold`` whose width and height are
at least 1 px. The per-image loss is the detector's own training loss (the sum of its loss dict) under such
targets, one image per pass (torchvision normalises its losses over a batch), with every BatchNorm in eval
mode and torch's generator seeded to a constant around each call (Faster R-CNN samples proposals at random):
see :mod:`saal.sharpness.detection`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from saal.core.model_state import model_device, preserved
from saal.core.scan import batches
from saal.errors import SaalError
from saal.extras import import_extra
from saal.tasks.base import Metric, Task

DEFAULT_SCORE_THRESHOLD = 0.5
MIN_BOX_SIDE = 1.0
LOSS_SEED = 0  # torch's generator is seeded with this around every per-image loss


Target = dict[str, torch.Tensor]


class Detection(Task):
    """Object detection into ``classes``, scored by mAP@0.5 (COCO's 101-point interpolation, torchmetrics).

    Args:
        classes: the object class names; label ``c + 1`` is ``classes[c]``.
        score_threshold: detections at least this confident become pseudo targets (default 0.5).

    Raises:
        SaalError: no class, or a threshold outside [0, 1].
    """

    name: ClassVar[str] = "detection"
    metric_name: ClassVar[str] = "map50"

    def __init__(self, classes: Sequence[str], score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> None:
        if len(classes) < 1:
            raise SaalError("detection needs at least one object class")
        if not 0.0 <= float(score_threshold) <= 1.0:
            raise SaalError(f"score_threshold must lie in [0, 1], got {score_threshold}")
        self.classes = [str(c) for c in classes]
        self.num_classes = len(self.classes)
        self.score_threshold = float(score_threshold)

    # -- labels ---------------------------------------------------------------------------------
    def check_labels(self, labels: Any, count: int) -> list[Target]:
        """Return ``count`` targets as dicts of tensors.

        Raises:
            SaalError: not ``count`` of them, a target without ``boxes`` and ``labels``, boxes that are not
                ``(N, 4)`` finite numbers with ``x2 > x1`` and ``y2 > y1``, or a label outside ``1..C``.
        """
        values = list(labels) if not isinstance(labels, dict) else [labels]
        if len(values) != count:
            raise SaalError(f"label() got {count} indices but {len(values)} targets; give one target per index")
        return [self._check_target(v) for v in values]

    def _check_target(self, value: Any) -> Target:
        if not isinstance(value, dict) or "boxes" not in value or "labels" not in value:
            raise SaalError("a detection label must be a dict with 'boxes' (N x 4, x1 y1 x2 y2) and 'labels' (N)")
        boxes = torch.as_tensor(np.asarray(value["boxes"], dtype=np.float32)).reshape(-1, 4)
        labels = torch.as_tensor(np.asarray(value["labels"], dtype=np.int64)).reshape(-1)
        if len(boxes) != len(labels):
            raise SaalError(f"a detection label has {len(boxes)} boxes but {len(labels)} labels; give one per box")
        if not torch.isfinite(boxes).all() or (boxes[:, 2:] <= boxes[:, :2]).any():
            raise SaalError("detection boxes must be finite x1 y1 x2 y2 with x2 > x1 and y2 > y1")
        bad = labels[(labels < 1) | (labels > self.num_classes)]
        if len(bad):
            raise SaalError(f"box label {int(bad[0])} is not a class; labels lie in 1..{self.num_classes}")
        target: Target = {"boxes": boxes, "labels": labels}
        if "difficult" in value:
            target["difficult"] = torch.as_tensor(np.asarray(value["difficult"], dtype=bool)).reshape(-1)
        return target

    def stack_labels(self, values: list[Any]) -> list[Target]:
        return list(values)

    def label_summary(self, labels: Any) -> dict[str, float]:
        """Return ``{"boxes_labelled": total boxes}`` of the given targets."""
        return {"boxes_labelled": float(sum(len(t["boxes"]) for t in labels))}

    # -- batches --------------------------------------------------------------------------------
    def collate(self, inputs: list[Any]) -> list[torch.Tensor]:
        return [torch.as_tensor(x) for x in inputs]

    def collate_targets(self, targets: list[Any]) -> list[Target]:
        """Return the training targets: boxes and labels, difficult boxes left out."""
        return [training_target(t) for t in targets]

    def to_device(self, batch: Any, device: torch.device) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(device)
        return [
            {k: v.to(device) for k, v in item.items()} if isinstance(item, dict) else item.to(device) for item in batch
        ]

    # -- the model ------------------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """Return the detector's detections (the model must be in eval mode)."""
        return model(list(inputs))

    def training_losses(self, model: nn.Module, inputs: Any, targets: Any) -> tuple[Any, torch.Tensor]:
        """Return ``(loss dict, losses)`` of a training step: torchvision's batch-normalised loss (the sum of its
        loss dict), repeated for every image of the batch (so that their mean is the batch's loss)."""
        losses = model(list(inputs), list(targets))
        total = sum_losses(losses)
        return losses, total.expand(len(inputs))

    def pseudo_targets(self, outputs: Any) -> list[Target]:
        """Return, for each image's detections, those scoring at least the threshold with sides >= 1 px."""
        return [confident(d, self.score_threshold) for d in outputs]

    def output_losses(self, outputs: Any, targets: Any) -> torch.Tensor:
        """Detectors compute losses from inputs, not outputs: use :meth:`item_losses`.

        Raises:
            SaalError: always.
        """
        raise SaalError("a detector's losses need its inputs; use Detection.item_losses(model, images, targets)")

    def item_losses(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        """Return each image's training loss under ``targets``, one image per pass (BatchNorm in eval mode)."""
        loss_mode(model)
        return torch.stack([image_loss(model, x, t) for x, t in zip(inputs, targets, strict=True)])

    def embed(self, model: nn.Module, inputs: Any) -> tuple[Any, torch.Tensor]:
        """Return ``(None, pooled backbone features)``: each image's pyramid maps average-pooled and concatenated."""
        from saal.models.detectors import pooled_features

        return None, pooled_features(model, list(inputs))

    def evaluate(self, model: nn.Module, dataset: Dataset[Any], batch_size: int = 512) -> Metric:
        """Return mAP@0.5 (per class: AP@0.5) with ``details["map"]`` = mAP@[.5:.95], via torchmetrics.

        Difficult boxes are ignored (neither found nor missed). COCO's 101-point interpolation, not VOC07's
        11-point one.

        Raises:
            MissingExtra: torchmetrics or faster-coco-eval is not installed.
        """
        preds, truths = self.predict(model, dataset, min(batch_size, 8))
        return map_metric(preds, truths, self.classes)

    def predict(
        self, model: nn.Module, dataset: Dataset[Any], batch_size: int = 8
    ) -> tuple[list[Target], list[Target]]:
        """Return the eval-mode detections of every item of ``dataset`` and the items' true targets (on the CPU)."""
        device = model_device(model)
        truths = [t for t in dataset_targets(dataset)]
        preds: list[Target] = []
        with preserved(model), torch.no_grad():
            for batch in batches(dataset, np.arange(len(truths)), batch_size, collate=self.collate):
                for d in model(self.to_device(batch.inputs, device)):
                    preds.append({k: v.detach().cpu() for k, v in d.items()})
        return preds, truths

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "classes": list(self.classes)}


# -- helpers -------------------------------------------------------------------------------------
def dataset_targets(dataset: Dataset[Any]) -> list[Target]:
    """Return every item's true target: ``dataset.targets`` when it has them, else read item by item."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]
    return list(targets)


def training_target(target: dict[str, Any]) -> Target:
    """Return a target's ``boxes`` and ``labels`` without its difficult boxes."""
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)
    if "difficult" in target:
        keep = ~torch.as_tensor(target["difficult"], dtype=torch.bool).reshape(-1)
        boxes, labels = boxes[keep], labels[keep]
    return {"boxes": boxes, "labels": labels}


def confident(detections: dict[str, torch.Tensor], threshold: float) -> Target:
    """Return the detections scoring at least ``threshold`` with width and height >= 1 px, detached."""
    boxes = detections["boxes"].detach()
    keep = (detections["scores"].detach() >= threshold) & ((boxes[:, 2:] - boxes[:, :2]) >= MIN_BOX_SIDE).all(1)
    return {"boxes": boxes[keep], "labels": detections["labels"].detach()[keep]}


def sum_losses(losses: Any) -> torch.Tensor:
    """Return the sum of a torchvision loss dict.

    Raises:
        SaalError: the model returned no loss dict (it is not a detector in train mode).
    """
    if not isinstance(losses, dict) or not losses:
        raise SaalError(f"a detector in train mode must return its loss dict, got {type(losses).__name__}")
    values: list[torch.Tensor] = list(losses.values())
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def loss_mode(model: nn.Module) -> None:
    """Put ``model`` in train mode (a torchvision detector has losses only then), with every BatchNorm and
    dropout layer back in eval mode, so that an image's loss uses running statistics and depends on no other."""
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) or type(m).__name__ == "FrozenBatchNorm2d":
            m.eval()


@contextmanager
def fixed_randomness(seed: int = LOSS_SEED) -> Iterator[None]:
    """Seed torch's CPU generator with ``seed`` inside, and give the caller's generator state back after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def image_loss(model: nn.Module, image: torch.Tensor, target: Target) -> torch.Tensor:
    """Return one image's training loss under ``target`` (the model already in :func:`loss_mode`).

    torch's generator is seeded to :data:`LOSS_SEED` around the call, so a detector that samples (Faster
    R-CNN's proposal and ROI samplers) gives the same loss every time, whatever ran before.
    """
    with fixed_randomness():
        return sum_losses(model([image], [{"boxes": target["boxes"], "labels": target["labels"]}]))


def map_metric(preds: list[Target], truths: list[dict[str, Any]], classes: Sequence[str]) -> Metric:
    """Return mAP@0.5 (per class AP@0.5; ``details``: ``map`` = mAP@[.5:.95], ``map75``) of ``preds`` against
    ``truths`` (difficult boxes as ``iscrowd``: ignored), with torchmetrics' ``MeanAveragePrecision``.

    Raises:
        MissingExtra: torchmetrics or faster-coco-eval is not installed.
    """
    detection = import_extra("torchmetrics.detection", "detection", "the mAP metric")
    import_extra("faster_coco_eval", "detection", "the mAP metric")
    targets = []
    for t in truths:
        boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)
        crowd = t.get("difficult", torch.zeros(len(boxes), dtype=torch.bool))
        targets.append({"boxes": boxes, "labels": torch.as_tensor(t["labels"]).long(), "iscrowd": crowd.long()})
    predictions = [
        {"boxes": p["boxes"].float(), "scores": p["scores"].float(), "labels": p["labels"].long()} for p in preds
    ]
    full = detection.MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")
    full.update(predictions, targets)
    overall = full.compute()
    at50 = detection.MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5], class_metrics=True, backend="faster_coco_eval"
    )
    at50.update(predictions, targets)
    per = at50.compute()
    per_class: dict[str, float] = {}
    found = per["classes"].reshape(-1).tolist()
    values = per["map_per_class"].reshape(-1).tolist()
    for label, value in zip(found, values, strict=True):
        if 1 <= int(label) <= len(classes) and value >= 0:
            per_class[classes[int(label) - 1]] = float(value)
    map50 = max(float(overall["map_50"]), 0.0)
    return Metric(
        "map50",
        map50,
        per_class,
        details={"map": max(float(overall["map"]), 0.0), "map75": max(float(overall["map_75"]), 0.0)},
    )
