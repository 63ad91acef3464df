"""Ranking the queue: before any model, a cold-start selector on the cached embeddings; after, one model update
(train on the current labels, score the unlabelled images with the project's strategy, write the new ranking in short
write transactions, then commit the new model version in one). Training, scoring, saving the weights and writing the
ranking's rows never hold the database's write lock for long: labels and claims go on meanwhile.

The model is a small head (one hidden layer) on the cached pretrained embeddings, or the small CNN on the cached
pixels (:mod:`saal.app.features`); both are plain :mod:`saal.models` classifiers trained by :func:`saal.training.fit`
and scored by any registered strategy through a :class:`saal.Pool`, so SAAL perturbs the head's (or the CNN's)
parameters exactly as in ``saal run``.

Cold start (:func:`cold_start`): until a model exists, the project's ``cold_start`` strategy (one that needs no
trained model: ``typiclust`` and the other ``cold_start = True`` strategies, ``coreset`` or ``random``) chooses the
next :data:`COLD_START_CHUNK` images on the cached feature rows; the rest follow in a seeded random order. It runs
once the features are cached and again after every ``retrain_every`` labels while no model can be trained.

Random check images (:mod:`saal.app.order`) are set aside from every strategy's pool and interleaved into its order.
Each new version's predictions for the next :data:`MAX_AUDIT_TRACK` check images are kept (``audit_predictions``):
its accuracy on those labelled after it was trained, which it never saw, is the page's quality figure
(:func:`saal.app.status.audit_figures`). The previous version is also measured on the other labels that arrived
after it (the strategy's picks, harder than a random image: not an estimate for the folder).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import Connection, Engine, func, select
from torch import nn
from torch.utils.data import TensorDataset

from saal.app import db
from saal.app.order import AUDIT, RANDOM, audit_sequence, place, write_order_chunked
from saal.errors import SaalError
from saal.models import MLP, build_model
from saal.pool import Pool
from saal.settings import TrainConfig
from saal.strategies import (
    ScoreStrategy,
    Strategy,
    build_strategy,
    parse_spec,
    strategy_class,
    strategy_names,
    strategy_options,
)
from saal.training import fit

MAX_NON_TOPK = 1000  # strategies whose cost grows with k (core-set, BADGE, ...) choose this many; the rest follow
COLD_START_CHUNK = 300  # a cold-start selector chooses this many; the rest follow in a seeded random order
MAX_AUDIT_TRACK = 500  # each version's predictions are kept for this many of the next check images
MODEL_FREE = ("random", "coreset")  # work on the feature rows alone (coreset: greedy k-center on them)


@dataclass
class Snapshot:
    """The labels a ranking works from, read in one transaction.

    Attributes:
        size: item ids are ``0 .. size - 1``.
        labelled: ids of labelled items; ``targets`` their class indices.
        candidates: readable ids not labelled (unlabelled or skipped).
        audit: the candidates that are random check images (never given to a strategy).
        unreadable: ids that cannot be read.
        last_event: the newest history row included.
        version: the model version in use.
        labelled_after: ``{id: class}`` of labels newer than the model in use (what it never saw), check labels
            left out (they are measured on their own).
        taken_at: when the snapshot was read (epoch seconds).
    """

    size: int
    labelled: np.ndarray
    targets: np.ndarray
    candidates: np.ndarray
    audit: np.ndarray
    unreadable: np.ndarray
    last_event: int
    version: int
    labelled_after: dict[int, int]
    taken_at: float

    @property
    def main(self) -> np.ndarray:
        """Return the candidates a strategy ranks (those that are not check images), ascending."""
        return np.setdiff1d(self.candidates, self.audit, assume_unique=True)


def take_snapshot(engine: Engine, classes: list[str]) -> Snapshot:
    """Return the current labels and candidates as one consistent :class:`Snapshot`."""
    it, ev = db.items, db.events
    index = {c: i for i, c in enumerate(classes)}
    taken_at = time.time()
    with db.read(engine) as conn:
        rows = conn.execute(
            select(
                it.c.id, it.c.readable, it.c.state, it.c.label, it.c.last_event, it.c.audit, ev.c.audit.label("checked")
            ).select_from(it.outerjoin(ev, ev.c.id == it.c.last_event))
        ).all()
        last_event = int(conn.execute(select(func.coalesce(func.max(ev.c.id), 0))).scalar_one())
        version = int(db.get_meta(conn, "current_version", "0") or 0)
        used = conn.execute(select(db.models.c.last_event).where(db.models.c.version == version)).scalar()
    used_event = int(used) if used is not None else 0
    size = max((int(r.id) for r in rows), default=-1) + 1
    labelled = [(int(r.id), index[r.label]) for r in rows if r.state == db.LABELLED and r.label in index]
    after = {
        int(r.id): index[r.label]
        for r in rows
        if r.state == db.LABELLED and r.label in index and (r.last_event or 0) > used_event and not r.checked
    }
    open_ = [r for r in rows if r.readable and r.state != db.LABELLED]
    return Snapshot(
        size=size,
        labelled=np.asarray([i for i, _ in labelled], dtype=np.int64),
        targets=np.asarray([c for _, c in labelled], dtype=np.int64),
        candidates=np.asarray(sorted(int(r.id) for r in open_), dtype=np.int64),
        audit=np.asarray(sorted(int(r.id) for r in open_ if r.audit), dtype=np.int64),
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


def feature_model(x: torch.Tensor, num_classes: int, seed: int) -> nn.Module:
    """Return the stand-in model a cold-start selector gets: its embedding (the input of its last ``nn.Linear``) is
    the cached row itself, flattened; its seeded outputs mean nothing."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(tuple(x.shape[1:]))), num_classes))


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


