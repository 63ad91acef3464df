"""SAAL for detectors, and its ablation without the perturbation (the pseudo-label loss alone)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from torch import nn

from saal.errors import SaalError
from saal.pool import Pool
from saal.sharpness.detection import check_threshold, pool_detection_sharpness
from saal.sharpness.engine import PoolSharpness
from saal.strategies.saal import SAALCore
from saal.tasks.detection import Detection


def detection_task(pool: Pool) -> Detection:
    """Return the pool's :class:`Detection` task.

    Raises:
        SaalError: the pool's task is not detection.
    """
    if not isinstance(pool.task, Detection):
        raise SaalError(f"this strategy needs a detection pool, not {pool.task.name}")
    return pool.task


class DetectionSAAL(SAALCore):
    """SAAL on a detector: choose the images whose own-prediction loss rises most under a worst-case
    weight perturbation (see :mod:`saal.sharpness.detection`). The query, checks and ``repr`` are
    :class:`~saal.strategies.saal.SAALCore`'s, as for classification's SAAL.

    Args:
        rho: the perturbation radius (default 0.05).
        perturbation: ``"asam"`` (default, the reference code's) or ``"sam"``.
        score: ``"max"`` (the perturbed loss, the paper's score) or ``"diff"`` (perturbed minus unperturbed).
        selection: ``"top-k"`` or ``"kmeans++"`` (D^2 sampling on the 1-D scores, as the reference code).
        score_threshold: detections at least this confident are the pseudo targets (default: the task's, 0.5).
        batch_size: images read at once (each is scored alone: scores never depend on it).
        subset: score only a seeded random subset of this many unlabelled images.

    ``select`` returns every scored image's score; :attr:`last_terms` keeps the losses and pseudo boxes.

    Raises:
        SaalError: a bad option value.
    """

    name = "det-saal"
    tasks: ClassVar[tuple[str, ...]] = ("detection",)
    perturb: ClassVar[bool] = True

    def __init__(
        self,
        *,
        rho: float = 0.05,
        perturbation: str = "asam",
        score: str = "max",
        selection: str = "top-k",
        score_threshold: float | None = None,
        batch_size: int = 8,
        subset: int | None = None,
    ) -> None:
        super().__init__(
            rho=rho, perturbation=perturbation, score=score, selection=selection, batch_size=batch_size, subset=subset
        )
        self.score_threshold = None if score_threshold is None else check_threshold(score_threshold)

    def sharpness(self, model: nn.Module, pool: Pool, candidates: np.ndarray) -> PoolSharpness:
        """Return the candidates' losses, perturbed losses, gradient norms and pseudo boxes (``pseudo_label``).

        Raises:
            SaalError: the pool is not a detection pool, or the model is not a detector.
        """
        return pool_detection_sharpness(
            model,
            pool.dataset,
            candidates,
            detection_task(pool),
            rho=self.rho,
            perturbation=self.perturbation,
            score_threshold=self.score_threshold,
            perturb=self.perturb,
            batch_size=self.batch_size,
        )


class DetectionSAALReference(DetectionSAAL):
    """:class:`DetectionSAAL` with the reference code's defaults: ASAM, rho 0.05, Max score, k-means++
    ("diversity") selection on the scores, a random pool subset of 2,000 per round."""

    name = "det-saal-reference"
    default_overrides: ClassVar[Mapping[str, Any]] = {"selection": "kmeans++", "subset": 2000}


class DetectionLoss(DetectionSAAL):
    """SAAL without the perturbation: the detector's own loss under its pseudo targets (the ablation that shows
    what sharpness adds; it ranks by the ``"loss"`` score). Options as :class:`DetectionSAAL` less ``rho``,
    ``perturbation`` and ``score``."""

    name = "det-loss"
    perturb: ClassVar[bool] = False

    def __init__(
        self,
        *,
        selection: str = "top-k",
        score_threshold: float | None = None,
        batch_size: int = 8,
        subset: int | None = None,
    ) -> None:
        super().__init__(selection=selection, score_threshold=score_threshold, batch_size=batch_size, subset=subset)
        self.score_kind = "loss"
