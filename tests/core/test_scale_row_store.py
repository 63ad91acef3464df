"""Per-item outputs on disk: the same numbers, and the same choices, as in memory; core-set and BADGE approximations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from saal.core.row_store import FileRows, MemoryRows, new_rows
from saal.core.scan import Batch, scan, scan_rows
from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.strategies.badge import kmeans_pp_rows, prefiltered_kmeans_pp
from saal.strategies.coreset import k_center_greedy_rows, prefiltered_k_center


def test_file_rows_round_trip_and_refuse_a_short_file(tmp_path: Path) -> None:
    x = torch.randn(50, 3, 2)
    rows = FileRows(tmp_path / "r.bin", 50, (3, 2), torch.float32)
    rows.write(0, x[:20])
    rows.write(20, x[20:])
    assert torch.equal(rows.read(5, 45), x[5:45])
    assert torch.equal(torch.cat([b for _, b in rows.blocks(7)]), x)
    rows.close()
    with open(tmp_path / "r.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(SaalError, match="fewer than 50 rows"):
        FileRows(tmp_path / "r.bin", 50, (3, 2), torch.float32, create=False)


def test_new_rows_go_to_a_temporary_file_above_the_limit_and_vanish_on_close() -> None:
    small = new_rows(10, (4,), torch.float32, torch.device("cpu"))
    big = new_rows(10, (4,), torch.float32, torch.device("cpu"), on_disk=True)
    assert isinstance(small, MemoryRows) and isinstance(big, FileRows)
    path = big.path
    assert path.exists()
    big.close()
    assert not path.exists()


def test_scan_rows_on_disk_equal_the_in_memory_scan() -> None:
    data = ArrayDataset(torch.randn(37, 5), np.zeros(37))

    def fn(b: Batch) -> dict[str, torch.Tensor]:
        return {"twice": 2 * b.inputs, "pos": torch.full((len(b),), b.position)}

    in_memory = scan(data, np.arange(37)[::-1], fn, batch_size=6)
    on_disk = scan_rows(data, np.arange(37)[::-1], fn, batch_size=6, on_disk=True)
    assert isinstance(on_disk["twice"], FileRows)
    assert torch.equal(on_disk["twice"].to_tensor(), in_memory["twice"])
    assert in_memory["pos"].tolist() == [6 * (i // 6) for i in range(37)]  # each batch's place in the scan


def _points(n: int = 400, d: int = 6) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0))


def _file_copy(x: torch.Tensor, tmp_path: Path, name: str) -> FileRows:
    rows = FileRows(tmp_path / name, len(x), tuple(x.shape[1:]), x.dtype)
    rows.write(0, x)
    return rows


def test_core_set_and_badge_choose_the_same_from_a_file_as_from_memory(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    p, c = _points(), _points(30)[:5] * 3
    a = k_center_greedy_rows(MemoryRows(p), MemoryRows(c), 12, np.random.default_rng(0), cpu)
    b = k_center_greedy_rows(
        _file_copy(p, tmp_path, "p"), _file_copy(c, tmp_path, "c"), 12, np.random.default_rng(0), cpu
    )
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    q, h = torch.softmax(_points(400, 4), 1), _points(400, 7)
    a = kmeans_pp_rows(MemoryRows(q), MemoryRows(h), 12, np.random.default_rng(1), cpu)
    b = kmeans_pp_rows(_file_copy(q, tmp_path, "q"), _file_copy(h, tmp_path, "h"), 12, np.random.default_rng(1), cpu)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_prefilters_keeping_everything_are_exact_and_keeping_some_choose_valid_items() -> None:
    cpu = torch.device("cpu")
    p, c = MemoryRows(_points()), MemoryRows(_points(30)[:5])
    exact = k_center_greedy_rows(p, c, 10, np.random.default_rng(0), cpu)
    every = prefiltered_k_center(p, c, 10, 400, np.random.default_rng(0), cpu)
    np.testing.assert_array_equal(exact[0], every[0])
    np.testing.assert_allclose(exact[1], every[1], rtol=1e-6)
    picks, scores = prefiltered_k_center(p, c, 10, 50, np.random.default_rng(0), cpu)
    assert len(set(picks.tolist())) == 10 and len(scores) == 400
    unpicked = np.setdiff1d(np.arange(400), picks)
    # every unpicked score is its distance to the nearest of labelled set + picks
    everything = torch.cat([c.tensor, p.tensor[picks]])
    np.testing.assert_allclose(
        scores[unpicked], torch.cdist(p.tensor[unpicked], everything).min(1).values.double().numpy(), atol=2e-3
    )
    q, h = MemoryRows(torch.softmax(_points(400, 4), 1)), MemoryRows(_points(400, 7))
    exact = kmeans_pp_rows(q, h, 10, np.random.default_rng(2), cpu)
    every = prefiltered_kmeans_pp(q, h, 10, 400, np.random.default_rng(2), cpu)
    np.testing.assert_array_equal(exact[0], every[0])
    some, d2 = prefiltered_kmeans_pp(q, h, 10, 40, np.random.default_rng(2), cpu)
    norms = (q.tensor.double().pow(2).sum(1) * h.tensor.double().pow(2).sum(1)).numpy()
    assert some[0] == np.argmax(norms) == exact[0][0]  # the exact first pick, always in the sample
    assert len(set(some.tolist())) == 10 and len(d2) == 400 and (d2 >= 0).all()


def test_the_prefilter_option_is_checked_and_subset_still_applies() -> None:
    from saal.pool import Pool
    from saal.strategies import build_strategy

    with pytest.raises(SaalError, match="prefilter must be a positive"):
        build_strategy("coreset[prefilter=0]")
    x = torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
    pool = Pool(ArrayDataset(x, np.zeros(60, dtype=np.int64)), 2)
    pool.label([0, 1], [0, 0])
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    for name in ("coreset", "badge"):
        with pytest.raises(SaalError, match="smaller than the query size"):
            build_strategy(f"{name}[prefilter=3]").select(model, pool, 5, 0)
        sel = build_strategy(f"{name}[prefilter=10]", subset=30).select(model, pool, 5, 0)
        assert len(sel.scored_indices) == 30 and len(set(sel.indices.tolist())) == 5
        assert set(sel.indices.tolist()) <= set(sel.scored_indices.tolist())
