"""SAAL: Sharpness-Aware Active Learning (Kim et al., ICML 2023)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from torch import nn

from saal.core.selection import d2_sample, top_k
from saal.errors import SaalError
from saal.pool import Pool
from saal.sharpness import (
    GRANULARITIES,
    PERTURBATIONS,
    SCOPES,
    PoolSharpness,
    check_option,
    check_rho,
    pool_sharpness,
)
from saal.strategies.base import Selection, Strategy

SCORES = ("max", "diff")
SELECTIONS = ("top-k", "kmeans++")


class SAAL(Strategy):
    """Choose the instances whose loss rises most under a worst-case weight perturbation.

    Each candidate ``x`` gets the pseudo label ``yhat = argmax f_w(x)`` and the perturbation
    ``eps(x)`` of one ascent step of radius ``rho`` on its own loss (see :mod:`saal.sharpness`).

    The engine speaks to the pool's task only through its forward pass, pseudo targets and
    per-item losses (:class:`saal.tasks.base.Task`), so ``scope="all"`` works for any task whose
    items do not interact in eval mode and whose batches and pseudo targets are tensors (or
    pytrees of tensors) with one row per item; ``scope="last-layer"`` is classification only.
    :attr:`tasks` declares classification, the task this strategy is tested on.

    Args:
        rho: the perturbation radius (default 0.05).
        perturbation: ``"asam"`` (``eps = rho T^2 g / ||T g||``, ``T = |w|``; the reference code)
            or ``"sam"`` (``eps = rho g / ||g||``).
        score: ``"max"`` (the perturbed loss, the paper's score) or ``"diff"`` (perturbed minus
            unperturbed loss: the sharpness alone).
        granularity: ``"per-instance"`` (each instance its own eps, the paper's definition) or
            ``"per-batch"`` (one eps from the mean loss of each pool batch of ``batch_size``:
            what the reference code computes with a pool batch larger than 1).
        scope: ``"all"`` parameters, or ``"last-layer"`` (closed form from the logits and the
            penultimate features; about the cost of entropy).
        selection: ``"top-k"`` (the largest scores) or ``"kmeans++"`` (the reference code's
            "diversity": D^2 sampling on the 1-D scores, first pick = the largest ``|score|``).
        batch_size: pool items scored at once.
        subset: score only a seeded random subset of this many unlabelled items.

    ``select`` returns the scores of every scored candidate (higher = picked first under top-k).

    Raises:
        SaalError: a bad option value, naming the option and the allowed values.
    """

    name = "saal"
    tasks: ClassVar[tuple[str, ...]] = ("classification",)

    def __init__(
        self,
        *,
        rho: float = 0.05,
        perturbation: str = "asam",
        score: str = "max",
        granularity: str = "per-instance",
        scope: str = "all",
        selection: str = "top-k",
        batch_size: int = 256,
        subset: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        self.rho = check_rho(rho)
        self.perturbation = check_option("perturbation", perturbation, PERTURBATIONS)
        self.score_kind = check_option("score", score, SCORES)
        self.granularity = check_option("granularity", granularity, GRANULARITIES)
        self.scope = check_option("scope", scope, SCOPES)
        self.selection = _check_selection(selection)
        self.last_terms: PoolSharpness | None = None

    def sharpness(self, model: nn.Module, pool: Pool, candidates: np.ndarray) -> PoolSharpness:
        """Return the per-candidate loss, perturbed loss, gradient norm and pseudo label, under the pool's task.

        Raises:
            SaalError: a model the engine cannot score, or ``scope="last-layer"`` on a task other
                than classification.
        """
        return pool_sharpness(
            model,
            pool.dataset,
            candidates,
            batch_size=self.batch_size,
            rho=self.rho,
            perturbation=self.perturbation,
            granularity=self.granularity,
            scope=self.scope,
            task=pool.task,
        )

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        terms = self.sharpness(model, pool, candidates)
        self.last_terms = terms
        scores = terms.score(self.score_kind)
        picked = top_k(scores, k) if self.selection == "top-k" else kmeans_pp_1d(scores, k, rng)
        return Selection(candidates[picked], candidates, scores)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rho={self.rho}, perturbation={self.perturbation!r}, score={self.score_kind!r}, "
            f"granularity={self.granularity!r}, scope={self.scope!r}, selection={self.selection!r}, "
            f"batch_size={self.batch_size}, subset={self.subset})"
        )


class SAALReference(SAAL):
    """SAAL with exactly the reference implementation's defaults: ASAM, rho 0.05, per-instance
    perturbation, the Max score, k-means++ ("diversity") selection on the scores, and a random
    pool subset of 2,000 per round. Options as in :class:`SAAL`."""

    name = "saal-reference"

    def __init__(
        self,
        *,
        rho: float = 0.05,
        perturbation: str = "asam",
        score: str = "max",
        granularity: str = "per-instance",
        scope: str = "all",
        selection: str = "kmeans++",
        batch_size: int = 256,
        subset: int | None = 2000,
    ) -> None:
        super().__init__(
            rho=rho,
            perturbation=perturbation,
            score=score,
            granularity=granularity,
            scope=scope,
            selection=selection,
            batch_size=batch_size,
            subset=subset,
        )


def _check_selection(value: object) -> str:
    text = value.lower().replace("_", "-") if isinstance(value, str) else value
    aliases = {"topk": "top-k", "kmeans": "kmeans++", "kmeans-pp": "kmeans++", "diversity": "kmeans++"}
    text = aliases.get(text, text) if isinstance(text, str) else text
    if text not in SELECTIONS:
        raise SaalError(f"selection must be one of {', '.join(SELECTIONS)}; got {value!r}")
    return text


def kmeans_pp_1d(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling, :func:`saal.core.selection.d2_sample`) on a 1-D score vector.

    The first pick is the largest ``|score|`` (ties to the smaller position); each next pick is
    drawn with probability proportional to its squared distance to the nearest pick so far. When
    every remaining distance is zero, the next pick is uniform among the unpicked.

    Returns:
        ``k`` distinct positions into ``scores``, in the order picked.

    Raises:
        SaalError: if ``k`` is not in ``0 .. len(scores)``.
    """
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0, posinf=np.finfo(np.float64).max / 4)
    n = len(s)
    if not 0 <= k <= n:
        raise SaalError(f"cannot pick {k} of {n} scores; choose k in 0..{n}")
    if k == 0:
        return np.empty(0, dtype=np.int64)
    picks, _ = d2_sample(n, k, int(np.argmax(np.abs(s))), lambda j: (s - s[j]) ** 2, rng)
    return picks
