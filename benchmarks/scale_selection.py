"""Selection time of core-set and BADGE at 20k / 200k / 1M candidates: exact, and with the candidate pre-filter.

The embeddings are synthetic and seeded (what the forward pass would give is not what is timed here): core-set
gets ``N x 128`` float32 points from a mixture of 50 Gaussians and 20 labelled centres; BADGE gets the factors
of ``N`` gradient embeddings, ``q = softmax(z) - onehot(argmax z)`` for 10 classes and ``h`` of 128 features
plus the bias 1. They are stored as the strategies store them (in memory up to 64 MiB, else a temporary file in
``$SAAL_TMPDIR`` read block by block). Timed: the exact greedy k-center / k-means++ seeding of ``k`` picks, and
the pre-filtered versions keeping ``--keep`` candidates; "agreement" is the share of the exact picks that the
approximate choice also picks (same seed), and "objective" what each method greedily improves: core-set's
covering radius (the largest distance of an unpicked candidate to its nearest centre) and BADGE's k-means++
potential (the sum of squared distances to the nearest pick), lower is better. BADGE is random, so its exact
seeding with another seed is run too, as the yardstick of its agreement. One thread, one run after another.

    python benchmarks/scale_selection.py --sizes 20000,200000,1000000 --out benchmarks/results/scale/selection.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from saal.core.row_store import RowStore, new_rows
from saal.strategies.badge import kmeans_pp_rows, prefiltered_kmeans_pp
from saal.strategies.coreset import k_center_greedy_rows, prefiltered_k_center

BLOCK = 65536


def _fill(store: RowStore, make: object) -> RowStore:
    for start in range(0, len(store), BLOCK):
        store.write(start, make(start, min(len(store), start + BLOCK)))  # type: ignore[operator]
    return store


def embeddings(n: int, d: int = 128, seed: int = 0) -> RowStore:
    """Return ``n`` seeded mixture-of-Gaussians points (``n x d`` float32) in a store."""
    means = torch.randn(50, d, generator=torch.Generator().manual_seed(seed)) * 3

    def make(a: int, b: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + a)
        which = torch.randint(0, 50, (b - a,), generator=g)
        return means[which] + torch.randn(b - a, d, generator=g)

    return _fill(new_rows(n, (d,), torch.float32, torch.device("cpu")), make)


def factors(n: int, classes: int = 10, d: int = 128, seed: int = 1) -> tuple[RowStore, RowStore]:
    """Return seeded BADGE factors ``(q, h)`` of ``n`` items in stores."""

    def make_q(a: int, b: int) -> torch.Tensor:
        z = torch.randn(b - a, classes, generator=torch.Generator().manual_seed(seed * 1_000_003 + a)) * 2
        p = torch.softmax(z, 1)
        return p - torch.nn.functional.one_hot(p.argmax(1), classes).float()

    def make_h(a: int, b: int) -> torch.Tensor:
        h = torch.relu(torch.randn(b - a, d + 1, generator=torch.Generator().manual_seed(seed * 7_000_003 + a)))
        h[:, -1] = 1.0
        return h

    cpu = torch.device("cpu")
    return _fill(new_rows(n, (classes,), torch.float32, cpu), make_q), _fill(
        new_rows(n, (d + 1,), torch.float32, cpu), make_h
    )


Picks = tuple[np.ndarray, np.ndarray]


def _runs(
    points: RowStore, centres: RowStore, q: RowStore, h: RowStore, k: int, keep: int
) -> dict[str, Callable[[np.random.Generator], Picks]]:
    cpu = torch.device("cpu")
    return {
        "coreset": lambda rng: k_center_greedy_rows(points, centres, k, rng, cpu),
        "coreset-prefilter": lambda rng: prefiltered_k_center(points, centres, k, keep, rng, cpu),
        "badge": lambda rng: kmeans_pp_rows(q, h, k, rng, cpu),
        "badge-prefilter": lambda rng: prefiltered_kmeans_pp(q, h, k, keep, rng, cpu),
        # a random method's own spread: the exact seeding with another seed
        "badge-exact-other-seed": lambda rng: kmeans_pp_rows(q, h, k, np.random.default_rng(1), cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20000,200000,1000000")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--keep", type=int, default=10_000, help="candidates kept by the pre-filter")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for n in (int(s) for s in args.sizes.split(",")):
        points = embeddings(n)
        centres = embeddings(20, seed=5)
        q, h = factors(n)
        runs = _runs(points, centres, q, h, args.k, args.keep)
        exact: dict[str, set[int]] = {}
        for name, run in runs.items():
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            picks, scores = run(np.random.default_rng(0))
            seconds = time.perf_counter() - t0
            base = name.split("-")[0]
            if name == base:
                exact[base] = set(picks.tolist())
            unpicked = np.ones(n, dtype=bool)
            unpicked[picks] = False
            # the objective each method greedily improves: the covering radius (core-set, lower is better) and
            # the k-means++ potential, the sum of squared distances to the nearest pick (BADGE, lower is better)
            objective = float(scores[unpicked].max() if base == "coreset" else scores[unpicked].sum())
            row = {
                "method": name,
                "candidates": n,
                "k": args.k,
                "keep": args.keep if name.endswith("prefilter") else None,
                "store": type(points).__name__,
                "seconds": round(seconds, 2),
                "agreement_with_exact": round(len(exact[base] & set(picks.tolist())) / args.k, 3),
                "objective": round(objective, 4),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "load_1min_before": round(load, 2),
            }
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as fh:
                    fh.write(line + "\n")
        for store in (points, centres, q, h):
            store.close()


if __name__ == "__main__":
    main()
