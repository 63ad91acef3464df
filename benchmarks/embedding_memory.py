"""Peak memory and time of core-set and BADGE selection on a 50,000-item pool with 512-d embeddings.

Each measurement runs in a fresh Python subprocess and reports its peak resident set size
(``ru_maxrss``), so nothing from another measurement is counted, next to its resident size just
before selection started (inputs and embeddings already in memory); "growth" is the difference,
an upper bound on what selection itself added. Two modes:

- ``synthetic``: the selection algorithms alone (``k_center_greedy`` / ``kmeans_pp``) on random
  ``N x 512`` embeddings (core-set, with a labelled set of ``--labelled`` centres) or random
  ``N x 10`` / ``N x 513`` gradient factors (BADGE);
- ``model``: the whole strategy (``select``) on a pool of ``N`` random 8x8 inputs and an MLP whose
  penultimate layer is 512-d, so the streamed embedding pass is included.

For scale: an ``N x N`` float32 distance matrix would take N^2 * 4 bytes (9.3 GiB at N = 50,000)
and BADGE's explicit ``N x (C * (d + 1))`` embedding matrix N * 10 * 513 * 4 bytes (0.96 GiB).

    python benchmarks/embedding_memory.py                    # both methods, both modes
    python benchmarks/embedding_memory.py --n 50000 --k 100 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GIB = 1024**3


def _peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _child(method: str, mode: str, n: int, dim: int, classes: int, labelled: int, k: int, threads: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    if mode == "synthetic":
        from saal.strategies.badge import kmeans_pp
        from saal.strategies.coreset import k_center_greedy

        if method == "coreset":
            points = torch.randn(n, dim, generator=g)
            centres = torch.randn(labelled, dim, generator=g)
            baseline = _current_rss_bytes()
            t0 = time.perf_counter()
            picks, _ = k_center_greedy(points, centres, k, rng)
        else:
            p = torch.softmax(torch.randn(n, classes, generator=g) * 2, dim=1)
            q = p - torch.nn.functional.one_hot(p.argmax(1), classes).float()
            h = torch.ones(n, dim + 1)  # filled in place: no temporary copies inflate the peak
            h[:, :dim].normal_(generator=g).relu_()
            baseline = _current_rss_bytes()
            t0 = time.perf_counter()
            picks, _ = kmeans_pp(q, h, k, rng)
    else:
        from saal.data import ArrayDataset
        from saal.models import MLP
        from saal.pool import Pool
        from saal.strategies import build_strategy

        torch.manual_seed(0)
        model = MLP((1, 8, 8), classes, hidden=(256, dim))
        inputs = torch.randn(n + labelled, 1, 8, 8, generator=g)
        pool = Pool(ArrayDataset(inputs, np.zeros(n + labelled, dtype=np.int64)), classes)
        pool.label(np.arange(labelled), rng.integers(0, classes, labelled))
        strategy = build_strategy(method, batch_size=512)
        baseline = _current_rss_bytes()
        t0 = time.perf_counter()
        picks = strategy.select(model, pool, k, rng).indices
    seconds = time.perf_counter() - t0
    assert len(set(np.asarray(picks).tolist())) == k
    return {
        "method": method,
        "mode": mode,
        "n": n,
        "dim": dim,
        "k": k,
        "threads": threads,
        "seconds": round(seconds, 2),
        "rss_before_gib": round(baseline / GIB, 3),
        "peak_rss_gib": round(_peak_rss_bytes() / GIB, 3),
        "growth_gib": round((_peak_rss_bytes() - baseline) / GIB, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="pool size [50000]")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension [512]")
    parser.add_argument("--classes", type=int, default=10, help="classes [10]")
    parser.add_argument("--labelled", type=int, default=1000, help="labelled items (core-set's initial centres) [1000]")
    parser.add_argument("--k", type=int, default=100, help="items to select [100]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    parser.add_argument("--methods", default="coreset,badge")
    parser.add_argument("--modes", default="synthetic,model")
    parser.add_argument("--limit-gib", type=float, default=4.0, help="fail if a peak exceeds this [4]")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = (args.n, args.dim, args.classes, args.labelled, args.k, args.threads)
    if args.child:
        print(json.dumps(_child(*args.child, *sizes)))
        return 0
    print(f"N={args.n} d={args.dim} C={args.classes} labelled={args.labelled} k={args.k} threads={args.threads}")
    print(f"(an N x N float32 matrix: {args.n**2 * 4 / GIB:.2f} GiB; "
          f"N x C(d+1) float32: {args.n * args.classes * (args.dim + 1) * 4 / GIB:.2f} GiB)")  # fmt: skip
    print(f"{'method':8} {'mode':10} {'seconds':>8} {'rss before':>11} {'peak rss':>9} {'growth':>8}")
    worst = 0.0
    for method in args.methods.split(","):
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--child", method, mode, "--n", str(args.n), "--dim", str(args.dim),
                   "--classes", str(args.classes), "--labelled", str(args.labelled), "--k", str(args.k),
                   "--threads", str(args.threads)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            worst = max(worst, r["peak_rss_gib"])
            print(
                f"{method:8} {mode:10} {r['seconds']:8.2f} {r['rss_before_gib']:9.3f} G "
                f"{r['peak_rss_gib']:7.3f} G {r['growth_gib']:6.3f} G"
            )
    ok = worst < args.limit_gib
    print(f"largest peak RSS {worst:.3f} GiB: {'under' if ok else 'OVER'} the {args.limit_gib} GiB target")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
