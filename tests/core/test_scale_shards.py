"""Batch-aligned shards, and checkpointed pieces of a scan: saved, reused on a rerun, refused when foreign."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from saal.core.distributed import batch_shard_bounds
from saal.core.scan import Batch, scan
from saal.core.shards import distributed_scoring
from saal.data.base import ArrayDataset
from saal.errors import SaalError


@pytest.mark.parametrize(("n", "batch", "world"), [(101, 8, 2), (101, 1, 2), (10, 4, 3), (3, 2, 4), (0, 5, 2)])
def test_batch_shards_are_contiguous_whole_batches_covering_every_item_once(n: int, batch: int, world: int) -> None:
    bounds = [batch_shard_bounds(n, batch, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert all(start % batch == 0 for start, stop in bounds if stop > start)  # one process's batches
    batches_per_rank = [-(-(stop - start) // batch) for start, stop in bounds]
    assert max(batches_per_rank) - min(batches_per_rank) <= 1
    assert batch_shard_bounds(101, 8, 0, 2) == (0, 56) and batch_shard_bounds(101, 8, 1, 2) == (56, 101)


def _fn(calls: list[int]):
    def fn(b: Batch) -> dict[str, torch.Tensor]:
        calls.extend(b.indices.tolist())
        return {"x2": 2 * b.inputs}

    return fn


def test_a_rerun_loads_finished_pieces_instead_of_computing_them(tmp_path: Path) -> None:
    data = ArrayDataset(torch.randn(50, 3), np.zeros(50))
    idx = np.arange(50)[::-1].copy()
    plain = scan(data, idx, _fn([]), batch_size=4)
    calls: list[int] = []
    with distributed_scoring(tmp_path, "fp", piece_batches=3) as plan:  # pieces of 12 items
        first = scan(data, idx, _fn(calls), batch_size=4)
    assert plan.saved == 5 and plan.loaded == 0 and len(calls) == 50
    assert torch.equal(first["x2"], plain["x2"])
    (tmp_path / "scan000-0000000012-0000000024.pt").unlink()  # as if the run had stopped before this piece
    calls.clear()
    with distributed_scoring(tmp_path, "fp", piece_batches=3) as plan:
        again = scan(data, idx, _fn(calls), batch_size=4)
    assert plan.loaded == 4 and plan.saved == 1 and sorted(calls) == sorted(idx[12:24].tolist())
    assert torch.equal(again["x2"], plain["x2"])
    with (
        pytest.raises(SaalError, match="belongs to another scoring"),
        distributed_scoring(tmp_path, "other", piece_batches=3),
    ):
        scan(data, idx, _fn([]), batch_size=4)
