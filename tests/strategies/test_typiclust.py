"""TypiClust: hand-made cases, a slow reference on random data, determinism, options, the large-pool approximation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch import nn

from saal.data import DatasetBundle
from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.models import build_model
from saal.pool import Pool
from saal.strategies import build_strategy, strategy_class
from saal.strategies.neighbours import knn_distances
from saal.strategies.typiclust import TypiClust, cluster_labels, kmeans_plus_plus

MODEL = nn.Linear(2, 2)  # never read by embedding="input"
# A blob whose centre (0, 0) is its most typical point: a plus of radius 1 and 2 (and 3 for the tenth point).
PLUS = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (2, 0), (-2, 0), (0, 2), (0, -2), (3, 0)]
SQUARE = [(0, 0), (1, 0), (0, 1), (1, 1)]


def _pool(points: np.ndarray, labelled: list[int] | None = None, classes: int = 3) -> Pool:
    x = torch.as_tensor(np.asarray(points), dtype=torch.float32)
    pool = Pool(ArrayDataset(x, np.zeros(len(x), dtype=np.int64)), classes)
    if labelled:
        pool.label(labelled, [0] * len(labelled))
    return pool


def _blobs_at(*specs: tuple[float, int]) -> np.ndarray:
    """Blobs along the x axis: ``(offset, size)``, the first ``size`` points of PLUS (SQUARE when size 4)."""
    rows: list[tuple[float, float]] = []
    for offset, size in specs:
        shape = SQUARE if size == 4 else PLUS[:size]
        rows += [(offset + x, y) for x, y in shape]
    return np.array(rows, dtype=np.float64)


def _blob(points: np.ndarray, index: int) -> float:
    return float(np.round(points[index, 0] / 50.0) * 50.0)


def test_the_centre_of_each_blob_largest_first() -> None:
    points = _blobs_at((0.0, 9), (50.0, 10))  # the second blob is larger: visited first
    sel = TypiClust(embedding="input", normalise=False).select(MODEL, _pool(points), 2, 0)
    assert points[sel.indices].tolist() == [[50.0, 0.0], [0.0, 0.0]]
    np.testing.assert_array_equal(sel.scored_indices, np.arange(len(points)))
    # knn = 10 // 2 = 5 in the larger blob (1, 1, 1, 1, 2), 9 // 2 = 4 in the other (1, 1, 1, 1)
    assert sel.scores[sel.indices].tolist() == pytest.approx([1 / (1.2 + 1e-5), 1 / (1.0 + 1e-5)], rel=1e-5)


def test_hand_computed_typicality_and_scores() -> None:
    points = _blobs_at((0.0, 9), (50.0, 10))
    sel = TypiClust(embedding="input", normalise=False).select(MODEL, _pool(points), 1, 0)
    # K = 1 cluster of all 19 points; knn = min(20, 19 // 2) = 9; the larger blob's centre has its 9 other
    # points at 1, 1, 1, 1, 2, 2, 2, 2, 3: typicality 1 / (15 / 9 + 1e-5)
    assert points[sel.indices].tolist() == [[50.0, 0.0]]
    assert sel.scores[sel.indices[0]] == pytest.approx(1 / (15 / 9 + 1e-5), rel=1e-6)
    d = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(sel.scores, 1 / (np.sort(d, 1)[:, 1:10].mean(1) + 1e-5), rtol=1e-5)


def test_clusters_with_labels_come_last_and_small_clusters_are_dropped() -> None:
    points = _blobs_at((0.0, 9), (50.0, 9), (100.0, 9), (150.0, 4))
    pool = _pool(points, labelled=[8])  # blob 0 has a label (its point (0, -2))
    # K = 1 + 3 = 4 clusters: the four blobs; the 4-point blob is dropped, blob 0 is visited last
    sel = TypiClust(embedding="input", normalise=False).select(MODEL, pool, 3, 0)
    assert {tuple(p) for p in points[sel.indices[:2]]} == {(50.0, 0.0), (100.0, 0.0)}
    assert points[sel.indices[2]].tolist() == [0.0, 0.0]
    # min_cluster_size=3 keeps the small blob; it has no label: visited before blob 0
    sel = TypiClust(embedding="input", normalise=False, min_cluster_size=3).select(MODEL, pool, 3, 0)
    assert sorted(_blob(points, i) for i in sel.indices) == [50.0, 100.0, 150.0]


def test_clusters_are_visited_cyclically_then_small_ones() -> None:
    points = _blobs_at((0.0, 10), (50.0, 9), (100.0, 4))
    sel = TypiClust(embedding="input", normalise=False).select(MODEL, _pool(points), 3, 0)
    # K = 3: the small blob is dropped, so the third pick is blob 0's second most typical point
    assert points[sel.indices[:2]].tolist() == [[0.0, 0.0], [50.0, 0.0]]
    assert _blob(points, sel.indices[2]) == 0.0 and points[sel.indices[2]].tolist() != [0.0, 0.0]
    # 3 clusters at most, 21 picks: the 19 points of the large blobs first (alternating), then the small blob
    sel = TypiClust(embedding="input", normalise=False, max_clusters=3).select(MODEL, _pool(points), 21, 0)
    assert [_blob(points, i) for i in sel.indices[:18]] == [0.0, 50.0] * 9
    assert [_blob(points, i) for i in sel.indices[18:]] == [0.0, 100.0, 100.0]
    lone = sel.indices[18]  # the last point of blob 0, alone in its cluster: typicality 0
    assert sel.scores[lone] == 0.0


def _reference(points: np.ndarray, labelled: np.ndarray, k: int, seed: int, knn: int = 20) -> list[int]:
    """TPC-RP written plainly: sklearn KMeans with the strategy's seed, loops over all pairs in float64."""
    n = len(points)
    unlabelled = np.setdiff1d(np.arange(n), labelled)
    items = np.concatenate([labelled, unlabelled])
    x = points[items].astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)
    clusters = len(labelled) + k
    km_seed = int(np.random.default_rng(seed).integers(0, 2**31 - 1))
    labels = KMeans(n_clusters=clusters, n_init=1, random_state=km_seed).fit_predict(x.astype(np.float32))
    sizes = [int((labels == c).sum()) for c in range(clusters)]
    known = [int((labels[: len(labelled)] == c).sum()) for c in range(clusters)]
    order = sorted((c for c in range(clusters) if sizes[c] > 5), key=lambda c: (known[c], -sizes[c], c))
    taken = set(range(len(labelled)))
    picks = []
    for t in range(k):
        c = order[t % len(order)]
        members = [i for i in range(n) if labels[i] == c and i not in taken]
        nn_k = min(knn, len(members) // 2)
        best, best_typ = None, -1.0
        for i in members:
            dists = sorted(float(np.sqrt(((x[i] - x[j]) ** 2).sum())) for j in members if j != i)
            typ = 1.0 / (np.mean(dists[:nn_k]) + 1e-5)
            if typ > best_typ:
                best, best_typ = i, typ
        assert best is not None
        picks.append(int(items[best]))
        taken.add(best)
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_same_picks_as_the_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    centres = rng.normal(size=(4, 6)) * 3
    points = centres[rng.integers(0, 4, 160)] + rng.normal(size=(160, 6))
    labelled = np.sort(rng.choice(160, size=seed * 2, replace=False))
    pool = _pool(points, labelled.tolist())
    sel = TypiClust(embedding="input", knn=7).select(MODEL, pool, 6, seed)
    assert sel.indices.tolist() == _reference(points, labelled, 6, seed, knn=7)


def test_deterministic_and_from_zero_labels(digits: DatasetBundle) -> None:
    pool = Pool(digits.train, digits.num_classes)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    strategy = build_strategy("typiclust[embedding=input]")
    first = strategy.select(model, pool, 10, 5)
    again = strategy.select(model, pool, 10, np.random.default_rng(5))
    np.testing.assert_array_equal(first.indices, again.indices)
    np.testing.assert_array_equal(first.scores, again.scores)
    assert len(set(digits.train_targets[first.indices])) >= 7  # typical items of 10 clusters span the digits
    assert np.isfinite(first.scores).all() and (first.scores >= 0).all()
    assert "10 clusters" in first.reason


def test_model_embedding_reads_the_model(digits: DatasetBundle) -> None:
    pool = Pool(digits.train, digits.num_classes)
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    sel = TypiClust(embedding="model").select(model, pool, 5, 0)
    assert len(sel.indices) == 5 and not pool.is_labelled(sel.indices).any()


def test_build_strategy_with_options() -> None:
    strategy = build_strategy("typiclust[knn=5,min_cluster_size=2,max_clusters=30]")
    assert isinstance(strategy, TypiClust)
    assert (strategy.knn, strategy.min_cluster_size, strategy.max_clusters) == (5, 2, 30)
    assert strategy_class("typiclust").cold_start is True
    assert "knn=5" in repr(strategy)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("typiclust[knn=0]", "knn must be an integer >= 1"),
        ("typiclust[min_cluster_size=-1]", "min_cluster_size must be an integer >= 0"),
        ("typiclust[max_clusters=0]", "max_clusters must be an integer >= 1"),
        ("typiclust[knn=2.5]", "knn must be an integer"),
        ("typiclust[sample=0]", "sample must be an integer >= 1 or None"),
        ("typiclust[candidates=0]", "candidates must be an integer >= 1 or None"),
    ],
)
def test_bad_values_are_one_line(spec: str, words: str) -> None:
    with pytest.raises(SaalError, match=words) as err:
        build_strategy(spec)
    assert "\n" not in str(err.value)


