"""The streaming top-k against a full stable sort: same positions, ties to the smaller position, NaN last."""

from __future__ import annotations

import numpy as np
import pytest

from saal.core.selection import STREAM_ABOVE, top_k
from saal.core.streaming_topk import StreamingTopK, streaming_top_k


def full_sort(scores: np.ndarray, k: int, ascending: bool) -> np.ndarray:
    key = scores if ascending else -scores
    key = np.where(np.isnan(key), np.inf, key)
    return np.argsort(key, kind="stable")[:k]


@pytest.mark.parametrize("ascending", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("k", [0, 1, 5, 100, 999, 1000, 1500])
def test_streaming_choice_equals_a_full_sort_with_ties_and_nans(ascending: bool, chunk: int, k: int) -> None:
    rng = np.random.default_rng(k + chunk)
    scores = rng.integers(0, 20, size=1000).astype(np.float64)  # many ties
    scores[rng.choice(1000, 30, replace=False)] = np.nan
    scores[rng.choice(1000, 5, replace=False)] = np.inf
    scores[rng.choice(1000, 5, replace=False)] = -np.inf
    np.testing.assert_array_equal(
        streaming_top_k(scores, k, ascending=ascending, chunk=chunk), full_sort(scores, k, ascending)
    )


def test_pushed_positions_and_scores_come_back_best_first() -> None:
    best = StreamingTopK(3)
    best.push(np.array([0.5, 0.9, np.nan]), np.array([10, 11, 12]))
    best.push(np.array([0.9, 0.1]), np.array([3, 4]))
    positions, scores = best.result()
    assert positions.tolist() == [3, 11, 10] and scores.tolist() == [0.9, 0.9, 0.5]
    assert best.seen == 5
    with pytest.raises(ValueError, match="positions"):
        best.push(np.zeros(2), np.zeros(3))


def test_top_k_streams_large_arrays_and_still_equals_the_sort() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=3 * STREAM_ABOVE), 2)  # ties across chunk borders
    for ascending in (False, True):
        np.testing.assert_array_equal(top_k(scores, 1000, ascending=ascending), full_sort(scores, 1000, ascending))


def test_memory_of_a_stream_does_not_hold_the_stream() -> None:
    best = StreamingTopK(10)
    for start in range(0, 1_000_000, 50_000):
        best.push(np.arange(start, start + 50_000, dtype=np.float64))
        assert len(best._key) <= 10  # only the k best are kept between chunks
    assert best.result()[0].tolist() == list(range(999_999, 999_989, -1))