def strategy_pool(x: torch.Tensor, snap: Snapshot, num_classes: int) -> Pool:
    """Return a :class:`Pool` over the rows ``x`` in which the labelled items are labelled and only the
    candidates that are not check images are unlabelled (everything else is set aside)."""
    pool = Pool(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), num_classes)
    pool.label(snap.labelled, snap.targets)
    aside = np.setdiff1d(np.arange(len(x), dtype=np.int64), np.union1d(snap.main, snap.labelled))
    if aside.size:
        pool.skip(aside)
    return pool


@dataclass
class Ordered:
    """A strategy's order of the candidates that are not check images.

    Attributes:
        order: the ids, best first.
        reason: what the strategy said about its choice (``auto``: which strategy chose and why), or "".
        state: what the strategy learned (its ``state_dict``), for the next ranking.
    """

    order: np.ndarray
    reason: str = ""
    state: dict[str, Any] | None = None


def build_for(spec: str, kind: str) -> Strategy:
    """Return the strategy ``spec`` for rows of the model ``kind``: on pixels (``cnn``) a cold-start part works on
    the pixels themselves (``embedding=input``), as no pretrained backbone is there to embed them.

    Raises:
        SaalError: an unknown strategy or option.
    """
    if kind != "pretrained":
        name, options = parse_spec(spec)
        known = strategy_options(name)
        if "embedding" in known and "embedding" not in options:
            return build_strategy(spec, embedding="input")
        if "cold" in known and "cold" not in options:
            cold = str(known["cold"])
            if "embedding" in strategy_options(parse_spec(cold)[0]) and "[" not in cold:
                return build_strategy(spec, cold=f"{cold}[embedding=input]")
    return build_strategy(spec)


