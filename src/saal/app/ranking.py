"""One model update: train on the current labels, measure the previous model, score the unlabelled images with
the project's strategy, and commit the new ranking under a new model version in one transaction.

The model is a small head (one hidden layer) on the cached pretrained embeddings, or the small CNN on the cached
pixels (:mod:`saal.app.features`); both are plain :mod:`saal.models` classifiers trained by :func:`saal.training.fit`
and scored by any registered strategy through a :class:`saal.Pool`, so SAAL perturbs the head's (or the CNN's)
parameters exactly as in ``saal run``.

Quality: the version before the new one is measured on the labels that arrived after it was trained, which it
never saw (a prospective accuracy). These are the images the strategy chose to show, usually harder than a
random image, so the figure is a conservative estimate of accuracy on the whole folder.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import Engine, bindparam, func, select
from torch import nn
from torch.utils.data import TensorDataset

from saal.app import db
from saal.models import MLP, build_model
from saal.pool import Pool
from saal.settings import TrainConfig
from saal.strategies import ScoreStrategy, build_strategy
from saal.training import fit

MAX_NON_TOPK = 1000  # strategies whose cost grows with k (core-set, BADGE, ...) choose this many; the rest follow


@dataclass
class Snapshot:
    """The labels a model update trains on, read in one transaction.

    Attributes:
        size: item ids are ``0 .. size - 1``.
        labelled: ids of labelled items; ``targets`` their class indices.
        candidates: readable ids not labelled (unlabelled or skipped).
        unreadable: ids that cannot be read.
        last_event: the newest history row included.
        version: the model version in use.
        labelled_after: ``{id: class}`` of labels newer than the model in use (what it never saw).
        taken_at: when the snapshot was read (epoch seconds).
    """

    size: int
    labelled: np.ndarray
    targets: np.ndarray
    candidates: np.ndarray
    unreadable: np.ndarray
    last_event: int
    version: int
    labelled_after: dict[int, int]
    taken_at: float


def take_snapshot(engine: Engine, classes: list[str]) -> Snapshot:
    """Return the current labels and candidates as one consistent :class:`Snapshot`."""
    it = db.items
    index = {c: i for i, c in enumerate(classes)}
    taken_at = time.time()
    with db.read(engine) as conn:
        rows = conn.execute(select(it.c.id, it.c.readable, it.c.state, it.c.label, it.c.last_event)).all()
        last_event = int(conn.execute(select(func.coalesce(func.max(db.events.c.id), 0))).scalar_one())
        version = int(db.get_meta(conn, "current_version", "0") or 0)
        used = conn.execute(select(db.models.c.last_event).where(db.models.c.version == version)).scalar()
    used_event = int(used) if used is not None else 0
    size = max((int(r.id) for r in rows), default=-1) + 1
    labelled = [(int(r.id), index[r.label]) for r in rows if r.state == db.LABELLED and r.label in index]
    after = {
        int(r.id): index[r.label]
        for r in rows
        if r.state == db.LABELLED and r.label in index and (r.last_event or 0) > used_event
    }
    return Snapshot(
        size=size,
        labelled=np.asarray([i for i, _ in labelled], dtype=np.int64),
        targets=np.asarray([c for _, c in labelled], dtype=np.int64),
        candidates=np.asarray(sorted(int(r.id) for r in rows if r.readable and r.state != db.LABELLED), dtype=np.int64),
        unreadable=np.asarray(sorted(int(r.id) for r in rows if not r.readable), dtype=np.int64),
        last_event=last_event,
        version=version,
        labelled_after=after,
        taken_at=taken_at,
    )


def make_model(kind: str, row_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Return a freshly initialised (seeded) model for rows of ``row_shape``: a one-hidden-layer head on
    embeddings, or the small CNN on ``side x side x 3`` pixels."""
    torch.manual_seed(seed)
    if kind == "pretrained":
        return MLP(row_shape, num_classes, hidden=(256,), dropout=0.1)
    side = row_shape[0]
    return build_model("cnn", (3, side, side), num_classes)


def as_inputs(kind: str, rows: np.ndarray) -> torch.Tensor:
    """Return the model inputs of cached ``rows`` (embeddings as they are; pixels scaled to [-1, 1], CHW)."""
    if kind == "pretrained":
        return torch.from_numpy(np.array(rows, dtype=np.float32))  # a copy: the cache is a read-only memory map
    x = torch.from_numpy(np.array(rows)).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0)


def train_config(kind: str, n: int) -> TrainConfig:
    """Return the training settings for ``n`` labels: about 300 Adam steps for a head, 400 for the CNN."""
    batch = 32
    steps = 300 if kind == "pretrained" else 400
    epochs = max(5, min(200, math.ceil(steps / max(1, math.ceil(n / batch)))))
    return TrainConfig(epochs=epochs, batch_size=batch, lr=1e-3, weight_decay=1e-4)


