"""Entropy, least confidence and margin against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from saal.data import ArrayDataset
from saal.pool import Pool
from saal.strategies import build_strategy

# Each row is a predictive distribution; the "model" is the identity on log-probabilities.
PROBS = [
    [0.5, 0.25, 0.25],
    [1 / 3, 1 / 3, 1 / 3],
    [0.9, 0.05, 0.05],
    [0.45, 0.44, 0.11],
]
ENTROPY = [
    1.5 * math.log(2),  # 0.5 ln 2 + 2 * 0.25 ln 4
    math.log(3),
    -(0.9 * math.log(0.9) + 0.1 * math.log(0.05)),
    -(0.45 * math.log(0.45) + 0.44 * math.log(0.44) + 0.11 * math.log(0.11)),
]
LEAST_CONFIDENCE = [0.5, 2 / 3, 0.1, 0.55]
MARGIN = [0.25, 0.0, 0.85, 0.01]


@pytest.fixture()
def pool() -> Pool:
    x = torch.log(torch.tensor(PROBS, dtype=torch.float32))
    # Item 4 is labelled; its (certain) distribution must never be chosen.
    x = torch.cat([x, torch.log(torch.tensor([[0.98, 0.01, 0.01]]))])
    p = Pool(ArrayDataset(x, np.zeros(5, dtype=np.int64)), num_classes=3)
    p.label([4], [0])
    return p


@pytest.mark.parametrize(
    ("name", "expected", "top2"),
    [
        ("entropy", ENTROPY, [1, 0]),
        ("least-confidence", LEAST_CONFIDENCE, [1, 3]),
        ("margin", MARGIN, [1, 3]),
    ],
)
def test_scores_match_hand_computed_values(pool: Pool, name: str, expected: list[float], top2: list[int]) -> None:
    strategy = build_strategy(name, batch_size=3)  # two batches: scores must not depend on batching
    sel = strategy.select(nn.Identity(), pool, 2, 0)
    assert sel.scored_indices.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(sel.scores, expected, atol=1e-6)
    assert sel.indices.tolist() == top2


def test_margin_takes_the_smallest_and_ties_go_to_the_smaller_index() -> None:
    x = torch.log(torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.5, 0.5], [0.9, 0.1]]))
    p = Pool(ArrayDataset(x, np.zeros(4, dtype=np.int64)), num_classes=2)
    sel = build_strategy("margin").select(nn.Identity(), p, 3, 0)
    assert sel.indices.tolist() == [1, 2, 0]
