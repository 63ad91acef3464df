"""Time and peak memory of loading an image folder eagerly (saal 0.1.0) versus lazily, plus one pass over its items.

For each loader, in a fresh Python subprocess (so that nothing from another measurement is counted):
``load`` (the old eager loader, kept in ``tests/data/old_eager_loaders.py``, or ``load_dataset("folder:PATH")``),
then one pass over every train item in batches of 256 through ``saal.core.scan.batches`` (what every pool scan
and training epoch uses: the eager set is sliced, the lazy one decodes each image). Reported: wall seconds of
the load and of the pass, the process's resident size after the imports (the baseline) and its peak resident
size (``ru_maxrss``); "growth" is peak minus baseline. Both loaders' train items are also checked to be equal
(``torch.equal``) on the first 512 items.

    python benchmarks/lazy_data.py data/cifar5k                  # a folder with train/<class>/* (and test/)
    python benchmarks/lazy_data.py data/cifar5k data/cifar50k --out benchmarks/results/lazy-data.txt

A CIFAR-10 JPEG folder of 5,000 images can be cut from ``cifar10-jpg.zip`` (train/<class>/NNNN.jpg,
test/<class>/NNNN.jpg), e.g. the first 400 train and 100 test files of each class.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

MIB = 1024**2
REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "old_eager_loaders.py"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _old_loaders() -> ModuleType:
    spec = importlib.util.spec_from_file_location("old_eager_loaders", REFERENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child(variant: str, folder: str, batch: int, check: str | None) -> dict[str, object]:
    import numpy as np
    import torch

    from saal.core.scan import batches
    from saal.data import load_dataset
    from saal.data.base import ArrayDataset

    torch.set_num_threads(1)
    old = _old_loaders() if variant == "eager" else None
    baseline = _current_rss()
    t0 = time.perf_counter()
    if old is not None:
        e = old.load_folder(folder)
        train = ArrayDataset(e.x_train, e.y_train)
    else:
        train = load_dataset(f"folder:{folder}").train
    t_load = time.perf_counter() - t0
    after_load = _current_rss()
    t0 = time.perf_counter()
    total = 0.0
    for b in batches(train, np.arange(len(train)), batch):
        total += float(b.inputs.sum())
    t_pass = time.perf_counter() - t0
    if check is not None:  # the first 512 items, for the cross-check in the parent
        torch.save(torch.stack([train[i][0] for i in range(min(512, len(train)))]), check)
    return {
        "variant": variant,
        "items": len(train),
        "load_s": t_load,
        "pass_s": t_pass,
        "baseline_mib": baseline / MIB,
        "after_load_mib": after_load / MIB,
        "peak_mib": _peak_rss() / MIB,
        "checksum": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="image folders (folder:PATH layout), measured one after another")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--variant", choices=["eager", "lazy"], help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--check", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_child(args.variant, args.folders[0], args.batch, args.check)))
        return
    report = "".join(_measure(folder, args.batch) for folder in args.folders)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)


def _measure(folder: str, batch: int) -> str:
    """Measure both loaders on ``folder`` in fresh subprocesses; print and return the report section."""
    import torch

    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for variant in ("eager", "lazy"):
        check = os.path.join(tempfile.gettempdir(), f"lazy_data_check_{os.getpid()}_{variant}.pt")
        cmd = [sys.executable, __file__, folder, "--batch", str(batch), "--variant", variant]
        out = subprocess.run([*cmd, "--check", check], check=True, capture_output=True, text=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    same = torch.equal(
        *(
            torch.load(os.path.join(tempfile.gettempdir(), f"lazy_data_check_{os.getpid()}_{v}.pt"))
            for v in ("eager", "lazy")
        )
    )
    for v in ("eager", "lazy"):
        os.remove(os.path.join(tempfile.gettempdir(), f"lazy_data_check_{os.getpid()}_{v}.pt"))
    lines = [
        f"folder: {Path(folder).resolve()} ({rows[0]['items']} train items)",
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; one torch thread; pass batch {batch}",
        "",
        "| loader | load s | pass s | baseline MiB | after load MiB | peak MiB | growth MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['load_s']:.2f} | {r['pass_s']:.2f} | {r['baseline_mib']:.0f} | "
            f"{r['after_load_mib']:.0f} | {r['peak_mib']:.0f} | {r['peak_mib'] - r['baseline_mib']:.0f} |"
        )
    lines += ["", f"first 512 train items torch.equal between the loaders: {same}"]
    lines += [f"pass checksums: {rows[0]['checksum']:.6f} (eager), {rows[1]['checksum']:.6f} (lazy)"]
    report = "\n".join(lines) + "\n\n"
    print(report, end="", flush=True)
    return report


if __name__ == "__main__":
    main()
