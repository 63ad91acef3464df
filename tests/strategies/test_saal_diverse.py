"""`saal-diverse`: SAAL's scores, a shortlist of the best, a batch spread in feature space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saal.data import DatasetBundle
from saal.errors import SaalError
from saal.models import build_model
from saal.pool import Pool, initial_indices
from saal.strategies import build_strategy
from saal.strategies.coreset import embeddings
from saal.strategies.saal import SAAL
from saal.strategies.saal_diverse import SAALDiverse, spread_picks
from saal.training import TrainConfig, fit


def _clusters() -> torch.Tensor:
    """Three tight clusters of four points each, listed cluster by cluster (a top-k would take one cluster)."""
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    offsets = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1]])
    return (centres[:, None, :] + offsets[None]).reshape(-1, 2)


@pytest.mark.parametrize("spread", ["kmeans++", "k-center"])
def test_spread_picks_start_with_the_best_and_cover_every_cluster(spread: str) -> None:
    points = _clusters()
    picks = spread_picks(points, 3, np.random.default_rng(0), spread)
    assert picks[0] == 0
    assert sorted(int(p) // 4 for p in picks) == [0, 1, 2]  # one from each cluster, never two near-duplicates


def test_kmeans_spread_is_seeded_and_k_center_is_deterministic() -> None:
    rng_points = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    a = spread_picks(rng_points, 8, np.random.default_rng(5))
    assert np.array_equal(a, spread_picks(rng_points, 8, np.random.default_rng(5)))
    assert len(np.unique(a)) == 8
    draws = {tuple(spread_picks(rng_points, 8, np.random.default_rng(s))) for s in range(6)}
    assert len(draws) > 1
    b = spread_picks(rng_points, 8, np.random.default_rng(0), "k-center")
    assert np.array_equal(b, spread_picks(rng_points, 8, np.random.default_rng(99), "k-center"))
    # k-center's second pick is the point farthest from the first
    assert b[1] == int(torch.cdist(rng_points, rng_points[:1]).argmax())


@pytest.fixture(scope="module")
def trained(digits: DatasetBundle) -> tuple[torch.nn.Module, Pool]:
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    pool = Pool(digits.train, digits.num_classes)
    start = initial_indices(digits.train_targets, 30, 0)
    pool.label(start, digits.train_targets[start])
    fit(model, digits.train, start, digits.train_targets[start], TrainConfig(epochs=5, batch_size=16),
        torch.Generator().manual_seed(0))  # fmt: skip
    return model, pool


def test_scores_are_saals_and_picks_come_from_the_shortlist(trained: tuple[torch.nn.Module, Pool]) -> None:
    model, pool = trained
    k = 10
    plain = SAAL(subset=300).select(model, pool, k, 7)
    diverse = SAALDiverse(subset=300, factor=4).select(model, pool, k, 7)
    assert np.array_equal(diverse.scored_indices, plain.scored_indices)
    np.testing.assert_allclose(diverse.scores, plain.scores, rtol=1e-6)
    order = np.lexsort((np.arange(len(plain.scores)), -plain.scores))
    shortlist = set(plain.scored_indices[order[: 4 * k]].tolist())
    assert set(diverse.indices.tolist()) <= shortlist
    assert diverse.indices[0] == plain.indices[0]  # the best-scored candidate is always taken first
    # factor 1 is top-k SAAL exactly
    assert np.array_equal(SAALDiverse(subset=300, factor=1).select(model, pool, k, 7).indices, plain.indices)


def test_the_batch_is_more_spread_than_top_k(trained: tuple[torch.nn.Module, Pool], digits: DatasetBundle) -> None:
    model, pool = trained
    k = 10

    def spread(indices: np.ndarray) -> float:
        e = embeddings(model, digits.train, indices, 256)
        return float(torch.pdist(e).min())

    plain = SAAL(subset=600).select(model, pool, k, 3)
    for method in ("kmeans++", "k-center"):
        diverse = build_strategy(f"saal-diverse[spread={method}]", subset=600).select(model, pool, k, 3)
        assert spread(diverse.indices) >= spread(plain.indices)
    center = build_strategy("saal-diverse[spread=k-center]", subset=600).select(model, pool, k, 3)
    assert spread(center.indices) > spread(plain.indices)  # k-center maximises the smallest gap greedily


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("saal-diverse[factor=0.5]", "factor must be a number >= 1"),
        ("saal-diverse[spread=random]", "spread must be one of"),
        ("saal-diverse[score=sharp]", "score"),
    ],
)
def test_bad_options_are_refused_in_one_line(spec: str, message: str) -> None:
    with pytest.raises(SaalError, match=message) as err:
        build_strategy(spec)
    assert "\n" not in str(err.value)


def test_a_shortlist_too_small_for_k_is_refused() -> None:
    with pytest.raises(SaalError, match="cannot pick 5 of 3"):
        spread_picks(torch.zeros(3, 2), 5, np.random.default_rng(0))
