"""Turning dataset indices into batches of tensors, in bounded memory.

An in-memory :class:`~saal.data.base.ArrayDataset` is sliced directly (fast); any other
``Dataset`` goes through a ``DataLoader``. Every loop over a pool or a labelled set in saal
goes through here, so the pool is always streamed in batches of ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from saal.data.base import ArrayDataset


def load_inputs(dataset: Dataset, indices: np.ndarray) -> torch.Tensor:
    """Return the stacked inputs of ``dataset`` at ``indices`` (targets are not read)."""
    if isinstance(dataset, ArrayDataset):
        return dataset.inputs[torch.as_tensor(indices, dtype=torch.long)]
    return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in indices])


def input_batches(
    dataset: Dataset, indices: np.ndarray, batch_size: int, num_workers: int = 0
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(dataset indices, inputs)`` over ``indices`` in order, ``batch_size`` at a time."""
    indices = np.asarray(indices, dtype=np.int64)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(dataset, ArrayDataset) or num_workers == 0:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            yield chunk, load_inputs(dataset, chunk)
        return
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, num_workers=num_workers)
    start = 0
    for x, _ in loader:
        yield indices[start : start + len(x)], x
        start += len(x)


def labelled_batches(
    dataset: Dataset,
    indices: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, labels)`` batches; shuffled with ``generator`` when one is given."""
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    order = np.arange(len(indices))
    if generator is not None:
        order = torch.randperm(len(indices), generator=generator).numpy()
    for start in range(0, len(order), batch_size):
        pos = order[start : start + batch_size]
        yield load_inputs(dataset, indices[pos]), torch.as_tensor(labels[pos])