def predict(model: nn.Module, x: torch.Tensor, ids: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Return the predicted class and its softmax probability for ``x[ids]``."""
    model.eval()
    preds, confs = [], []
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            probs = model(x[torch.from_numpy(ids[start : start + batch])]).softmax(1)
            conf, pred = probs.max(1)
            preds.append(pred.numpy())
            confs.append(conf.numpy())
    if not preds:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(preds), np.concatenate(confs)


def order_candidates(
    strategy_spec: str, model: nn.Module, x: torch.Tensor, snap: Snapshot, num_classes: int, seed: int
) -> np.ndarray:
    """Return the candidate ids in the order the strategy would label them, best first.

    Strategies that score every candidate and take the top (``saal``, entropy, ...) order all of them;
    the others choose their first :data:`MAX_NON_TOPK` and the rest follow by score (or at random).
    """
    strategy = build_strategy(strategy_spec)
    pool = Pool(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), num_classes)
    pool.label(snap.labelled, snap.targets)
    if snap.unreadable.size:
        pool.skip(snap.unreadable)
    n = len(snap.candidates)
    top_everything = isinstance(strategy, ScoreStrategy) or getattr(strategy, "selection", None) == "top-k"
    k = n if top_everything else min(n, MAX_NON_TOPK)
    rng = np.random.default_rng([seed, snap.last_event])
    selection = strategy.select(model, pool, k, rng)
    chosen = np.asarray(selection.indices, dtype=np.int64)
    rest = np.setdiff1d(snap.candidates, chosen)
    if rest.size:
        scores = dict(zip(selection.scored_indices.tolist(), selection.scores.tolist(), strict=True))
        if all(i in scores for i in rest.tolist()):
            rest = rest[np.argsort([-scores[i] for i in rest.tolist()], kind="stable")]
        else:
            rest = rng.permutation(rest)
    return np.concatenate([chosen, rest])


@dataclass
class Update:
    """What :func:`update` committed."""

    version: int
    labels: int
    train_seconds: float
    score_seconds: float
    quality: float | None
    quality_n: int


def update(
    engine: Engine,
    *,
    kind: str,
    rows: np.ndarray,
    classes: list[str],
    strategy: str,
    seed: int,
    models_dir: Path,
    snap: Snapshot,
) -> Update:
    """Train, measure, score and commit one new model version (see the module docstring).

    Args:
        rows: the cached feature rows of every item id.
        models_dir: where each version's weights are kept (the previous one is measured from its file).
        snap: the labels to train on (:func:`take_snapshot`).

    Returns:
        The :class:`Update` committed.
    """
    x = as_inputs(kind, np.asarray(rows))
    row_shape = tuple(rows.shape[1:])
    quality, quality_n = None, 0
    previous = models_dir / f"v{snap.version}.pt"
    if snap.version > 0 and snap.labelled_after and previous.exists():
        old = make_model(kind, row_shape, len(classes), seed)
        old.load_state_dict(torch.load(previous, map_location="cpu", weights_only=True))
        ids = np.asarray(sorted(snap.labelled_after), dtype=np.int64)
        pred, _ = predict(old, x, ids)
        truth = np.asarray([snap.labelled_after[int(i)] for i in ids])
        quality, quality_n = float((pred == truth).mean()), len(ids)

    start = time.perf_counter()
    model = make_model(kind, row_shape, len(classes), seed)
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    fit(model, dataset, snap.labelled, snap.targets, train_config(kind, len(snap.labelled)), generator)
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    order = order_candidates(strategy, model, x, snap, len(classes), seed) if len(snap.candidates) else snap.candidates
    pred, conf = predict(model, x, order)
    score_seconds = time.perf_counter() - start

    models_dir.mkdir(exist_ok=True)
    n = len(order)
    params = [
        {
            "item": int(i),
            "p": float((n - pos) / n),
            "guess": classes[int(pred[pos])],
            "conf": float(conf[pos]),
        }
        for pos, i in enumerate(order.tolist())
    ]
    with db.write(engine) as conn:
        version = int(conn.execute(select(func.coalesce(func.max(db.models.c.version), 0))).scalar_one()) + 1
        tmp = models_dir / f"v{version}.pt.tmp"
        torch.save(model.state_dict(), tmp)
        tmp.replace(models_dir / f"v{version}.pt")
        now = time.time()
        conn.execute(
            db.models.insert().values(
                version=version,
                created_at=now,
                kind=strategy,
                model=kind,
                labels=len(snap.labelled),
                last_event=snap.last_event,
                train_seconds=train_seconds,
                score_seconds=score_seconds,
            )
        )
        if quality is not None:
            conn.execute(
                db.models.update()
                .where(db.models.c.version == snap.version)
                .values(quality=quality, quality_n=quality_n, quality_at=now)
            )
        if params:
            conn.execute(
                db.items.update()
                .where(db.items.c.id == bindparam("item"))
                .values(priority=bindparam("p"), predicted=bindparam("guess"), confidence=bindparam("conf")),
                params,
            )
        db.set_meta(conn, "current_version", version)
        db.set_meta(conn, "ranked_at", now)
        requested = db.get_meta(conn, "retrain_requested")
        if requested is not None and float(requested) <= snap.taken_at:
            db.set_meta(conn, "retrain_requested", None)
    for old_file in models_dir.glob("v*.pt"):
        if old_file.stem not in (f"v{version}", f"v{snap.version}"):
            old_file.unlink(missing_ok=True)
    return Update(version, len(snap.labelled), train_seconds, score_seconds, quality, quality_n)
