"""Rank helpers that fall back to one process when ``torch.distributed`` is not initialised.

Also: joining the group ``torchrun`` describes (:func:`init_from_env`, with a timeout and a one-line
error), batch-aligned contiguous shards (:func:`batch_shard_bounds`) and a check that every rank got
the same settings (:func:`check_same_everywhere`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from saal.errors import SaalError


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


DEFAULT_TIMEOUT_S = 120.0


def launched_distributed() -> bool:
    """Return whether this process was started as one of several (``WORLD_SIZE > 1``, as ``torchrun`` sets)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group that ``torchrun`` (or ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``)
    describes: gloo for a CPU ``device``, NCCL for a CUDA one (each rank on GPU ``LOCAL_RANK``).

    Does nothing when a group is already initialised or ``WORLD_SIZE`` is 1 or unset.

    Args:
        device: the torch device the ranks score on.
        timeout_s: how long to wait for the other ranks (rendezvous and every collective).

    Returns:
        Whether this process is now one rank of several.

    Raises:
        SaalError: the variables are malformed, or the group cannot be joined within ``timeout_s``
            (an unreachable rendezvous address, a rank that never started).
    """
    if is_distributed():
        return get_world_size() > 1
    if not launched_distributed():
        return False
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        address = f"{os.environ['MASTER_ADDR']}:{int(os.environ['MASTER_PORT'])}"
    except (KeyError, ValueError) as exc:
        raise SaalError(
            f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but {exc} is missing or malformed; start the ranks with "
            "torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
        ) from None
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    try:
        with _native_stderr_held() as held:
            dist.init_process_group(
                "nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
            )
        held.replay()  # joined: what the native code said (if anything) is shown after all
    except Exception as exc:  # DistStoreError, RuntimeError, TimeoutError: all mean "could not join"
        raise SaalError(
            f"rank {rank} of {world} could not join the process group at {address} within {timeout_s:g} s "
            f"({_first_line(exc)}); check the rendezvous address and port and that every node was started"
        ) from None
    return True


def shutdown() -> None:
    """Leave the process group, if one is initialised."""
    if is_distributed():
        dist.destroy_process_group()


def batch_shard_bounds(n: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return ``(start, stop)`` of rank ``rank``'s contiguous share of ``n`` items, in whole batches.

    The ``ceil(n / batch_size)`` batches of one process are shared out by :func:`shard_bounds`, so
    every rank's batches are exactly batches of a one-process scan (same items together: the same
    numbers, and per-batch quantities such as a per-batch perturbation stay the same). No padding,
    no duplicates; a rank may get nothing.

    Raises:
        ValueError: ``batch_size < 1`` or a bad rank.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    first, last = shard_bounds(-(-n // batch_size), rank, world_size)
    return min(first * batch_size, n), min(last * batch_size, n)


def check_same_everywhere(settings: dict[str, Any], what: str = "settings") -> None:
    """Check that every rank was given the same ``settings`` (plain JSON-able values).

    Raises:
        SaalError: on every rank, naming the first rank and key that differ from rank 0's.
    """
    if not is_distributed():
        return
    everyone = all_gather_objects(json.loads(json.dumps(settings, sort_keys=True, default=str)))
    ours = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        if theirs != ours:
            keys = sorted(set(ours) | set(theirs))
            key = next(k for k in keys if ours.get(k) != theirs.get(k))
            raise SaalError(
                f"rank {rank} was given other {what} than rank 0 ({key}: {theirs.get(key)!r} vs {ours.get(key)!r}); "
                "give every rank the same command"
            )


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (``obj`` itself without a process group).

    ``group``: a process group of :func:`patient_group` (or None: the default group).
    """
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def patient_group(hours: float = 24.0) -> Any:
    """Return a gloo group of every rank whose exchanges wait up to ``hours`` (the default group's timeout is
    short, to report an unreachable rank quickly; ranks that wait while rank 0 trains need longer).

    Returns:
        The group, or None without a process group.
    """
    if not is_distributed():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(hours=hours))


def barrier() -> None:
    """Wait until every rank gets here (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


class _Held:
    """What the native code wrote to stderr while it was held (see :func:`_native_stderr_held`)."""

    def __init__(self) -> None:
        self.text = b""

    def replay(self) -> None:
        """Write the held text to stderr."""
        if self.text:
            os.write(2, self.text)


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[_Held]:
    """Hold what is written to file descriptor 2 in the block (c10d's C++ retry logs and stack frames).

    A failed join is then reported in one line instead of pages of native frames; a successful one
    can replay what was held.
    """
    held = _Held()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            held.text = sink.read()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
