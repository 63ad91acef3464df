"""The order images are shown in: the ranking's picks, with random check (audit) images interleaved.

* **Check images.** Each image is a random check image with probability ``audit_share``, decided by a seeded
  hash of its id (:func:`audit_mask`): a uniform random sample of the folder that no strategy chose, stable when
  images are added; raising the share keeps the earlier check images. The strategies never see them (they are
  set aside in the :class:`saal.Pool` they rank), and a label given to one on the page is recorded as an audit
  label (``events.audit``), which is what the page's accuracy figure is measured on.
* **Interleaving.** Counting labelled images, the ``g``-th image shown (from 0) is a check image when
  ``floor((g + 1) * share) > floor(g * share)``: with the default 0.1 every 10th image. The check images come in a
  fixed seeded random order (:func:`audit_sequence`); the others in the order the ranking chose. When one kind runs
  out the other follows.
* **Priorities.** An order of ``n`` images is written as priorities ``(n - position) / n`` (the queue shows the
  highest first), with each image's ``picked_by``: the strategy that chose it, ``random`` or :data:`AUDIT`. A new
  ranking is written by :func:`write_order_chunked`: :data:`ORDER_CHUNK` rows per short write transaction, the top
  of the new order first, so that it never holds the database's write lock for long (labels and claims go on in
  between; for the moment of the write the rows not written yet keep their earlier priority).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, bindparam, func, select

from saal.app import db

AUDIT = "audit"  # picked_by of a random check image
RANDOM = "random"  # picked_by of an image in the seeded random order
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
ORDER_CHUNK = 2000  # rows of a ranking written per write transaction


def unit_hash(seed: int, ids: np.ndarray, stream: int) -> np.ndarray:
    """Return a number in [0, 1) for each id, fixed by ``(seed, stream, id)`` (splitmix64 of the three)."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64((int(seed) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF)
        z &= _MASK64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def audit_mask(seed: int, ids: np.ndarray, share: float) -> np.ndarray:
    """Return whether each id is a random check image at ``share`` (each with probability ``share``)."""
    return unit_hash(seed, ids, 1) < share


def audit_sequence(seed: int, ids: np.ndarray) -> np.ndarray:
    """Return the check images ``ids`` in the fixed seeded random order they are shown in."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids[np.argsort(unit_hash(seed, ids, 2), kind="stable")]


def audit_slots(shown: int, n: int, share: float) -> np.ndarray:
    """Return, for the next ``n`` positions after ``shown`` labelled images, whether each is a check image's."""
    g = shown + np.arange(n, dtype=np.float64)
    return np.floor((g + 1) * share) > np.floor(g * share)


