"""What the pages show about a project: progress, the model in use, its measured quality, the model job.

Quality is measured on random check (audit) images (:mod:`saal.app.order`): for each model version, how many of the
check images labelled after it was trained (so never seen by it) it predicted right, with a 95 % Wilson score
interval; below :data:`MIN_AUDIT` check labels the page says there are too few yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, case, func, select

from saal.app import db

NEW_LABEL_KINDS = ("label", "import")
MIN_AUDIT = 10  # check labels a version needs before its accuracy is shown
AUDIT_VERSIONS = 5  # versions whose check figures are shown (the newest)
Z95 = 1.96


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
        quality: the latest accuracy of a version on the other labels that came after it (the strategy's picks,
            harder than a random image): ``{"version", "value", "n", "at"}`` or None.
        audit: the newest versions' accuracy on random check images labelled after them, newest first (see
            :func:`audit_figures`).
        cold_start: the cold-start ranking in use before any model: ``{"by", "chosen", "seconds"}`` or None.
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
    audit: list[dict[str, Any]] = field(default_factory=list)
    cold_start: dict[str, str | None] | None = None

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


def wilson(right: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Return the Wilson score interval of a proportion ``right / n`` (95 % for the default ``z``).

    Raises:
        ValueError: ``n < 1`` or ``right`` outside ``0 .. n``.
    """
    if n < 1 or not 0 <= right <= n:
        raise ValueError(f"a proportion needs 0 <= right <= n and n >= 1, got {right} of {n}")
    p = right / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def audit_sentence(version: int, right: int, n: int) -> str:
    """Return the accuracy of ``version`` on ``n`` check images in plain words (or that there are too few yet)."""
    images = "image" if n == 1 else "images"
    if n < MIN_AUDIT:
        return (
            f"Version {version}: {n} random check {images} labelled since it was trained; too few yet to say how "
            f"often it is right (at least {MIN_AUDIT} are needed)."
        )
    low, high = wilson(right, n)
    return (
        f"Version {version} was right on {right} of {n} random check images ({100 * right / n:.0f} %, likely "
        f"between {100 * low:.0f} % and {100 * high:.0f} %)."
    )


def audit_figures(conn: Connection, newest: int, count: int = AUDIT_VERSIONS) -> list[dict[str, Any]]:
    """Return, for the ``count`` model versions up to ``newest`` (newest first), their accuracy on the random check
    images labelled after they were trained: ``{"version", "right", "n", "low", "high", "text"}`` (``low`` and
    ``high``, the 95 % Wilson interval, are None without any check label)."""
    p, it, ev = db.audit_predictions, db.items, db.events
    lowest = newest - count
    right = func.sum(case((p.c.predicted == it.c.label, 1), else_=0))
    measured = {
        int(r.version): (int(r.right or 0), int(r.n))
        for r in conn.execute(
            select(p.c.version, func.count().label("n"), right.label("right"))
            .select_from(p.join(it, it.c.id == p.c.item_id).join(ev, ev.c.id == it.c.last_event))
            .where(p.c.version > lowest, p.c.version <= newest, it.c.state == db.LABELLED, ev.c.audit.is_(True))
            .group_by(p.c.version)
        )
    }
    versions = conn.execute(
        select(db.models.c.version)
        .where(db.models.c.version > lowest, db.models.c.version <= newest)
        .order_by(db.models.c.version.desc())
    ).scalars()
    figures = []
    for version in (int(v) for v in versions):
        got, n = measured.get(version, (0, 0))
        low, high = wilson(got, n) if n else (None, None)
        text = audit_sentence(version, got, n)
        figures.append({"version": version, "right": got, "n": n, "low": low, "high": high, "text": text})
    return figures


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
        audit = audit_figures(conn, version)
        cold = {k: db.get_meta(conn, f"cold_start_{k}") for k in ("by", "chosen", "seconds")}
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
        audit=audit,
        cold_start=cold if cold["by"] is not None else None,
    )
