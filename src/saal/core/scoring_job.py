"""One scoring (a strategy's selection) as a job over the processes ``torchrun`` started, or over one.

A :class:`ScoringJob` joins the process group (gloo on CPU, NCCL on GPU), checks that every rank
was given the same settings, refuses more ranks than items, runs the selection inside
:func:`saal.core.shards.distributed_scoring` (every pool scan split in contiguous whole-batch
shards, finished pieces saved to a work folder and reused by a rerun) and turns a rank that
stopped mid-way into one clear line. Only rank 0 (:attr:`ScoringJob.is_main`) writes results.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from saal.core.distributed import (
    DEFAULT_TIMEOUT_S,
    all_gather_objects,
    barrier,
    check_same_everywhere,
    get_rank,
    get_world_size,
    init_from_env,
    is_distributed,
    shutdown,
)
from saal.core.shards import distributed_scoring
from saal.errors import SaalError

T = TypeVar("T")


def model_fingerprint(model: nn.Module) -> str:
    """Return a hash of ``model``'s parameters and buffers (names, shapes and values)."""
    digest = hashlib.sha1()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ScoringJob:
    """A selection scored by every rank of the process group, results written by rank 0.

    Args:
        settings: what the job computes (plain JSON-able values); every rank must get the same.
        device: the torch device each rank scores on (picks gloo or NCCL).
        timeout_s: how long to wait for the other ranks to join, and in any collective.

    Raises:
        SaalError: the group cannot be joined in time, or a rank was given other settings.
    """

    def __init__(self, settings: dict[str, Any], *, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.settings = dict(settings)
        self.distributed = init_from_env(device, timeout_s)
        self._rank, self._world = get_rank(), get_world_size()  # kept: still known after close()
        self.pieces_reused = 0  # finished pieces an earlier run left in the work folder, loaded by run()
        self.pieces_computed = 0
        try:
            check_same_everywhere(self.settings, "options")
        except BaseException:
            self.close()
            raise

    @property
    def rank(self) -> int:
        """This process's rank (0 alone)."""
        return self._rank

    @property
    def world_size(self) -> int:
        """How many processes score (1 alone)."""
        return self._world

    @property
    def is_main(self) -> bool:
        """Whether this process writes the results (rank 0)."""
        return self.rank == 0

    def check_items(self, n: int) -> None:
        """Refuse more processes than items to score.

        Raises:
            SaalError: ``world_size > n``.
        """
        if self.world_size > n:
            raise SaalError(
                f"{self.world_size} processes for {n} items to score: some would have nothing to do; "
                f"start at most {n} (torchrun --nproc_per_node)"
            )

    def run(self, select: Callable[[], T], model: nn.Module, work_dir: str | Path | None) -> T:
        """Run ``select`` with every pool scan sharded over the ranks and its finished pieces kept in ``work_dir``.

        Args:
            select: the selection (the same call on every rank).
            model: the scored model (part of the fingerprint that keeps other scorings' pieces out).
            work_dir: where finished pieces are kept for a rerun (None: nowhere).

        Returns:
            What ``select`` returned (the same on every rank).

        Raises:
            SaalError: what ``select`` raises for bad input; a piece file that is corrupt or of another
                scoring; a rank that stopped (the others then stop with one line).
        """
        if work_dir is not None and Path(work_dir).exists() and not Path(work_dir).is_dir():
            raise SaalError(f"work folder {work_dir} is a file; give a folder for the finished pieces")
        if work_dir is not None:
            try:
                Path(work_dir).mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise SaalError(
                    f"cannot create work folder {work_dir} ({error.strerror}); give a folder you can write to"
                ) from None
        fingerprint = hashlib.sha1(
            json.dumps({"settings": self.settings, "model": model_fingerprint(model)}, sort_keys=True).encode()
        ).hexdigest()
        try:
            with distributed_scoring(work_dir, fingerprint) as plan:
                result = select()
            counts = all_gather_objects((plan.loaded, plan.saved))
            self.pieces_reused = sum(c[0] for c in counts)
            self.pieces_computed = sum(c[1] for c in counts)
            return result
        except SaalError:
            raise
        except RuntimeError as exc:  # gloo / NCCL: a peer closed its connection or timed out
            if not is_distributed():
                raise
            kept = f"; pieces already finished are kept in {work_dir}" if work_dir is not None else ""
            raise SaalError(
                f"rank {self.rank}: another rank stopped while scoring ({_first_line(exc)}){kept}; "
                "run the same command again to resume"
            ) from None

    def finish(self, work_dir: str | Path | None) -> None:
        """Wait for every rank, then (rank 0) remove the work folder: the results are written."""
        barrier()
        if self.is_main and work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)

    def close(self) -> None:
        """Leave the process group."""
        shutdown()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
