"""BADGE: the factored embedding is autograd's last-layer gradient; factored distances; k-means++."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saal.data import DatasetBundle
from saal.models import build_model
from saal.pool import Pool
from saal.strategies import build_strategy
from saal.strategies.badge import gradient_factors, kmeans_pp, squared_distances_to, squared_norms


@pytest.fixture(scope="module")
def model(digits: DatasetBundle) -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", digits.input_shape, 10).eval()


def _explicit(q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return (q[:, :, None] * h[:, None, :]).flatten(1).double()


def test_embedding_is_the_autograd_gradient_of_ce_under_the_predicted_label(model, digits) -> None:
    idx = np.array([0, 7, 123, 900])
    q, h = gradient_factors(model, digits.train, idx, batch_size=3)
    assert q.shape == (4, 10) and h.shape == (4, 129)  # 128 features + the bias's constant 1
    for row, i in enumerate(idx):
        x = digits.train.inputs[i : i + 1]
        model.zero_grad()
        logits = model(x)
        F.cross_entropy(logits, logits.argmax(1)).backward()
        grad = torch.cat([model.head.weight.grad, model.head.bias.grad[:, None]], dim=1)  # [dW | db] per class
        torch.testing.assert_close(_explicit(q[row : row + 1], h[row : row + 1]).view(10, 129).float(), grad,
                                   atol=1e-6, rtol=1e-5)  # fmt: skip
    model.zero_grad()


def test_factored_distances_equal_explicit_ones(model, digits) -> None:
    q, h = gradient_factors(model, digits.train, np.arange(60), batch_size=25)
    g = _explicit(q, h)
    torch.testing.assert_close(squared_norms(q, h), (g**2).sum(1), rtol=1e-5, atol=1e-8)
    for i in (0, 13, 59):
        explicit = ((g - g[i]) ** 2).sum(1)
        torch.testing.assert_close(squared_distances_to(q, h, i), explicit, rtol=1e-4, atol=1e-5)
        assert squared_distances_to(q, h, i)[i] < 1e-5


def test_first_pick_is_the_largest_norm_and_picks_are_seeded(model, digits) -> None:
    q, h = gradient_factors(model, digits.train, np.arange(300), batch_size=128)
    picks, scores = kmeans_pp(q, h, 15, np.random.default_rng(0))
    assert picks[0] == int(torch.argmax(squared_norms(q, h)))
    assert len(set(picks.tolist())) == 15
    again, _ = kmeans_pp(q, h, 15, np.random.default_rng(0))
    other, _ = kmeans_pp(q, h, 15, np.random.default_rng(1))
    assert again.tolist() == picks.tolist() and other.tolist() != picks.tolist()
    # Unpicked scores are the final squared distances to the nearest pick.
    g = _explicit(q, h)
    final = torch.cdist(g, g[picks]).pow(2).min(1).values.numpy()
    others = np.setdiff1d(np.arange(300), picks)
    np.testing.assert_allclose(scores[others], final[others], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(scores[picks[0]], float(squared_norms(q, h)[picks[0]]))


def test_d2_sampling_follows_the_squared_distances() -> None:
    # One-dimensional embeddings: q = [1], h = [x]. The first pick is x = 3 (largest norm);
    # then the other points are drawn with probability proportional to (x - 3)^2 = 9, 4, 0 (duplicate).
    q = torch.ones(4, 1)
    h = torch.tensor([[0.0], [1.0], [3.0], [3.0]])
    rng = np.random.default_rng(0)
    seconds = [int(kmeans_pp(q, h, 2, rng)[0][1]) for _ in range(4000)]
    counts = np.bincount(seconds, minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] / 4000 - 9 / 13) < 0.03
    # Only duplicates of the picks left: uniform among the rest, never a repeat.
    picks, _ = kmeans_pp(q, h, 4, np.random.default_rng(0))
    assert sorted(picks.tolist()) == [0, 1, 2, 3]


def test_strategy_returns_dataset_indices(model, digits) -> None:
    pool = Pool(digits.train, 10)
    pool.label(np.arange(0, 1000), digits.train_targets[:1000])
    sel = build_strategy("badge", batch_size=64).select(model, pool, 8, 5)
    assert (sel.indices >= 1000).all() and len(set(sel.indices)) == 8
    np.testing.assert_array_equal(sel.scored_indices, np.arange(1000, len(pool)))
