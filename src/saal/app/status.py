"""What the pages show about a project: progress, the model in use, its measured quality, the model job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from saal.app import db

NEW_LABEL_KINDS = ("label", "import")


@dataclass
class Status:
    """One consistent snapshot of a project.

    Attributes:
        total: images in the project (readable or not).
        unreadable: images that cannot be read (never offered).
        labelled, skipped, unlabelled: readable images in each state.
        per_class: labelled images per class name.
        version: the model version whose ranking the queue uses (0: the initial random order).
        model: that version's ``models`` row (None for version 0).
        quality: the latest measured quality: ``{"version", "value", "n", "at"}`` or None.
        ranked_at: when the ranking in use was committed (epoch seconds).
        new_labels: labels added since the model in use was trained.
        job: the model job's ``state``, ``message``, ``error``, ``restarts``, ``pid``, ``heartbeat``.
    """

    total: int
    unreadable: int
    labelled: int
    skipped: int
    unlabelled: int
    per_class: dict[str, int]
    version: int
    model: dict[str, Any] | None
    quality: dict[str, Any] | None
    ranked_at: float | None
    new_labels: int
    job: dict[str, str | None] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """Return the snapshot as plain JSON values."""
        return dict(self.__dict__)


def new_labels_since(conn: Connection, event_id: int) -> int:
    """Return how many labels (and imported labels) were added after history row ``event_id``."""
    return int(
        conn.execute(
            select(func.count())
            .select_from(db.events)
            .where(db.events.c.id > event_id, db.events.c.kind.in_(NEW_LABEL_KINDS))
        ).scalar_one()
    )


def snapshot(engine: Engine, classes: list[str]) -> Status:
    """Return the project's :class:`Status`, read in one transaction."""
    it = db.items
    with db.read(engine) as conn:
        counts = {
            (bool(r.readable), int(r.state)): int(r.n)
            for r in conn.execute(
                select(it.c.readable, it.c.state, func.count().label("n")).group_by(it.c.readable, it.c.state)
            )
        }
        per = {
            str(r.label): int(r.n)
            for r in conn.execute(
                select(it.c.label, func.count().label("n")).where(it.c.state == db.LABELLED).group_by(it.c.label)
            )
        }
        version = int(db.get_meta(conn, "current_version", "0") or 0)
        model_row = conn.execute(select(db.models).where(db.models.c.version == version)).first()
        quality_row = conn.execute(
            select(db.models).where(db.models.c.quality.is_not(None)).order_by(db.models.c.version.desc()).limit(1)
        ).first()
        ranked = db.get_meta(conn, "ranked_at")
        last_event = int(model_row.last_event) if model_row is not None else 0
        new = new_labels_since(conn, last_event)
        job = {k: db.get_meta(conn, f"job_{k}") for k in ("state", "message", "error", "restarts", "pid", "heartbeat")}
    unreadable = sum(n for (readable, _), n in counts.items() if not readable)
    quality = None
    if quality_row is not None:
        quality = {
            "version": int(quality_row.version),
            "value": float(quality_row.quality),
            "n": int(quality_row.quality_n or 0),
            "at": quality_row.quality_at,
        }
    return Status(
        total=sum(counts.values()),
        unreadable=unreadable,
        labelled=counts.get((True, db.LABELLED), 0),
        skipped=counts.get((True, db.SKIPPED), 0),
        unlabelled=counts.get((True, db.UNLABELLED), 0),
        per_class={c: per.get(c, 0) for c in classes},
        version=version,
        model=None if model_row is None else dict(model_row._mapping),
        quality=quality,
        ranked_at=float(ranked) if ranked is not None else None,
        new_labels=new,
        job=job,
    )
