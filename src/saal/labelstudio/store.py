"""The backend's own store: which Label Studio projects it serves, their tasks, and what it pushed there.

One SQLAlchemy database (SQLite in the backend's folder by default, any URL by ``--db``), opened with
:func:`saal.app.db.connect` (WAL mode, full sync: a committed row survives a SIGKILL). The labels, model versions and
rankings themselves live in each project's ``saal label`` database (:mod:`saal.app.db`); this store only maps Label
Studio to it and records the pushes, so that a restarted backend resumes a push where it stopped and pushes nothing
twice.

Tables:

* ``ls_projects``: one row per Label Studio project served: its label config (kind, tag names, classes) and the
  folder of its mirror project.
* ``ls_tasks``: one row per task: its image URL, the image file in the mirror project, and why it cannot be read.
* ``ls_annotations``: annotation id -> task id (Label Studio's deletion webhook names only the annotation).
* ``ls_versions``: one row per model version pushed (or being pushed) to a project: the app's version it comes
  from, when the push started and when it finished (NULL: not finished; resumed at start).
* ``ls_pushed``: which task received which version's prediction: ``done`` False while its batch is on its way
  (after a SIGKILL then, Label Studio is asked which of them arrived), True once Label Studio confirmed it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    select,
    update,
)

from saal.app import db

metadata = MetaData()

projects = Table(
    "ls_projects",
    metadata,
    Column("project", Integer, primary_key=True, autoincrement=False),
    Column("kind", String(32), nullable=False),
    Column("from_name", String(256), nullable=False),
    Column("to_name", String(256), nullable=False),
    Column("data_key", String(256), nullable=False),
    Column("classes", Text, nullable=False),  # JSON list
    Column("folder", Text, nullable=False),
    Column("connected_at", Float, nullable=False),
)

tasks = Table(
    "ls_tasks",
    metadata,
    Column("project", Integer, primary_key=True, autoincrement=False),
    Column("task", Integer, primary_key=True, autoincrement=False),
    Column("url", Text),
    Column("path", String(1024)),  # the image file, relative to the mirror project's folder
    Column("error", Text),  # why the image cannot be read (reported once)
    Column("added_at", Float, nullable=False),
)

annotation_map = Table(
    "ls_annotations",
    metadata,
    Column("project", Integer, primary_key=True, autoincrement=False),
    Column("annotation", Integer, primary_key=True, autoincrement=False),
    Column("task", Integer, nullable=False),
)

versions = Table(
    "ls_versions",
    metadata,
    Column("project", Integer, primary_key=True, autoincrement=False),
    Column("name", String(128), primary_key=True),
    Column("app_version", Integer, nullable=False),
    Column("labels", Integer, nullable=False),
    Column("strategy", String(128)),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("tasks", Integer),
    Column("removed", Boolean, nullable=False, default=False),  # its predictions were deleted in Label Studio
)

pushed = Table(
    "ls_pushed",
    metadata,
    Column("project", Integer, primary_key=True, autoincrement=False),
    Column("name", String(128), primary_key=True),
    Column("task", Integer, primary_key=True, autoincrement=False),
    Column("done", Boolean, nullable=False),
)


class Store:
    """The backend's store on ``url`` (tables created when missing)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = db.connect(url)
        metadata.create_all(self.engine)

    # -- projects ---------------------------------------------------------------------------------
    def project(self, project: int) -> dict[str, Any] | None:
        """Return the stored row of ``project`` (classes as a list), or None."""
        with db.read(self.engine) as conn:
            row = conn.execute(select(projects).where(projects.c.project == project)).first()
        if row is None:
            return None
        found = dict(row._mapping)
        found["classes"] = json.loads(found["classes"])
        return found

    def project_ids(self) -> list[int]:
        """Return the ids of every project served before."""
        with db.read(self.engine) as conn:
            return [int(p) for p in conn.execute(select(projects.c.project).order_by(projects.c.project)).scalars()]

    def save_project(
        self, project: int, kind: str, names: tuple[str, str, str], classes: list[str], folder: str
    ) -> None:
        """Record (or replace) the project's label config and mirror folder."""
        with db.write(self.engine) as conn:
            conn.execute(delete(projects).where(projects.c.project == project))
            conn.execute(
                projects.insert().values(
                    project=project,
                    kind=kind,
                    from_name=names[0],
                    to_name=names[1],
                    data_key=names[2],
                    classes=json.dumps(classes),
                    folder=folder,
                    connected_at=time.time(),
                )
            )

    # -- tasks ------------------------------------------------------------------------------------
    def known_tasks(self, project: int) -> dict[int, dict[str, Any]]:
        """Return ``{task id: row}`` of the project's tasks."""
        with db.read(self.engine) as conn:
            rows = conn.execute(select(tasks).where(tasks.c.project == project)).all()
        return {int(r.task): dict(r._mapping) for r in rows}

    def add_task(self, project: int, task: int, url: str | None, path: str | None, error: str | None) -> None:
        """Record a task, its image file and why it cannot be read (None: it can)."""
        with db.write(self.engine) as conn:
            conn.execute(delete(tasks).where(tasks.c.project == project, tasks.c.task == task))
            conn.execute(
                tasks.insert().values(project=project, task=task, url=url, path=path, error=error, added_at=time.time())
            )

    def forget_tasks(self, project: int, task_ids: list[int]) -> None:
        """Forget tasks deleted in Label Studio."""
        with db.write(self.engine) as conn:
            conn.execute(delete(tasks).where(tasks.c.project == project, tasks.c.task.in_(task_ids)))

    def remember_annotation(self, project: int, annotation: int, task: int) -> None:
        """Record which task ``annotation`` belongs to."""
        with db.write(self.engine) as conn:
            known = annotation_map.c.project == project, annotation_map.c.annotation == annotation
            conn.execute(delete(annotation_map).where(*known))
            conn.execute(annotation_map.insert().values(project=project, annotation=annotation, task=task))

    def annotation_tasks(self, project: int, annotation_ids: list[int]) -> list[int]:
        """Return the tasks of the annotations ``annotation_ids`` (those known)."""
        with db.read(self.engine) as conn:
            found = conn.execute(
                select(annotation_map.c.task).where(
                    annotation_map.c.project == project, annotation_map.c.annotation.in_(annotation_ids)
                )
            ).scalars()
            return sorted({int(t) for t in found})

    # -- versions and pushes ----------------------------------------------------------------------
    def version(self, project: int, name: str) -> dict[str, Any] | None:
        """Return the row of the version ``name`` (None: never pushed)."""
        with db.read(self.engine) as conn:
            row = conn.execute(select(versions).where(versions.c.project == project, versions.c.name == name)).first()
        return dict(row._mapping) if row is not None else None

    def versions(self, project: int) -> list[dict[str, Any]]:
        """Return the project's versions, oldest first."""
        with db.read(self.engine) as conn:
            rows = conn.execute(
                select(versions)
                .where(versions.c.project == project)
                .order_by(versions.c.started_at, versions.c.app_version)
            ).all()
        return [dict(r._mapping) for r in rows]

    def start_version(self, project: int, name: str, app_version: int, labels: int, strategy: str) -> None:
        """Record that the push of ``name`` starts (nothing when it was started before)."""
        with db.write(self.engine) as conn:
            exists = conn.execute(
                select(versions.c.name).where(versions.c.project == project, versions.c.name == name)
            ).first()
            if exists is None:
                conn.execute(
                    versions.insert().values(
                        project=project,
                        name=name,
                        app_version=app_version,
                        labels=labels,
                        strategy=strategy,
                        started_at=time.time(),
                        removed=False,
                    )
                )

    def finish_version(self, project: int, name: str) -> None:
        """Record that every task got its prediction of ``name``."""
        with db.write(self.engine) as conn:
            count = len(
                conn.execute(select(pushed.c.task).where(pushed.c.project == project, pushed.c.name == name)).all()
            )
            conn.execute(
                update(versions)
                .where(versions.c.project == project, versions.c.name == name)
                .values(finished_at=time.time(), tasks=count)
            )

    def mark_removed(self, project: int, name: str) -> None:
        """Record that the predictions of ``name`` were deleted in Label Studio."""
        with db.write(self.engine) as conn:
            conn.execute(
                update(versions).where(versions.c.project == project, versions.c.name == name).values(removed=True)
            )
            conn.execute(delete(pushed).where(pushed.c.project == project, pushed.c.name == name))

    def pushed_tasks(self, project: int, name: str) -> tuple[set[int], set[int]]:
        """Return the tasks whose prediction of ``name`` Label Studio confirmed, and those on their way."""
        with db.read(self.engine) as conn:
            rows = conn.execute(
                select(pushed.c.task, pushed.c.done).where(pushed.c.project == project, pushed.c.name == name)
            ).all()
        return {int(t) for t, d in rows if d}, {int(t) for t, d in rows if not d}

    def sending(self, project: int, name: str, task_ids: list[int]) -> None:
        """Record that the predictions of ``name`` for ``task_ids`` are being sent."""
        with db.write(self.engine) as conn:
            conn.execute(
                delete(pushed).where(pushed.c.project == project, pushed.c.name == name, pushed.c.task.in_(task_ids))
            )
            conn.execute(
                pushed.insert(), [{"project": project, "name": name, "task": t, "done": False} for t in task_ids]
            )

    def sent(self, project: int, name: str, task_ids: list[int]) -> None:
        """Record that Label Studio holds the predictions of ``name`` for ``task_ids``."""
        with db.write(self.engine) as conn:
            conn.execute(
                update(pushed)
                .where(pushed.c.project == project, pushed.c.name == name, pushed.c.task.in_(task_ids))
                .values(done=True)
            )

    def unsent(self, project: int, name: str, task_ids: list[int]) -> None:
        """Forget the sending of ``task_ids`` (Label Studio does not hold them: they go again)."""
        with db.write(self.engine) as conn:
            conn.execute(
                delete(pushed).where(pushed.c.project == project, pushed.c.name == name, pushed.c.task.in_(task_ids))
            )