def order_candidates(
    strategy_spec: str,
    model: nn.Module,
    x: torch.Tensor,
    snap: Snapshot,
    num_classes: int,
    seed: int,
    *,
    kind: str = "pretrained",
    state: dict[str, Any] | None = None,
) -> Ordered:
    """Return the candidates that are not check images (``snap.main``) in the order the strategy would label them,
    best first.

    Strategies that score every candidate and take the top (``saal``, entropy, ...) order all of them;
    the others choose their first :data:`MAX_NON_TOPK` and the rest follow by score (or at random). The strategy
    gets the app's training settings (``use_training``) and, when given, the ``state`` it had after the last
    ranking (``auto`` keeps its switch).
    """
    strategy = build_for(strategy_spec, kind)
    use_training = getattr(strategy, "use_training", None)  # strategies that train models of their own (auto)
    if use_training is not None:
        use_training(train_config(kind, len(snap.labelled)))
    if state:
        strategy.load_state_dict(state)
    pool = strategy_pool(x, snap, num_classes)
    main = snap.main
    n = len(main)
    top_everything = isinstance(strategy, ScoreStrategy) or getattr(strategy, "selection", None) == "top-k"
    k = n if top_everything else min(n, MAX_NON_TOPK)
    rng = np.random.default_rng([seed, snap.last_event])
    selection = strategy.select(model, pool, k, rng)
    chosen = np.asarray(selection.indices, dtype=np.int64)
    rest = np.setdiff1d(main, chosen)
    if rest.size:
        scores = dict(zip(selection.scored_indices.tolist(), selection.scores.tolist(), strict=True))
        if all(i in scores for i in rest.tolist()):
            rest = rest[np.argsort([-scores[i] for i in rest.tolist()], kind="stable")]
        else:
            rest = rng.permutation(rest)
    return Ordered(np.concatenate([chosen, rest]), str(getattr(selection, "reason", "")), strategy.state_dict())


def cold_start_names() -> list[str]:
    """Return the registered strategies a cold start can use: those marked ``cold_start = True``, and
    :data:`MODEL_FREE`."""
    return [n for n in strategy_names() if n in MODEL_FREE or getattr(strategy_class(n), "cold_start", False)]


def check_cold_start(spec: str) -> None:
    """Check that ``spec`` names a strategy that ranks images without a trained model.

    Raises:
        SaalError: an unknown strategy or option, or one that needs a trained model.
    """
    strategy = build_strategy(spec)
    name, _ = parse_spec(spec)
    if not getattr(strategy, "cold_start", False) and name not in MODEL_FREE:
        raise SaalError(
            f"--cold-start {spec!r} needs a trained model; give one that ranks on the image embeddings alone: "
            f"{', '.join(cold_start_names())}"
        )


def cold_start_order(spec: str, x: torch.Tensor, snap: Snapshot, num_classes: int, seed: int) -> tuple[np.ndarray, int]:
    """Return the candidates that are not check images in cold-start order, and how many the strategy chose.

    The strategy ``spec`` chooses the first ``min(COLD_START_CHUNK, n)`` on a :class:`saal.Pool` over the feature
    rows ``x`` flattened (labelled items labelled, check images and the rest set aside: :func:`strategy_pool`),
    with :func:`feature_model` and the generator ``numpy.random.default_rng([seed, snap.last_event])``; the rest
    follow in the seeded random order ``default_rng([seed, snap.last_event, 1]).permutation``.
    """
    main = snap.main
    if not len(main):
        return main, 0
    k = min(COLD_START_CHUNK, len(main))
    x = x.flatten(1)  # 1-D rows: a strategy's embedding="auto" reads them as they are
    pool = strategy_pool(x, snap, num_classes)
    selection = build_strategy(spec).select(
        feature_model(x, num_classes, seed), pool, k, np.random.default_rng([seed, snap.last_event])
    )
    chosen = np.asarray(selection.indices, dtype=np.int64)
    rest = np.random.default_rng([seed, snap.last_event, 1]).permutation(np.setdiff1d(main, chosen))
    return np.concatenate([chosen, rest]), k


@dataclass
class ColdStart:
    """What :func:`cold_start` committed: how many images the strategy chose, of how many ranked, in how long."""

    chosen: int
    ranked: int
    seconds: float
    committed: bool


