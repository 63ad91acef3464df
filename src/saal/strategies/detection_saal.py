"""SAAL for detectors, and its ablation without the perturbation (the pseudo-label loss alone)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from torch import nn

from saal.core.selection import top_k
from saal.errors import SaalError
from saal.pool import Pool
from saal.sharpness.detection import DetectionSharpness, check_threshold, pool_detection_sharpness
from saal.sharpness.engine import PERTURBATIONS, check_option, check_rho
from saal.strategies.base import Selection, Strategy
from saal.strategies.saal import SCORES, _check_selection, kmeans_pp_1d
from saal.tasks.detection import Detection


def detection_task(pool: Pool) -> Detection:
    """Return the pool's :class:`Detection` task.

    Raises:
        SaalError: the pool's task is not detection.
    """
    if not isinstance(pool.task, Detection):
        raise SaalError(f"this strategy needs a detection pool, not {pool.task.name}")
    return pool.task


class DetectionSAAL(Strategy):
    """SAAL on a detector: choose the images whose own-prediction loss rises most under a worst-case
    weight perturbation (see :mod:`saal.sharpness.detection`).

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
        super().__init__(batch_size=batch_size, subset=subset)
        self.rho = check_rho(rho)
        self.perturbation = check_option("perturbation", perturbation, PERTURBATIONS)
        self.score_kind = check_option("score", score, SCORES)
        self.selection = _check_selection(selection)
        self.score_threshold = None if score_threshold is None else check_threshold(score_threshold)
        self.last_terms: DetectionSharpness | None = None

    def sharpness(self, model: nn.Module, pool: Pool, candidates: np.ndarray) -> DetectionSharpness:
        """Return the candidates' losses, perturbed losses, gradient norms and pseudo boxes.

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

    def scores_of(self, terms: DetectionSharpness) -> np.ndarray:
        """Return the score this strategy ranks by."""
        return terms.score(self.score_kind)

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        terms = self.sharpness(model, pool, candidates)
        self.last_terms = terms
        scores = self.scores_of(terms)
        picked = top_k(scores, k) if self.selection == "top-k" else kmeans_pp_1d(scores, k, rng)
        return Selection(candidates[picked], candidates, scores)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rho={self.rho}, perturbation={self.perturbation!r}, score={self.score_kind!r}, "
            f"selection={self.selection!r}, score_threshold={self.score_threshold}, batch_size={self.batch_size}, "
            f"subset={self.subset})"
        )


class DetectionSAALReference(DetectionSAAL):
    """:class:`DetectionSAAL` with the reference code's defaults: ASAM, rho 0.05, Max score, k-means++
    ("diversity") selection on the scores, a random pool subset of 2,000 per round."""

    name = "det-saal-reference"

    def __init__(
        self,
        *,
        rho: float = 0.05,
        perturbation: str = "asam",
        score: str = "max",
        selection: str = "kmeans++",
        score_threshold: float | None = None,
        batch_size: int = 8,
        subset: int | None = 2000,
    ) -> None:
        super().__init__(
            rho=rho,
            perturbation=perturbation,
            score=score,
            selection=selection,
            score_threshold=score_threshold,
            batch_size=batch_size,
            subset=subset,
        )


class DetectionLoss(DetectionSAAL):
    """SAAL without the perturbation: the detector's own loss under its pseudo targets (the ablation that shows
    what sharpness adds). Options as :class:`DetectionSAAL` less ``rho``, ``perturbation`` and ``score``."""

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

    def scores_of(self, terms: DetectionSharpness) -> np.ndarray:
        return terms.score("loss")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(selection={self.selection!r}, score_threshold={self.score_threshold}, "
            f"batch_size={self.batch_size}, subset={self.subset})"
        )
