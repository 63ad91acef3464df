"""The append-only label history: label (and relabel), skip, undo and import each add one ``events`` row.

Each call is one write transaction that appends the history row and updates the item's current state from it,
so the two never disagree, even when the process is killed between two calls. A ``request_id`` (a form's nonce)
makes a call idempotent: the same request sent twice is recorded once. A label given on the page to a random
check image is recorded as an audit label (``events.audit``; see :mod:`saal.app.order`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, exists, select
from sqlalchemy.exc import IntegrityError

from saal.app import db
from saal.errors import SaalError


class NotFound(SaalError):
    """No such item (HTTP 404)."""


class Conflict(SaalError):
    """The request does not fit the item's current state (HTTP 409)."""


@dataclass
class Recorded:
    """What a history call did.

    Attributes:
        event_id: the history row (the earlier one when the request was a repeat).
        item_id: the item it is about.
        repeated: the request id had been recorded before; nothing was added.
    """

    event_id: int
    item_id: int
    repeated: bool = False


def _repeat(conn: Connection, request_id: str | None) -> Recorded | None:
    if request_id is None:
        return None
    row = conn.execute(select(db.events.c.id, db.events.c.item_id).where(db.events.c.request_id == request_id)).first()
    return None if row is None else Recorded(int(row.id), int(row.item_id), True)


def _item(conn: Connection, item_id: int) -> Any:
    row = conn.execute(select(db.items).where(db.items.c.id == item_id)).first()
    if row is None:
        raise NotFound(f"there is no image {item_id} in this project")
    return row


def _append(
    conn: Connection,
    item: Any,
    *,
    kind: str,
    label: str | None,
    annotator: str | None,
    request_id: str | None,
    now: float,
    undoes: int | None = None,
    audit: bool | None = None,
) -> int:
    result = conn.execute(
        db.events.insert().values(
            item_id=int(item.id),
            kind=kind,
            label=label,
            annotator=annotator,
            at=now,
            request_id=request_id,
            undoes=undoes,
            prev_state=int(item.state),
            prev_label=item.label,
            prev_annotator=item.annotator,
            prev_labelled_at=item.labelled_at,
            prev_event=item.last_event,
            audit=audit,
        )
    )
    return int(result.inserted_primary_key[0])  # type: ignore[index]


def _guarded(engine: Engine, request_id: str | None, body: Any) -> Recorded:
    """Run ``body(conn)`` in a write transaction unless ``request_id`` was recorded already."""
    try:
        with db.write(engine) as conn:
            seen = _repeat(conn, request_id)
            if seen is not None:
                return seen
            recorded: Recorded = body(conn)
            return recorded
    except IntegrityError:  # PostgreSQL: the same request committed by a concurrent transaction
        with db.read(engine) as conn:
            seen = _repeat(conn, request_id)
        if seen is None:
            raise
        return seen


def _label_in(
    conn: Connection, item_id: int, label: str, annotator: str, request_id: str | None, kind: str, when: float
) -> Recorded:
    item = _item(conn, item_id)
    if not item.readable:
        raise Conflict(f"image {item.path} cannot be read, so it cannot be labelled")
    audit = _is_audit_label(conn, item, kind)
    event_id = _append(
        conn, item, kind=kind, label=label, annotator=annotator, request_id=request_id, now=when, audit=audit
    )
    conn.execute(
        db.items.update()
        .where(db.items.c.id == item_id)
        .values(
            state=db.LABELLED,
            label=label,
            annotator=annotator,
            labelled_at=when,
            last_event=event_id,
            claimed_by=None,
            claim_until=None,
        )
    )
    return Recorded(event_id, item_id)


def _is_audit_label(conn: Connection, item: Any, kind: str) -> bool:
    """Return whether a ``kind`` label of ``item`` is a random check (audit) label: one given on the page to a
    check image that was unlabelled, or correcting its check label (an imported label never is one)."""
    if kind != "label" or not item.audit:
        return False
    if item.state != db.LABELLED:
        return True
    before = conn.execute(select(db.events.c.audit).where(db.events.c.id == item.last_event)).scalar()
    return bool(before)


def record_many(
    engine: Engine, labels: list[tuple[int, str, str, float | None]], classes: list[str], *, kind: str = "import"
) -> int:
    """Add ``(item_id, label, annotator, time or None)`` labels in one transaction: all or none.

    Returns:
        How many were added.

    Raises:
        SaalError: a label that is not one of ``classes``.
        NotFound, Conflict: as :func:`record_label`; nothing is added then.
    """
    bad = [label for _, label, _, _ in labels if label not in classes]
    if bad:
        raise SaalError(f"{bad[0]!r} is not a class of this project; use one of {', '.join(classes)}")
    now = time.time()
    with db.write(engine) as conn:
        for item_id, label, annotator, when in labels:
            _label_in(conn, item_id, label, annotator, None, kind, now if when is None else when)
    return len(labels)


