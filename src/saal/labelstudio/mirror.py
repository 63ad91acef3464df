"""One Label Studio project, mirrored as a ``saal label`` project that the app's model job keeps ranked.

The mirror is a folder (``DIR/project-<id>``) holding each task's image as ``images/task-<id>.<ext>`` (read from
Label Studio once, with the token; see :meth:`saal.labelstudio.client.LabelStudio.download`) and the app's state
folder ``.saal-label/`` (its database, its cached embeddings: one row per task, its model versions). Annotations
become labels in the app's append-only history (:mod:`saal.app.labels`, annotator ``ls-task-<id>``); a deleted
annotation is undone there (the task falls back to its other annotations, or to unlabelled). The app's model job
(:mod:`saal.app.model_job`, started by :class:`saal.app.supervisor.JobSupervisor`) retrains every ``retrain_every``
labels and on a requested retrain, and re-ranks; a worker thread here pushes each new ranking to Label Studio
(:mod:`saal.labelstudio.push`).

Everything Label Studio sends is applied in the worker thread, except a created or updated annotation of a task
already mirrored, which is recorded at once (a webhook must be answered within Label Studio's 1 s timeout, and a
local write takes milliseconds).
"""

from __future__ import annotations

import base64
import mimetypes
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import select

from saal.app import db
from saal.app.labels import record_label, record_skip, undo_last
from saal.app.project import Project, ServerLock, open_project, sync_items
from saal.errors import SaalError
from saal.labelstudio.client import LabelStudio, LabelStudioError
from saal.labelstudio.labelconfig import LabelConfig
from saal.labelstudio.predictions import BadAnnotation, annotation_choice, choice_result
from saal.labelstudio.push import Pruner, Ranking, push, read_ranking
from saal.labelstudio.store import Store

IMAGE_DIR = "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
POLL_SECONDS = 0.2
MAX_UNDO = 100  # a task relabelled more often than this keeps its label when its annotations are all deleted


@dataclass
class Options:
    """How the backend trains and ranks (see ``saal label-studio --help``)."""

    strategy: str | None = None
    box_strategy: str = "det-saal"
    cold_start: str | None = None
    retrain_every: int = 10
    model: str = "auto"
    image_size: int = 128
    seed: int = 0
    keep_versions: int = 3
    model_job: bool = True
    address: str = ""
    basic_auth: tuple[str, str] | None = None


def annotator(task: int) -> str:
    """Return the app annotator that stands for the annotations of ``task``."""
    return f"ls-task-{int(task)}"


def image_suffix(url: str, data: bytes) -> str:
    """Return the file suffix of an image read from ``url`` (its path's, else its content's, else ``.jpg``)."""
    path = unquote(urlsplit(url).path)
    query = unquote(urlsplit(url).query)
    for candidate in (path, query):
        suffix = PurePosixPath(candidate).suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            return suffix
    guessed = {b"\x89PNG": ".png", b"GIF8": ".gif", b"BM": ".bmp", b"RIFF": ".webp"}
    for magic, suffix in guessed.items():
        if data.startswith(magic):
            return suffix
    return mimetypes.guess_extension("image/jpeg") or ".jpg"


