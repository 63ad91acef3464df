"""Rank helpers that fall back to one process when ``torch.distributed`` is not initialised."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def is_distributed() -> bool:
    """Return whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Return this process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Return the number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Return whether this process is rank 0 (the one that writes results)."""
    return get_rank() == 0


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return ``(start, stop)`` of rank ``rank``'s contiguous share of ``n`` items.

    The shares cover ``0 .. n`` exactly once, in rank order, with no padding: the first
    ``n % world_size`` ranks get one item more. A rank may get nothing when ``n < world_size``.

    Raises:
        ValueError: ``world_size < 1`` or ``rank`` outside ``0 .. world_size - 1``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def all_gather_objects(obj: Any) -> list[Any]:
    """Return every rank's ``obj`` in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