def record_label(
    engine: Engine,
    item_id: int,
    label: str,
    classes: list[str],
    annotator: str,
    request_id: str | None = None,
    *,
    kind: str = "label",
    now: float | None = None,
) -> Recorded:
    """Label ``item_id`` (or relabel it: the earlier label stays in the history).

    Returns:
        The :class:`Recorded` history row.

    Raises:
        SaalError: ``label`` is not one of ``classes``.
        NotFound: no such item.
        Conflict: the image is unreadable.
    """
    if label not in classes:
        raise SaalError(f"{label!r} is not a class of this project; use one of {', '.join(classes)}")
    when = time.time() if now is None else now

    def body(conn: Connection) -> Recorded:
        return _label_in(conn, item_id, label, annotator, request_id, kind, when)

    return _guarded(engine, request_id, body)


def record_skip(engine: Engine, item_id: int, annotator: str, request_id: str | None = None) -> Recorded:
    """Set ``item_id`` aside: it comes back after every unlabelled image.

    Returns:
        The :class:`Recorded` history row.

    Raises:
        NotFound: no such item.
        Conflict: the image is labelled already (undo or relabel it instead).
    """
    now = time.time()

    def body(conn: Connection) -> Recorded:
        item = _item(conn, item_id)
        if item.state == db.LABELLED:
            raise Conflict(f"image {item.path} is labelled already; relabel it from its history instead")
        event_id = _append(conn, item, kind="skip", label=None, annotator=annotator, request_id=request_id, now=now)
        conn.execute(
            db.items.update()
            .where(db.items.c.id == item_id)
            .values(state=db.SKIPPED, last_event=event_id, claimed_by=None, claim_until=None)
        )
        return Recorded(event_id, item_id)

    return _guarded(engine, request_id, body)


def undo_last(engine: Engine, annotator: str, claim_seconds: float, request_id: str | None = None) -> Recorded:
    """Undo ``annotator``'s latest label or skip that is not undone yet; the image is claimed for them again.

    The undo is a new history row; the item returns to the state it had before (unlabelled, skipped, or its
    earlier label).

    Returns:
        The :class:`Recorded` undo row (its ``item_id`` is the image to show).

    Raises:
        NotFound: the annotator has nothing left to undo.
        Conflict: someone changed that image since; fix it from its history instead.
    """
    now = time.time()
    e, u = db.events, db.events.alias("u")

    def body(conn: Connection) -> Recorded:
        undone = exists().where(u.c.undoes == e.c.id)
        target = conn.execute(
            select(e)
            .where(and_(e.c.annotator == annotator, e.c.kind.in_(("label", "skip", "import")), ~undone))
            .order_by(e.c.id.desc())
            .limit(1)
        ).first()
        if target is None:
            raise NotFound(f"{annotator} has nothing to undo")
        item = _item(conn, int(target.item_id))
        if item.last_event != target.id:
            raise Conflict(
                f"image {item.path} was changed by {item.annotator or 'someone'} since; fix it from its history"
            )
        event_id = _append(
            conn, item, kind="undo", label=None, annotator=annotator, request_id=request_id, now=now, undoes=target.id
        )
        # the image the annotator was shown next goes back to the queue: the undone one is theirs now
        conn.execute(
            db.items.update().where(db.items.c.claimed_by == annotator).values(claimed_by=None, claim_until=None)
        )
        conn.execute(
            db.items.update()
            .where(db.items.c.id == item.id)
            .values(
                state=int(target.prev_state),
                label=target.prev_label,
                annotator=target.prev_annotator,
                labelled_at=target.prev_labelled_at,
                last_event=target.prev_event,
                claimed_by=annotator if target.prev_state != db.LABELLED else None,
                claim_until=now + claim_seconds if target.prev_state != db.LABELLED else None,
            )
        )
        return Recorded(event_id, int(item.id))

    return _guarded(engine, request_id, body)


def history(engine: Engine, item_id: int) -> list[dict[str, Any]]:
    """Return every history row of ``item_id``, oldest first, as dicts.

    Raises:
        NotFound: no such item.
    """
    with db.read(engine) as conn:
        _item(conn, item_id)
        rows = conn.execute(select(db.events).where(db.events.c.item_id == item_id).order_by(db.events.c.id))
        return [dict(r._mapping) for r in rows]


def item(engine: Engine, item_id: int) -> dict[str, Any]:
    """Return the current row of ``item_id`` as a dict.

    Raises:
        NotFound: no such item.
    """
    with db.read(engine) as conn:
        return dict(_item(conn, item_id)._mapping)


def labelled_page(
    engine: Engine,
    *,
    label: str | None = None,
    annotator: str | None = None,
    state: int = db.LABELLED,
    offset: int = 0,
    limit: int = 60,
) -> tuple[list[dict[str, Any]], int]:
    """Return one page of items in ``state`` (newest first), filtered by label and annotator, and the total count."""
    from sqlalchemy import func

    where = [db.items.c.state == state]
    if label:
        where.append(db.items.c.label == label)
    if annotator:
        where.append(db.items.c.annotator == annotator)
    with db.read(engine) as conn:
        total = int(conn.execute(select(func.count()).select_from(db.items).where(*where)).scalar_one())
        rows = conn.execute(
            select(db.items)
            .where(*where)
            .order_by(db.items.c.labelled_at.desc(), db.items.c.id.desc())
            .offset(offset)
            .limit(limit)
        )
        return [dict(r._mapping) for r in rows], total
