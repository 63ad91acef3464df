"""A small CNN for 28x28 and 32x32 images (also works on 8x8), with dropout for MC-dropout."""

from __future__ import annotations

import torch
from torch import nn

from saal.models.base import Classifier


class SmallCNN(Classifier):
    """Two conv blocks (conv3x3 -> ReLU -> max-pool 2) -> Linear 128 -> ReLU -> Dropout -> head."""

    feature_layers = ("block1", "block2", "fc")

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 32,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        side = image_size // 4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * side * side, 128), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(128, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc(self.block2(self.block1(x))))
