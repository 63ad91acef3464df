"""Core-set for detectors: greedy k-center on each image's pooled backbone (pyramid) features."""

from __future__ import annotations

from typing import ClassVar

from saal.strategies.coreset import CoreSet


class DetectionCoreSet(CoreSet):
    """Core-set (Sener & Savarese 2018) on a detector: the labelled images' pooled backbone features are the
    initial centres; each pick is the image farthest from its nearest centre
    (:meth:`saal.tasks.detection.Detection.embed`: every pyramid level average-pooled, concatenated).
    Scores as :class:`saal.strategies.coreset.CoreSet`.

    Args:
        batch_size: images read at once (each runs through the backbone alone).
        subset: score only a seeded random subset of the unlabelled pool.
    """

    name = "det-coreset"
    tasks: ClassVar[tuple[str, ...]] = ("detection",)

    def __init__(self, *, batch_size: int = 8, subset: int | None = None) -> None:
        super().__init__(batch_size=batch_size, subset=subset)

    def __repr__(self) -> str:
        return f"DetectionCoreSet(batch_size={self.batch_size}, subset={self.subset})"
