"""SAAL with batch diversity: SAAL's scores shortlist the candidates, the model's features spread the batch.

Top-k on any per-item score can fill one round with near-duplicates (the same sharp region of input space,
chosen ten times), which is where BADGE and core-set gain. This variant (beyond the paper) keeps SAAL's scores
and changes only how a batch of ``k`` is drawn from them, as PPAL (Yang et al., 2022) does for detection:

1. score every candidate with SAAL exactly as :class:`~saal.strategies.saal.SAAL` does (per-instance ASAM,
   Max score by default);
2. shortlist the ``factor * k`` best-scored candidates;
3. among them, pick ``k`` spread out in the model's penultimate features (the task's embedding, as core-set
   and BADGE use): ``spread="kmeans++"`` (D^2 sampling, seeded) or ``spread="k-center"`` (greedy farthest
   point, deterministic); the first pick is the best-scored candidate in both.

``factor=1`` is plain top-k SAAL. The scores returned are SAAL's, for every scored candidate.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from saal.core.selection import d2_sample, top_k
from saal.errors import SaalError
from saal.pool import Pool
from saal.strategies.base import Selection
from saal.strategies.coreset import embeddings, nearest_distances
from saal.strategies.saal import SAAL

SPREADS = ("kmeans++", "k-center")


def spread_picks(points: torch.Tensor, k: int, rng: np.random.Generator, spread: str = "kmeans++") -> np.ndarray:
    """Pick ``k`` of ``points`` (rows, best-scored first) spread out in Euclidean distance; row 0 is picked first.

    Args:
        points: ``M x d`` features, ordered best score first.
        k: how many to pick (``1 <= k <= M``).
        rng: drives k-means++'s draws (unused by k-center).
        spread: ``"kmeans++"`` (each next pick drawn with probability proportional to its squared distance to
            the nearest pick) or ``"k-center"`` (each next pick the farthest from every pick, ties to the
            better score).

    Returns:
        ``k`` distinct row positions, in the order picked.

    Raises:
        SaalError: ``k`` outside ``1..M`` or an unknown ``spread``.
    """
    m = len(points)
    if not 1 <= k <= m:
        raise SaalError(f"cannot pick {k} of {m} shortlisted candidates; choose k in 1..{m}")
    if spread not in SPREADS:
        raise SaalError(f"spread must be one of {', '.join(SPREADS)}; got {spread!r}")
    p = points.double()
    if spread == "kmeans++":

        def squared_to(j: int) -> np.ndarray:
            return (nearest_distances(p, p[j : j + 1]) ** 2).cpu().numpy()

        picks, _ = d2_sample(m, k, 0, squared_to, rng)
        return picks
    picks = np.empty(k, dtype=np.int64)
    min_d = torch.full((m,), float("inf"), dtype=torch.float64, device=p.device)
    pick = 0
    for t in range(k):
        picks[t] = pick
        min_d = torch.minimum(min_d, nearest_distances(p, p[pick : pick + 1]))
        min_d[picks[: t + 1]] = -1.0
        pick = int(torch.argmax(min_d))  # first maximum: ties go to the better score
    return picks


class SAALDiverse(SAAL):
    """SAAL's scores, a shortlist of the ``factor * k`` best, and ``k`` of them spread in feature space.

    Args:
        factor: shortlist size as a multiple of ``k`` (>= 1; 1 is top-k SAAL).
        spread: ``"kmeans++"`` (default) or ``"k-center"`` (see :func:`spread_picks`).
        rho, perturbation, score, granularity, scope, batch_size, subset: as for
            :class:`~saal.strategies.saal.SAAL` (``selection`` is this class's own procedure).

    ``select`` returns SAAL's score of every scored candidate.

    Raises:
        SaalError: a bad option value.
    """

    name = "saal-diverse"
    tasks: ClassVar[tuple[str, ...]] = ("classification",)

    def __init__(
        self,
        *,
        factor: float = 4.0,
        spread: str = "kmeans++",
        rho: float = 0.05,
        perturbation: str = "asam",
        score: str = "max",
        granularity: str = "per-instance",
        scope: str = "all",
        batch_size: int = 256,
        subset: int | None = None,
    ) -> None:
        super().__init__(
            rho=rho,
            perturbation=perturbation,
            score=score,
            granularity=granularity,
            scope=scope,
            batch_size=batch_size,
            subset=subset,
        )
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not np.isfinite(factor) or factor < 1:
            raise SaalError(f"factor must be a number >= 1 (shortlist = factor x query size), got {factor!r}")
        text = spread.lower().replace("_", "-") if isinstance(spread, str) else spread
        text = {"kmeans": "kmeans++", "kcenter": "k-center"}.get(text, text) if isinstance(text, str) else text
        if text not in SPREADS:
            raise SaalError(f"spread must be one of {', '.join(SPREADS)}; got {spread!r}")
        self.factor = float(factor)
        self.spread = str(text)

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        terms = self.sharpness(model, pool, candidates)
        self.last_terms = terms
        scores = terms.score(self.score_kind)
        size = min(len(candidates), max(k, int(np.ceil(self.factor * k))))
        shortlist = top_k(scores, size)  # best first
        if size == k:
            return Selection(candidates[shortlist], candidates, scores)
        points = embeddings(model, pool.dataset, candidates[shortlist], self.batch_size, pool.task)
        picks = spread_picks(points, k, rng, self.spread)
        return Selection(candidates[shortlist[picks]], candidates, scores)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(factor={self.factor}, spread={self.spread!r}, rho={self.rho}, "
            f"perturbation={self.perturbation!r}, score={self.score_kind!r}, granularity={self.granularity!r}, "
            f"scope={self.scope!r}, batch_size={self.batch_size}, subset={self.subset})"
        )


__all__ = ["SPREADS", "SAALDiverse", "spread_picks"]
