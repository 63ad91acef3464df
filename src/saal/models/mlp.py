"""A multi-layer perceptron for small flat or image inputs (the digits default)."""

from __future__ import annotations

import math

import torch
from torch import nn

from saal.models.base import Classifier


class MLP(Classifier):
    """Flatten -> [Linear -> ReLU -> Dropout] x len(hidden) -> Linear head."""

    feature_layers: tuple[str, ...] = ("body.2", "body.5")

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: tuple[int, ...] = (256, 128),
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.feature_layers = tuple(f"body.{3 * i + 2}" for i in range(len(hidden)))
        self.head = nn.Linear(width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
