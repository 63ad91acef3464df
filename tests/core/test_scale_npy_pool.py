"""Pools in .npy files: the same items as eager arrays, and reading every item does not grow the process's memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from saal.core.scan import batches
from saal.data import load_dataset
from saal.errors import SaalError


def _write(folder: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=n)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    return x, y


def test_npy_items_equal_the_eager_npz_items(tmp_path: Path) -> None:
    x, y = _write(tmp_path / "pool", 300)
    np.savez(tmp_path / "same.npz", x=x, y=y)
    lazy, eager = load_dataset(f"npy:{tmp_path / 'pool'}"), load_dataset(f"npz:{tmp_path / 'same.npz'}")
    assert lazy.mean == eager.mean and lazy.std == eager.std
    np.testing.assert_array_equal(lazy.train_targets, eager.train_targets)
    idx = np.array([5, 0, 7, 8, 9, 100, 3])  # unsorted, with a contiguous run
    a = torch.cat([b.inputs for b in batches(lazy.train, idx, 4)])
    b = torch.stack([eager.train[int(i)][0] for i in idx])
    assert torch.equal(a, b)
    assert lazy.input_shape == (1, 28, 28) and len(lazy.test) == len(eager.test)


def test_a_truncated_or_missing_npy_file_is_one_clear_error(tmp_path: Path) -> None:
    _write(tmp_path / "pool", 50)
    with open(tmp_path / "pool" / "x.npy", "r+b") as fh:
        fh.truncate(5000)
    with pytest.raises(SaalError, match="truncated"):
        load_dataset(f"npy:{tmp_path / 'pool'}")
    (tmp_path / "pool" / "y.npy").unlink()
    with pytest.raises(SaalError, match=r"lacks y\.npy"):
        load_dataset(f"npy:{tmp_path / 'pool'}")


_READ_ALL = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from saal.core.scan import batches
    from saal.data import load_dataset

    def resident_kib():  # now, file pages of memory maps included (they count: the kernel keeps them mapped)
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    data = load_dataset(sys.argv[1], stats_sample=1000)
    idx = np.arange(len(data.train))
    next(iter(batches(data.train, idx, 512)))  # the first batch allocates what every batch reuses
    before = resident_kib()
    total = 0.0
    for b in batches(data.train, idx, 512):
        total += float(b.inputs[:, 0, 0, 0].sum())
    print(json.dumps({"grew_kib": resident_kib() - before, "items": len(idx)}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident size from /proc")
def test_reading_every_item_of_a_pool_does_not_grow_memory(tmp_path: Path) -> None:
    """60,000 items (47 MB of pixels) read batch by batch: resident memory grows by far less than the file."""
    _write(tmp_path / "pool", 60_000)
    script = tmp_path / "read_all.py"
    script.write_text(_READ_ALL)
    done = subprocess.run(
        [sys.executable, str(script), f"npy:{tmp_path / 'pool'}"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["items"] == 48_000  # the train split
    # through a memory map (npz:) the same loop grew by 48 MB here: every touched page of the file stays mapped
    assert report["grew_kib"] < 8 * 1024, report
