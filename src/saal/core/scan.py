"""One streaming pass over chosen pool items: batches in order, per-item outputs gathered.

Every loop over a pool, a labelled set or a test set in saal goes through here, so memory never
grows with the pool beyond the per-item outputs asked for. An in-memory
:class:`~saal.data.base.ArrayDataset` is sliced directly (fast); any other ``Dataset`` is read
item by item (through a ``DataLoader`` when loader workers are asked for) and its inputs are
collated by the task's ``collate``. With ``shard=True`` and an initialised ``torch.distributed``
process group, each rank scans its contiguous share of the items (no padding, no duplicates) and
the per-item outputs are gathered back into the order of the items on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from saal.core.distributed import all_gather_objects, get_rank, get_world_size, shard_bounds
from saal.data.base import ArrayDataset

Collate = Callable[[list[Any]], Any]


def stack_inputs(items: list[Any]) -> torch.Tensor:
    """The default collate for inputs: stack same-shaped tensors into one batch tensor."""
    return torch.stack([torch.as_tensor(x) for x in items])


@dataclass
class Batch:
    """One batch of a scan: the dataset indices and their collated inputs (on the CPU)."""

    indices: np.ndarray
    inputs: Any

    def __len__(self) -> int:
        return len(self.indices)


class _Inputs(Dataset[Any]):
    """``dataset[indices[i]]``'s input alone: targets are never handed to the scan's user."""

    def __init__(self, dataset: Dataset[Any], indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.indices[i])][0]


def load_inputs(dataset: Dataset[Any], indices: np.ndarray, collate: Collate | None = None) -> Any:
    """Return the collated inputs of ``dataset`` at ``indices`` (targets are not read)."""
    if isinstance(dataset, ArrayDataset):  # ready tensors: slicing is stacking, without the copies
        return dataset.inputs[torch.as_tensor(np.ascontiguousarray(indices), dtype=torch.long)]
    return (collate or stack_inputs)([dataset[int(i)][0] for i in indices])


def batches(
    dataset: Dataset[Any],
    indices: Sequence[int] | np.ndarray,
    batch_size: int,
    *,
    collate: Collate | None = None,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Yield :class:`Batch` es over ``indices`` in order, ``batch_size`` items at a time.

    Raises:
        ValueError: ``batch_size < 1`` or ``num_workers < 0``.
    """
    idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0 or isinstance(dataset, ArrayDataset):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            yield Batch(chunk, load_inputs(dataset, chunk, collate))
        return
    loader = DataLoader(
        _Inputs(dataset, idx), batch_size=batch_size, num_workers=num_workers, collate_fn=collate or stack_inputs
    )
    start = 0
    for inputs in loader:
        n = min(batch_size, len(idx) - start)
        yield Batch(idx[start : start + n], inputs)
        start += n


def scan(
    dataset: Dataset[Any],
    indices: Sequence[int] | np.ndarray,
    fn: Callable[[Batch], dict[str, torch.Tensor]],
    *,
    batch_size: int,
    collate: Collate | None = None,
    num_workers: int = 0,
    shard: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``fn`` on every batch of ``dataset[indices]`` and gather its per-item outputs.

    Args:
        fn: returns, for one batch, named tensors whose first dimension is the batch's length.
        shard: under an initialised process group, scan only this rank's contiguous share and
            gather every rank's outputs (moved to the CPU for the exchange).

    Returns:
        For each name ``fn`` returned, one tensor of ``len(indices)`` rows in the order of
        ``indices`` (device and dtype of ``fn``'s first output); an empty dict when there is no item.
    """
    idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    world = get_world_size() if shard else 1
    start, stop = shard_bounds(len(idx), get_rank(), world) if world > 1 else (0, len(idx))
    mine = _fill(dataset, idx[start:stop], fn, batch_size, collate, num_workers)
    if world == 1:
        return mine
    parts = all_gather_objects({k: v.cpu() for k, v in mine.items()})
    device = next(iter(mine.values())).device if mine else torch.device("cpu")
    names = next((list(p) for p in parts if p), [])
    return {k: torch.cat([p[k] for p in parts if p]).to(device) for k in names}


def _fill(
    dataset: Dataset[Any],
    idx: np.ndarray,
    fn: Callable[[Batch], dict[str, torch.Tensor]],
    batch_size: int,
    collate: Collate | None,
    num_workers: int,
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    start = 0
    for batch in batches(dataset, idx, batch_size, collate=collate, num_workers=num_workers):
        values = fn(batch)
        if not out:  # allocated once: no list of batches to concatenate (which would double the peak)
            out = {k: v.new_empty((len(idx), *v.shape[1:])) for k, v in values.items()}
        for k, v in values.items():
            out[k][start : start + len(batch)] = v
        start += len(batch)
    return out


def training_batches(
    dataset: Dataset[Any],
    indices: np.ndarray,
    targets: Sequence[Any] | np.ndarray,
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    collate: Collate | None = None,
    collate_targets: Collate | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(inputs, targets)`` batches of the labelled items; shuffled with ``generator`` when one is given.

    ``targets`` holds the given label of each of ``indices``; ``collate_targets`` turns a list of
    them into a batch (default: an int64 tensor).
    """
    indices = np.asarray(indices, dtype=np.int64)
    order = np.arange(len(indices))
    if generator is not None:
        order = torch.randperm(len(indices), generator=generator).numpy()
    for start in range(0, len(order), batch_size):
        pos = order[start : start + batch_size]
        if collate_targets is None:
            y = torch.as_tensor(np.asarray(targets, dtype=np.int64)[pos])
        else:
            y = collate_targets([targets[int(p)] for p in pos])
        yield load_inputs(dataset, indices[pos], collate), y