def test_a_sample_smaller_than_the_query_is_one_line() -> None:
    with pytest.raises(SaalError, match="sample 2 is smaller than the query size 3") as err:
        TypiClust(embedding="input", sample=2).select(MODEL, _pool(_blobs_at((0.0, 9))), 3, 0)
    assert "\n" not in str(err.value)


def _blobs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(8, 10))[rng.integers(0, 8, n)] * 2 + rng.normal(size=(n, 10))


def test_the_approximation_is_exact_when_its_samples_cover_everything() -> None:
    pool = _pool(_blobs(400), labelled=[0, 1, 2])
    exact = TypiClust(embedding="input", sample=None, candidates=None).select(MODEL, pool, 8, 3)
    covering = TypiClust(embedding="input", sample=397, candidates=397).select(MODEL, pool, 8, 3)
    np.testing.assert_array_equal(covering.indices, exact.indices)
    np.testing.assert_array_equal(covering.scores, exact.scores)


def test_the_approximation_samples_and_stays_deterministic() -> None:
    pool = _pool(_blobs(600))
    strategy = TypiClust(embedding="input", sample=200, candidates=10)
    sel = strategy.select(MODEL, pool, 6, 1)
    again = strategy.select(MODEL, pool, 6, 1)
    np.testing.assert_array_equal(sel.indices, again.indices)
    scored = np.flatnonzero(sel.scores)
    assert len(scored) <= 6 * 10 and set(sel.indices) <= set(scored)  # typicality of 10 per visited cluster
    np.testing.assert_array_equal(sel.scored_indices, np.arange(600))


