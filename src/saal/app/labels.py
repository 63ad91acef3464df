"""The append-only label history: label (and relabel), skip, undo and import each add one ``events`` row.

Each call is one write transaction that appends the history row and updates the item's current state from it,
so the two never disagree, even when the process is killed between two calls. A ``request_id`` (a form's nonce)
makes a call idempotent: the same request sent twice is recorded once; sent again with another payload (the
browser's Back button, then another class) it is refused (:class:`Stale`). A form also carries the item's version
as it was shown (``expected_event``: its ``last_event``, 0 for none): when someone changed the item since, the call
is refused with who did what, instead of silently replacing a newer label. Undo refuses likewise when the image
was changed since the label it would undo. The item's row is read ``FOR UPDATE`` (a row lock on PostgreSQL;
SQLite's write lock already serialises writers), so two concurrent calls never both act on the same old state.
A label given on the page to a random check image is recorded as an audit label (``events.audit``; see
:mod:`saal.app.order`).
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


class Stale(Conflict):
    """The form was sent before with another payload, or the item changed since the form was shown (HTTP 409).

    Attributes:
        item_id: the item concerned (the page links to its history).
    """

    def __init__(self, message: str, item_id: int) -> None:
        super().__init__(message)
        self.item_id = item_id


LABEL_BUSY_SECONDS = 5.0  # a label, skip or undo waits this long for the database before a 503


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


@dataclass(frozen=True)
class Payload:
    """What a request asks for, compared with what a repeat of its ``request_id`` recorded.

    Attributes:
        kind: the history row's kind (label, skip, undo).
        annotator: who sent it.
        item_id, label: the item and label (None: not part of the request, e.g. an undo's item).
    """

    kind: str
    annotator: str
    item_id: int | None = None
    label: str | None = None


def _repeat(conn: Connection, request_id: str | None, payload: Payload | None = None) -> Recorded | None:
    if request_id is None:
        return None
    e = db.events
    row = conn.execute(
        select(e.c.id, e.c.item_id, e.c.kind, e.c.label, e.c.annotator).where(e.c.request_id == request_id)
    ).first()
    if row is None:
        return None
    if payload is not None and (
        (row.kind, row.annotator) != (payload.kind, payload.annotator)
        or payload.item_id not in (None, row.item_id)
        or (payload.kind == "label" and row.label != payload.label)
    ):
        path = conn.execute(select(db.items.c.path).where(db.items.c.id == row.item_id)).scalar()
        what = f"{row.kind} {row.label}" if row.label else str(row.kind)
        raise Stale(
            f"this form was already sent ({what} of {path} by {row.annotator}); it was not sent again with another "
            "answer. Change the image from its history instead",
            int(row.item_id),
        )
    return Recorded(int(row.id), int(row.item_id), True)


def _item(conn: Connection, item_id: int, *, lock: bool = False) -> Any:
    query = select(db.items).where(db.items.c.id == item_id)
    row = conn.execute(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFound(f"there is no image {item_id} in this project")
    return row


def _describe(conn: Connection, item: Any) -> str:
    """Return how ``item`` stands and who changed it last, in words: "labelled blue by bo at 10:04:05 UTC"."""
    e = db.events
    last = conn.execute(
        select(e.c.id, e.c.kind, e.c.annotator, e.c.at).where(e.c.item_id == item.id).order_by(e.c.id.desc()).limit(1)
    ).first()
    now = f"labelled {item.label}" if item.state == db.LABELLED else "skipped" if item.state == db.SKIPPED else ""
    if last is None:
        return now or "unlabelled"
    at = time.strftime("%H:%M:%S UTC", time.gmtime(float(last.at)))
    who = last.annotator or "an import"
    if now and last.id == item.last_event:
        return f"{now} by {who} at {at}"
    article = "an" if last.kind in ("undo", "import") else "a"
    return f"{now or 'unlabelled'} since {article} {last.kind} by {who} at {at}"


def _check_version(conn: Connection, item: Any, expected_event: int | None, wanted: str) -> None:
    """Raise :class:`Stale` when ``item`` changed since the form showing it as ``expected_event`` was rendered."""
    if expected_event is None or int(item.last_event or 0) == int(expected_event):
        return
    raise Stale(
        f"{item.path} changed after your page was shown: it is {_describe(conn, item)}; {wanted} was not saved",
        int(item.id),
    )


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


def _guarded(engine: Engine, request_id: str | None, payload: Payload, body: Any, busy: float | None) -> Recorded:
    """Run ``body(conn)`` in a write transaction unless ``request_id`` was recorded already (with this payload).

    Raises:
        Stale: ``request_id`` was recorded with another payload.
    """
    try:
        with db.write(engine, busy=busy) as conn:
            seen = _repeat(conn, request_id, payload)
            if seen is not None:
                return seen
            recorded: Recorded = body(conn)
            return recorded
    except IntegrityError:  # PostgreSQL: the same request committed by a concurrent transaction
        with db.read(engine) as conn:
            seen = _repeat(conn, request_id, payload)
        if seen is None:
            raise
        return seen


def _label_in(
    conn: Connection,
    item_id: int,
    label: str,
    annotator: str,
    request_id: str | None,
    kind: str,
    when: float,
    expected_event: int | None = None,
) -> Recorded:
    item = _item(conn, item_id, lock=True)
    _check_version(conn, item, expected_event, f"your {label}")
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
    expected_event: int | None = None,
    busy: float | None = LABEL_BUSY_SECONDS,
) -> Recorded:
    """Label ``item_id`` (or relabel it: the earlier label stays in the history).

    Args:
        expected_event: the item's ``last_event`` when the form was shown (0: none); None: no check.
        busy: how long to wait for the database (None: :data:`saal.app.db.BUSY_SECONDS`).

    Returns:
        The :class:`Recorded` history row.

    Raises:
        SaalError: ``label`` is not one of ``classes``.
        NotFound: no such item.
        Stale: ``request_id`` was sent before with another label or item, or the item changed since
            ``expected_event``.
        Conflict: the image is unreadable.
        saal.app.db.Busy: the database stayed locked for ``busy`` seconds.
    """
    if label not in classes:
        raise SaalError(f"{label!r} is not a class of this project; use one of {', '.join(classes)}")
    when = time.time() if now is None else now

    def body(conn: Connection) -> Recorded:
        return _label_in(conn, item_id, label, annotator, request_id, kind, when, expected_event)

    return _guarded(engine, request_id, Payload(kind, annotator, item_id, label), body, busy)


def record_skip(
    engine: Engine,
    item_id: int,
    annotator: str,
    request_id: str | None = None,
    *,
    expected_event: int | None = None,
    busy: float | None = LABEL_BUSY_SECONDS,
) -> Recorded:
    """Set ``item_id`` aside: it comes back after every unlabelled image.

    Returns:
        The :class:`Recorded` history row.

    Raises:
        NotFound: no such item.
        Stale: as :func:`record_label`.
        Conflict: the image is labelled already (undo or relabel it instead).
        saal.app.db.Busy: the database stayed locked for ``busy`` seconds.
    """
    now = time.time()

    def body(conn: Connection) -> Recorded:
        item = _item(conn, item_id, lock=True)
        _check_version(conn, item, expected_event, "your skip")
        if item.state == db.LABELLED:
            raise Conflict(f"image {item.path} is labelled already; relabel it from its history instead")
        event_id = _append(conn, item, kind="skip", label=None, annotator=annotator, request_id=request_id, now=now)
        conn.execute(
            db.items.update()
            .where(db.items.c.id == item_id)
            .values(state=db.SKIPPED, last_event=event_id, claimed_by=None, claim_until=None)
        )
        return Recorded(event_id, item_id)

    return _guarded(engine, request_id, Payload("skip", annotator, item_id), body, busy)


def undo_last(
    engine: Engine,
    annotator: str,
    claim_seconds: float,
    request_id: str | None = None,
    *,
    busy: float | None = LABEL_BUSY_SECONDS,
) -> Recorded:
    """Undo ``annotator``'s latest label or skip that is not undone yet; the image is claimed for them again.

    The undo is a new history row; the item returns to the state it had before (unlabelled, skipped, or its
    earlier label).

    Returns:
        The :class:`Recorded` undo row (its ``item_id`` is the image to show).

    Raises:
        NotFound: the annotator has nothing left to undo.
        Stale: someone changed that image since (their newer label is kept); fix it from its history instead.
        saal.app.db.Busy: the database stayed locked for ``busy`` seconds.
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
        item = _item(conn, int(target.item_id), lock=True)
        if item.last_event != target.id:
            raise Stale(
                f"{item.path} changed after your {target.kind}: it is {_describe(conn, item)}; it was not undone "
                "(change it from its history instead)",
                int(item.id),
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

    return _guarded(engine, request_id, Payload("undo", annotator), body, busy)


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
