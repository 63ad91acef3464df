"""Uncertainty sampling from the model's softmax: entropy, least confidence, margin."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from saal.core.model_state import model_device
from saal.core.scan import Batch, scan
from saal.pool import Pool
from saal.strategies.base import ScoreStrategy


class _SoftmaxScore(ScoreStrategy):
    """Scores computed batch by batch from softmax probabilities (bounded memory)."""

    def score(self, model: nn.Module, pool: Pool, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        device = model_device(model)

        def batch_scores(batch: Batch) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                logits = pool.task.forward(model, pool.task.to_device(batch.inputs, device))
            return {"score": self.from_logits(logits.double())}

        out = scan(pool.dataset, candidates, batch_scores, batch_size=self.batch_size, collate=pool.task.collate)
        return out["score"].cpu().numpy()

    @staticmethod
    def from_logits(logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Entropy(_SoftmaxScore):
    """Predictive entropy ``-sum_c p_c log p_c`` (nats); the largest are chosen."""

    name = "entropy"

    @staticmethod
    def from_logits(logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=1)
        return -(logp.exp() * logp).sum(1)


class LeastConfidence(_SoftmaxScore):
    """Variation ratio ``1 - max_c p_c``; the largest are chosen."""

    name = "least-confidence"

    @staticmethod
    def from_logits(logits: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.softmax(logits, dim=1).max(1).values


class Margin(_SoftmaxScore):
    """Margin ``p_(1) - p_(2)`` between the two most probable classes; the SMALLEST are chosen."""

    name = "margin"
    ascending = True

    @staticmethod
    def from_logits(logits: torch.Tensor) -> torch.Tensor:
        top2 = torch.softmax(logits, dim=1).topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
