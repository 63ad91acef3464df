"""Scoring throughput with 1 and 2 processes under ``torchrun`` (gloo, one thread each), and the speed-up.

Each measurement is one ``torchrun --standalone --nproc_per_node=P`` of this file: every rank loads the ``npy:``
pool, builds the same small CNN (width ``--width``, seeded, untrained), labels 20 items, waits for the others
(a barrier), then times ``strategy.select`` inside ``distributed_scoring`` (each rank scores its contiguous
share, rank 0 merges). Rank 0 reports items per second and the CPU seconds each rank spent (how the work was
split, which the load does not change). The machine's 1-minute load average before and after each measurement
is recorded beside it: other work on the CPU distorts the 2-process figure most.

    python benchmarks/scale_pool.py /tmp/saal-scale/pool-200k 200000
    python benchmarks/scale_throughput.py /tmp/saal-scale/pool-200k --out benchmarks/results/scale/throughput.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def worker(pool: str, spec: str, width: int, batch_size: int, k: int) -> None:
    """One rank's part: time the selection; rank 0 prints the JSON line."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    from saal.core.distributed import all_gather_objects, init_from_env, shutdown
    from saal.core.shards import distributed_scoring
    from saal.data import load_dataset
    from saal.models.cnn import SmallCNN
    from saal.pool import Pool
    from saal.strategies import build_strategy

    init_from_env("cpu", 600)
    data = load_dataset(f"npy:{pool}", stats_sample=10_000)
    torch.manual_seed(0)
    model = SmallCNN(1, 10, 28, width=width).eval()
    p = Pool(data.train, 10)
    labelled = np.arange(20, dtype=np.int64)
    p.label(labelled, data.train_targets[labelled])
    strategy = build_strategy(spec, batch_size=batch_size)
    if dist.is_initialized():
        dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    with distributed_scoring():
        sel = strategy.select(model, p, k, 0)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    world = dist.get_world_size() if dist.is_initialized() else 1
    cpu_of_ranks = all_gather_objects(round(cpu, 2))
    if not dist.is_initialized() or dist.get_rank() == 0:
        n = len(sel.scored_indices)
        row = {"strategy": spec, "processes": world, "items": n, "seconds": round(seconds, 2)}
        row |= {"items_per_s": round(n / seconds, 1), "first_chosen": [int(i) for i in sel.indices[:5]]}
        row["cpu_seconds_per_rank"] = cpu_of_ranks  # CPU time each rank spent: the work split, whatever the load
        print(json.dumps(row))
    shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool")
    parser.add_argument("--strategies", default="entropy;saal[scope=last-layer]")
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.pool, args.strategies, args.width, args.batch_size, args.k)
        return
    torchrun = shutil.which("torchrun") or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for spec in args.strategies.split(";"):
        for _ in range(args.repeats):
            for procs in (1, 2):
                before = os.getloadavg()[0]
                done = subprocess.run(
                    [torchrun, "--standalone", f"--nproc_per_node={procs}", __file__, args.pool, "--worker",
                     "--strategies", spec, "--width", str(args.width), "--batch-size", str(args.batch_size),
                     "--k", str(args.k)],
                    env=env, capture_output=True, text=True,
                )  # fmt: skip
                if done.returncode != 0:
                    print(f"{spec} with {procs} failed: {done.stderr[-1500:]}", file=sys.stderr)
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row["load_1min_before"], row["load_1min_after"] = round(before, 2), round(os.getloadavg()[0], 2)
                line = json.dumps(row)
                print(line, flush=True)
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    with open(args.out, "a") as fh:
                        fh.write(line + "\n")


if __name__ == "__main__":
    main()