def cold_start(
    engine: Engine,
    *,
    kind: str,
    rows: np.ndarray,
    classes: list[str],
    spec: str,
    seed: int,
    audit_share: float,
    snap: Snapshot,
) -> ColdStart:
    """Rank the queue with the cold-start strategy ``spec`` (see :func:`cold_start_order`), check images
    interleaved, unless a model version was committed meanwhile.

    Returns:
        The :class:`ColdStart` (``committed`` False when a model version exists).
    """
    start = time.perf_counter()
    main, k = cold_start_order(spec, as_inputs(kind, np.asarray(rows)), snap, len(classes), seed)
    first = set(main[:k].tolist())
    name = parse_spec(spec)[0]
    seconds = time.perf_counter() - start
    with db.read(engine) as conn:
        if int(db.get_meta(conn, "current_version", "0") or 0) != 0:
            return ColdStart(k, len(main), seconds, False)
        order, is_audit, held = place(conn, main, audit_sequence(seed, snap.audit), audit_share, snap.last_event)
    picked = [
        held[i] or RANDOM if i in held else AUDIT if a else name if i in first else RANDOM
        for i, a in zip(order.tolist(), is_audit.tolist(), strict=True)
    ]
    write_order_chunked(engine, order, picked)  # short transactions: labels and claims go on meanwhile
    with db.write(engine) as conn:
        now = time.time()
        for key, value in (("by", spec), ("chosen", k), ("event", snap.last_event), ("seconds", seconds)):
            db.set_meta(conn, f"cold_start_{key}", value)
        db.set_meta(conn, "ranked_at", now)
        _clear_request(conn, snap)
    return ColdStart(k, len(main) + len(snap.audit), seconds, True)


def _clear_request(conn: Connection, snap: Snapshot) -> None:
    requested = db.get_meta(conn, "retrain_requested")
    if requested is not None and float(requested) <= snap.taken_at:
        db.set_meta(conn, "retrain_requested", None)


@dataclass
class Update:
    """What :func:`update` committed."""

    version: int
    labels: int
    train_seconds: float
    score_seconds: float
    quality: float | None
    quality_n: int


def measure_previous(
    kind: str,
    x: torch.Tensor,
    row_shape: tuple[int, ...],
    classes: list[str],
    seed: int,
    models_dir: Path,
    snap: Snapshot,
) -> tuple[float | None, int]:
    """Return the accuracy of the model in use on the labels that arrived after it (check labels left out: the
    strategy's picks, harder than a random image) and how many there were; ``(None, 0)`` when there is nothing."""
    previous = models_dir / f"v{snap.version}.pt"
    if snap.version == 0 or not snap.labelled_after or not previous.exists():
        return None, 0
    old = make_model(kind, row_shape, len(classes), seed)
    old.load_state_dict(torch.load(previous, map_location="cpu", weights_only=True))
    ids = np.asarray(sorted(snap.labelled_after), dtype=np.int64)
    pred, _ = predict(old, x, ids)
    truth = np.asarray([snap.labelled_after[int(i)] for i in ids])
    return float((pred == truth).mean()), len(ids)


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
    audit_share: float = 0.0,
) -> Update:
    """Train, measure, score and commit one new model version (see the module docstring).

    Args:
        rows: the cached feature rows of every item id.
        models_dir: where each version's weights are kept (the previous one is measured from its file).
        snap: the labels to train on (:func:`take_snapshot`).
        audit_share: the share of check images interleaved into the strategy's order.

    Returns:
        The :class:`Update` committed.
    """
    x = as_inputs(kind, np.asarray(rows))
    row_shape = tuple(rows.shape[1:])
    quality, quality_n = measure_previous(kind, x, row_shape, classes, seed, models_dir, snap)

    start = time.perf_counter()
    model = make_model(kind, row_shape, len(classes), seed)
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    fit(model, dataset, snap.labelled, snap.targets, train_config(kind, len(snap.labelled)), generator)
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    ordered = Ordered(snap.main)
    if len(snap.main):
        ordered = order_candidates(
            strategy, model, x, snap, len(classes), seed, kind=kind, state=_strategy_state(engine, strategy)
        )
    checks = audit_sequence(seed, snap.audit)
    everything = np.concatenate([ordered.order, checks])
    pred, conf = predict(model, x, everything)
    score_seconds = time.perf_counter() - start

    guess = {int(i): (classes[int(p)], float(c)) for i, p, c in zip(everything, pred, conf, strict=True)}
    row = {
        "created_at": time.time(),
        "kind": strategy,
        "model": kind,
        "labels": len(snap.labelled),
        "last_event": snap.last_event,
        "train_seconds": train_seconds,
        "score_seconds": score_seconds,
        "note": ordered.reason or None,
    }
    version = _commit(engine, model, models_dir, row, snap, ordered, checks, guess, audit_share, quality, quality_n)
    _prune(models_dir, version, snap.version)
    return Update(version, len(snap.labelled), train_seconds, score_seconds, quality, quality_n)