def test_subset_restricts_the_candidates() -> None:
    pool = _pool(_blobs(300))
    sel = TypiClust(embedding="input", subset=50).select(MODEL, pool, 4, 2)
    assert len(sel.scored_indices) == 50 and set(sel.indices) <= set(sel.scored_indices)


def test_knn_distances_match_brute_force_whatever_the_blocks() -> None:
    rng = np.random.default_rng(0)
    pts = torch.as_tensor(rng.normal(size=(70, 5)), dtype=torch.float32)
    queries = np.array([0, 5, 69, 33])
    full = torch.cdist(pts[queries].double(), pts.double())
    full[np.arange(4), queries] = float("inf")
    want = full.sort(1).values[:, :6]
    for chunk in (7, 64, 2048):
        got = knn_distances(pts[queries], pts, 6, queries, chunk=chunk)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.69"):
        knn_distances(pts[queries], pts, 70, queries)


def test_minibatch_clustering_above_50_clusters_is_seeded() -> None:
    x = _blobs(300).astype(np.float32)
    a, b = cluster_labels(x, 60, 4), cluster_labels(x, 60, 4)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) > 50
    centres = kmeans_plus_plus(x, 8, np.random.default_rng(0))
    assert centres.shape == (8, 10) and len({tuple(c) for c in centres}) == 8
    dup = np.repeat(x[:3], 5, axis=0)  # only 3 distinct points: later picks are uniform duplicates
    assert kmeans_plus_plus(dup, 5, np.random.default_rng(0)).shape == (5, 10)
