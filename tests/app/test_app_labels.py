"""The label history, claims and exports, on a real SQLite database (no server)."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from pathlib import Path

import pytest

from saal.app import claims, db, exchange, labels
from saal.app.project import open_project
from saal.app.status import snapshot
from saal.errors import SaalError


@pytest.fixture
def project(image_folder):
    folder, _ = image_folder
    return open_project(folder, classes=["red", "blue"])


def event_rows(project) -> list[tuple]:
    with sqlite3.connect(project.state_dir / "labels.db") as conn:
        return conn.execute("SELECT id, item_id, kind, label, annotator, undoes FROM events ORDER BY id").fetchall()


def test_history_is_append_only_and_undo_restores_the_state_before(project):
    engine, classes = project.engine, project.classes
    labels.record_label(engine, 3, "red", classes, "ana")
    labels.record_label(engine, 3, "blue", classes, "bo")  # a relabel by someone else
    assert labels.item(engine, 3)["label"] == "blue"
    undone = labels.undo_last(engine, "bo", 60)
    assert undone.item_id == 3
    row = labels.item(engine, 3)
    assert (row["state"], row["label"], row["annotator"]) == (db.LABELLED, "red", "ana")
    labels.undo_last(engine, "ana", 60)
    row = labels.item(engine, 3)
    assert (row["state"], row["label"], row["claimed_by"]) == (db.UNLABELLED, None, "ana")
    kinds = [(r[2], r[3], r[4]) for r in event_rows(project)]
    assert kinds == [("label", "red", "ana"), ("label", "blue", "bo"), ("undo", None, "bo"), ("undo", None, "ana")]
    assert [e["kind"] for e in labels.history(engine, 3)] == ["label", "label", "undo", "undo"]
    with pytest.raises(labels.NotFound, match="nothing to undo"):
        labels.undo_last(engine, "ana", 60)


def test_undo_refuses_when_someone_changed_the_image_since(project):
    engine, classes = project.engine, project.classes
    labels.record_label(engine, 1, "red", classes, "ana")
    labels.record_label(engine, 1, "blue", classes, "bo")
    with pytest.raises(labels.Conflict, match="changed by bo"):
        labels.undo_last(engine, "ana", 60)
    assert labels.item(engine, 1)["label"] == "blue"


def test_a_repeated_request_is_recorded_once_and_bad_labels_are_refused(project):
    engine, classes = project.engine, project.classes
    first = labels.record_label(engine, 2, "red", classes, "ana", "req-1")
    again = labels.record_label(engine, 2, "blue", classes, "ana", "req-1")
    assert again.repeated and again.event_id == first.event_id
    assert labels.item(engine, 2)["label"] == "red"
    with pytest.raises(SaalError, match="'green' is not a class"):
        labels.record_label(engine, 2, "green", classes, "ana")
    with pytest.raises(labels.NotFound):
        labels.record_label(engine, 999, "red", classes, "ana")
    assert len(event_rows(project)) == 1


def test_claims_give_each_annotator_a_different_image_and_expire(project):
    engine = project.engine
    now = time.time()
    a = claims.claim_next(engine, "ana", 30, now)
    b = claims.claim_next(engine, "bo", 30, now)
    assert a is not None and b is not None and a.id != b.id
    assert claims.claim_next(engine, "ana", 30, now + 1).id == a.id  # ana keeps hers
    c = claims.claim_next(engine, "cy", 30, now + 31)  # both claims expired: cy gets the best one again
    assert c is not None and c.id in (a.id, b.id)


def test_skipped_images_come_back_after_the_others(project):
    engine, classes = project.engine, project.classes
    first = claims.claim_next(engine, "ana", 60)
    assert first is not None
    labels.record_skip(engine, first.id, "ana")
    seen = []
    while (item := claims.claim_next(engine, "ana", 60)) is not None and item.id != first.id:
        seen.append(item.id)
        labels.record_label(engine, item.id, "red", classes, "ana")
    assert item is not None and item.id == first.id and item.state == db.SKIPPED
    assert len(seen) == snapshot(engine, classes).total - 1
    with pytest.raises(labels.Conflict, match="labelled already"):
        labels.record_skip(engine, seen[0], "ana")


def test_exports_stream_every_labelled_image_and_import_is_all_or_nothing(project, tmp_path, monkeypatch):
    engine, classes = project.engine, project.classes
    monkeypatch.setattr(exchange, "PAGE", 7)  # several pages
    for i in range(20):
        labels.record_label(engine, i, classes[i % 2], classes, "ana")
    chunks = list(exchange.csv_chunks(engine))
    assert len(chunks) > 2
    rows = list(csv.DictReader(io.StringIO("".join(chunks))))
    assert len(rows) == 20 and set(rows[0]) == {"file", "label", "annotator", "time"}
    assert json.loads("".join(exchange.json_chunks(engine))) == rows

    source = tmp_path / "old.csv"
    source.write_text("file,label\nimg021.png,blue\nimg022.png,purple\n")
    with pytest.raises(SaalError, match="line 3: 'purple' is not a class"):
        exchange.import_csv(project, str(source))
    assert snapshot(engine, classes).labelled == 20
    there = f"{rows[0]['file']},{rows[0]['label']},"
    source.write_text(f"file,label,annotator\nimg021.png,blue,cy\n{there}\n../etc/passwd,red,\n")
    with pytest.raises(SaalError, match=r"line 4: '\.\./etc/passwd' is not an image"):
        exchange.import_csv(project, str(source))
    source.write_text(f"file,label,annotator\nimg021.png,blue,cy\n./{there}\n")
    assert "imported 1 labels" in exchange.import_csv(project, str(source))
    with db.read(engine) as conn:
        row = conn.execute(db.items.select().where(db.items.c.path == "img021.png")).first()
    assert (row.label, row.annotator) == ("blue", "cy")


def test_reopening_checks_classes_and_the_database_owner(image_folder, tmp_path):
    folder, _ = image_folder
    open_project(folder, classes=["red", "blue"])
    with pytest.raises(SaalError, match="was made for classes red,blue, not cat,dog"):
        open_project(folder, classes=["cat", "dog"])
    other = tmp_path / "other"
    from PIL import Image

    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "a.png")
    url = f"sqlite:///{folder / '.saal-label' / 'labels.db'}"
    with pytest.raises(SaalError, match="belongs to another project"):
        open_project(other, classes=["red", "blue"], url=url)
    assert not (other / ".saal-label" / "project.json").exists()
    assert open_project(folder).classes == ["red", "blue"]


def test_new_images_are_added_on_reopen_and_corrupt_ones_are_listed(image_folder):
    folder, _ = image_folder
    project = open_project(folder, classes=["red", "blue"])
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(folder / "zz-new.png")
    project = open_project(folder)
    status = snapshot(project.engine, project.classes)
    assert (status.total, status.unreadable) == (42, 1)
    with db.read(project.engine) as conn:
        row = conn.execute(db.items.select().where(db.items.c.path == "broken.png")).first()
    assert row is not None and not row.readable and row.error
    assert row.id == 40  # new images get the next ids (in path order); the first 40 keep theirs
    with pytest.raises(labels.Conflict, match="cannot be read"):
        labels.record_label(project.engine, int(row.id), "red", project.classes, "ana")


def test_images_outside_the_project_are_refused(project):
    for bad in ("../x.png", "/etc/passwd", "sub/../../x.png", ".saal-label/secret", "C:/x.png", ""):
        with pytest.raises(SaalError, match="not a path inside"):
            project.resolve_image(bad)
    assert project.resolve_image("sub/img000.png") == (Path(project.root) / "sub" / "img000.png").resolve()
