"""The ML backend's protocol, without HTTP: what ``/setup``, ``/predict``, ``/webhook`` and ``/metrics`` do.

Label Studio (``label_studio/ml/api_connector.py``) sends:

* ``POST /setup`` ``{"project": "<id>.<created ts>", "schema": <label config>, "hostname", "access_token",
  "extra_params"}`` when a model is connected or checked; the answer's ``model_version`` becomes the connection's.
* ``POST /predict`` ``{"tasks": [...], "project", "label_config", "params": {"context": ...}}``; the answer is
  ``{"results": [{"result": [...], "score": s, "model_version": v}, ...]}``, one per task, in order.
* ``POST /webhook`` for every project event (Label Studio makes the model's URL + ``/webhook`` a webhook of the
  project, all actions, with payloads, a 1 s timeout): ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` (with the
  annotation and its task), ``ANNOTATIONS_DELETED`` (annotation ids only), ``START_TRAINING`` ("Start Training"),
  ``TASKS_CREATED`` / ``TASKS_DELETED`` and ``PROJECT_UPDATED``; anything else is answered and ignored.

A request saal cannot serve raises :class:`Refused` (HTTP 4xx with one line).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saal.errors import SaalError
from saal.labelstudio.client import LabelStudio
from saal.labelstudio.labelconfig import BOXES, LabelConfig, UnsupportedConfig, parse
from saal.labelstudio.mirror import Mirror, Options
from saal.labelstudio.predictions import BadAnnotation
from saal.labelstudio.store import Store

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
DELETE_EVENTS = ("ANNOTATIONS_DELETED", "ANNOTATION_DELETED")


class Refused(SaalError):
    """A request saal cannot serve; ``status`` is its HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def project_id(value: Any) -> int:
    """Return the project id of a request's ``project`` (``"12.1700000000"``, ``12`` or ``{"id": 12}``).

    Raises:
        Refused: no project id.
    """
    if isinstance(value, dict):
        value = value.get("id")
    text = str(value).split(".", 1)[0] if value is not None else ""
    if not text.isdigit():
        raise Refused(f"the request names no Label Studio project (project={value!r}); it must come from Label Studio")
    return int(text)


