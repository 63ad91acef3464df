"""What every dataset in the registry provides."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """An in-memory dataset of ready, normalised input tensors and integer targets.

    ``targets`` is a numpy int64 array (the simulated annotator reads it).
    """

    def __init__(self, inputs: torch.Tensor, targets: np.ndarray | torch.Tensor) -> None:
        targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.inputs[i], int(self.targets[i])

    def __getitems__(self, items: list[int]) -> list[tuple[torch.Tensor, int]]:
        return [(self.inputs[i], int(self.targets[i])) for i in items]


@dataclass
class DatasetBundle:
    """A dataset's train and test splits plus what a model needs to know about them.

    Attributes:
        name: registry name or a description of the source.
        train: ``Dataset`` of ``(normalised input tensor, target)``; the unlabelled pool.
        test: the held-out evaluation split, same format.
        train_targets: true class of every train item (the simulated annotator's answers).
        classes: class names, in label order.
        channels, image_size: input shape ``(channels, image_size, image_size)``; ``image_size``
            is 0 for flat vector inputs.
        mean, std: the per-channel normalisation already applied to the inputs.
    """

    name: str
    train: Dataset
    test: Dataset
    train_targets: np.ndarray
    classes: list[str]
    channels: int
    image_size: int
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.image_size == 0:
            return (self.channels,)
        return (self.channels, self.image_size, self.image_size)


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Return ``(images - mean) / std`` per channel for an ``N x C x H x W`` float tensor in [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s
