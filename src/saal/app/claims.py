"""Time-limited claims: each annotator is shown a different image.

An annotator's next image is the one they already hold (its claim is renewed), else the highest-priority image
nobody holds (or whose claim expired), claimed in one atomic ``UPDATE ... WHERE id = (SELECT ... LIMIT 1)
RETURNING``: two annotators asking at the same moment never get the same image. Unlabelled images come first by
the model's priority, then skipped ones. A label, a skip or an expired claim frees the image.

Every page load claims, so a claim waits only :data:`CLAIM_BUSY_SECONDS` for the database (then
:class:`saal.app.db.Busy`, a 503): a held write lock never ties up a web worker for long.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, or_, select

from saal.app import db

CLAIM_BUSY_SECONDS = 2.0


@dataclass
class Claimed:
    """The image an annotator holds.

    Attributes:
        id: the item id.
        path: its path relative to the project folder.
        state: unlabelled or skipped.
        predicted, confidence: the current model's guess for it, when there is one.
        picked_by: what placed it in the queue: a strategy's name, ``random`` or ``audit`` (a random check image).
        last_event: its latest history row when claimed (the version a form sends back; None: no history).
    """

    id: int
    path: str
    state: int
    predicted: str | None
    confidence: float | None
    picked_by: str | None = None
    last_event: int | None = None


def claim_next(
    engine: Engine, annotator: str, seconds: float, now: float | None = None, *, busy: float = CLAIM_BUSY_SECONDS
) -> Claimed | None:
    """Return the image ``annotator`` should label now, claimed for ``seconds``; None when none is left.

    Raises:
        saal.app.db.Busy: the database stayed locked for ``busy`` seconds.
    """
    now = time.time() if now is None else now
    it = db.items
    cols = (it.c.id, it.c.path, it.c.state, it.c.predicted, it.c.confidence, it.c.picked_by, it.c.last_event)
    open_ = and_(it.c.readable.is_(True), it.c.state.in_((db.UNLABELLED, db.SKIPPED)))
    with db.write(engine, durable=False, busy=busy) as conn:
        held = conn.execute(
            it.update()
            .where(
                it.c.id
                == select(it.c.id)
                .where(open_, it.c.claimed_by == annotator)
                .order_by(it.c.claim_until.desc())
                .limit(1)
                .scalar_subquery()
            )
            .values(claim_until=now + seconds)
            .returning(*cols)
        ).first()
        if held is not None:
            return _claimed(held)
        free = or_(it.c.claimed_by.is_(None), it.c.claim_until < now)
        best = (
            select(it.c.id)
            .where(open_, free)
            .order_by(it.c.state, it.c.priority.desc(), it.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)  # PostgreSQL; SQLite's write lock already serialises this
            .scalar_subquery()
        )
        row = conn.execute(
            it.update()
            .where(it.c.id == best, free)
            .values(claimed_by=annotator, claim_until=now + seconds)
            .returning(*cols)
        ).first()
    return None if row is None else _claimed(row)


def _claimed(row: Any) -> Claimed:
    last = None if row.last_event is None else int(row.last_event)
    return Claimed(int(row.id), str(row.path), int(row.state), row.predicted, row.confidence, row.picked_by, last)


def release(engine: Engine, annotator: str, *, busy: float = CLAIM_BUSY_SECONDS) -> None:
    """Free every image ``annotator`` holds (they left, or asked for another)."""
    with db.write(engine, busy=busy) as conn:
        conn.execute(
            db.items.update().where(db.items.c.claimed_by == annotator).values(claimed_by=None, claim_until=None)
        )
