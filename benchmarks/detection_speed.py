"""Seconds per image of detection inference, per-image SAAL (the engine and the naive reference) and each
detection baseline, on the default detector (``fcos-lite0``) and one torchvision detector.

    OMP_NUM_THREADS=1 python benchmarks/detection_speed.py --data ../shared/data/BCCD --images 8 --other-images 4 \
        --out benchmarks/results/detection-speed/speed.csv

Each detector is first trained briefly (``--train-on`` images, ``--epochs``) so that it has confident
detections (pseudo boxes) to score. For ``fcos-lite0`` the frozen backbone's feature cache is cleared before
each "cold" measurement (every image's backbone runs, as for images never seen) and kept for the "warm" one
(the features of every image were cached, as for a pool scored again in a later round). One torch thread.
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saal.data import load_dataset
from saal.data.feature_cache import MEMORY_CACHE
from saal.models.detectors import build_detector
from saal.pool import Pool
from saal.settings import TrainConfig
from saal.sharpness.detection import detection_terms, naive_detection_terms
from saal.strategies import build_strategy
from saal.training import fit


def timed(fn: Callable[[], Any], count: int, clear: bool) -> tuple[float, float]:
    """Return ``(CPU seconds, wall seconds)`` per image of ``fn`` over ``count`` images (the feature cache cleared
    first if asked). CPU seconds (``time.process_time``) hardly change with what else runs on a shared machine;
    wall seconds do."""
    if clear:
        MEMORY_CACHE.clear()
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


def measure(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Return the rows of one detector: operation, cache state, seconds per image."""
    bundle = load_dataset(f"voc:{args.data}")
    task = bundle.task
    torch.manual_seed(0)
    model = build_detector(name, len(bundle.classes))
    train = np.arange(args.train_on)
    config = TrainConfig(epochs=args.epochs if name == "fcos-lite0" else args.other_epochs, batch_size=2)
    fit(model, bundle.train, train, bundle.train_targets[train], config, torch.Generator().manual_seed(0), task=task)
    model.eval()
    pool = Pool(bundle.train, task=task)
    pool.label(train, bundle.train_targets[train])
    count = args.images if name == "fcos-lite0" else args.other_images
    images_idx = np.arange(args.train_on, args.train_on + count)
    images = [bundle.train[int(i)][0] for i in images_idx]
    n = len(images)
    cached = name == "fcos-lite0"
    rows: list[dict[str, Any]] = []

    def add(operation: str, fn: Callable[[], Any], clear: bool) -> None:
        cpu, wall = timed(fn, n, clear)
        cache = "cold" if clear else "warm"
        row = {
            "detector": name,
            "operation": operation,
            "cache": cache,
            "cpu_s_per_image": cpu,
            "wall_s_per_image": wall,
        }
        rows.append(row)
        print(f"{name:28s} {operation:30s} {cache:5s} CPU {cpu:.3f} s/image, wall {wall:.3f}", flush=True)

    def inference() -> None:
        with torch.no_grad():
            for x in images:
                model([x])

    boxes = [len(t.pseudo["boxes"]) for t in detection_terms(model, images)]
    print(f"{name}: pseudo boxes per image {boxes}", flush=True)
    states = (True, False) if cached else (True,)
    for clear in states:
        add("inference", inference, clear)
        add("saal (engine)", lambda: detection_terms(model, images), clear)
        if cached:
            add("saal (engine, 3 passes)", lambda: detection_terms(model, images, fused=False), clear)
        add("pseudo-label loss (det-loss)", lambda: detection_terms(model, images, perturb=False), clear)
    add("saal (naive reference)", lambda: naive_detection_terms(model, images), True)
    strategies = ["det-entropy", "det-coreset"] if cached else ["det-coreset"]
    for spec in strategies:
        strategy = build_strategy(spec, batch_size=8)
        for clear in states:
            add(
                spec,
                lambda strategy=strategy: strategy.query(model, pool, images_idx, 1, np.random.default_rng(0)),
                clear,
            )
    return rows


def main() -> None:
    """Measure and write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/BCCD", help="a VOC folder (BCCD)")
    parser.add_argument("--images", type=int, default=8, help="images per measurement (fcos-lite0)")
    parser.add_argument("--other-images", type=int, default=4, help="images per measurement (other detectors)")
    parser.add_argument("--train-on", type=int, default=20, help="images the detector is first trained on")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of that training (fcos-lite0)")
    parser.add_argument("--other-epochs", type=int, default=2, help="epochs of that training (other detectors)")
    parser.add_argument("--detectors", default="fcos-lite0,fasterrcnn-mobilenet-v3-320")
    parser.add_argument("--out", default="benchmarks/results/detection-speed/speed.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    rows = [row for name in args.detectors.split(",") for row in measure(name.strip(), args)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        fields = ["detector", "operation", "cache", "cpu_s_per_image", "wall_s_per_image"]
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{k: f"{row[k]:.4f}" for k in fields[3:]}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
