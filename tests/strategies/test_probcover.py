"""ProbCover: hand-made cases, a slow reference on random data, the purity rule, determinism, options, the
large-pool approximation, and the blocked radius computations it rests on."""

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
from saal.strategies.neighbours import nearest_other, radius_any, radius_counts, radius_members, within
from saal.strategies.probcover import ProbCover, delta_grid

MODEL = nn.Linear(2, 2)  # never read by embedding="input"
LINE = np.array([[0.0, 0], [1, 0], [2, 0], [3, 0], [10, 0], [11, 0], [20, 0]])


def _pool(points: np.ndarray, labelled: list[int] | None = None, classes: int = 2) -> Pool:
    x = torch.as_tensor(np.asarray(points), dtype=torch.float32)
    pool = Pool(ArrayDataset(x, np.zeros(len(x), dtype=np.int64)), classes)
    if labelled:
        pool.label(labelled, [0] * len(labelled))
    return pool


def test_greedy_coverage_on_a_line_by_hand() -> None:
    # balls of radius 1.5: 0:{0,1} 1:{0,1,2} 2:{1,2,3} 3:{2,3} 10:{10,11} 11:{10,11} 20:{20}
    strategy = ProbCover(embedding="input", normalise=False, delta=1.5)
    sel = strategy.select(MODEL, _pool(LINE), 4, 0)
    # 1 (3 new, before its tie 2), then 10 (2 new), then 2 (covers 3: 1 new, before its tie 3), then 20
    assert sel.indices.tolist() == [1, 4, 2, 6]
    np.testing.assert_array_equal(sel.scored_indices, np.arange(7))
    assert sel.scores.tolist() == [0, 3, 1, 0, 2, 0, 1]  # gains of the picks; uncovered in the others' balls
    assert "coverage 0.0% -> 100.0% of 7 points" in sel.reason


def test_everything_covered_then_random_among_the_rest() -> None:
    strategy = ProbCover(embedding="input", normalise=False, delta=1.5)
    sel = strategy.select(MODEL, _pool(LINE), 6, 0)
    assert sel.indices[:4].tolist() == [1, 4, 2, 6]
    assert set(sel.indices[4:].tolist()) <= {0, 3, 5} and len(set(sel.indices.tolist())) == 6
    assert sel.scores[sel.indices[4:]].tolist() == [0, 0]
    draws = {tuple(strategy.select(MODEL, _pool(LINE), 6, s).indices[4:]) for s in range(12)}
    assert len(draws) > 1  # seeded, not fixed


def test_labelled_items_cover_their_balls_first() -> None:
    sel = ProbCover(embedding="input", normalise=False, delta=1.5).select(MODEL, _pool(LINE, [0]), 3, 0)
    # 0 covers {0, 1}: degrees 1:1 2:2 3:2 10:2 11:2 20:1 -> 2 (ties: smaller index), 10, then 20 over 1 and 3 (0)
    assert sel.indices.tolist() == [2, 4, 6]
    assert sel.scores.tolist() == [0, 2, 0, 2, 0, 1]  # candidates 1, 2, 3, 4, 5, 6
    assert "coverage 28.6% -> 100.0%" in sel.reason


def test_the_ball_is_open() -> None:
    points = np.array([[-2.0, 0], [0.0, 0], [0.5, 0], [1.5, 0]])  # mean 0: centring moves nothing
    sel = ProbCover(embedding="input", normalise=False, delta=1.0).select(MODEL, _pool(points), 1, 0)
    # 0.5 and 1.5 are exactly 1 apart: no edge; 0 and 0.5 cover each other
    assert sel.indices.tolist() == [1] and sel.scores.tolist() == [1, 2, 0, 1]


def test_purity_chooses_the_largest_pure_radius_by_hand() -> None:
    # two groups 0.83 apart; k-means with 2 clusters finds them; nearest other-group distances: 0.83 (x2),
    # 0.93 (x2), 1.03 (x2)
    points = np.array([[0.0, 0], [0.1, 0], [0.2, 0], [1.03, 0], [1.13, 0], [1.23, 0]])
    pool = _pool(points)
    sel = ProbCover(embedding="input", normalise=False, purity=1.0).select(MODEL, pool, 1, 0)
    assert sel.reason.startswith("delta 0.8 (purity 1.000 of 6 balls")
    sel = ProbCover(embedding="input", normalise=False, purity=0.6).select(MODEL, pool, 1, 0)
    assert sel.reason.startswith("delta 0.9 (purity 0.667 of 6 balls")
    sel = ProbCover(embedding="input", normalise=False, purity=0.3).select(MODEL, pool, 1, 0)
    assert sel.reason.startswith("delta 1 (purity 0.333 of 6 balls")
    # the grid runs to twice the largest norm (2.46 -> 2.5); nothing is impure with one class
    assert delta_grid(2.46)[-1] == 2.5 and delta_grid(2.0)[-1] == 2.0 and delta_grid(0.01).tolist() == [0.05]
    sel = ProbCover(embedding="input", normalise=False).select(MODEL, _pool(points, classes=1), 1, 0)
    assert sel.reason.startswith("delta 2.5 (purity 1.000")


