"""Pushing a ranking to Label Studio: one prediction per task, tagged with a named model version, then the project's
``model_version`` switched to it (what the Data Manager's prediction score and uncertainty sampling read).

A push is resumable and exactly-once: each batch is recorded in the store as *on its way* before it is sent and as
*done* once Label Studio confirmed it. A backend killed in between asks Label Studio, at the next push of that
version, which of the tasks on their way already hold a prediction of it, and sends only the others. Versions older
than the newest ``keep`` have their predictions deleted in Label Studio (the store keeps their record).

Version names: ``saal-vN`` for the app's model version N (trained on the labels), ``saal-cold-eK`` for a cold-start
ranking (before any model: the order of the cold-start strategy after history row K, with empty results).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from saal.app import db
from saal.labelstudio.client import LabelStudio, LabelStudioError
from saal.labelstudio.predictions import order_scores
from saal.labelstudio.store import Store

BATCH = 500
LABELLED_SCORE = 1.0  # a labelled task sorts after every unlabelled one


def version_name(app_version: int, cold_event: str | None) -> str | None:
    """Return the name of the ranking in use (None: nothing ranked yet)."""
    if app_version > 0:
        return f"saal-v{app_version}"
    if cold_event is not None:
        return f"saal-cold-e{int(float(cold_event))}"
    return None


@dataclass
class Ranking:
    """One ranking of a project, as Label Studio predictions.

    Attributes:
        name: the model version's name.
        app_version: the app's model version (0: a cold-start ranking).
        labels: how many labels the model was trained on.
        strategy: the strategy that ordered the tasks.
        predictions: ``{task: {"result": ..., "score": ...}}``.
        order: the unlabelled tasks in acquisition order (first = next to label).
        ready_at: when the backend first saw it (``time.time()``).
    """

    name: str
    app_version: int
    labels: int
    strategy: str
    predictions: dict[int, dict[str, Any]]
    order: list[int]
    ready_at: float = field(default_factory=time.time)

    def prediction(self, task: int) -> dict[str, Any]:
        """Return the prediction of ``task`` in the form of the ``/predict`` answer and of the import API."""
        found = self.predictions.get(task)
        if found is None:  # a task that came after this ranking: last, without a result
            return {"result": [], "score": LABELLED_SCORE, "model_version": self.name}
        return {"result": found["result"], "score": found["score"], "model_version": self.name}


def read_ranking(
    engine: Engine, task_of: dict[int, int], result_of: Callable[[Any, int], list[dict[str, Any]]]
) -> Ranking | None:
    """Return the ranking in use in the app database ``engine`` (None: none yet), for the tasks ``task_of``
    (``{item id: task}``); ``result_of(row, version)`` makes an item's result."""
    it = db.items
    with db.read(engine) as conn:
        version = int(db.get_meta(conn, "current_version", "0") or 0)
        name = version_name(version, db.get_meta(conn, "cold_start_event"))
        if name is None:
            return None
        rows = conn.execute(
            select(it.c.id, it.c.state, it.c.readable, it.c.priority, it.c.predicted, it.c.confidence)
        ).all()
        model = conn.execute(select(db.models).where(db.models.c.version == version)).first()
        strategy = str(model.kind) if model is not None else str(db.get_meta(conn, "cold_start_by", "") or "")
        labels = int(model.labels) if model is not None else 0
    shown = [r for r in rows if int(r.id) in task_of and r.readable]
    open_ = sorted((r for r in shown if r.state != db.LABELLED), key=lambda r: (r.state, -r.priority, r.id))
    order = [task_of[int(r.id)] for r in open_]
    scores = order_scores(order)
    predictions = {}
    for row in shown:
        task = task_of[int(row.id)]
        predictions[task] = {"result": result_of(row, version), "score": scores.get(task, LABELLED_SCORE)}
    return Ranking(name, version, labels, strategy, predictions, order)


def push(
    ls: LabelStudio, store: Store, project: int, ranking: Ranking, log: Callable[[str], None], batch: int = BATCH
) -> int:
    """Send every task's prediction of ``ranking`` that Label Studio does not hold yet, then make it the project's
    model version; return how many were sent.

    Raises:
        LabelStudioError: Label Studio failed (what was confirmed stays recorded; the next call goes on).
    """
    store.start_version(project, ranking.name, ranking.app_version, ranking.labels, ranking.strategy)
    done, flying = store.pushed_tasks(project, ranking.name)
    if flying:  # a push killed after sending: ask Label Studio which arrived
        arrived = ls.predicted_tasks(project, ranking.name) & flying
        store.sent(project, ranking.name, sorted(arrived))
        store.unsent(project, ranking.name, sorted(flying - arrived))
        done |= arrived
        log(f"{ranking.name}: {len(arrived)} of {len(flying)} predictions on their way at a stop had arrived")
    todo = [t for t in ranking.predictions if t not in done]
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        store.sending(project, ranking.name, chunk)
        try:
            ls.import_predictions(project, [{"task": t, **ranking.prediction(t)} for t in chunk])
        except LabelStudioError as error:
            if error.status == 400:  # refused (e.g. a task deleted meanwhile): nothing of the batch was kept
                store.unsent(project, ranking.name, chunk)
            raise
        store.sent(project, ranking.name, chunk)
    ls.set_model_version(project, ranking.name)
    store.finish_version(project, ranking.name)
    return len(todo)


PRUNE_STEP = 50  # predictions deleted per call of :class:`Pruner`: each delete is a short write in Label Studio


class Pruner:
    """Deletes in Label Studio the predictions of a project's versions older than the newest ``keep`` finished ones,
    a few at a time.

    Label Studio's own "delete a model version" holds its database's write lock while it updates every task's
    prediction count (8 s for 1,000 predictions on SQLite), and an annotation submitted meanwhile fails with "database
    is locked". So each old prediction is deleted on its own (``DELETE /api/predictions/<id>/``), :data:`PRUNE_STEP`
    per :meth:`step`, between the pushes. A version counts as removed once none of its predictions is left.
    """

    def __init__(self, ls: LabelStudio, store: Store, project: int, keep: int, log: Callable[[str], None]) -> None:
        self.ls, self.store, self.project, self.keep, self.log = ls, store, project, keep, log
        self.names: list[str] = []
        self.ids: list[int] = []

    def step(self) -> bool:
        """Delete up to :data:`PRUNE_STEP` old predictions; return whether work is left."""
        if not self.ids:
            if self.names:
                for name in self.names:
                    self.store.mark_removed(self.project, name)
                self.log(f"deleted the predictions of {', '.join(self.names)} (keeping the newest {self.keep})")
                self.names = []
            finished = [v for v in self.store.versions(self.project) if v["finished_at"] is not None]
            old = [str(v["name"]) for v in finished[: max(0, len(finished) - self.keep)] if not v["removed"]]
            if not old:
                return False
            self.names = old
            self.ids = self.ls.prediction_ids(self.project, set(old))
            return True
        for prediction in self.ids[:PRUNE_STEP]:
            self.ls.delete_prediction(prediction)
        del self.ids[:PRUNE_STEP]
        return True
