"""Label integrity through the web pages (the app in this process), on SQLite and on a real PostgreSQL.

A form sent again with another answer, a form about an image someone changed since it was shown and an undo of an
image someone relabelled since are 409 pages that say who did what; a database held locked by another program is a
503 with ``Retry-After`` within seconds, never a 500 after a minute.
"""

from __future__ import annotations

import re
import sqlite3
import time

import pytest
from fastapi.testclient import TestClient

from saal.app import db, labels
from saal.app.project import open_project
from saal.app.server import create_app

HTML = {"accept": "text/html"}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def project(request, image_folder):
    """A project on 40 images whose labels are in SQLite (its own file) or in a fresh PostgreSQL database."""
    folder, _ = image_folder
    url = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None
    opened = open_project(folder, classes=["red", "blue"], url=url)
    yield opened
    opened.engine.dispose()


def signed_in(project, name: str) -> TestClient:
    client = TestClient(create_app(project), base_url="http://127.0.0.1")
    assert client.post("/login", data={"name": name}, follow_redirects=False).status_code == 303
    return client


def form(page: str, action: str) -> dict[str, str]:
    """Return the hidden fields of the first form posting to ``action`` on ``page``."""
    body = re.search(rf'<form[^>]*action="{re.escape(action)}"[^>]*>(.*?)</form>', page, re.S)
    assert body is not None, f"no form for {action}"
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', body.group(1)))


def post(client: TestClient, action: str, fields: dict[str, str], **extra: str):
    return client.post(action, data={**fields, **extra}, headers=HTML, follow_redirects=False)


def test_the_back_button_then_another_class_is_a_409_not_a_silent_drop(project):
    with signed_in(project, "ana") as ana:
        fields = form(ana.get("/", headers=HTML).text, "/label")
        assert fields["version"] == "0"
        assert post(ana, "/label", fields, label="red").status_code == 303
        assert post(ana, "/label", fields, label="red").status_code == 303  # a double click: recorded once
        back = post(ana, "/label", fields, label="blue")  # Back, then the other class: the same form nonce
        assert back.status_code == 409
        assert "this form was already sent (label red of" in back.text
        assert f'href="/items/{fields["item_id"]}"' in back.text and 'href="/"' in back.text
    item_id = int(fields["item_id"])
    assert labels.item(project.engine, item_id)["label"] == "red" and len(labels.history(project.engine, item_id)) == 1


def test_a_stale_form_is_a_409_that_says_who_labelled_it_what(project):
    with signed_in(project, "ana") as ana, signed_in(project, "bo") as bo:
        fields = form(ana.get("/", headers=HTML).text, "/label")  # ana is shown an image ...
        item_id = fields["item_id"]
        fix = form(bo.get(f"/items/{item_id}", headers=HTML).text, "/label")  # ... that bo labels from its page
        assert post(bo, "/label", fix, label="blue").status_code == 303
        stale = post(ana, "/label", fields, label="red")
        assert stale.status_code == 409
        assert re.search(r"changed after your page was shown: it is labelled blue by bo at [\d:]+ UTC", stale.text)
        assert f'href="/items/{item_id}"' in stale.text
        again = form(ana.get(f"/items/{item_id}", headers=HTML).text, "/label")  # the link: now it shows bo's
        assert post(ana, "/label", again, label="red").status_code == 303
        listed = form(bo.get("/labelled", headers=HTML).text, "/label")  # the "fix" form of the newest label
        assert listed["item_id"] == item_id
        now = form(ana.get(f"/items/{item_id}", headers=HTML).text, "/label")
        assert post(ana, "/label", now, label="blue").status_code == 303  # ana changes it meanwhile
        assert post(bo, "/label", listed, label="red").status_code == 409  # bo's fix from the older list
        api = bo.get("/api/next").json()
        body = {"item_id": api["item"]["id"], "label": "red", "version": api["item"]["version"] + 999}
        refused = bo.post("/api/label", json=body, headers={"x-csrf-token": api["csrf"]})
        assert refused.status_code == 409 and "changed after your page was shown" in refused.text
    row = labels.item(project.engine, int(item_id))
    assert (row["label"], row["annotator"]) == ("blue", "ana") and len(
        labels.history(project.engine, int(item_id))
    ) == 3


def test_an_undo_of_an_image_someone_relabelled_since_is_a_409(project):
    with signed_in(project, "ana") as ana, signed_in(project, "bo") as bo:
        page = ana.get("/", headers=HTML).text
        fields = form(page, "/label")
        assert post(ana, "/label", fields, label="red").status_code == 303
        fix = form(bo.get(f"/items/{fields['item_id']}", headers=HTML).text, "/label")
        assert post(bo, "/label", fix, label="blue").status_code == 303
        undo = post(ana, "/undo", form(ana.get("/", headers=HTML).text, "/undo"))
        assert undo.status_code == 409 and "it is labelled blue by bo" in undo.text and "not undone" in undo.text
    row = labels.item(project.engine, int(fields["item_id"]))
    assert (row["label"], row["annotator"]) == ("blue", "bo")


def hold_lock(project, item_id: int):
    """Hold what another program writing to the database would: SQLite's write lock (``BEGIN IMMEDIATE`` from its
    own connection), or on PostgreSQL the item's row lock; return a function that lets go."""
    if project.engine.dialect.name == "sqlite":
        other = sqlite3.connect(project.state_dir / "labels.db", timeout=1, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        return lambda: (other.rollback(), other.close())
    conn = project.engine.connect()
    transaction = conn.begin()
    conn.execute(db.select(db.items.c.id).where(db.items.c.id == item_id).with_for_update())
    return lambda: (transaction.rollback(), conn.close())


def timed(call):
    start = time.monotonic()
    response = call()
    return response, time.monotonic() - start


def test_a_held_write_lock_is_a_503_with_retry_after_within_seconds(project):
    with signed_in(project, "ana") as ana:
        fields = form(ana.get("/", headers=HTML).text, "/label")
        release = hold_lock(project, int(fields["item_id"]))
        try:
            page, page_seconds = timed(lambda: ana.get("/", headers=HTML))  # every page load claims (a write)
            posted, post_seconds = timed(lambda: post(ana, "/label", fields, label="red"))
        finally:
            release()
        for response in (page, posted):
            assert response.status_code == 503 and response.headers["retry-after"] == str(db.RETRY_AFTER)
            assert "the database is busy" in response.text and "\n" not in response.text.strip()
        assert page_seconds < 4 and post_seconds < 8, (page_seconds, post_seconds)
        assert post(ana, "/label", fields, label="red").status_code == 303  # once free, the same form goes through
        assert ana.get("/", headers=HTML).status_code == 200
