"""Acquisition speed and memory: any strategy against a plain forward pass, on one model and pool.

    python benchmarks/acquisition.py                          # small CNN + ResNet-18, SAAL variants
    python benchmarks/acquisition.py --models cnn --strategies entropy,badge,coreset --no-naive
    python benchmarks/acquisition.py --memory                  # + peak RSS of SAAL, 2,000 vs 20,000 pool

Times are the best of ``--repeats`` runs of ``strategy.select(model, pool, k)`` over a pool of
``--pool`` items (every item a candidate), next to a plain batched forward pass over the same
items. The small CNN scores 28x28x1 images (real MNIST from the shared data folder when present,
else random tensors); ResNet-18 scores random 32x32x3 tensors. Where fewer items are timed
(``--resnet-items``, ``--naive-items``), the time is extrapolated linearly to the pool size and
marked with ``*``. Memory: each pool size runs in its own subprocess over the same 20,000-item
dataset and reports peak RSS (``resource.getrusage``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saal.core.scan import batches
from saal.data.base import ArrayDataset
from saal.models import ResNet18, SmallCNN
from saal.pool import Pool
from saal.sharpness import naive_perturbed_losses
from saal.strategies import build_strategy, split_specs

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_STRATEGIES = "entropy,saal,saal[perturbation=sam],saal[scope=last-layer],saal[granularity=per-batch]"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def make_data(model_name: str, n: int, seed: int = 0) -> tuple[ArrayDataset, str]:
    """Return ``n`` inputs for the model (real MNIST for the CNN when available) and their source."""
    g = torch.Generator().manual_seed(seed)
    if model_name == "cnn":
        mnist = SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte"
        if mnist.is_file() and n <= 60000:
            # Raw IDX: a 16-byte header, then 28x28 uint8 images. Read only the n needed (light on memory).
            raw = np.fromfile(mnist, dtype=np.uint8, count=n * 784, offset=16).reshape(n, 1, 28, 28)
            images = torch.from_numpy(raw).float().div_(255)
            return ArrayDataset((images - MNIST_MEAN) / MNIST_STD, np.zeros(n)), "MNIST train images"
        return ArrayDataset(torch.randn(n, 1, 28, 28, generator=g), np.zeros(n)), "random 1x28x28 tensors"
    return ArrayDataset(torch.randn(n, 3, 32, 32, generator=g), np.zeros(n)), "random 3x32x32 tensors"


def make_model(model_name: str, seed: int = 0) -> nn.Module:
    """Return a seeded fresh model (eval mode): the small CNN for 28x28x1, or ResNet-18 for 32x32x3."""
    torch.manual_seed(seed)
    model = SmallCNN(1, 10, 28) if model_name == "cnn" else ResNet18(3, 10)
    return model.eval()


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Return ``(wall, cpu)`` seconds of the fastest of ``repeats`` calls (the least disturbed by other
    processes); ``cpu`` is this process's CPU time, which time spent descheduled does not inflate."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def forward_pass(model: nn.Module, dataset: ArrayDataset, batch_size: int) -> None:
    """A plain batched eval-mode forward pass over the whole dataset, gradients off."""
    with torch.no_grad():
        for batch in batches(dataset, np.arange(len(dataset)), batch_size):
            model(batch.inputs)


def time_model(args: argparse.Namespace, model_name: str) -> list[dict]:
    """Time the forward pass, every strategy and the naive loop on one model; return table rows.

    The methods are timed round-robin (each repeat runs every method once), so that a burst of load
    from other processes does not fall on one method only; each method's best repeat is kept.
    """
    pool_size = args.pool
    timed = min(pool_size, args.resnet_items) if model_name == "resnet18" else pool_size
    dataset, source = make_data(model_name, timed)
    model = make_model(model_name)
    print(f"\n## {model_name}: {timed} items timed of {source}, batch size {args.batch_size}", flush=True)
    warm_data = make_data(model_name, 32)[0]
    warm = Pool(warm_data, 10)
    pool = Pool(dataset, 10)
    # (name, call, items, note, repeats)
    methods: list[tuple[str, Callable[[], object], int, str, int]] = [
        ("forward pass", lambda: forward_pass(model, dataset, args.batch_size), timed, "", args.repeats)
    ]
    forward_pass(model, warm_data, args.batch_size)  # warm-up: first-call allocations
    failed: list[str] = []
    for spec in split_specs(args.strategies):
        try:
            strategy = build_strategy(spec, batch_size=args.batch_size)
            strategy.select(model, warm, 4, 0)
        except Exception as exc:  # a strategy that needs more (e.g. a trained side model) is reported, not fatal
            print(f"  {spec:<38} failed: {type(exc).__name__}: {exc}", flush=True)
            failed.append(spec)
            continue
        methods.append((spec, functools.partial(strategy.select, model, pool, args.k, 0), timed, "", args.repeats))
    if args.naive:
        n = min(timed, args.naive_items if model_name == "cnn" else max(1, args.naive_items // 10))
        x = dataset.inputs[:n]
        naive_perturbed_losses(model, x[:1])
        methods.append(
            ("naive reference (copy per instance)", lambda: naive_perturbed_losses(model, x), n, "(asam)", 1)
        )
    best = {name: (float("inf"), float("inf")) for name, *_ in methods}
    for r in range(args.repeats):
        for name, call, _, _, reps in methods:
            if r < reps:
                best[name] = min(best[name], best_time(call, 1))
    rows = []
    for name, _, items, note, _ in methods:
        total, cpu = (t * pool_size / items for t in best[name])
        rows.append({"model": model_name, "method": name, "items": items, "seconds": total, "cpu": cpu, "note": note})
        star = " *" if items < pool_size else "  "
        print(f"  {name:<38} {total:9.2f} s wall{star} {cpu:9.2f} s CPU {note}", flush=True)
    nan = float("nan")
    rows += [
        {"model": model_name, "method": spec, "items": 0, "seconds": nan, "cpu": nan, "note": "failed"}
        for spec in failed
    ]
    forward, forward_cpu = rows[0]["seconds"], rows[0]["cpu"]
    for row in rows:
        row["ratio"], row["cpu_ratio"] = row["seconds"] / forward, row["cpu"] / forward_cpu
    return rows


def _proc_status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: score ``--memory-pool`` candidates of a 20,000-item dataset; print RSS in MiB.

    The peak is the kernel's high-water mark of this process (VmHWM), reset just before scoring
    (``/proc/self/clear_refs``) so that it measures the scoring alone; ``ru_maxrss`` would not do,
    as it is carried over from the parent across fork and exec.
    """
    dataset, _ = make_data(args.models, args.memory_dataset)
    model = make_model(args.models)
    strategy = build_strategy(args.strategies, batch_size=args.batch_size, subset=args.memory_pool)
    pool = Pool(dataset, 10)
    strategy.select(model, Pool(make_data(args.models, 32)[0], 10), 4, 0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _proc_status_mib("VmRSS")
    sel = strategy.select(model, pool, args.k, 0)
    peak = _proc_status_mib("VmHWM")
    if before is None or peak is None:  # not Linux: the lifetime peak is the best available
        before = peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"pool": len(sel.scored_indices), "before_mib": before, "peak_mib": peak, "reset": reset}))


