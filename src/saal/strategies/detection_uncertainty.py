"""Uncertainty sampling for detectors: entropy, least confidence and margin of each box's class scores,
aggregated over an image's boxes by ``max``, ``mean`` or ``sum``.

A box's class distribution is its class scores (the sigmoid score of every object class at the location that
produced the box, FCOS and RetinaNet) normalised to sum to one. Box scores (larger = more uncertain):

* entropy: ``-sum_c q_c log q_c``;
* least confidence: ``1 - max_c q_c``;
* margin: ``1 - (q_(1) - q_(2))``.

The boxes are the detector's detections at least ``min_score`` confident (above its own ``score_thresh``,
0.2 for FCOS). An image with no such box scores 0.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from saal.core.model_state import model_device
from saal.core.scan import Batch, scan
from saal.errors import SaalError
from saal.models.detectors import detections_with_class_scores, has_dense_head
from saal.pool import Pool
from saal.strategies.base import ScoreStrategy
from saal.strategies.detection_saal import detection_task

AGGREGATIONS = ("max", "mean", "sum")


class _BoxUncertainty(ScoreStrategy):
    """Image scores from per-box class scores, aggregated over boxes.

    Args:
        aggregate: ``max``, ``mean`` or ``sum`` over an image's boxes.
        min_score: boxes below this detection score are left out (default 0: every box the detector returns).
        batch_size: images read at once (each runs alone).
        subset: score only a seeded random subset of this many unlabelled images.

    Raises:
        SaalError: a bad option value.
    """

    tasks: ClassVar[tuple[str, ...]] = ("detection",)

    def __init__(
        self, *, aggregate: str = "max", min_score: float = 0.0, batch_size: int = 8, subset: int | None = None
    ) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        if aggregate not in AGGREGATIONS:
            raise SaalError(f"aggregate must be one of {', '.join(AGGREGATIONS)}; got {aggregate!r}")
        if not 0.0 <= float(min_score) <= 1.0:
            raise SaalError(f"min_score must lie in [0, 1], got {min_score!r}")
        self.aggregate = aggregate
        self.min_score = float(min_score)

    def score(self, model: nn.Module, pool: Pool, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        task = detection_task(pool)
        if not has_dense_head(model):
            raise SaalError(
                f"{self.name} needs per-box class scores, which only FCOS and RetinaNet detectors give here "
                f"({type(model).__name__} does not); use det-saal, det-loss, det-coreset or random with it"
            )
        device = model_device(model)

        def batch_scores(batch: Batch) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                found = detections_with_class_scores(model, task.to_device(batch.inputs, device))
            return {"score": torch.tensor([self.image_score(d) for d in found], dtype=torch.float64)}

        return scan(pool.dataset, candidates, batch_scores, batch_size=self.batch_size, collate=task.collate)[
            "score"
        ].numpy()

    def image_score(self, detections: dict[str, torch.Tensor]) -> float:
        """Return one image's score from its detections (0 when no box reaches ``min_score``)."""
        keep = detections["scores"] >= self.min_score
        scores = detections["class_scores"][keep][:, 1:].double()  # column 0 is the background
        if len(scores) == 0:
            return 0.0
        q = scores / scores.sum(1, keepdim=True).clamp_min(1e-12)
        box = self.box_scores(q)
        if self.aggregate == "max":
            return float(box.max())
        return float(box.mean() if self.aggregate == "mean" else box.sum())

    @staticmethod
    def box_scores(q: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(aggregate={self.aggregate!r}, min_score={self.min_score}, "
            f"batch_size={self.batch_size}, subset={self.subset})"
        )


class DetectionEntropy(_BoxUncertainty):
    """Entropy of each box's class distribution, aggregated over boxes; the largest are chosen."""

    name = "det-entropy"

    @staticmethod
    def box_scores(q: torch.Tensor) -> torch.Tensor:
        return -(q * q.clamp_min(1e-12).log()).sum(1)


class DetectionLeastConfidence(_BoxUncertainty):
    """``1 - max_c q_c`` of each box, aggregated over boxes; the largest are chosen."""

    name = "det-least-confidence"

    @staticmethod
    def box_scores(q: torch.Tensor) -> torch.Tensor:
        return 1.0 - q.max(1).values


class DetectionMargin(_BoxUncertainty):
    """``1 - (q_(1) - q_(2))`` of each box (one class: 0), aggregated over boxes; the largest are chosen."""

    name = "det-margin"

    @staticmethod
    def box_scores(q: torch.Tensor) -> torch.Tensor:
        if q.shape[1] < 2:
            return torch.zeros(len(q), dtype=q.dtype)
        top = q.topk(2, dim=1).values
        return 1.0 - (top[:, 0] - top[:, 1])
