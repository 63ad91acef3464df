"""The label history, claims and exports (no server), on SQLite and on a real PostgreSQL (``postgres`` fixture)."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from pathlib import Path

import pytest

from saal.app import claims, db, exchange, labels
from saal.app.project import open_project
from saal.app.status import snapshot
from saal.errors import SaalError

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)]


@pytest.fixture(params=BACKENDS)
def project(request, image_folder):
    """A project on 40 images whose labels are in SQLite (its own file) or in a fresh PostgreSQL database."""
    folder, _ = image_folder
    url = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None
    opened = open_project(folder, classes=["red", "blue"], url=url)
    yield opened
    opened.engine.dispose()


def event_rows(project) -> list[tuple]:
    with db.read(project.engine) as conn:
        e = db.events
        rows = conn.execute(
            db.select(e.c.id, e.c.item_id, e.c.kind, e.c.label, e.c.annotator, e.c.undoes).order_by(e.c.id)
        )
        return [tuple(r) for r in rows]


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
    with pytest.raises(labels.Stale, match=r"it is labelled blue by bo at .*; it was not undone") as refused:
        labels.undo_last(engine, "ana", 60)
    assert refused.value.item_id == 1 and labels.item(engine, 1)["label"] == "blue"


def test_a_repeated_request_is_recorded_once_and_bad_labels_are_refused(project):
    engine, classes = project.engine, project.classes
    first = labels.record_label(engine, 2, "red", classes, "ana", "req-1")
    again = labels.record_label(engine, 2, "red", classes, "ana", "req-1")  # a double click, a retry
    assert again.repeated and again.event_id == first.event_id
    # the same form sent again with another answer (the Back button, then another class): refused, not dropped
    with pytest.raises(labels.Stale, match=r"already sent \(label red of \S+ by ana\)"):
        labels.record_label(engine, 2, "blue", classes, "ana", "req-1")
    with pytest.raises(labels.Stale, match="already sent"):  # the same nonce for another image
        labels.record_label(engine, 3, "red", classes, "ana", "req-1")
    assert labels.item(engine, 2)["label"] == "red"
    with pytest.raises(SaalError, match="'green' is not a class"):
        labels.record_label(engine, 2, "green", classes, "ana")
    with pytest.raises(labels.NotFound):
        labels.record_label(engine, 999, "red", classes, "ana")
    assert len(event_rows(project)) == 1


def test_a_stale_form_does_not_replace_a_newer_label(project):
    engine, classes = project.engine, project.classes
    shown = labels.item(engine, 4)["last_event"] or 0  # ana's page shows image 4, never labelled: version 0
    labels.record_label(engine, 4, "blue", classes, "bo", expected_event=0)  # bo labels it first
    stale = r"changed after your page was shown: it is labelled blue by bo at \d\d:\d\d:\d\d UTC; your red was not"
    with pytest.raises(labels.Stale, match=stale) as refused:
        labels.record_label(engine, 4, "red", classes, "ana", "req-a", expected_event=shown)
    assert refused.value.item_id == 4
    row = labels.item(engine, 4)
    assert (row["label"], row["annotator"]) == ("blue", "bo") and len(labels.history(engine, 4)) == 1
    labels.record_label(engine, 4, "red", classes, "ana", "req-b", expected_event=row["last_event"])  # seen: fine
    assert labels.item(engine, 4)["label"] == "red"
    labels.record_label(engine, 6, "red", classes, "bo")
    with pytest.raises(labels.Stale, match=r"it is labelled red by bo .*; your skip was not saved"):
        labels.record_skip(engine, 6, "ana", expected_event=0)
    labels.undo_last(engine, "bo", 60)  # an undo: "unlabelled since an undo by bo"
    labels.record_skip(engine, 6, "ana", expected_event=0)  # the page showed it unlabelled, as it is again
    labels.undo_last(engine, "ana", 60)
    with pytest.raises(labels.Stale, match="it is unlabelled since an undo by ana at"):
        labels.record_label(engine, 6, "red", classes, "bo", expected_event=labels.history(engine, 6)[-2]["id"])


def _while_another_transaction_changes(project, change, late) -> str:
    """Run ``late()`` in a thread while ``change(conn)`` holds its write transaction open for a second; return what
    ``late`` ended with ("saved", or the message of the :class:`labels.Stale` it raised)."""
    outcome: list[str] = []

    def run() -> None:
        try:
            late()
            outcome.append("saved")
        except labels.Stale as error:
            outcome.append(str(error))

    with db.write(project.engine) as conn:
        change(conn)
        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive(), "the second transaction did not wait for the first"
    thread.join(20)
    return outcome[0]


def test_a_label_waiting_for_the_item_sees_the_label_committed_before_it(project):
    """Two pages showed image 7 unlabelled; bo's label commits while ana's waits (SQLite's write lock, PostgreSQL's
    row lock): ana's gets a conflict, it never silently replaces bo's."""
    engine, classes = project.engine, project.classes
    outcome = _while_another_transaction_changes(
        project,
        lambda conn: labels._label_in(conn, 7, "blue", "bo", None, "label", time.time(), 0),
        lambda: labels.record_label(engine, 7, "red", classes, "ana", expected_event=0),
    )
    assert "it is labelled blue by bo" in outcome
    row = labels.item(engine, 7)
    assert (row["label"], row["annotator"]) == ("blue", "bo") and len(labels.history(engine, 7)) == 1


def test_an_undo_waiting_for_the_item_never_undoes_a_newer_label(project):
    engine, classes = project.engine, project.classes
    labels.record_label(engine, 8, "red", classes, "ana")
    outcome = _while_another_transaction_changes(
        project,
        lambda conn: labels._label_in(conn, 8, "blue", "bo", None, "label", time.time()),
        lambda: labels.undo_last(engine, "ana", 60),
    )
    assert "it is labelled blue by bo" in outcome and "not undone" in outcome
    row = labels.item(engine, 8)
    assert (row["state"], row["label"], row["annotator"]) == (db.LABELLED, "blue", "bo")


def test_concurrent_annotators_never_get_the_same_image(project):
    engine, classes = project.engine, project.classes
    names, rounds = [f"p{i}" for i in range(4)], 5
    barrier = threading.Barrier(len(names))
    labelled: dict[str, list[int]] = {}
    errors: list[str] = []

    def annotate(name: str) -> None:
        barrier.wait()
        for _ in range(rounds):
            try:
                item = claims.claim_next(engine, name, 60)
                assert item is not None and claims.claim_next(engine, name, 60).id == item.id  # renewed, kept
                labels.record_label(engine, item.id, "red", classes, name, expected_event=item.last_event or 0)
                labelled.setdefault(name, []).append(item.id)
            except Exception as error:  # a Stale here means two people were shown the same image
                errors.append(f"{name}: {error!r}")

    threads = [threading.Thread(target=annotate, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    ids = [i for got in labelled.values() for i in got]
    assert len(ids) == len(names) * rounds == len(set(ids)) == len(event_rows(project))


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
