"""Write a synthetic pool of 28x28 uint8 images as ``.npy`` files for the scale benchmarks (``npy:FOLDER``).

``FOLDER/x.npy`` and ``y.npy`` hold N items (written in pieces through ``open_memmap``, so N may exceed
memory), ``test_x.npy`` / ``test_y.npy`` 1,000 more. Pixels are seeded noise around ten class templates, so a
model trained on a few labels has real, varied uncertainty. Write these under /tmp, never in the repository:

    python benchmarks/scale_pool.py /tmp/saal-scale/pool-1m 1000000
    python benchmarks/scale_pool.py /tmp/saal-scale/pool-20k 20000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

PIECE = 50_000


def write_pool(folder: Path, n: int, seed: int = 0, side: int = 28) -> None:
    """Write ``n`` train items and 1,000 test items into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, side, side)).astype(np.float32)
    for prefix, count in (("", n), ("test_", 1000)):
        x = np.lib.format.open_memmap(folder / f"{prefix}x.npy", mode="w+", dtype=np.uint8, shape=(count, side, side))
        y = np.empty(count, dtype=np.int64)
        for start in range(0, count, PIECE):
            m = min(PIECE, count - start)
            labels = rng.integers(0, 10, size=m)
            noise = rng.normal(0, 60, size=(m, side, side)).astype(np.float32)
            x[start : start + m] = np.clip(templates[labels] * 0.6 + noise + 50, 0, 255).astype(np.uint8)
            y[start : start + m] = labels
        x.flush()
        del x
        np.save(folder / f"{prefix}y.npy", y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_pool(args.folder, args.n, args.seed)
    print(f"wrote {args.n} items to {args.folder}")


if __name__ == "__main__":
    main()