def _commit(
    engine: Engine,
    model: nn.Module,
    models_dir: Path,
    row: dict[str, Any],
    snap: Snapshot,
    ordered: Ordered,
    checks: np.ndarray,
    guess: dict[int, tuple[str, float]],
    audit_share: float,
    quality: float | None,
    quality_n: int,
) -> int:
    """Save the model, write the ranking, then commit its version row, its check-image predictions and the previous
    version's measured quality in one transaction; return the new version.

    The weights are saved and the ranking's rows written (:func:`saal.app.order.write_order_chunked`) before that
    transaction, so the write lock is never held while a file is written or thousands of rows are updated.
    """
    name = parse_spec(str(row["kind"]))[0]
    tracked = [(int(i), guess[int(i)][0]) for i in checks[:MAX_AUDIT_TRACK]]
    models_dir.mkdir(exist_ok=True)
    tmp = models_dir / f"next-{os.getpid()}.pt.tmp"
    torch.save(model.state_dict(), tmp)
    with db.read(engine) as conn:
        order, is_audit, held = place(conn, ordered.order, checks, audit_share, snap.last_event)
    picked = [
        held[i] or name if i in held else AUDIT if a else name
        for i, a in zip(order.tolist(), is_audit.tolist(), strict=True)
    ]
    ids = order.tolist()
    write_order_chunked(engine, order, picked, [guess[i][0] for i in ids], [guess[i][1] for i in ids])
    with db.write(engine) as conn:
        version = int(conn.execute(select(func.coalesce(func.max(db.models.c.version), 0))).scalar_one()) + 1
        tmp.replace(models_dir / f"v{version}.pt")  # a rename: the weights were written before the lock
        now = float(row["created_at"])
        conn.execute(db.models.insert().values(version=version, **row))
        if quality is not None:
            conn.execute(
                db.models.update()
                .where(db.models.c.version == snap.version)
                .values(quality=quality, quality_n=quality_n, quality_at=now)
            )
        if tracked:
            conn.execute(
                db.audit_predictions.insert(), [{"version": version, "item_id": i, "predicted": g} for i, g in tracked]
            )
        db.set_meta(conn, "current_version", version)
        db.set_meta(conn, "ranked_at", now)
        _save_state(conn, str(row["kind"]), ordered.state)
        _clear_request(conn, snap)
    return version


def _strategy_state(engine: Engine, spec: str) -> dict[str, Any] | None:
    """Return the state the strategy ``spec`` left after the last ranking (None: none, or another strategy's)."""
    with db.read(engine) as conn:
        saved = db.get_meta(conn, "strategy_state")
    if saved is None:
        return None
    record = json.loads(saved)
    return dict(record["state"]) if record.get("spec") == spec else None


def _save_state(conn: Connection, spec: str, state: dict[str, Any] | None) -> None:
    try:
        text = json.dumps({"spec": spec, "state": state or {}})
    except (TypeError, ValueError):  # a state of arrays or tensors: not kept (the strategy starts afresh)
        text = None
    db.set_meta(conn, "strategy_state", text)


def _prune(models_dir: Path, version: int, previous: int) -> None:
    for old_file in models_dir.glob("v*.pt"):
        if old_file.stem not in (f"v{version}", f"v{previous}"):
            old_file.unlink(missing_ok=True)
