"""Core-set: chunked distances, greedy k-center against brute force, and the strategy on a point set."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from saal.data import ArrayDataset, DatasetBundle
from saal.models import Classifier, build_model
from saal.pool import Pool
from saal.strategies import build_strategy
from saal.strategies.coreset import embeddings, k_center_greedy, nearest_distances


def brute_force_greedy(points: np.ndarray, centres: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """Greedy k-center with the full distance matrix, in float64."""
    everything = np.concatenate([points, centres])
    d = np.sqrt(((everything[:, None, :] - everything[None, :, :]) ** 2).sum(-1))
    centre_set = list(range(len(points), len(everything)))
    picks, dists = [], []
    for _ in range(k):
        min_d = d[: len(points)][:, centre_set].min(1)
        min_d[picks] = -1
        pick = int(np.argmax(min_d))
        picks.append(pick)
        dists.append(float(min_d[pick]))
        centre_set.append(pick)
    return picks, dists


def test_nearest_distances_in_small_blocks_equal_the_full_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    p, c = torch.randn(53, 6, generator=g), torch.randn(19, 6, generator=g)
    full = torch.cdist(p.double(), c.double()).min(1).values
    torch.testing.assert_close(nearest_distances(p, c, chunk=7).double(), full, atol=1e-5, rtol=1e-5)
    assert torch.isinf(nearest_distances(p, c[:0])).all()


def test_k_center_greedy_maximises_the_minimum_distance_like_brute_force() -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(300, 2)) * [3.0, 1.0]
    centres = rng.normal(size=(4, 2))
    picks, scores = k_center_greedy(torch.tensor(points), torch.tensor(centres), 12, np.random.default_rng(0))
    expected, expected_d = brute_force_greedy(points, centres, 12)
    assert picks.tolist() == expected
    np.testing.assert_allclose(scores[picks], expected_d, rtol=1e-9)
    assert np.all(np.diff(scores[picks]) <= 0), "pick-time distances never increase"
    others = np.setdiff1d(np.arange(300), picks)
    assert scores[others].max() <= scores[picks].min()
    # The unpicked points' scores are their final distances to labelled set + picks.
    final = np.sqrt(((points[others, None] - np.concatenate([centres, points[picks]])[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(scores[others], final, rtol=1e-9)


def test_without_centres_the_first_pick_is_seeded_random() -> None:
    points = torch.tensor(np.random.default_rng(1).normal(size=(50, 3)))
    a, _ = k_center_greedy(points, points[:0], 5, np.random.default_rng(7))
    b, _ = k_center_greedy(points, points[:0], 5, np.random.default_rng(7))
    assert a.tolist() == b.tolist()
    # After the first pick it is deterministic farthest-point traversal.
    d = torch.cdist(points, points[a[:1]]).squeeze(1)
    assert a[1] == int(torch.argmax(d))


def test_duplicates_are_never_picked_twice() -> None:
    points = torch.zeros(6, 2)
    picks, _ = k_center_greedy(points, torch.zeros(1, 2), 6, np.random.default_rng(0))
    assert sorted(picks.tolist()) == list(range(6))


class _PointEmbedder(Classifier):
    """The embedding is the input itself: core-set then works on the raw points."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 3)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_strategy_picks_far_points_in_dataset_indices() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 2)).astype(np.float32)
    pool = Pool(ArrayDataset(torch.tensor(x), np.zeros(120, dtype=np.int64)), 3)
    labelled = np.array([5, 17, 60])
    pool.label(labelled, [0, 0, 0])
    sel = build_strategy("coreset", batch_size=16).select(_PointEmbedder(), pool, 6, 0)
    candidates = pool.unlabelled_indices()
    expected, expected_d = brute_force_greedy(x[candidates].astype(np.float64), x[labelled].astype(np.float64), 6)
    assert sel.indices.tolist() == candidates[expected].tolist()
    np.testing.assert_allclose(sel.scores[np.searchsorted(candidates, sel.indices)], expected_d, rtol=1e-5)


def test_embeddings_are_the_penultimate_features(digits: DatasetBundle) -> None:
    torch.manual_seed(0)
    model = build_model("cnn", digits.input_shape, 10).eval()
    idx = np.array([3, 1, 400])
    with torch.no_grad():
        expected = model.embed(digits.train.inputs[idx])
    torch.testing.assert_close(embeddings(model, digits.train, idx, batch_size=2), expected)