class Backend:
    """The Label Studio projects this backend serves, each mirrored (:class:`saal.labelstudio.mirror.Mirror`).

    Args:
        folder: the backend's folder (a mirror per project: ``folder/project-<id>``).
        ls: the Label Studio client.
        store: the backend's store.
        options: training and ranking options.
        log: prints one line.
    """

    def __init__(
        self, folder: Path, ls: LabelStudio, store: Store, options: Options, log: Callable[[str], None]
    ) -> None:
        self.folder, self.ls, self.store, self.options, self.log = folder, ls, store, options, log
        self.mirrors: dict[int, Mirror] = {}
        self._lock = threading.Lock()

    def resume(self) -> None:
        """Serve again every project served before (their mirrors, model jobs and pushes go on)."""
        for pid in self.store.project_ids():
            row = self.store.project(pid)
            if row is None:
                continue
            names = (str(row["from_name"]), str(row["to_name"]), str(row["data_key"]))
            config = LabelConfig(str(row["kind"]), *names, tuple(row["classes"]))
            self._start(pid, config)

    def _start(self, pid: int, config: LabelConfig) -> Mirror:
        folder = self.folder / f"project-{pid}"
        mirror = Mirror(pid, config, folder, self.ls, self.store, self.options, self.log)
        if config.kind == BOXES:
            from saal.labelstudio.boxes import BoxMirror

            mirror = BoxMirror(pid, config, folder, self.ls, self.store, self.options, self.log)
        self.mirrors[pid] = mirror
        mirror.start()
        return mirror

    def mirror(self, project: Any, schema: Any = None) -> Mirror:
        """Return the mirror of ``project``, started now from ``schema`` when it is new.

        Raises:
            Refused: no project id, a label config saal cannot serve, or classes other than those it serves.
        """
        pid = project_id(project)
        with self._lock:
            mirror = self.mirrors.get(pid)
            if mirror is not None:
                if schema:
                    self._check_same(mirror, schema)
                return mirror
            if not schema:
                raise Refused(f"Label Studio project {pid} is not connected to saal yet; connect it (Settings > Model)")
            try:
                config = parse(str(schema))
            except UnsupportedConfig as error:
                raise Refused(str(error)) from None
            folder = self.folder / f"project-{pid}"
            names = (config.from_name, config.to_name, config.data_key)
            self.store.save_project(pid, config.kind, names, list(config.classes), str(folder))
            self.log(f"project {pid}: connected ({config.kind}: {', '.join(config.classes)})")
            return self._start(pid, config)

    def _check_same(self, mirror: Mirror, schema: Any) -> None:
        try:
            config = parse(str(schema))
        except UnsupportedConfig as error:
            raise Refused(str(error)) from None
        old = mirror.config
        if (config.kind, config.classes) != (old.kind, old.classes):
            raise Refused(
                f"the label config of project {mirror.id} changed ({old.kind} {','.join(old.classes)} -> "
                f"{config.kind} {','.join(config.classes)}); saal keeps the model and labels of the old classes in "
                f"{mirror.folder}: move that folder away and restart saal label-studio to start over with the new ones",
                409,
            )

    # -- the protocol ----------------------------------------------------------------------------------------
    def setup(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer ``/setup``: connect the project (mirror, model job) and say its model version."""
        mirror = self.mirror(body.get("project"), body.get("schema"))
        return {"model_version": mirror.ranking.name if mirror.ranking else "saal-v0"}

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer ``/predict``: one prediction per task, from the ranking in use."""
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise Refused("/predict needs {'tasks': [task, ...]} as Label Studio sends it")
        project = body.get("project")
        if project is None and tasks:
            project = tasks[0].get("project")
        mirror = self.mirror(project, body.get("label_config"))
        return {"results": mirror.predict(tasks)}

    def webhook(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer ``/webhook``: apply an annotation, a deletion, new or deleted tasks, a training request."""
        action = body.get("action")
        if not isinstance(action, str):
            raise Refused("the webhook has no 'action'; Label Studio sends {'action': ..., 'project': {...}, ...}")
        project = body.get("project")
        config = project.get("label_config") if isinstance(project, dict) else None
        if action not in (*ANNOTATION_EVENTS, *DELETE_EVENTS, "START_TRAINING", "TASKS_CREATED", "TASKS_DELETED"):
            if action == "PROJECT_UPDATED" and config and project_id(project) in self.mirrors:
                self._check_same(self.mirrors[project_id(project)], config)
            return {"status": "ignored", "action": action}
        mirror = self.mirror(project, config)
        return {"status": "ok", "action": action, "result": self._event(mirror, action, body)}

    def _event(self, mirror: Mirror, action: str, body: dict[str, Any]) -> str:
        if action == "START_TRAINING":
            return mirror.retrain()
        if action == "TASKS_CREATED":
            tasks = [t for t in body.get("tasks") or [] if isinstance(t, dict) and "id" in t]
            mirror.queue("tasks", tasks)
            return f"{len(tasks)} tasks queued"
        if action == "TASKS_DELETED":
            ids = [int(t["id"]) for t in body.get("tasks") or [] if isinstance(t, dict) and "id" in t]
            mirror.queue("forget", ids)
            return f"{len(ids)} tasks forgotten"
        if action in DELETE_EVENTS:
            found = body.get("annotations") or (
                [body["annotation"]] if isinstance(body.get("annotation"), dict) else []
            )
            ids = [int(a["id"]) for a in found if isinstance(a, dict) and str(a.get("id", "")).isdigit()]
            touched = self.store.annotation_tasks(mirror.id, ids)
            mirror.queue("reconcile", touched)
            return f"{len(touched)} tasks to check"
        annotations = body.get("annotation")
        done = []
        for annotation in annotations if isinstance(annotations, list) else [annotations]:
            if not isinstance(annotation, dict):
                raise Refused(f"{action} without an annotation object")
            task = annotation.get("task")
            task = task.get("id") if isinstance(task, dict) else task
            if task is None and isinstance(body.get("task"), dict):
                task = body["task"].get("id")
            if not str(task).isdigit():
                raise Refused(f"{action}: the annotation names no task")
            try:
                done.append(mirror.annotate(int(str(task)), annotation))
            except BadAnnotation as error:
                raise Refused(f"task {task}: {error}", 422) from None
        return "; ".join(done)

    def metrics(self) -> dict[str, Any]:
        """Return each project's figures."""
        return {"projects": [m.status() for m in list(self.mirrors.values())]}

    def versions(self, project: Any) -> dict[str, Any]:
        """Answer ``/versions``: the names of the project's model versions, oldest first."""
        pid = project_id(project)
        return {"versions": [v["name"] for v in self.store.versions(pid)]}

    def stop(self) -> None:
        """Stop every mirror (worker threads and model jobs)."""
        for mirror in list(self.mirrors.values()):
            mirror.stop()