def test_no_pure_radius_takes_the_smallest() -> None:
    points = np.array([[0.0, 0], [0.01, 0], [5.0, 0], [5.01, 0]])
    sel = ProbCover(embedding="input", normalise=False).select(MODEL, _pool(points, classes=4), 1, 0)
    assert sel.reason.startswith("delta 0.05 (purity 0.000")


def _reference(points: np.ndarray, labelled: np.ndarray, k: int, seed: int, classes: int, delta: float | None) -> list:
    """ProbCover written plainly: all pairs in float64 loops, sklearn KMeans with the strategy's seed."""
    n = len(points)
    items = np.concatenate([labelled, np.setdiff1d(np.arange(n), labelled)])
    x = points[items].astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)
    dist = np.array([[np.sqrt(((x[i] - x[j]) ** 2).sum()) for j in range(n)] for i in range(n)])
    if delta is None:
        km_seed = int(np.random.default_rng(seed).integers(0, 2**31 - 1))
        pseudo = KMeans(n_clusters=classes, n_init=1, random_state=km_seed).fit_predict(x.astype(np.float32))
        delta = 0.05
        for d in [g / 20 for g in range(1, 41)]:
            pure = [all(pseudo[j] == pseudo[i] for j in range(n) if dist[i, j] < d) for i in range(n)]
            if np.mean(pure) >= 0.95:
                delta = d
    edges = dist < delta
    covered = set()
    for i in range(len(labelled)):
        covered |= set(np.flatnonzero(edges[i]).tolist())
    picks: list[int] = []
    for _ in range(k):
        gains = [-1 if i < len(labelled) or i in picks else len(set(np.flatnonzero(edges[i])) - covered)
                 for i in range(n)]  # fmt: skip
        best = int(np.argmax(gains))  # the first maximum
        assert gains[best] > 0, "the test wants no random fill"
        picks.append(best)
        covered |= set(np.flatnonzero(edges[best]).tolist())
    return [int(items[p]) for p in picks]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("delta", [None, 0.45])
def test_same_picks_as_the_slow_reference(seed: int, delta: float | None) -> None:
    rng = np.random.default_rng(200 + seed)
    centres = rng.normal(size=(6, 8)) * 2
    points = centres[rng.integers(0, 6, 90)] + rng.normal(size=(90, 8))
    labelled = np.sort(rng.choice(90, size=seed * 3, replace=False))
    pool = _pool(points, labelled.tolist(), classes=3)
    sel = ProbCover(embedding="input", delta=delta).select(MODEL, pool, 5, seed)
    assert sel.indices.tolist() == _reference(points, labelled, 5, seed, 3, delta)


def test_deterministic_and_from_zero_labels(digits: DatasetBundle) -> None:
    pool = Pool(digits.train, digits.num_classes)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    strategy = build_strategy("probcover[embedding=input]")
    first = strategy.select(model, pool, 10, 5)
    again = strategy.select(model, pool, 10, np.random.default_rng(5))
    np.testing.assert_array_equal(first.indices, again.indices)
    np.testing.assert_array_equal(first.scores, again.scores)
    gains = first.scores[first.indices]
    assert (np.diff(gains) <= 0).all() and gains[0] >= first.scores.max()  # greedy gains never rise
    assert len(set(digits.train_targets[first.indices])) >= 6


