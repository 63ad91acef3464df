"""ProbCover (Yehuda, Dekel, Hacohen and Weinshall, NeurIPS 2022): greedy maximum coverage by delta-balls."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from saal.core.model_state import model_device
from saal.core.seeding import derive_seed
from saal.errors import SaalError
from saal.pool import Pool
from saal.strategies.base import Selection, Strategy, check_optional_count
from saal.strategies.embedding_input import (
    check_embedding_option,
    describe_embedding,
    l2_normalise,
    pool_embeddings,
)
from saal.strategies.neighbours import nearest_other, radius_any, radius_counts, radius_members

# The radii tried by the purity rule: multiples of DELTA_STEP (0.05, 0.10, ..., as the paper's grid).
DELTA_STEP = 0.05


def delta_grid(max_distance: float) -> np.ndarray:
    """Return the radii the purity rule tries: ``0.05, 0.10, ...`` up to the first one ``>= max_distance``.

    Each is ``g / 20`` (exactly the decimal it reads as, ``0.15`` not ``0.15000000000000002``).
    """
    steps = max(1, math.ceil(max_distance / DELTA_STEP - 1e-9))
    return np.array([g / 20 for g in range(1, steps + 1)], dtype=np.float64)


def pseudo_labels(points: np.ndarray, classes: int, seed: int) -> np.ndarray:
    """Return seeded k-means labels of ``points`` with ``min(classes, len(points))`` clusters (one k-means++ start)."""
    from sklearn.cluster import KMeans

    k = max(1, min(int(classes), len(points)))
    return np.asarray(KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(points), dtype=np.int64)


def purity_delta(
    points: torch.Tensor, rows: np.ndarray, labels: np.ndarray, alpha: float, grid: np.ndarray
) -> tuple[float, float]:
    """Return ``(delta, purity)``: the largest radius of ``grid`` whose purity is ``>= alpha``, and that purity.

    The purity of ``delta`` is the share of ``rows`` (positions among ``points``) whose open ``delta``-ball
    among all ``points`` holds a single label of ``labels``: whose nearest point of another label is at
    distance ``>= delta`` (float32-chosen, float64-measured, see :mod:`saal.strategies.neighbours`). Purity
    never rises with the radius. When even the smallest radius falls below ``alpha``, it is returned with its
    purity.
    """
    lab = torch.as_tensor(labels, device=points.device)
    at = torch.as_tensor(rows, device=points.device)
    other = nearest_other(points[at], lab[at], points, lab).cpu().numpy()
    purity = np.array([(other >= d).mean() for d in grid], dtype=np.float64)
    good = np.flatnonzero(purity >= alpha)
    best = int(good[-1]) if len(good) else 0
    return float(grid[best]), float(purity[best])


def greedy_cover(
    points: torch.Tensor,
    pickable: np.ndarray,
    covered: torch.Tensor,
    delta: float,
    k: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy maximum coverage: ``k`` times take the pickable point whose ``delta``-ball covers most uncovered points.

    Args:
        points: every point whose coverage counts (``n x d``).
        pickable: positions among ``points`` that may be chosen (sorted, distinct, at least ``k``).
        covered: a boolean ``n``-vector of points already covered (updated in place).
        delta: the ball radius (open ball, :mod:`saal.strategies.neighbours` rules).
        k: how many to choose.
        rng: draws the picks once nothing uncovered is left to cover.

    Returns:
        ``(picks, gains, degrees)``: positions into ``pickable`` in pick order, each pick's coverage gain when
        taken, and every pickable point's count of uncovered points in its ball after all picks. Ties go to the
        smaller position; once every ball is empty, the rest are drawn uniformly from ``rng`` (gain 0).
    """
    at = torch.as_tensor(pickable, device=points.device)
    rows = points[at]
    degree = radius_counts(rows, points, delta, ~covered)
    picked = torch.zeros(len(pickable), dtype=torch.bool, device=points.device)
    picks, gains = [], []
    for _ in range(k):
        open_degree = degree.masked_fill(picked, -1)
        best = int(torch.argmax(open_degree))  # the first maximum: the smaller position
        if int(open_degree[best]) <= 0:
            break
        inside = radius_members(rows[best], points, delta)
        new = inside[~covered[inside]]
        if len(new) != int(degree[best]):
            raise RuntimeError("coverage count and ball disagree")  # a bug: the radius rule is exact
        covered[new] = True
        degree -= radius_counts(rows, points[new], delta)
        picked[best] = True
        picks.append(best)
        gains.append(len(new))
    if len(picks) < k:
        rest = (~picked).nonzero(as_tuple=True)[0].cpu().numpy()
        extra = rng.choice(rest, size=k - len(picks), replace=False)
        picks.extend(int(p) for p in extra)
        gains.extend([0] * len(extra))
    return np.array(picks, dtype=np.int64), np.array(gains, dtype=np.float64), degree.cpu().numpy()


