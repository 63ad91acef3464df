"""Peak memory (and wall time) of one selection by every strategy on pools of 20,000 and 1,000,000 items on disk.

Each (strategy, pool) runs in a fresh Python subprocess: load the ``npy:`` pool (28x28 uint8 images, read a batch
at a time), build the small CNN (``SmallCNN`` of width ``--width``), label 20 items and train on them for 5 epochs
(with LL4AL's hook for ``ll4al``), then time ``strategy.select(model, pool, k)``. Reported: the resident size
before the selection and the process's peak resident size (``ru_maxrss``, file pages of memory maps included),
the selection's wall time, and per strategy the ratio of peak sizes 1M / 20k (target <= 1.2). One thread
(``OMP_NUM_THREADS=1``); large per-item outputs go to ``$SAAL_TMPDIR``. Make the pools with
``benchmarks/scale_pool.py`` first:

    python benchmarks/scale_memory.py /tmp/saal-scale/pool-20k /tmp/saal-scale/pool-1m \
        --out benchmarks/results/scale/memory.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

STRATEGIES = (
    "random",
    "entropy",
    "margin",
    "least-confidence",
    "bald",
    "coreset",
    "badge",
    "ll4al",
    "vaal[steps=50]",
    "saal[scope=last-layer]",
    "saal",
)
MIB = 1024**2


def _rss_now() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(pool: str, spec: str, k: int, width: int, batch_size: int) -> dict[str, object]:
    """Run one selection in this process; return what was measured."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from saal.data import load_dataset
    from saal.models.cnn import SmallCNN
    from saal.pool import Pool
    from saal.settings import TrainConfig
    from saal.strategies import build_strategy
    from saal.training import fit

    t0 = time.perf_counter()
    data = load_dataset(f"npy:{pool}", stats_sample=10_000)
    torch.manual_seed(0)
    model = SmallCNN(1, 10, 28, width=width)
    p = Pool(data.train, 10)
    labelled = np.arange(20, dtype=np.int64)
    p.label(labelled, data.train_targets[labelled])
    strategy = build_strategy(spec, batch_size=batch_size)
    fit(model, data.train, labelled, p.labels_of(labelled), TrainConfig(epochs=5, batch_size=20),
        torch.Generator().manual_seed(0), hook=strategy.training_hook())  # fmt: skip
    load_s = time.perf_counter() - t0
    before = _rss_now()
    t1 = time.perf_counter()
    sel = strategy.select(model, p, k, 0)
    select_s = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "strategy": spec,
        "pool_items": len(data.train),
        "scored": len(sel.scored_indices),
        "k": k,
        "width": width,
        "batch_size": batch_size,
        "setup_s": round(load_s, 2),
        "select_s": round(select_s, 2),
        "rss_before_select_mib": round(before / MIB, 1),
        "peak_rss_mib": round(peak / MIB, 1),
        "first_chosen": [int(i) for i in sel.indices[:5]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pools", nargs="*", help="npy pool folders (small first)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="';'-separated specs")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("POOL", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.k, args.width, args.batch_size)))
        return
    specs = args.strategies.split(";") if ";" in args.strategies else _split(args.strategies)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for spec in specs:
        for pool in args.pools:
            load = os.getloadavg()[0]
            done = subprocess.run(
                [sys.executable, __file__, "--child", pool, spec, "--k", str(args.k), "--width", str(args.width),
                 "--batch-size", str(args.batch_size)],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode != 0:
                print(f"{spec} on {pool} failed: {done.stderr[-1500:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["load_1min_before"] = round(load, 2)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as fh:
                    fh.write(line + "\n")


def _split(text: str) -> list[str]:
    """Split specs at commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur] if cur else out


if __name__ == "__main__":
    main()
