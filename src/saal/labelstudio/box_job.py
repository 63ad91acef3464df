"""The box job: the app's model job (:mod:`saal.app.model_job`) with a detection trainer, for ``<RectangleLabels>``.

``python -m saal.labelstudio.box_job --state-dir FOLDER/.saal-label --parent PID`` (started by the mirror through
:class:`saal.app.supervisor.JobSupervisor`): it registers :func:`train_boxes` as the trainer of ``detection``
projects and runs :func:`saal.app.model_job.main`. Everything else is the app's job: the cold start on the cached
embeddings, when to retrain (every ``retrain_every`` labels, or on request), the heartbeat, the lock, the restarts.

One version (:func:`train_boxes`): the default detector (``fcos-lite0``: FCOS on the frozen ImageNet-pretrained
EfficientNet-Lite0, :mod:`saal.models.detectors`), warm-started from the previous version, is trained on the
labelled images' boxes (Adam, lr 1e-3, batch 2, about 100 steps, at least 4 epochs); the project's strategy
(``det-saal`` by default) scores every unlabelled image and orders them; each one's pseudo boxes (the detections at
least the strategy's ``score_threshold`` confident, else the task's 0.5) are kept as its prediction (JSON in the
app's ``predicted`` column: boxes in pixels, class names, scores, the image size). The version is committed by the
app's ranking code (:func:`saal.app.ranking._commit`): weights, order and version row, as for classes.

A label is the JSON the mirror records: ``{"boxes": [[x1, y1, x2, y2], ...], "labels": [class, ...]}`` in pixels.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import select

from saal.app import db, model_job, ranking
from saal.app.project import Settings
from saal.errors import SaalError

DETECTOR = "fcos-lite0"
STEPS = 100


def read_labels(engine: db.Engine, classes: list[str]) -> tuple[list[str], dict[int, dict[str, np.ndarray]]]:
    """Return every item's path (by id) and ``{id: target}`` of the labelled ones (boxes in pixels, labels 1..C)."""
    index = {c: i + 1 for i, c in enumerate(classes)}
    it = db.items
    with db.read(engine) as conn:
        rows = conn.execute(select(it.c.id, it.c.path, it.c.state, it.c.label, it.c.readable).order_by(it.c.id)).all()
    paths = [""] * (max((int(r.id) for r in rows), default=-1) + 1)
    targets: dict[int, dict[str, np.ndarray]] = {}
    for row in rows:
        paths[int(row.id)] = str(row.path)
        if row.state != db.LABELLED or not row.readable or not row.label:
            continue
        try:
            value = json.loads(row.label)
            boxes = np.asarray(value["boxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray([index[str(c)] for c in value["labels"]], dtype=np.int64)
        except (ValueError, KeyError, TypeError):
            continue  # not a box label (never written by the mirror): left out of training
        target: dict[str, np.ndarray] = {"boxes": boxes, "labels": labels}
        targets[int(row.id)] = target
    return paths, targets


def epochs_for(n: int, batch: int = 2) -> int:
    """Return the epochs of about :data:`STEPS` steps on ``n`` labelled images (4 to 30)."""
    return max(4, min(30, math.ceil(STEPS / max(1, math.ceil(n / batch)))))


def train_boxes(
    engine: db.Engine, settings: Settings, rows: np.ndarray, state_dir: Path, snap: ranking.Snapshot
) -> str:
    """Train, score and commit one detection model version (see the module docstring); return what was done."""
    from saal.data.detection import DetectionDataset
    from saal.models.detectors import build_detector
    from saal.pool import Pool
    from saal.settings import TrainConfig
    from saal.strategies import build_strategy
    from saal.tasks.detection import Detection
    from saal.training import fit

    classes = list(settings.classes)
    paths, targets = read_labels(engine, classes)
    root = state_dir.parent
    dataset = DetectionDataset([root / p for p in paths], [{} for _ in paths])
    task = Detection(classes)
    labelled = np.asarray(sorted(targets), dtype=np.int64)
    start = time.perf_counter()
    model = build_detector(DETECTOR, len(classes))
    previous = state_dir / "models" / f"v{snap.version}.pt"
    if snap.version and previous.exists():  # warm start: the previous version's weights
        model.load_state_dict(torch.load(previous, map_location="cpu", weights_only=True))
    config = TrainConfig(epochs=epochs_for(len(labelled)), batch_size=2, lr=1e-3, optimizer="adam", augment=False)
    generator = torch.Generator().manual_seed(settings.seed)
    pool = Pool(dataset, task=task)
    pool.label(labelled, [targets[int(i)] for i in labelled])
    fit(model, dataset, labelled, pool.labels_of(labelled), config, generator, task=task)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    strategy = build_strategy(settings.strategy)
    order = _order(strategy, model, pool, labelled, snap, settings.seed)
    threshold = getattr(strategy, "score_threshold", None) or task.score_threshold
    guess = {int(i): _pseudo(model, dataset, int(i), threshold, classes) for i in order}
    score_seconds = time.perf_counter() - start
    row = {
        "created_at": time.time(),
        "kind": settings.strategy,
        "model": DETECTOR,
        "labels": len(labelled),
        "last_event": snap.last_event,
        "train_seconds": train_seconds,
        "score_seconds": score_seconds,
        "note": None,
    }
    ordered = ranking.Ordered(order)
    no_checks = np.zeros(0, dtype=np.int64)
    models_dir = state_dir / "models"
    version = ranking._commit(engine, model, models_dir, row, snap, ordered, no_checks, guess, 0.0, None, 0)
    ranking._prune(models_dir, version, snap.version)
    return (
        f"version {version}: {DETECTOR} trained on {len(labelled)} labelled images in {train_seconds:.1f} s, "
        f"ranked {len(order)} images with {settings.strategy} in {score_seconds:.1f} s"
    )


def _order(
    strategy: Any, model: torch.nn.Module, pool: Any, labelled: np.ndarray, snap: ranking.Snapshot, seed: int
) -> np.ndarray:
    """Return the unlabelled images in the strategy's order (those it did not choose follow, in id order)."""
    main = snap.main
    if not len(main):
        return main
    aside = np.setdiff1d(np.arange(len(pool), dtype=np.int64), np.union1d(main, labelled))
    if aside.size:
        pool.skip(aside)
    selection = strategy.select(model, pool, len(main), np.random.default_rng([seed, snap.last_event]))
    chosen = np.asarray(selection.indices, dtype=np.int64)
    rest = np.setdiff1d(main, chosen)
    return np.concatenate([chosen, rest])


def _pseudo(
    model: torch.nn.Module, dataset: Any, index: int, threshold: float, classes: list[str]
) -> tuple[str, float]:
    """Return an image's pseudo boxes as the JSON the mirror reads, and their best score."""
    from PIL import Image

    from saal.cli.detection_outputs import pseudo_boxes

    try:
        boxes, labels, scores = pseudo_boxes(model, dataset, index, threshold)
        with Image.open(dataset.paths[index]) as image:
            size = list(image.size)
    except (SaalError, OSError):
        return json.dumps({"boxes": [], "labels": [], "scores": [], "size": None}), 0.0
    value = {
        "boxes": [[round(float(v), 2) for v in box] for box in boxes.tolist()],
        "labels": [classes[int(c) - 1] for c in labels.tolist()],
        "scores": [round(float(s), 4) for s in scores.tolist()],
        "size": size,
    }
    return json.dumps(value), float(scores.max()) if len(scores) else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app's model job with the detection trainer registered.

    Returns:
        The model job's exit code.
    """
    model_job.TRAINERS["detection"] = train_boxes
    return model_job.main(argv)


if __name__ == "__main__":
    sys.exit(main())
