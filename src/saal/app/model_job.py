"""The model job: a process of its own (never the web worker) that keeps the ranking up to date.

``python -m saal.app.model_job --state-dir FOLDER/.saal-label --parent PID`` (the server starts it; the database
URL comes in the ``SAAL_LABEL_DB`` environment variable, so a password never shows in a process list).

It caches every image's features once, then loops: when ``retrain_every`` labels arrived since the model in use
was trained, or a retrain was requested from the page, and labels of at least two classes exist, it runs one
:func:`saal.app.ranking.update` (train, measure, score, commit a new version). Before the first model it ranks the
queue with the project's cold-start strategy on the cached features (:func:`saal.app.ranking.cold_start`): once the
features are cached, and again after every ``retrain_every`` labels (or a retrain request) while labels of two
classes are missing. It reports what it does in the database (``job_*`` meta keys) for
the page, exits when its parent server is gone, and lets every error end the process with a traceback in
``job.log``: the supervisor restarts it and shows the error's last line on the page.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saal.app import db, ranking
from saal.app.features import FeatureCache, make_extractor
from saal.app.project import Settings, read_settings
from saal.app.status import new_labels_since
from saal.errors import SaalError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

HEARTBEAT_SECONDS = 5.0

# Trainers of other tasks than classification, by the project's ``task`` (settings): each trains, ranks and commits
# one model version (as :func:`saal.app.ranking.update` does for classes) and returns what it did, in words. A module
# that registers one runs this job through its own ``main`` (``saal label-studio``'s box job: detection).
Trainer = Callable[[db.Engine, Settings, np.ndarray, Path, ranking.Snapshot], str]
TRAINERS: dict[str, Trainer] = {}


def set_job(engine: db.Engine, **values: str | float | int | None) -> None:
    """Record the job's ``state``, ``message``, ``pid`` or ``heartbeat`` for the page."""
    with db.write(engine) as conn:
        for key, value in values.items():
            db.set_meta(conn, f"job_{key}", value)


def _lock(state_dir: Path, parent: int | None) -> object:
    handle = open(state_dir / "job.lock", "a")  # noqa: SIM115 - held for the process's lifetime
    if fcntl is None:
        return handle
    deadline = time.monotonic() + 120
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:  # the job of a server that was killed a moment ago is still finishing
            if time.monotonic() > deadline or (parent is not None and os.getppid() != parent):
                raise SaalError("another model job holds this project; stop its server first") from None
            time.sleep(0.2)


@dataclass
class Wanted:
    """What the job should do next.

    Attributes:
        train: train a new model version (a retrain is due or requested, and labels of two classes exist).
        cold_start: rank with the cold-start strategy (no model yet, and it never ran or is due again).
        requested: a retrain was requested from the page.
    """

    train: bool
    cold_start: bool
    requested: bool


def _wanted(engine: db.Engine, every: int) -> Wanted:
    """Return what is due (see :class:`Wanted`)."""
    from sqlalchemy import func, select

    with db.read(engine) as conn:
        version = int(db.get_meta(conn, "current_version", "0") or 0)
        used = conn.execute(select(db.models.c.last_event).where(db.models.c.version == version)).scalar()
        new = new_labels_since(conn, int(used or 0))
        requested = db.get_meta(conn, "retrain_requested") is not None
        classes = conn.execute(
            select(func.count(func.distinct(db.items.c.label))).where(db.items.c.state == db.LABELLED)
        ).scalar_one()
        cold = db.get_meta(conn, "cold_start_event")
        new_since_cold = new_labels_since(conn, int(cold)) if cold is not None else 0
    train = (new >= every or requested) and int(classes) >= 2
    cold_due = version == 0 and not train and (cold is None or new_since_cold >= every or requested)
    return Wanted(train, cold_due, requested)