class Mirror:
    """The mirror of the Label Studio project ``project`` in ``folder``.

    Args:
        project: the Label Studio project id.
        config: its label config.
        folder: the mirror's folder.
        ls: the Label Studio client.
        store: the backend's store.
        options: training and ranking options.
        log: prints one line.
    """

    def __init__(
        self,
        project: int,
        config: LabelConfig,
        folder: Path,
        ls: LabelStudio,
        store: Store,
        options: Options,
        log: Callable[[str], None],
    ) -> None:
        self.id, self.config, self.folder = project, config, folder
        self.ls, self.store, self.options, self._log = ls, store, options, log
        self.app: Project | None = None
        self.supervisor: Any = None
        self.lock = ServerLock(folder / ".saal-label")
        self.ranking: Ranking | None = None
        self.events: deque[tuple[str, Any]] = deque()
        self.item_of: dict[int, int] = {}  # task -> app item id
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._mutex = threading.RLock()
        self._thread = threading.Thread(target=self._run, name=f"saal-ls-{project}", daemon=True)
        self.synced = False
        self.pruner = Pruner(ls, store, project, options.keep_versions, self.log)
        self.error: str | None = None  # the last failure, in words (shown by /metrics)
        self.last_label_at: float | None = None
        self.latencies: list[float] = []  # seconds from a label to its ranking's push, per pushed version

    def log(self, message: str) -> None:
        self._log(f"project {self.id}: {message}")

    # -- life --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (it reads the tasks, starts the model job and pushes rankings)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker thread and the model job."""
        self._stop.set()
        self.wake.set()
        if self._thread.is_alive():
            self._thread.join(10)
        if self.supervisor is not None:
            self.supervisor.stop()
        self.lock.release()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if not self.synced:
                    self.sync_all()
                self._drain()
                self._push_new()
                if self.pruner.step():  # more old predictions to delete: come back soon
                    self.wake.set()
                failures, self.error = 0, None
            except (SaalError, db.Busy) as error:
                failures += 1
                if str(error) != self.error:
                    self.log(f"{error}; trying again")
                self.error = str(error)
            except Exception as error:  # a bug: say so once per kind, keep serving the others
                failures += 1
                what = f"unexpected {type(error).__name__}: {error}"
                if what != self.error:
                    self.log(f"{what}\n{traceback.format_exc()}")
                self.error = what
            self.wake.wait(POLL_SECONDS if failures == 0 else min(30.0, 2.0**failures))
            self.wake.clear()

    # -- tasks and images ----------------------------------------------------------------------------
    def sync_all(self) -> None:
        """Read every task of the project with its annotations, mirror the new ones and apply the labels."""
        tasks = self.ls.request(
            "GET", f"/api/projects/{self.id}/export", params={"exportType": "JSON", "download_all_tasks": "true"}
        )
        tasks = tasks if isinstance(tasks, list) else []
        self.add_tasks(tasks)
        for task in tasks:
            self.reconcile(int(task["id"]), task.get("annotations") or [])
        live = {int(t["id"]) for t in tasks}
        gone = [t for t in self.store.known_tasks(self.id) if t not in live]
        if gone:
            self.forget(gone)
        self.synced = True
        self.log(f"{len(live)} tasks, {len(self.item_of)} images mirrored in {self.folder}")
        self._check_webhook()

    def _check_webhook(self) -> None:
        """Say once when Label Studio sends no webhook to this backend; give it the basic auth header it needs."""
        headers = None
        if self.options.basic_auth is not None:
            user, password = self.options.basic_auth
            headers = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        ready = False
        for connection in self.ls.ml_backends(self.id):
            if headers is not None and connection.get("basic_auth_user") != self.options.basic_auth[0]:  # type: ignore[index]
                continue
            url = str(connection.get("url", "")).rstrip("/") + "/webhook"
            ready = self.ls.webhook_ready(self.id, url, headers) or ready
        if not ready:
            self.log(
                "Label Studio has no webhook to this backend: annotations reach saal only when it restarts, and "
                "predictions change only on 'Retrieve predictions'. Connect the model again with Label Studio started "
                "with LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false (it refuses webhooks to local addresses otherwise)"
            )

    def add_tasks(self, tasks: list[dict[str, Any]]) -> int:
        """Read the images of the tasks not mirrored yet into the folder and add them to the app project; return
        how many were added."""
        known = self.store.known_tasks(self.id)
        fresh = [t for t in tasks if int(t["id"]) not in known]
        files: list[str] = []
        for task in fresh:
            path = self._download(task)
            if path is not None:
                files.append(path)
        if files or (self.app is None and any(r["path"] for r in known.values())):
            self._open(files)
        return len(files)

    def _download(self, task: dict[str, Any]) -> str | None:
        task_id = int(task["id"])
        url = (task.get("data") or {}).get(self.config.data_key)
        if not isinstance(url, str) or not url:
            why = f"its data has no {self.config.data_key!r} (the field the <Image> tag reads)"
            self.store.add_task(self.id, task_id, None, None, why)
            self.log(f"task {task_id}: {why}; it gets no prediction")
            return None
        try:
            data = self.ls.download(url)
        except LabelStudioError as error:
            self.store.add_task(self.id, task_id, url, None, str(error))
            self.log(f"task {task_id}: its image cannot be read ({error}); it gets no prediction")
            return None
        relative = f"{IMAGE_DIR}/task-{task_id}{image_suffix(url, data)}"
        target = self.folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(target)
        self.store.add_task(self.id, task_id, url, relative, None)
        return relative

    def _open(self, files: list[str]) -> None:
        """Open (or create) the app project and add ``files``; start the model job the first time."""
        with self._mutex:
            if self.app is None:
                if not self.lock.held:
                    self.lock.path.parent.mkdir(parents=True, exist_ok=True)
                    self.lock.acquire(f"saal label-studio {self.options.address} (Label Studio project {self.id})")
                updates = {
                    "strategy": self.strategy(),
                    "cold_start": self.options.cold_start,
                    "audit_share": 0.0,
                    "retrain_every": self.options.retrain_every,
                    "model": self.options.model,
                    "image_size": self.options.image_size,
                    "seed": self.options.seed,
                    "task": self.task,
                }
                self.app = open_project(self.folder, classes=list(self.config.classes), updates=updates)
            elif files:
                sync_items(self.app, files)
            self._map_items()
            if self.supervisor is None and self.options.model_job:
                from saal.app.supervisor import JobSupervisor

                self.supervisor = JobSupervisor(self.app.engine, self.app.state_dir, self.app.url, self.job_module)
                self.supervisor.start()
                self.log(f"model job started (retrains every {self.options.retrain_every} labels)")

    def _map_items(self) -> None:
        assert self.app is not None
        with db.read(self.app.engine) as conn:
            rows = conn.execute(select(db.items.c.id, db.items.c.path, db.items.c.readable, db.items.c.error)).all()
        by_path = {str(r.path): r for r in rows}
        mapping = {}
        for task, row in self.store.known_tasks(self.id).items():
            item = by_path.get(str(row["path"])) if row["path"] else None
            if item is None:
                continue
            mapping[task] = int(item.id)
            if not item.readable and row["error"] is None:  # reported once
                self.store.add_task(self.id, task, row["url"], row["path"], item.error or "unreadable")
                self.log(f"task {task}: its image cannot be decoded ({item.error}); it gets no prediction")
        self.item_of = mapping

    def forget(self, task_ids: list[int]) -> None:
        """Drop tasks deleted in Label Studio: no more predictions, and the model job no longer ranks them."""
        items = [self.item_of.pop(t) for t in task_ids if t in self.item_of]
        self.store.forget_tasks(self.id, task_ids)
        if items and self.app is not None:
            with db.write(self.app.engine) as conn:
                conn.execute(
                    db.items.update()
                    .where(db.items.c.id.in_(items), db.items.c.state != db.LABELLED)
                    .values(readable=False, error="the task was deleted in Label Studio")
                )
        self.log(f"{len(task_ids)} tasks deleted in Label Studio")

    # -- labels --------------------------------------------------------------------------------------
    def annotate(self, task: int, annotation: dict[str, Any]) -> str:
        """Apply a created or updated annotation of ``task``; return what was done, in words.

        Raises:
            BadAnnotation: the annotation names a class the project does not have.
        """
        if annotation.get("id") is not None:
            self.store.remember_annotation(self.id, int(annotation["id"]), task)
        with self._mutex:
            item = self.item_of.get(task)
        if item is None or self.app is None:
            self.queue("tasks", [task])
            return "queued (the task is not mirrored yet)"
        if annotation.get("was_cancelled"):
            self.queue("reconcile", [task])
            return "skipped"
        label = self.label_of(task, annotation.get("result"))
        if label is None:
            self.queue("reconcile", [task])
            return "no class chosen"
        self._label(item, task, label)
        return f"labelled {label if len(label) < 40 else label[:37] + '...'}"

    # -- what a label is (a class name here; :class:`saal.labelstudio.boxes.BoxMirror` keeps boxes) ----------------
    job_module = "saal.app.model_job"
    task = "classification"

    def strategy(self) -> str | None:
        """Return the strategy spec of the mirror's app project (None: the app's default)."""
        return self.options.strategy

    def label_of(self, task: int, result: Any) -> str | None:
        """Return the app label of an annotation's ``result`` (None: it labels nothing).

        Raises:
            BadAnnotation: a class the project does not have.
        """
        return annotation_choice(self.config, result)

    def classes_for(self, label: str) -> list[str]:
        """Return the classes :func:`saal.app.labels.record_label` checks ``label`` against."""
        return list(self.config.classes)

    def result_of(self, row: Any, version: int) -> list[dict[str, Any]]:
        """Return the Label Studio result of an app item ``row`` of the ranking of model ``version``."""
        return choice_result(self.config, row.predicted if version > 0 else None)

    def _label(self, item: int, task: int, label: str) -> None:
        assert self.app is not None
        with db.read(self.app.engine) as conn:
            row = conn.execute(select(db.items.c.state, db.items.c.label).where(db.items.c.id == item)).first()
        if row is not None and row.state == db.LABELLED and row.label == label:
            return
        record_label(self.app.engine, item, label, self.classes_for(label), annotator(task), busy=None)
        self.last_label_at = time.time()
        self.wake.set()

    def reconcile(self, task: int, annotations: list[dict[str, Any]]) -> None:
        """Make the app's label of ``task`` that of its newest annotation that chose a class (unlabelled: none)."""
        with self._mutex:
            item = self.item_of.get(task)
        if item is None or self.app is None:
            return
        chosen, cancelled = None, False
        for annotation in sorted(annotations, key=lambda a: str(a.get("updated_at") or "")):
            if annotation.get("id") is not None:
                self.store.remember_annotation(self.id, int(annotation["id"]), task)
            if annotation.get("was_cancelled"):
                cancelled = True
                continue
            try:
                chosen = self.label_of(task, annotation.get("result")) or chosen
            except BadAnnotation as error:
                self.log(f"task {task}: {error}")
        if chosen is not None:
            self._label(item, task, chosen)
        else:
            self._unlabel(item, task, cancelled)

    def _unlabel(self, item: int, task: int, cancelled: bool) -> None:
        assert self.app is not None
        state = None
        for _ in range(MAX_UNDO):
            with db.read(self.app.engine) as conn:
                state = conn.execute(select(db.items.c.state).where(db.items.c.id == item)).scalar()
            if state != db.LABELLED:
                break
            undo_last(self.app.engine, annotator(task), self.app.settings.claim_seconds, busy=None)
        if cancelled and state == db.UNLABELLED:
            record_skip(self.app.engine, item, annotator(task), busy=None)

    def retrain(self) -> str:
        """Ask the model job for a retrain now (Label Studio's "Start Training")."""
        if self.app is None:
            return "not ready: the tasks are still being read"
        with db.write(self.app.engine) as conn:
            db.set_meta(conn, "retrain_requested", time.time())
        return "retrain requested"

    # -- the worker's queue ----------------------------------------------------------------------------
    def queue(self, kind: str, payload: Any) -> None:
        """Hand ``kind`` (``tasks``: task ids or task dicts to mirror; ``reconcile``: task ids; ``forget``) to the
        worker thread."""
        self.events.append((kind, payload))
        self.wake.set()

    def _drain(self) -> None:
        while self.events:
            kind, payload = self.events.popleft()
            if kind == "forget":
                self.forget([int(t) for t in payload])
                continue
            tasks = [t if isinstance(t, dict) else self.ls.task(int(t)) for t in payload]
            if kind == "tasks":
                self.add_tasks([t for t in tasks if "data" in t])
            for task in tasks:
                annotations = task.get("annotations")
                if annotations is None or not isinstance(annotations, list):
                    annotations = self.ls.task(int(task["id"])).get("annotations") or []
                self.reconcile(int(task["id"]), annotations)

    # -- pushing ---------------------------------------------------------------------------------------
    def _push_new(self) -> None:
        if self.app is None:
            return
        with self._mutex:
            task_of = {item: task for task, item in self.item_of.items()}
        ranking = read_ranking(self.app.engine, task_of, self.result_of)
        if ranking is None:
            return
        known = self.store.version(self.id, ranking.name)
        if known is not None and known["finished_at"] is not None:
            if self.ranking is None:
                self.ranking = ranking
            return
        for old in self.store.versions(self.id):  # a version that a newer one replaced before it was finished
            if old["finished_at"] is None and old["name"] != ranking.name:
                self.store.finish_version(self.id, str(old["name"]))
        started = time.perf_counter()
        sent = push(self.ls, self.store, self.id, ranking, self.log)
        self.ranking = ranking
        since = f"; {time.time() - self.last_label_at:.1f} s after the last label" if self.last_label_at else ""
        if self.last_label_at is not None:
            self.latencies.append(time.time() - self.last_label_at)
        self.log(
            f"pushed {ranking.name} ({ranking.strategy or 'cold start'}, {ranking.labels} labels): {sent} predictions "
            f"in {time.perf_counter() - started:.1f} s{since}"
        )

    def predict(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Return one prediction per task, from the ranking in use (tasks not mirrored yet are queued)."""
        ranking = self.ranking
        unknown = [t for t in tasks if int(t.get("id", -1)) not in self.item_of and "data" in t]
        if unknown:
            self.queue("tasks", unknown)
        if ranking is None:
            return [{"result": [], "score": 1.0, "model_version": "saal-v0"} for _ in tasks]
        return [ranking.prediction(int(t.get("id", -1))) for t in tasks]

    def status(self) -> dict[str, Any]:
        """Return the mirror's figures for ``/metrics``."""
        ranking = self.ranking
        return {
            "project": self.id,
            "kind": self.config.kind,
            "classes": list(self.config.classes),
            "tasks": len(self.item_of),
            "model_version": ranking.name if ranking else None,
            "order": ranking.order[:20] if ranking else [],
            "versions": [v["name"] for v in self.store.versions(self.id)],
            "latencies": [round(s, 2) for s in self.latencies[-20:]],
            "error": self.error,
        }
