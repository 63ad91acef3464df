"""The model job: a process of its own (never the web worker) that keeps the ranking up to date.

``python -m saal.app.model_job --state-dir FOLDER/.saal-label --parent PID`` (the server starts it; the database
URL comes in the ``SAAL_LABEL_DB`` environment variable, so a password never shows in a process list).

It caches every image's features once, then loops: when ``retrain_every`` labels arrived since the model in use
was trained, or a retrain was requested from the page, and labels of at least two classes exist, it runs one
:func:`saal.app.ranking.update` (train, measure, score, commit a new version). Until then the order is the
seeded random one the project started with. It reports what it does in the database (``job_*`` meta keys) for
the page, exits when its parent server is gone, and lets every error end the process with a traceback in
``job.log``: the supervisor restarts it and shows the error's last line on the page.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from saal.app import db, ranking
from saal.app.features import FeatureCache, make_extractor
from saal.app.project import read_settings
from saal.app.status import new_labels_since
from saal.errors import SaalError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

HEARTBEAT_SECONDS = 5.0


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


def _wanted(engine: db.Engine, every: int) -> tuple[bool, bool, bool]:
    """Return (a retrain is due or requested, it was requested, labels of two classes exist)."""
    from sqlalchemy import func, select

    with db.read(engine) as conn:
        version = int(db.get_meta(conn, "current_version", "0") or 0)
        used = conn.execute(select(db.models.c.last_event).where(db.models.c.version == version)).scalar()
        new = new_labels_since(conn, int(used or 0))
        requested = db.get_meta(conn, "retrain_requested") is not None
        classes = conn.execute(
            select(func.count(func.distinct(db.items.c.label))).where(db.items.c.state == db.LABELLED)
        ).scalar_one()
    return new >= every or requested, requested, int(classes) >= 2


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
    beat, waiting = time.monotonic(), False
    while parent is None or os.getppid() == parent:
        due, requested, two_classes = _wanted(engine, settings.retrain_every)
        if due and not two_classes:
            if requested or not waiting:  # say it once, not on every poll
                with db.write(engine) as conn:
                    db.set_meta(conn, "retrain_requested", None)
                    db.set_meta(conn, "job_message", "a model needs labels of two classes; the order stays random")
                waiting = True
        elif due:
            snap = ranking.take_snapshot(engine, settings.classes)
            if snap.size > len(rows):
                rows = _features(engine, state_dir.parent, cache)
            set_job(engine, state="training", message=f"training on {len(snap.labelled)} labels")
            done = ranking.update(
                engine,
                kind=extractor.kind,
                rows=rows,
                classes=settings.classes,
                strategy=settings.strategy,
                seed=settings.seed,
                models_dir=state_dir / "models",
                snap=snap,
            )
            message = (
                f"version {done.version}: trained on {done.labels} labels in {done.train_seconds:.1f} s, "
                f"ranked {len(snap.candidates)} images in {done.score_seconds:.1f} s"
            )
            set_job(engine, state="idle", message=message, heartbeat=time.time())
            print(message, flush=True)
        if time.monotonic() - beat > HEARTBEAT_SECONDS:
            set_job(engine, heartbeat=time.time())
            beat = time.monotonic()
        time.sleep(poll)
    return 0


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