def interleave(main: np.ndarray, audit: np.ndarray, share: float, shown: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge the ranking's order ``main`` and the check images ``audit`` (in their order) into one queue.

    Returns:
        ``(order, is_audit)``: all ids of both, and which positions hold a check image.
    """
    main, audit = np.asarray(main, dtype=np.int64), np.asarray(audit, dtype=np.int64)
    n = len(main) + len(audit)
    slots = audit_slots(shown, n, share) if share > 0 else np.zeros(n, dtype=bool)
    # the k-th check slot takes audit[k] while check images last; every other position takes the next of main
    is_audit = slots & (np.cumsum(slots) <= len(audit))
    if is_audit.sum() < len(audit):  # main ran out first: the remaining check images follow
        spare = np.flatnonzero(~is_audit)[len(main) :]
        is_audit[spare] = True
    order = np.empty(n, dtype=np.int64)
    order[is_audit] = audit
    order[~is_audit] = main
    return order, is_audit


def place(
    conn: Connection, main: np.ndarray, checks: np.ndarray, share: float, since_event: int, now: float | None = None
) -> tuple[np.ndarray, np.ndarray, dict[int, str | None]]:
    """Interleave ``main`` and ``checks`` as the queue stands at commit time (inside the write transaction).

    A ranking is computed from a snapshot while people go on labelling: the images labelled since history row
    ``since_event`` are left out, the images someone holds now (shown on their page, so the next they label) come
    first, and the interleaving counts from the labelled images plus those held, so that the share holds across
    rankings.

    Returns:
        ``(order, is_audit, held)``: the order (held images first), which positions the interleaving gave to a check
        image (False for the held ones), and ``{id: picked_by}`` of the held images (what their page says).
    """
    it = db.items
    now = time.time() if now is None else now
    gone = conn.execute(select(it.c.id).where(it.c.state == db.LABELLED, it.c.last_event > since_event)).scalars()
    held_rows = conn.execute(
        select(it.c.id, it.c.picked_by)
        .where(it.c.state != db.LABELLED, it.c.claimed_by.is_not(None), it.c.claim_until >= now)
        .order_by(it.c.claim_until)
    ).all()
    ranked = set(np.concatenate([main, checks]).tolist())
    held = {int(r.id): r.picked_by for r in held_rows if int(r.id) in ranked}
    away = np.asarray(sorted({int(i) for i in gone} | set(held)), dtype=np.int64)
    rest, is_audit = interleave(
        main[~np.isin(main, away)], checks[~np.isin(checks, away)], share, count_labelled(conn) + len(held)
    )
    order = np.concatenate([np.asarray(list(held), dtype=np.int64), rest])
    return order, np.concatenate([np.zeros(len(held), dtype=bool), is_audit]), held


def write_order(
    conn: Connection,
    order: np.ndarray,
    picked_by: Sequence[str],
    guesses: Sequence[str | None] | None = None,
    confidences: Sequence[float | None] | None = None,
) -> None:
    """Give the items of ``order`` the priorities ``(n - position) / n`` and their ``picked_by`` (and, when given,
    the model's guess and its confidence), in the transaction of ``conn``."""
    statement, params = _order_rows(order, picked_by, guesses, confidences)
    for start in range(0, len(params), 5000):
        conn.execute(statement, params[start : start + 5000])


def write_order_chunked(
    engine: Engine,
    order: np.ndarray,
    picked_by: Sequence[str],
    guesses: Sequence[str | None] | None = None,
    confidences: Sequence[float | None] | None = None,
) -> None:
    """Write what :func:`write_order` writes in :data:`ORDER_CHUNK`-row write transactions, the top of ``order``
    first: each holds the write lock for a moment, whatever the number of images."""
    statement, params = _order_rows(order, picked_by, guesses, confidences)
    for start in range(0, len(params), ORDER_CHUNK):
        with db.write(engine, durable=False) as conn:  # the final commit of the ranking syncs these too
            conn.execute(statement, params[start : start + ORDER_CHUNK])


def _order_rows(
    order: np.ndarray,
    picked_by: Sequence[str],
    guesses: Sequence[str | None] | None,
    confidences: Sequence[float | None] | None,
) -> tuple[Any, list[dict[str, Any]]]:
    n = len(order)
    params = [{"item": int(i), "p": float((n - pos) / n), "by": picked_by[pos]} for pos, i in enumerate(order.tolist())]
    values: dict[str, Any] = {"priority": bindparam("p"), "picked_by": bindparam("by")}
    if guesses is not None and confidences is not None:
        for pos, row in enumerate(params):
            row["guess"], row["conf"] = guesses[pos], confidences[pos]
        values.update(predicted=bindparam("guess"), confidence=bindparam("conf"))
    return db.items.update().where(db.items.c.id == bindparam("item")).values(**values), params


def assign_audit(engine: Engine, seed: int, share: float) -> int:
    """Decide which images are random check images under ``(seed, share)``, when that rule is new to the database
    (a new project, one from before schema 2, or another ``--audit-share`` / ``--seed``).

    Labelled images keep what they were. When the set of check images among the others changes, the queue is
    interleaved again (the ranking's order of the other images is kept).

    Returns:
        How many images changed from check image to not or back.
    """
    rule = f"{int(seed)}:{float(share)!r}"
    it = db.items
    with db.write(engine) as conn:
        if db.get_meta(conn, "audit_rule") == rule:
            return 0
        rows = conn.execute(
            select(it.c.id, it.c.audit, it.c.picked_by)
            .where(it.c.state != db.LABELLED)
            .order_by(it.c.state, it.c.priority.desc(), it.c.id)
        ).all()
        ids = np.asarray([int(r.id) for r in rows], dtype=np.int64)
        want = audit_mask(seed, ids, share)
        had = np.asarray([bool(r.audit) for r in rows], dtype=bool)
        changed = int((want != had).sum())
        conn.execute(it.update().where(it.c.audit.is_(None), it.c.state == db.LABELLED).values(audit=False))
        if changed or any(r.audit is None for r in rows):
            flags = [{"item": int(i), "a": bool(a)} for i, a in zip(ids.tolist(), want.tolist(), strict=True)]
            for start in range(0, len(flags), 5000):
                conn.execute(
                    it.update().where(it.c.id == bindparam("item")).values(audit=bindparam("a")),
                    flags[start : start + 5000],
                )
        if changed:
            main = ids[~want]
            by = {int(r.id): (r.picked_by if r.picked_by not in (None, AUDIT) else RANDOM) for r in rows}
            last = int(conn.execute(select(func.coalesce(func.max(db.events.c.id), 0))).scalar_one())
            order, is_audit, held = place(conn, main, audit_sequence(seed, ids[want]), share, last)
            picked = [
                held.get(i, AUDIT if a else by[i]) for i, a in zip(order.tolist(), is_audit.tolist(), strict=True)
            ]
            write_order(conn, order, [p or RANDOM for p in picked])
        db.set_meta(conn, "audit_rule", rule)
    return changed


def count_labelled(conn: Connection) -> int:
    """Return how many images are labelled (the interleaving's count of images shown)."""
    return int(
        conn.execute(select(func.count()).select_from(db.items).where(db.items.c.state == db.LABELLED)).scalar_one()
    )
