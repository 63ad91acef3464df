"""Uniform random sampling: the baseline every method must beat."""

from __future__ import annotations

import numpy as np
from torch import nn

from saal.pool import Pool
from saal.strategies.base import Selection, Strategy


class RandomSampling(Strategy):
    """Choose ``k`` candidates uniformly at random with the given generator. Scores nothing; needs no labels
    (``cold_start``)."""

    name = "random"
    tasks = ("*",)
    cold_start = True

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        chosen = rng.choice(candidates, size=k, replace=False)
        return Selection(chosen, np.empty(0, dtype=np.int64), np.empty(0))