def run(state_dir: Path, url: str, parent: int | None, poll: float = 0.5) -> int:
    """Run the model job until the parent server is gone.

    Returns:
        0 when the parent server is gone.

    Raises:
        SaalError: the project's settings are missing or its database belongs to another project.
    """
    settings = read_settings(state_dir)
    if settings is None:
        raise SaalError(f"{state_dir} holds no labelling project")
    engine = db.connect(url)
    db.check_owner(engine, settings.project_id, str(state_dir.parent))
    _handle = _lock(state_dir, parent)
    set_job(engine, state="starting", pid=os.getpid(), message="loading the model", heartbeat=time.time())
    extractor, fallback = make_extractor(settings.model, settings.image_size)
    note = f"no pretrained backbone ({fallback}); using the small CNN" if fallback else None
    cache = FeatureCache(state_dir, extractor)
    rows = _features(engine, state_dir.parent, cache)
    idle = f"{extractor.kind} model ready" + (f"; {note}" if note else "")
    set_job(engine, state="idle", message=idle)
    beat = time.monotonic()
    while parent is None or os.getppid() == parent:
        wanted = _wanted(engine, settings.retrain_every)
        if wanted.train or wanted.cold_start:
            snap = ranking.take_snapshot(engine, settings.classes)
            if snap.size > len(rows):
                rows = _features(engine, state_dir.parent, cache)
            message = _rank(engine, settings, extractor.kind, rows, state_dir, snap, wanted.train)
            set_job(engine, state="idle", message=message, heartbeat=time.time())
            print(message, flush=True)
        if time.monotonic() - beat > HEARTBEAT_SECONDS:
            set_job(engine, heartbeat=time.time())
            beat = time.monotonic()
        time.sleep(poll)
    return 0


def _rank(
    engine: db.Engine,
    settings: Settings,
    kind: str,
    rows: np.ndarray,
    state_dir: Path,
    snap: ranking.Snapshot,
    train: bool,
) -> str:
    """Train a new version (``train``) or rank with the cold-start strategy; return what was done, in words."""
    if not train:
        set_job(engine, state="ranking", message=f"cold start: ranking with {settings.cold_start}")
        cold = ranking.cold_start(
            engine,
            kind=kind,
            rows=rows,
            classes=settings.classes,
            spec=settings.cold_start,
            seed=settings.seed,
            audit_share=settings.audit_share,
            snap=snap,
        )
        return (
            f"no model yet (it needs labels of two classes and {settings.retrain_every} labels): "
            f"{settings.cold_start} chose the next {cold.chosen} of {cold.ranked} images in {cold.seconds:.1f} s"
        )
    trainer = TRAINERS.get(settings.task)
    if trainer is not None:
        set_job(engine, state="training", message=f"training a {settings.task} model")
        return trainer(engine, settings, rows, state_dir, snap)
    set_job(engine, state="training", message=f"training on {len(snap.labelled)} labels")
    done = ranking.update(
        engine,
        kind=kind,
        rows=rows,
        classes=settings.classes,
        strategy=settings.strategy,
        seed=settings.seed,
        models_dir=state_dir / "models",
        snap=snap,
        audit_share=settings.audit_share,
    )
    return (
        f"version {done.version}: trained on {done.labels} labels in {done.train_seconds:.1f} s, "
        f"ranked {len(snap.candidates)} images in {done.score_seconds:.1f} s"
    )


def _features(engine: db.Engine, root: Path, cache: FeatureCache) -> np.ndarray:
    from sqlalchemy import func, select

    with db.read(engine) as conn:
        items = [
            (int(i), root / p)
            for i, p in conn.execute(select(db.items.c.id, db.items.c.path).where(db.items.c.readable.is_(True)))
        ]
        size = int(conn.execute(select(func.coalesce(func.max(db.items.c.id) + 1, 0))).scalar_one())

    def progress(done: int, todo: int) -> None:
        set_job(
            engine, state="reading", message=f"reading images for the model: {done} of {todo}", heartbeat=time.time()
        )

    rows, failed = cache.ensure(items, size, progress)
    if failed:
        with db.write(engine) as conn:
            for item_id, why in failed.items():
                conn.execute(db.items.update().where(db.items.c.id == item_id).values(readable=False, error=why))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the model job process.

    Returns:
        The exit code: 0 when the parent server is gone, 2 for a project that cannot be opened.
    """
    parser = argparse.ArgumentParser(prog="python -m saal.app.model_job")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--parent", type=int, default=None)
    parser.add_argument("--poll", type=float, default=0.5)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the server's terminal: the server stops the job
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    import torch

    torch.set_num_threads(1)
    state_dir = Path(args.state_dir).resolve()
    url = os.environ.get("SAAL_LABEL_DB") or db.default_url(str(state_dir / "labels.db"))
    try:
        return run(state_dir, url, args.parent, args.poll)
    except SaalError as error:
        print(f"model job: error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