def measure_memory(args: argparse.Namespace, model_name: str, spec: str) -> dict:
    """Run one subprocess per pool size; return peak RSS per size and the ratios."""
    out = {}
    for size in args.memory_sizes:
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            "--models",
            model_name,
            "--strategies",
            spec,
            "--memory-pool",
            str(size),
            "--memory-dataset",
            str(max(args.memory_sizes)),
            "--batch-size",
            str(args.batch_size),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[size] = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = out[min(out)], out[max(out)]
    ratio = large["peak_mib"] / small["peak_mib"]
    growth = (large["peak_mib"] - large["before_mib"]) / max(small["peak_mib"] - small["before_mib"], 1.0)
    print(f"\n## peak memory, {spec} on {model_name} (same {max(out):,}-item dataset in memory in both runs)")
    for size, r in sorted(out.items()):
        print(
            f"  pool {size:>6,}: RSS before scoring {r['before_mib']:7.1f} MiB, peak {r['peak_mib']:7.1f} MiB "
            f"(+{r['peak_mib'] - r['before_mib']:.1f} MiB while scoring)"
        )
    print(
        f"  peak ratio {max(out):,} / {min(out):,}: {ratio:.3f} (target <= 1.2); scoring increments ratio {growth:.2f}"
    )
    return {"sizes": out, "peak_ratio": ratio, "increment_ratio": growth}


