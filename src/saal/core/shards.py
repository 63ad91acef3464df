"""A scoring plan: whether pool scans split over the process group, and where finished pieces are kept.

Inside :func:`distributed_scoring`, every :func:`saal.core.scan.scan` of a strategy (which knows
nothing of ranks) scans only this rank's contiguous share of the pool and gathers the others'.
With a ``checkpoint_dir``, each finished piece of a rank's share (``piece_batches`` batches) is
saved there as a file named by the scan's number and the piece's item range; a rerun of the same
scoring loads those pieces instead of computing them again. Every piece file carries the plan's
``fingerprint`` (what was scored, by which model and settings) and a hash of its items, so a
piece of another scoring is refused, never mixed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saal.errors import SaalError

PIECE_BATCHES = 64


@dataclass
class ScoringPlan:
    """How the scans of one scoring run (see the module docstring).

    Attributes:
        shard: split scans over the initialised process group.
        checkpoint_dir: where finished pieces are kept (None: nowhere).
        fingerprint: identifies the scoring; pieces with another are refused.
        piece_batches: batches per checkpointed piece.
        scans: how many scans were started under this plan (numbers the piece files).
        saved: how many pieces this rank saved under this plan.
        loaded: how many pieces this rank found finished (by an earlier run) and loaded.
    """

    shard: bool = True
    checkpoint_dir: Path | None = None
    fingerprint: str = ""
    piece_batches: int = PIECE_BATCHES
    scans: int = 0
    saved: int = 0
    loaded: int = 0

    def next_scan(self) -> int:
        """Return the number of the scan starting now."""
        self.scans += 1
        return self.scans - 1

    def piece_path(self, scan: int, start: int, stop: int) -> Path | None:
        """Return the file of items ``start .. stop - 1`` of scan ``scan`` (None without a checkpoint dir)."""
        if self.checkpoint_dir is None:
            return None
        return self.checkpoint_dir / f"scan{scan:03d}-{start:010d}-{stop:010d}.pt"

    def load_piece(self, path: Path, indices: np.ndarray) -> dict[str, torch.Tensor] | None:
        """Return the outputs saved in ``path`` for ``indices``, or None when there is no such file.

        Raises:
            SaalError: the file is truncated or corrupt, or holds a piece of another scoring.
        """
        if not path.is_file():
            return None
        self.loaded += 1
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            fingerprint, items, outputs = saved["fingerprint"], saved["items"], saved["outputs"]
        except Exception as exc:  # truncated zip, not a torch file, missing keys
            raise SaalError(
                f"shard file {path} is truncated or corrupt ({type(exc).__name__}); delete it and run the same "
                "command again"
            ) from None
        if fingerprint != self.fingerprint or items != items_hash(indices):
            raise SaalError(
                f"shard file {path} belongs to another scoring (other data, model or settings); give an empty "
                f"work folder, or delete {path.parent}"
            )
        if not isinstance(outputs, dict) or any(len(v) != len(indices) for v in outputs.values()):
            raise SaalError(f"shard file {path} is truncated or corrupt (wrong row count); delete it and run again")
        return dict(outputs)

    def save_piece(self, path: Path, indices: np.ndarray, outputs: dict[str, torch.Tensor]) -> None:
        """Save a finished piece atomically (a partial file is never left under the final name)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"fingerprint": self.fingerprint, "items": items_hash(indices), "outputs": outputs}, tmp)
        os.replace(tmp, path)
        self.saved += 1
        _die_if_asked(self.saved)


# Failure drill: ``SAAL_KILL_RANK_AFTER_PIECES=RANK:N`` makes rank RANK kill itself (SIGKILL, as the
# kernel's OOM killer or a lost node would) right after saving its N-th piece. The tests use it to
# stop a real rank at a known point; it does nothing unless set.
KILL_ENV = "SAAL_KILL_RANK_AFTER_PIECES"


def _die_if_asked(saved: int) -> None:
    order = os.environ.get(KILL_ENV)
    if not order:
        return
    rank, _, count = order.partition(":")
    if rank == os.environ.get("RANK", "0") and count.isdigit() and saved >= int(count):
        os.kill(os.getpid(), signal.SIGKILL)


def items_hash(indices: np.ndarray) -> str:
    """Return a short hash of an index array (which items a piece holds)."""
    return hashlib.sha1(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


_PLAN: ContextVar[ScoringPlan | None] = ContextVar("saal_scoring_plan", default=None)


def current_plan() -> ScoringPlan | None:
    """Return the scoring plan in force, or None."""
    return _PLAN.get()


@contextlib.contextmanager
def distributed_scoring(
    checkpoint_dir: str | os.PathLike[str] | None = None,
    fingerprint: str = "",
    *,
    shard: bool = True,
    piece_batches: int = PIECE_BATCHES,
) -> Iterator[ScoringPlan]:
    """Within the block, pool scans follow a :class:`ScoringPlan` (sharded, checkpointed pieces).

    Yields:
        The plan (its ``scans`` counts the scans made).

    Raises:
        ValueError: ``piece_batches < 1``.
    """
    if piece_batches < 1:
        raise ValueError(f"piece_batches must be >= 1, got {piece_batches}")
    plan = ScoringPlan(shard, Path(checkpoint_dir) if checkpoint_dir is not None else None, fingerprint, piece_batches)
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)
