"""One streaming pass over chosen pool items: batches in order, per-item outputs gathered.

Every loop over a pool, a labelled set or a test set in saal goes through here, so memory never
grows with the pool beyond the per-item outputs asked for. An in-memory
:class:`~saal.data.base.ArrayDataset` is sliced directly (fast); any other ``Dataset`` is read
item by item (through a ``DataLoader`` when loader workers are asked for) and its inputs are
collated by the task's ``collate``. With ``shard=True`` (or inside
:func:`saal.core.shards.distributed_scoring`) and an initialised ``torch.distributed`` process group,
each rank scans its contiguous share of the items in whole batches (no padding, no duplicates) and
the per-item outputs are gathered back into the order of the items on every rank, in bounded
rounds. :func:`scan_rows` keeps large outputs in files (:mod:`saal.core.row_store`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from saal.core.distributed import all_gather_objects, batch_shard_bounds, get_rank, get_world_size
from saal.core.progress import Progress
from saal.core.row_store import RowStore, new_rows
from saal.core.shards import ScoringPlan, current_plan
from saal.data.base import ArrayDataset

Collate = Callable[[list[Any]], Any]


def stack_inputs(items: list[Any]) -> torch.Tensor:
    """The default collate for inputs: stack same-shaped tensors into one batch tensor."""
    return torch.stack([torch.as_tensor(x) for x in items])


@dataclass
class Batch:
    """One batch of a scan: the dataset indices and their collated inputs (on the CPU).

    ``position`` is where the batch's first item stands in the whole scan's ``indices`` (the same
    under sharding as in one process: per-batch random streams can be seeded from it).
    """

    indices: np.ndarray
    inputs: Any
    position: int = 0

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
    getitems = getattr(dataset, "__getitems__", None)  # a batch read at once, as torch's DataLoader does
    items = getitems([int(i) for i in indices]) if getitems is not None else [dataset[int(i)] for i in indices]
    return (collate or stack_inputs)([item[0] for item in items])


def batches(
    dataset: Dataset[Any],
    indices: Sequence[int] | np.ndarray,
    batch_size: int,
    *,
    collate: Collate | None = None,
    num_workers: int = 0,
    first_position: int = 0,
) -> Iterator[Batch]:
    """Yield :class:`Batch` es over ``indices`` in order, ``batch_size`` items at a time.

    ``first_position`` is added to each batch's :attr:`Batch.position`.

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
            yield Batch(chunk, load_inputs(dataset, chunk, collate), first_position + start)
        return
    loader = DataLoader(
        _Inputs(dataset, idx), batch_size=batch_size, num_workers=num_workers, collate_fn=collate or stack_inputs
    )
    start = 0
    for inputs in loader:
        n = min(batch_size, len(idx) - start)
        yield Batch(idx[start : start + n], inputs, first_position + start)
        start += n


def scan(
    dataset: Dataset[Any],
    indices: Sequence[int] | np.ndarray,
    fn: Callable[[Batch], dict[str, torch.Tensor]],
    *,
    batch_size: int,
    collate: Collate | None = None,
    num_workers: int = 0,
    shard: bool | None = None,
    desc: str = "scan",
) -> dict[str, torch.Tensor]:
    """Run ``fn`` on every batch of ``dataset[indices]`` and gather its per-item outputs.

    Args:
        fn: returns, for one batch, named tensors whose first dimension is the batch's length.
        shard: under an initialised process group, scan only this rank's contiguous share (whole
            batches of a one-process scan, :func:`~saal.core.distributed.batch_shard_bounds`) and
            gather every rank's outputs (moved to the CPU for the exchange). None (the default)
            follows the :class:`~saal.core.shards.ScoringPlan` in force (no plan: no sharding).
        desc: what the scan's progress (:mod:`saal.core.progress`) calls it.

    Returns:
        For each name ``fn`` returned, one tensor of ``len(indices)`` rows in the order of
        ``indices`` (device and dtype of ``fn``'s first output); an empty dict when there is no item.
    """
    rows = scan_rows(
        dataset,
        indices,
        fn,
        batch_size=batch_size,
        collate=collate,
        num_workers=num_workers,
        shard=shard,
        on_disk=False,
        desc=desc,
    )
    return {k: v.to_tensor() for k, v in rows.items()}