def print_table(rows: list[dict], pool_size: int) -> None:
    print(f"\n| model | method | wall s for {pool_size:,} items | x forward | CPU s | x forward (CPU) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        star = " *" if 0 < r["items"] < pool_size else ""
        if r["note"] == "failed":
            print(f"| {r['model']} | {r['method']} | failed | | | |")
            continue
        print(
            f"| {r['model']} | {r['method']} | {r['seconds']:.2f}{star} | {r['ratio']:.2f} | "
            f"{r['cpu']:.2f}{star} | {r['cpu_ratio']:.2f} |"
        )
    print("\n`*`: timed on fewer items and extrapolated linearly to the pool size.")


def check_targets(rows: list[dict]) -> None:
    cnn = {r["method"]: r for r in rows if r["model"] == "cnn"}
    checks = []
    if "saal" in cnn:
        checks.append(("per-instance SAAL <= 6x forward", cnn["saal"]["ratio"], cnn["saal"]["ratio"] <= 6))
        naive = cnn.get("naive reference (copy per instance)")
        if naive:
            speedup = naive["seconds"] / cnn["saal"]["seconds"]
            checks.append(("per-instance SAAL >= 5x faster than naive", speedup, speedup >= 5))
    if "saal[scope=last-layer]" in cnn:
        r = cnn["saal[scope=last-layer]"]["ratio"]
        checks.append(("last-layer SAAL <= 1.5x forward", r, r <= 1.5))
    for name, value, ok in checks:
        print(f"  target {name:<44} {value:6.2f}  {'met' if ok else 'MISSED'} (wall)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn,resnet18", help="cnn, resnet18 or both (comma-separated)")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="any registered strategy specs, comma-separated")
    p.add_argument("--pool", type=int, default=2000, help="pool size the times refer to")
    p.add_argument("--resnet-items", type=int, default=200, help="items actually timed on ResNet-18")
    p.add_argument("--naive-items", type=int, default=100, help="items the naive loop runs on (a tenth on ResNet)")
    p.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive reference loop")
    p.add_argument("--k", type=int, default=10, help="query size")
    p.add_argument("--batch-size", type=int, default=256, help="pool items scored at once")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (the best is reported)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's machine default)")
    p.add_argument("--memory", action="store_true", help="also measure peak RSS for each --memory-sizes pool")
    p.add_argument("--memory-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[2000, 20000])
    p.add_argument("--memory-strategy", default="saal", help="strategy whose memory is measured")
    p.add_argument("--memory-model", default="cnn", help="model whose memory is measured")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-pool", type=int, help=argparse.SUPPRESS)
    p.add_argument("--memory-dataset", type=int, default=20000, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return 0
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} at start"
    )
    rows: list[dict] = []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in models:
        rows += time_model(args, name)
    print_table(rows, args.pool)
    check_targets(rows)
    memory: dict = {}
    if args.memory:
        memory = measure_memory(args, args.memory_model, args.memory_strategy)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "memory": memory}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
