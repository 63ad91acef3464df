"""The ``k`` best of a stream of scores, in memory that depends on ``k`` and the chunk, never on the stream.

Order: the largest scores first (the smallest with ``ascending``), ties to the smaller position,
NaN last. That is exactly the order of a full stable sort, so a streamed choice equals
:func:`saal.core.selection.top_k` on the whole array.
"""

from __future__ import annotations

import numpy as np


def sort_keys(scores: np.ndarray, ascending: bool) -> np.ndarray:
    """Return float64 keys whose ascending order is the choice order (NaN mapped to ``+inf``, last)."""
    s = np.asarray(scores, dtype=np.float64)
    key = s if ascending else -s
    return np.where(np.isnan(key), np.inf, key)


class StreamingTopK:
    """Keep the ``k`` best of scores pushed chunk by chunk, with their positions.

    Each :meth:`push` merges the running best with the chunk by ``np.argpartition`` (linear time);
    the final :meth:`result` sorts only the ``k`` kept. Memory: ``O(k + chunk)``.

    Args:
        k: how many to keep (``k >= 0``).
        ascending: keep the smallest scores instead of the largest.

    Raises:
        ValueError: ``k < 0``.
    """

    def __init__(self, k: int, *, ascending: bool = False) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = int(k)
        self.ascending = ascending
        self._key = np.empty(0, dtype=np.float64)
        self._pos = np.empty(0, dtype=np.int64)
        self._val = np.empty(0, dtype=np.float64)
        self._seen = 0

    @property
    def seen(self) -> int:
        """How many scores were pushed so far."""
        return self._seen

    def push(self, scores: np.ndarray, positions: np.ndarray | None = None) -> None:
        """Add a chunk of scores; ``positions`` defaults to the running count (0, 1, 2, ... over all pushes).

        Raises:
            ValueError: ``positions`` differs in length from ``scores``.
        """
        val = np.asarray(scores, dtype=np.float64).reshape(-1)
        key = sort_keys(val, self.ascending)
        if positions is None:
            pos = np.arange(self._seen, self._seen + len(key), dtype=np.int64)
        else:
            pos = np.asarray(positions, dtype=np.int64).reshape(-1)
            if len(pos) != len(key):
                raise ValueError(f"{len(key)} scores but {len(pos)} positions")
        self._seen += len(key)
        if self.k == 0 or len(key) == 0:
            return
        key = np.concatenate([self._key, key])
        pos = np.concatenate([self._pos, pos])
        val = np.concatenate([self._val, val])
        if len(key) > self.k:
            keep = _best(key, pos, self.k)
            key, pos, val = key[keep], pos[keep], val[keep]
        self._key, self._pos, self._val = key, pos, val

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(positions, scores)`` of the kept items, best first (scores as pushed, NaN kept)."""
        order = np.lexsort((self._pos, self._key))
        return self._pos[order], self._val[order]


def _best(key: np.ndarray, pos: np.ndarray, k: int) -> np.ndarray:
    """Return where the ``k`` smallest ``(key, pos)`` pairs are (unordered); ``len(key) > k``."""
    part = np.argpartition(key, k - 1)
    threshold = key[part[k - 1]]
    below = np.flatnonzero(key < threshold)
    ties = np.flatnonzero(key == threshold)
    need = k - len(below)
    if need < len(ties):
        ties = ties[np.argsort(pos[ties], kind="stable")[:need]]
    return np.concatenate([below, ties])


def streaming_top_k(scores: np.ndarray, k: int, *, ascending: bool = False, chunk: int = 65536) -> np.ndarray:
    """Return the positions of the ``k`` best of ``scores``, best first, reading ``chunk`` scores at a time.

    ``scores`` may be any array-like that slices (a ``np.memmap`` of scores on disk too).

    Raises:
        ValueError: ``k < 0`` or ``chunk < 1``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    best = StreamingTopK(min(k, len(scores)), ascending=ascending)
    for start in range(0, len(scores), chunk):
        best.push(np.asarray(scores[start : start + chunk]))
    return best.result()[0]
