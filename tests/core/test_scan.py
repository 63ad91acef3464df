import itertools
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from saal.core.distributed import shard_bounds
from saal.core.scan import Batch, batches, scan, training_batches
from saal.data.base import ArrayDataset


class _ItemByItem(torch.utils.data.Dataset):
    """A dataset that is not an ArrayDataset: read one item at a time."""

    def __init__(self, n: int) -> None:
        self.x = torch.arange(n * 2, dtype=torch.float32).view(n, 2)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i % 3


@pytest.mark.parametrize("dataset", [ArrayDataset(torch.arange(20.0).view(10, 2), np.zeros(10)), _ItemByItem(10)])
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_in_order_whatever_the_source(dataset, workers: int) -> None:
    idx = np.array([7, 1, 4, 9, 0])
    got = list(batches(dataset, idx, 2, num_workers=workers))
    assert [b.indices.tolist() for b in got] == [[7, 1], [4, 9], [0]]
    assert torch.equal(
        torch.cat([b.inputs for b in got]), dataset.x[idx] if hasattr(dataset, "x") else dataset.inputs[idx]
    )


def test_scan_gathers_per_item_outputs_in_order_for_any_batch_size() -> None:
    data = _ItemByItem(11)
    idx = np.arange(11)[::-1]  # a reversed view: negative strides

    def fn(b: Batch) -> dict[str, torch.Tensor]:
        return {"sum": b.inputs.sum(1), "twice": 2 * b.inputs}

    full = scan(data, idx, fn, batch_size=11)
    for bs in (1, 3, 4):  # exact across batch sizes: small integers, summed without rounding in any order
        part = scan(data, idx, fn, batch_size=bs)
        assert torch.equal(part["sum"], full["sum"]) and torch.equal(part["twice"], full["twice"])
    assert full["sum"].tolist() == [float(4 * i + 1) for i in idx]
    assert scan(data, [], fn, batch_size=4) == {}


def test_training_batches_shuffle_with_the_generator_and_keep_targets_aligned() -> None:
    data = ArrayDataset(torch.arange(8.0).view(8, 1), np.zeros(8))
    idx = np.array([1, 3, 5, 6])
    targets = np.array([10, 30, 50, 60])
    a = list(training_batches(data, idx, targets, 3, torch.Generator().manual_seed(0)))
    b = list(training_batches(data, idx, targets, 3, torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in a] == [3, 1]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert (ya == 10 * xa[:, 0].long()).all()
    boxes = [[1], [3, 3], [5], [6]]
    got = list(training_batches(data, idx, boxes, 4, None, collate_targets=list))
    assert got[0][1] == boxes


@pytest.mark.parametrize(("n", "world"), [(101, 2), (10, 3), (2, 4), (0, 2), (7, 1)])
def test_shards_cover_every_item_once_contiguously(n: int, world: int) -> None:
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="not in"):
        shard_bounds(n, world, world)


_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np, torch, torch.distributed as dist
    from saal.core.scan import scan
    from saal.data.base import ArrayDataset
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    data = ArrayDataset(torch.randn(101, 3), np.zeros(101))
    net = torch.nn.Linear(3, 2)
    calls = []
    def fn(b):
        calls.extend(b.indices.tolist())
        with torch.no_grad():
            return {"out": net(b.inputs)}
    idx = np.arange(101)[::-1].copy()
    out = scan(data, idx, fn, batch_size=8, shard=True)
    torch.save({"out": out["out"], "calls": calls}, sys.argv[1] + f"/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_scan_their_shards_and_gather_the_same_result(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)], env={**env, "RANK": str(r)}, stderr=subprocess.PIPE
        )
        for r in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:] if p.stderr else ""
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    x = torch.randn(101, 3)
    net = torch.nn.Linear(3, 2)
    items = x[np.arange(101)[::-1].copy()]
    # The same batches as the workers (rank 0: positions 0..55, rank 1: 56..100, 8 at a time); a
    # different batching (one call of 101 rows) may round differently (~1e-7), so: a tight tolerance.
    starts = [*range(0, 56, 8), *range(56, 101, 8)]
    with torch.no_grad():
        expected = torch.cat([net(items[s : min(s + 8, 56 if s < 56 else 101)]) for s in starts])
    for r in ranks:
        assert r["out"].shape == (101, 2)
        torch.testing.assert_close(r["out"], expected, atol=1e-6, rtol=0)  # every rank holds everything, in order
    # each rank scored only its own contiguous share in whole batches of 8 (13 batches: 7 + 6, so 56 + 45
    # items), no padding, no duplicates
    assert sorted(ranks[0]["calls"] + ranks[1]["calls"]) == list(range(101))
    assert ranks[0]["calls"] == list(range(100, 44, -1)) and ranks[1]["calls"] == list(range(44, -1, -1))