class ProbCover(Strategy):
    """ProbCover: the candidates whose ``delta``-balls cover the most points not yet covered (greedy max coverage).

    As the paper and its official code (``deep-al/pycls/al/prob_cover.py``): the labelled items and the
    candidates are embedded (``embedding``, L2-normalised when ``normalise``, then centred on their float32
    mean, which moves no distance but for rounding); a graph has an edge ``x -> y`` iff
    ``||x - y|| < delta`` (squared distances against ``delta ** 2``, decided exactly as
    :mod:`saal.strategies.neighbours` says; every point covers itself). The points within ``delta`` of a
    labelled item are covered first; then ``k`` times the candidate covering the most uncovered points is taken
    and its ball marked covered (ties to the smaller dataset index). When every point is covered, the official
    code would take item 0 again and again; this takes the rest uniformly at random among the candidates not yet
    taken (seeded). Needs no label and no trained model (``cold_start``).

    ``delta`` is given, or (``delta=None``) chosen by purity as in the paper: the pseudo-labels are a seeded
    k-means of the points with ``k`` = the pool's class count; a point's ball is pure when it holds a single
    pseudo-label; ``delta`` is the largest radius of the grid ``0.05, 0.10, ...`` (up to 2, the largest distance
    of unit vectors, or twice the largest norm without ``normalise``) whose share of pure balls is ``>= purity``
    (the smallest, 0.05, when none is). The chosen radius and its purity are in the selection's ``reason``: check
    it (balls of one or two items cover little; MaxHerding's smooth kernel exists for that).

    Large pools (an approximation, off below the thresholds): with more than ``sample`` candidates, the points
    are the labelled items and a seeded uniform sample of ``sample`` candidates (only they are embedded: time
    and memory follow ``sample``, not the pool), so coverage is estimated on the sample; with more than
    ``candidates`` of those, only a seeded sample of ``candidates`` may be taken (and they and the labelled items
    measure the purity). Cost: about ``(labelled + candidates) x points`` distances per pass, two or three passes.
    With both at least the number of candidates, the result is the exact one.

    Scores (every candidate, in candidate order): for a chosen candidate, its coverage gain when taken; for
    another candidate that could be taken, its out-degree after all picks (uncovered points in its ball), never
    more than any chosen candidate's gain; 0 for candidates outside the samples.

    Args:
        embedding: ``"auto"``, ``"input"``, ``"model"``, ``"pretrained"`` or an array (see
            :mod:`saal.strategies.embedding_input`).
        normalise: L2-normalise the embeddings first.
        delta: the ball radius, or None to choose it by purity.
        purity: the share of pure balls the chosen radius keeps (0.95).
        sample: candidates the method runs on at most (None: all).
        candidates: candidates that may be taken at most (None: all of the sample).
        batch_size: items embedded at once.
        subset: score only a seeded random subset of the unlabelled pool.

    Raises:
        SaalError: ``delta <= 0``, ``purity`` outside (0, 1], ``sample`` or ``candidates`` < 1, a bad
            ``embedding``; at selection, ``sample`` or ``candidates`` smaller than the query size.
    """

    name = "probcover"
    cold_start = True

    def __init__(
        self,
        *,
        embedding: str | np.ndarray = "auto",
        normalise: bool = True,
        delta: float | None = None,
        purity: float = 0.95,
        sample: int | None = 10_000,
        candidates: int | None = 5_000,
        batch_size: int = 256,
        subset: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        self.embedding = check_embedding_option(embedding)
        self.normalise = bool(normalise)
        if delta is not None and (not _is_real(delta) or not 0 < float(delta) < math.inf):
            raise SaalError(f"probcover delta must be a positive number or None (chosen by purity), got {delta!r}")
        if not _is_real(purity) or not 0 < float(purity) <= 1:
            raise SaalError(f"probcover purity must be a number in (0, 1], got {purity!r}")
        self.delta = None if delta is None else float(delta)
        self.purity = float(purity)
        self.sample = check_optional_count("probcover sample", sample)
        self.pickable = check_optional_count("probcover candidates", candidates)

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        for what, size in (("sample", self.sample), ("candidates", self.pickable)):
            if size is not None and size < k:
                raise SaalError(f"probcover {what} {size} is smaller than the query size {k}; raise it")
        sampled = _draw(candidates, self.sample, rng)
        labelled = pool.labelled_indices()
        items = np.concatenate([labelled, sampled])
        pickable = len(labelled) + np.searchsorted(sampled, _draw(sampled, self.pickable, rng))
        emb = pool_embeddings(self.embedding, model, pool, items, self.batch_size)
        if self.normalise:
            emb = l2_normalise(emb)
        points = torch.from_numpy(emb).to(model_device(model))
        points = points - points.mean(0)  # distances do not move; float32 products of small numbers round less
        delta, how = self._radius(emb, points, len(labelled), pickable, pool, rng)
        known = torch.arange(len(labelled), device=points.device)
        covered = radius_any(points[known], points, delta)
        before = float(covered.double().mean())
        picks, gains, degree = greedy_cover(points, pickable, covered, delta, k, rng)
        scores = np.zeros(len(candidates), dtype=np.float64)
        where = np.searchsorted(candidates, items[pickable])
        scores[where] = degree
        scores[where[picks]] = gains
        reason = (
            f"delta {delta:g} ({how}); coverage {before:.1%} -> {float(covered.double().mean()):.1%} of "
            f"{len(items)} points in {describe_embedding(self.embedding)} embeddings"
        )
        return Selection(items[pickable[picks]], candidates, scores, reason)

    def _radius(
        self,
        emb: np.ndarray,
        points: torch.Tensor,
        labelled: int,
        pickable: np.ndarray,
        pool: Pool,
        rng: np.random.Generator,
    ) -> tuple[float, str]:
        """Return the radius and how it was chosen (given, or by purity over the labelled and pickable points)."""
        if self.delta is not None:
            return self.delta, "given"
        labels = pseudo_labels(emb, pool.num_classes, derive_seed(rng))
        top = 2.0 if self.normalise else 2.0 * float(np.linalg.norm(emb, axis=1).max(initial=0.0))
        rows = np.concatenate([np.arange(labelled), pickable])
        delta, purity = purity_delta(points, rows, labels, self.purity, delta_grid(max(top, DELTA_STEP)))
        return delta, f"purity {purity:.3f} of {len(rows)} balls, alpha {self.purity:g}"

    def __repr__(self) -> str:
        return (
            f"ProbCover(embedding={describe_embedding(self.embedding)}, normalise={self.normalise}, "
            f"delta={self.delta}, purity={self.purity}, sample={self.sample}, candidates={self.pickable}, "
            f"batch_size={self.batch_size}, subset={self.subset})"
        )


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _draw(indices: np.ndarray, size: int | None, rng: np.random.Generator) -> np.ndarray:
    """Return ``indices`` when ``size`` is None or not smaller, else a seeded uniform sorted sample of ``size``."""
    if size is None or len(indices) <= size:
        return indices
    return np.sort(rng.choice(indices, size=size, replace=False))
