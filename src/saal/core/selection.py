"""Turning scores into a choice: top-k and D^2 (k-means++) sampling, shared by every strategy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from saal.core.progress import Progress
from saal.core.streaming_topk import sort_keys, streaming_top_k

# Above this many scores, top_k streams them (argpartition per chunk) instead of sorting them all.
STREAM_ABOVE = 65536


def top_k(scores: np.ndarray, k: int, *, ascending: bool = False) -> np.ndarray:
    """Return the positions of the ``k`` largest (or smallest) scores, best first, ties by position, NaN last.

    A large array is read in chunks by :func:`saal.core.streaming_topk.streaming_top_k` (the same
    result as a full sort, in memory ``O(k + chunk)`` and linear time).
    """
    if len(scores) > STREAM_ABOVE and k < len(scores) // 4:
        return streaming_top_k(scores, k, ascending=ascending)
    key = sort_keys(np.asarray(scores), ascending)
    return np.lexsort((np.arange(len(scores)), key))[:k]


def d2_sample(
    n: int,
    k: int,
    first: int,
    squared_distances_to: Callable[[int], np.ndarray],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ seeding (D^2 sampling) over ``n`` points known only through their distances.

    The first pick is ``first``; each next pick is drawn with probability proportional to its
    squared distance to the nearest pick so far. When every remaining squared distance is zero
    (duplicates), the next pick is uniform among the points not yet picked.

    Args:
        squared_distances_to: ``j -> `` the squared distance of every point to point ``j``
            (``n`` float64 values).

    Returns:
        ``(picks, d2)``: ``k`` distinct positions in the order picked, and an ``n``-vector: for
        every point not picked its squared distance to the nearest pick after all picks; for a
        pick after the first, its squared distance to the nearest earlier pick when it was
        drawn (the caller sets the first pick's value).
    """
    picks = np.empty(k, dtype=np.int64)
    at_pick = np.zeros(k, dtype=np.float64)
    taken = np.zeros(n, dtype=bool)
    min_d2 = np.full(n, np.inf)
    with Progress(k, "k-means++ seeding", "pick") as progress:
        for t in range(k):
            if t == 0:
                pick = int(first)
            else:
                weights = min_d2
                total = weights.sum()
                if total > 0 and np.isfinite(total):
                    cumulative = np.cumsum(weights)
                    pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
                    pick = min(pick, n - 1)
                    while weights[pick] == 0:  # round-off at the top end of the cumulative sum
                        pick -= 1
                else:
                    pick = int(rng.choice(np.flatnonzero(~taken)))
                at_pick[t] = float(weights[pick])
            picks[t] = pick
            taken[pick] = True
            min_d2 = np.minimum(min_d2, squared_distances_to(pick))
            min_d2[taken] = 0.0
            progress.update(1)
    final = min_d2.copy()
    final[picks] = at_pick
    return picks, final