def test_build_strategy_with_options() -> None:
    strategy = build_strategy("probcover[delta=0.5,sample=100,candidates=50]")
    assert isinstance(strategy, ProbCover)
    assert (strategy.delta, strategy.sample, strategy.pickable) == (0.5, 100, 50)
    assert strategy_class("probcover").cold_start is True
    assert "delta=0.5" in repr(strategy)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("probcover[delta=0]", "delta must be a positive number or None"),
        ("probcover[delta=-0.3]", "delta must be a positive number or None"),
        ("probcover[delta=nan]", "delta must be a positive number or None"),
        ("probcover[delta=big]", "delta must be a positive number or None"),
        ("probcover[purity=0]", r"purity must be a number in \(0, 1\]"),
        ("probcover[purity=1.5]", r"purity must be a number in \(0, 1\]"),
        ("probcover[sample=0]", "sample must be an integer >= 1 or None"),
        ("probcover[candidates=-2]", "candidates must be an integer >= 1 or None"),
    ],
)
def test_bad_values_are_one_line(spec: str, words: str) -> None:
    with pytest.raises(SaalError, match=words) as err:
        build_strategy(spec)
    assert "\n" not in str(err.value)


def test_samples_smaller_than_the_query_are_one_line() -> None:
    for option in ("sample", "candidates"):
        with pytest.raises(SaalError, match=f"probcover {option} 2 is smaller than the query size 3") as err:
            ProbCover(embedding="input", **{option: 2}).select(MODEL, _pool(LINE), 3, 0)
        assert "\n" not in str(err.value)


def _blobs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(8, 10))[rng.integers(0, 8, n)] * 2 + rng.normal(size=(n, 10))


def test_the_approximation_is_exact_when_its_samples_cover_everything() -> None:
    pool = _pool(_blobs(400), labelled=[0, 1, 2], classes=8)
    exact = ProbCover(embedding="input", sample=None, candidates=None).select(MODEL, pool, 8, 3)
    covering = ProbCover(embedding="input", sample=397, candidates=397).select(MODEL, pool, 8, 3)
    np.testing.assert_array_equal(covering.indices, exact.indices)
    np.testing.assert_array_equal(covering.scores, exact.scores)
    assert covering.reason == exact.reason


def test_the_approximation_samples_and_stays_deterministic() -> None:
    pool = _pool(_blobs(600), classes=8)
    strategy = ProbCover(embedding="input", sample=200, candidates=50, delta=0.5)
    sel = strategy.select(MODEL, pool, 6, 1)
    np.testing.assert_array_equal(sel.indices, strategy.select(MODEL, pool, 6, 1).indices)
    assert "of 200 points" in sel.reason
    assert (sel.scores > 0).sum() <= 50 and set(sel.indices) <= set(np.flatnonzero(sel.scores))
    np.testing.assert_array_equal(sel.scored_indices, np.arange(600))


def test_subset_restricts_the_candidates() -> None:
    pool = _pool(_blobs(300), classes=8)
    sel = ProbCover(embedding="input", subset=50).select(MODEL, pool, 4, 2)
    assert len(sel.scored_indices) == 50 and set(sel.indices) <= set(sel.scored_indices)


@pytest.mark.parametrize("chunk", [3, 16, 2048])
def test_radius_computations_match_brute_force_whatever_the_blocks(chunk: int) -> None:
    rng = np.random.default_rng(1)
    a = torch.as_tensor(rng.normal(size=(37, 6)), dtype=torch.float32)
    b = torch.as_tensor(rng.normal(size=(41, 6)), dtype=torch.float32)
    d2 = ((a.double()[:, None, :] - b.double()[None, :, :]) ** 2).sum(-1)
    r = float(d2.sqrt().median())
    inside = d2 < r * r
    mask = torch.as_tensor(rng.random(41) < 0.5)
    assert torch.equal(within(a, b, r), inside)
    assert torch.equal(radius_counts(a, b, r, chunk=chunk), inside.sum(1))
    assert torch.equal(radius_counts(a, b, r, mask, chunk=chunk), (inside & mask).sum(1))
    assert torch.equal(radius_any(a, b, r, chunk=chunk), inside.any(0))
    assert torch.equal(radius_members(a[4], b, r, chunk=chunk), inside[4].nonzero()[:, 0])
    la, lb = torch.as_tensor(rng.integers(0, 3, 37)), torch.as_tensor(rng.integers(0, 3, 41))
    other = d2.masked_fill(la[:, None] == lb[None, :], float("inf")).min(1).values.sqrt()
    torch.testing.assert_close(nearest_other(a, la, b, lb, chunk=chunk), other, rtol=1e-6, atol=1e-6)


def test_radius_boundary_is_decided_in_float64() -> None:
    # float32 products cannot tell these apart from the radius; the float64 rule can
    a = torch.tensor([[1000.0, 0.0]])
    b = torch.tensor([[1001.0, 0.0], [1000.0, 1.0], [1000.5, 0.5]])
    assert within(a, b, 1.0).tolist() == [[False, False, True]]
    assert within(a, b, 1.0000001).tolist() == [[True, True, True]]