def scan_rows(
    dataset: Dataset[Any],
    indices: Sequence[int] | np.ndarray,
    fn: Callable[[Batch], dict[str, torch.Tensor]],
    *,
    batch_size: int,
    collate: Collate | None = None,
    num_workers: int = 0,
    shard: bool | None = None,
    on_disk: bool | None = None,
    desc: str = "scan",
) -> dict[str, RowStore]:
    """As :func:`scan`, but each output is a :class:`~saal.core.row_store.RowStore`: large outputs
    (``N x d`` embeddings of a big pool) go to a temporary file instead of memory.

    Args:
        on_disk: True: every output in a file; False: in memory; None: a file when an output is
            larger than :data:`saal.core.row_store.IN_MEMORY_BYTES`.

    Returns:
        One store of ``len(indices)`` rows per output name (empty dict when there is no item).
    """
    idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    plan = current_plan()
    if shard is None:
        shard = plan is not None and plan.shard
    world = get_world_size() if shard else 1
    if world == 1 and plan is None:
        with Progress(len(idx), desc) as progress:
            return _fill(dataset, idx, fn, batch_size, collate, num_workers, 0, on_disk, None, 0, progress)
    number = plan.next_scan() if plan is not None else 0
    start, stop = batch_shard_bounds(len(idx), batch_size, get_rank(), world) if world > 1 else (0, len(idx))
    with Progress(stop - start, desc) as progress:  # this rank's share
        mine = _fill(
            dataset, idx[start:stop], fn, batch_size, collate, num_workers, start, on_disk, plan, number, progress
        )
    if world == 1:
        return mine
    bounds = [batch_shard_bounds(len(idx), batch_size, r, world) for r in range(world)]
    return _gather(mine, bounds, len(idx), on_disk)


def _fill(
    dataset: Dataset[Any],
    idx: np.ndarray,
    fn: Callable[[Batch], dict[str, torch.Tensor]],
    batch_size: int,
    collate: Collate | None,
    num_workers: int,
    first: int,
    on_disk: bool | None,
    plan: ScoringPlan | None,
    number: int,
    progress: Progress,
) -> dict[str, RowStore]:
    """Scan ``idx`` (the items ``first ..`` of the whole scan) into stores allocated at the first batch;
    ``progress`` counts the items done (saved pieces loaded included).

    Under a plan with a checkpoint folder, the items go in pieces aligned to global multiples of
    ``piece_batches * batch_size``; a saved piece is loaded instead of computed, a computed one saved.
    """
    out: dict[str, RowStore] = {}

    def put(at: int, values: dict[str, torch.Tensor]) -> None:
        if not out:  # allocated once: no list of batches to concatenate (which would double the peak)
            for k, v in values.items():
                out[k] = new_rows(len(idx), tuple(v.shape[1:]), v.dtype, v.device, on_disk=on_disk)
        for k, v in values.items():
            out[k].write(at, v)

    def run(lo: int, hi: int) -> None:
        at = lo
        for batch in batches(dataset, idx[lo:hi], batch_size, collate=collate, num_workers=num_workers,
                             first_position=first + lo):  # fmt: skip
            put(at, fn(batch))
            at += len(batch)
            progress.update(len(batch))

    if plan is None or plan.checkpoint_dir is None:
        run(0, len(idx))
        return out
    piece = plan.piece_batches * batch_size
    lo = 0
    while lo < len(idx):
        hi = min(len(idx), (first + lo) // piece * piece + piece - first)
        path = plan.piece_path(number, first + lo, first + hi)
        assert path is not None
        saved = plan.load_piece(path, idx[lo:hi])
        if saved is not None:
            put(lo, saved)
            progress.update(hi - lo)
        else:
            run(lo, hi)
            plan.save_piece(path, idx[lo:hi], {k: v.read(lo, hi).cpu().clone() for k, v in out.items()})
        lo = hi
    return out


# Bytes of rows per rank in one exchange round of :func:`_gather` (bounds the memory of gathering).
GATHER_BYTES = 32 * 2**20


def _gather(
    mine: dict[str, RowStore], bounds: list[tuple[int, int]], n: int, on_disk: bool | None
) -> dict[str, RowStore]:
    """Return every rank's rows in item order, exchanged in rounds of at most :data:`GATHER_BYTES` per rank."""
    kinds = {k: v.read(0, 0).device.type for k, v in mine.items()}
    metas = all_gather_objects({k: (v.shape, v.dtype, kinds[k]) for k, v in mine.items()})
    meta = next((m for m in metas if m), None)
    if meta is None:
        return {}
    # A rank with no items learns the outputs' kind from the others: on a GPU, its own current one.
    out = {k: new_rows(n, shape, dtype, _device(kind), on_disk=on_disk) for k, (shape, dtype, kind) in meta.items()}
    rank = get_rank()
    row_bytes = sum(out[k].row_bytes for k in out)
    step = max(1, GATHER_BYTES // max(1, row_bytes))
    longest = max(stop - start for start, stop in bounds)
    for off in range(0, longest, step):
        size = min(step, bounds[rank][1] - bounds[rank][0] - off)
        piece = {k: v.read(off, off + size).cpu() for k, v in mine.items()} if size > 0 else None
        for r, part in enumerate(all_gather_objects(piece)):
            if part:
                for k, v in part.items():
                    out[k].write(bounds[r][0] + off, v)
    for v in mine.values():
        v.close()
    return out


def _device(kind: str) -> torch.device:
    return torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)


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
