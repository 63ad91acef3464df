"""``saal label`` robustness and security (issue 17 point 2): odd file names, links, bad requests, the token file,
failed imports and exports; each test fails without its fix."""

from __future__ import annotations

import csv
import http.client
import json
import os
import signal
import sqlite3
import stat
from contextlib import closing
from urllib.parse import urlsplit

import pytest

from saal.app import labels
from saal.app.project import NOT_UTF8, STATE_DIR, ServerLock, open_project
from saal.cli import main

TOKEN = "robust-token-1"
NAMES = ("Łukasz", "张三", "Αλέξανδρος", "José")


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["label", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(code: int, err: str, needed: str) -> None:
    assert code == 2 and err.count("\n") == 1 and needed in err and "Traceback" not in err, err


def ids(project) -> dict[str, int]:
    with project.engine.connect() as conn:
        return {str(p): int(i) for p, i in conn.exec_driver_sql("SELECT path, id FROM items").fetchall()}


def client(project, token: str | None = None):
    from fastapi.testclient import TestClient

    from saal.app.server import create_app

    return TestClient(create_app(project, token=token), base_url="http://127.0.0.1:8765")


def sign_in(c, name: str) -> str:
    response = c.post("/login", data={"name": name}, follow_redirects=False)
    assert response.status_code == 303, response.text
    return c.get("/api/next").json()["csrf"]


# --- file names and links ------------------------------------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_listed_as_unreadable_and_the_rest_works(capsys, image_folder, tmp_path):
    folder, _ = image_folder
    bad = os.fsencode(folder) + b"/caf\xe9.png"
    try:
        with open(bad, "wb") as handle:
            handle.write((folder / "img001.png").read_bytes())
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    code, out, err = run(capsys, str(folder), "--classes", "red,blue", "--export", str(tmp_path / "l.csv"))
    assert code == 0 and err == "" and "wrote 0 labels" in out
    project = open_project(folder)
    with project.engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT id, readable, error FROM items WHERE path = 'caf\\xe9.png'").one()
    assert row[1] == 0 and row[2] == NOT_UTF8 and "rename it" in row[2]
    assert len(ids(project)) == 41  # the 40 others are images as before
    with client(project) as c:
        assert "caf\\xe9.png" in c.get("/unreadable").text
        assert "rename it" in c.get("/unreadable").text


def test_a_new_project_that_fails_half_way_leaves_nothing_behind(image_folder, monkeypatch):
    folder, _ = image_folder
    import saal.app.project as project_module

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(project_module, "sync_items", broken)
    with pytest.raises(RuntimeError):
        open_project(folder, classes=["red", "blue"])
    assert not (folder / STATE_DIR).exists()
    monkeypatch.undo()
    assert len(ids(open_project(folder, classes=["cat", "dog"]))) == 40  # the retry with other classes works


def test_a_link_to_an_image_outside_the_folder_is_served_labelled_and_exported(capsys, image_folder, tmp_path):
    folder, _ = image_folder
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((folder / "img001.png").read_bytes())
    (folder / "linked.png").symlink_to(outside)
    project = open_project(folder, classes=["red", "blue"])
    with client(project) as c:
        response = c.get("/image/linked.png")
        assert response.status_code == 200 and response.content == outside.read_bytes()
        assert c.get("/image/../elsewhere.png").status_code in (400, 404)  # still nothing else outside
    known = ids(project)
    for name in ("linked.png", "img001.png", "img002.png", "img003.png"):
        labels.record_label(project.engine, known[name], "red", project.classes, "ana")
    code, out, _ = run(capsys, str(folder), "--export", str(tmp_path / "tree"))
    assert code == 0 and "copied 4" in out
    assert (tmp_path / "tree" / "red" / "linked.png").read_bytes() == outside.read_bytes()

    outside.unlink()  # the link now leads nowhere: the export checks everything before it writes anything
    code, _, err = run(capsys, str(folder), "--export", str(tmp_path / "tree2"))
    one_line(code, err, "1 labelled images cannot be read (first: linked.png)")
    assert not (tmp_path / "tree2").exists() and [p.name for p in tmp_path.iterdir() if "tree2" in p.name] == []
    outside.write_bytes((folder / "img002.png").read_bytes())
    code, out, _ = run(capsys, str(folder), "--export", str(tmp_path / "tree2"))  # the retry is not refused
    assert code == 0 and "copied 4" in out


def test_a_copy_that_fails_half_way_leaves_no_export_folder(capsys, image_folder, tmp_path, monkeypatch):
    folder, _ = image_folder
    project = open_project(folder, classes=["red", "blue"])
    for item_id in range(5):
        labels.record_label(project.engine, item_id, "blue", project.classes, "ana")
    import shutil

    copied = []
    real = shutil.copy2

    def flaky(source, target):
        if len(copied) == 3:
            raise OSError(28, "No space left on device")
        copied.append(target)
        return real(source, target)

    monkeypatch.setattr(shutil, "copy2", flaky)
    code, _, err = run(capsys, str(folder), "--export", str(tmp_path / "tree"))
    one_line(code, err, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # neither the folder nor its temporary twin
    monkeypatch.undo()
    code, out, _ = run(capsys, str(folder), "--export", str(tmp_path / "tree"))
    assert code == 0 and "copied 5" in out


# --- the command line: imports and exports --------------------------------------------------------------------------


def test_a_failed_import_into_a_new_folder_leaves_no_project(capsys, image_folder, tmp_path):
    folder, _ = image_folder
    source = tmp_path / "old.csv"
    source.write_text("file,label\nimg001.png,cat\n")
    code, _, err = run(capsys, str(folder), "--classes", "red,blue", "--import", str(source))
    one_line(code, err, "'cat' is not a class")
    assert not (folder / STATE_DIR).exists()
    code, out, err = run(capsys, str(folder), "--classes", "cat,dog", "--import", str(source))  # the retry
    assert code == 0 and "imported 1 labels" in out, err


def test_a_malformed_import_csv_names_its_line(capsys, image_folder, tmp_path):
    folder, _ = image_folder
    open_project(folder, classes=["red", "blue"])
    source = tmp_path / "quoted.csv"
    source.write_text('file,label\nimg001.png,red\nimg002.png,blue\n"img003.png,red\nimg004.png,blue\n')
    code, _, err = run(capsys, str(folder), "--import", str(source))
    one_line(code, err, "is malformed at line 4")
    assert "is not an image" not in err
    source.write_bytes(b"file,label\nimg001.png,r\xe9d\n")
    code, _, err = run(capsys, str(folder), "--import", str(source))
    one_line(code, err, "is not UTF-8 text")
    source.write_text("\ufefffile,label,annotator\nimg001.png,red,Łukasz\n", encoding="utf-8")  # Excel's BOM
    code, out, _ = run(capsys, str(folder), "--import", str(source))
    assert code == 0 and "imported 1 labels" in out
    code, out, _ = run(capsys, str(folder), "--export", str(tmp_path / "out.csv"))
    assert code == 0 and "wrote 1 labels" in out
    assert next(csv.DictReader((tmp_path / "out.csv").open(encoding="utf-8")))["annotator"] == "Łukasz"


def test_export_paths_decide_by_suffix_and_unwritable_ones_are_one_line(capsys, image_folder, tmp_path):
    folder, _ = image_folder
    open_project(folder, classes=["red", "blue"])
    code, _, err = run(capsys, str(folder), "--export", "/proc/x/labels.csv")
    one_line(code, err, "cannot write --export /proc/x/labels.csv")
    code, _, err = run(capsys, str(folder), "--export", "/proc/x/tree")
    one_line(code, err, "cannot write --export /proc/x/tree")
    code, _, err = run(capsys, str(folder), "--export", str(tmp_path / "out.txt"))
    one_line(code, err, ".txt is neither .csv nor .json")
    assert not (tmp_path / "out.txt").exists()
    code, out, _ = run(capsys, str(folder), "--export", str(tmp_path / "tree.v2") + "/")  # a folder, said so
    assert code == 0 and "copied 0" in out and (tmp_path / "tree.v2").is_dir()
    code, out, _ = run(capsys, str(folder), "--export", str(tmp_path / "LABELS.JSON"))
    assert code == 0 and json.loads((tmp_path / "LABELS.JSON").read_text()) == []


# --- HTTP: bad input is 4xx, never 500; names in any script -----------------------------------------------------------


@pytest.fixture
def project(image_folder):
    folder, _ = image_folder
    return open_project(folder, classes=["red", "blue"])


def test_wrong_tokens_csrf_fields_and_cookies_with_any_characters_are_refused_not_500(project):
    with client(project, token=TOKEN) as c:
        assert c.get("/api/status", params={"token": "é"}).status_code == 401
        assert c.get("/api/status", headers={"authorization": "Bearer é".encode()}).status_code == 401
        assert c.get("/api/status", headers={"cookie": "saal_token=\u00e9t\u00e9".encode()}).status_code == 401
        c.headers["authorization"] = f"Bearer {TOKEN}"
        csrf = sign_in(c, "ana")
        form = {"item_id": "0", "label": "red"}
        refused = c.post("/label", data={**form, "csrf": "é" * 32})
        assert refused.status_code == 403 and "stale" in refused.text
        assert (
            c.post("/api/label", json={**form, "item_id": 0}, headers={"x-csrf-token": "ü".encode()}).status_code == 403
        )
        assert c.post("/label", data={**form, "csrf": csrf}, follow_redirects=False).status_code == 303
        c.cookies.clear()
        for cookie in ("saal_annotator=é|abc", "saal_annotator=%FF%FE|abc", "saal_annotator=Ł"):
            response = c.get("/api/next", headers={"cookie": cookie.encode()})
            assert response.status_code == 403 and "sign in first" in response.text


def test_huge_numbers_are_400_with_a_reason(project):
    with client(project) as c:
        csrf = sign_in(c, "ana")
        huge = str(10**30)
        for path, data in (
            ("/label", {"item_id": huge, "label": "red", "csrf": csrf}),
            ("/skip", {"item_id": huge, "csrf": csrf}),
            ("/label", {"item_id": "-" + huge, "label": "red", "csrf": csrf}),
        ):
            response = c.post(path, data=data)
            assert response.status_code == 400 and response.text.startswith("item_id:"), response.text
        body = {"item_id": 10**30, "label": "red"}
        for sent in (body, {**body, "item_id": 1e400}, {**body, "item_id": 0, "request_id": ["x"]}):
            response = c.post("/api/label", content=json.dumps(sent), headers={"x-csrf-token": csrf})
            assert response.status_code == 400 and "give a JSON body" in response.text
        assert c.get(f"/items/{huge}").status_code == 400
        response = c.get("/labelled", params={"page": 10**20})
        assert response.status_code == 400 and response.text.startswith("page:")
        assert c.get("/labelled", params={"page": 2}).status_code == 200


@pytest.mark.parametrize("name", NAMES)
def test_names_in_any_script_sign_in_label_and_are_shown_and_exported(project, name):
    with client(project) as c:
        csrf = sign_in(c, name)
        page = c.get("/", headers={"accept": "text/html"}).text
        assert f'<span id="annotator">{name}</span>' in page
        item = c.get("/api/next").json()["item"]["id"]
        done = c.post("/label", data={"item_id": item, "label": "blue", "csrf": csrf}, follow_redirects=False)
        assert done.status_code == 303
        history = c.get(f"/items/{item}", headers={"accept": "text/html"}).text
        assert f"labelled <b>blue</b> by {name}" in history and "when (UTC)" in history
        rows = list(csv.DictReader(c.get("/export.csv").text.splitlines()))
        assert rows == [{"file": rows[0]["file"], "label": "blue", "annotator": name, "time": rows[0]["time"]}]
        assert json.loads(c.get("/export.json").text)[0]["annotator"] == name
        assert name in c.get("/labelled", params={"annotator": name}).text


def test_favicon_relative_unreadable_reasons_and_the_tenth_key(tmp_path, app_helpers):
    folder = tmp_path / "photos"
    app_helpers.make_images(folder, 12)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing after")
    classes = [f"c{i}" for i in range(1, 11)]
    project = open_project(folder, classes=classes)
    with client(project) as c:
        icon = c.get("/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
        assert 'rel="icon"' in c.get("/login").text
        page = c.get("/unreadable").text
        assert "broken.png" in page and str(folder) not in page
        sign_in(c, "ana")
        page = c.get("/", headers={"accept": "text/html"}).text
        assert 'data-key="0"' in page and "<kbd>0</kbd> c10" in page
        assert "<kbd>Backspace</kbd> undo" in page


# --- the token ------------------------------------------------------------------------------------------------------


def test_only_127_0_0_1_localhost_and_ipv6_loopback_go_without_a_token(capsys, image_folder):
    from saal.app.security import check_token, needs_token

    assert not needs_token("127.0.0.1") and not needs_token("localhost") and not needs_token("::1")
    assert needs_token("127.0.0.2") and needs_token("0.0.0.0") and needs_token("192.168.1.4")
    assert check_token("abc-DEF_1.2~") == "abc-DEF_1.2~"
    folder, _ = image_folder
    code, _, err = run(capsys, str(folder), "--classes", "red,blue", "--token", "é", "--port", "0")
    one_line(code, err, "--token must be")
    assert not (folder / STATE_DIR).exists()


def test_the_lock_file_is_private_from_the_start_and_removed_on_release(tmp_path, monkeypatch):
    created = []
    real_open = os.open

    def watch(path, flags, mode=0o777, *args, **kwargs):
        if str(path).endswith("server.lock"):
            created.append(mode)
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", watch)
    lock = ServerLock(tmp_path)
    lock.acquire("http://127.0.0.2:1/?token=secret")
    assert created == [0o600]  # created owner-only, not opened wider and narrowed afterwards
    assert stat.S_IMODE((tmp_path / "server.lock").stat().st_mode) == 0o600
    assert "token=secret" in (tmp_path / "server.lock").read_text()
    lock.release()
    assert not (tmp_path / "server.lock").exists()

    (tmp_path / "server.lock").write_text("left by an older saal")
    (tmp_path / "server.lock").chmod(0o644)
    lock.acquire("http://x/?token=t")
    assert stat.S_IMODE((tmp_path / "server.lock").stat().st_mode) == 0o600
    lock.release()


def raw(parts, conn: http.client.HTTPConnection, method: str, path: str, headers: dict, body: str = "") -> int:
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", parts.netloc)
    for key, value in headers.items():
        conn.putheader(key, value.encode() if isinstance(value, str) else value)
    if body:
        conn.putheader("Content-Type", "application/x-www-form-urlencoded")
        conn.putheader("Content-Length", str(len(body.encode())))
    conn.endheaders(body.encode() if body else None)
    response = conn.getresponse()
    response.read()
    return response.status


@pytest.mark.slow
def test_a_server_on_127_0_0_2_needs_its_token_keeps_its_connection_and_removes_its_lock(image_folder, app_helpers):
    folder, _ = image_folder
    server = app_helpers.start_server(folder, "--classes", "red,blue", "--no-model", "--host", "127.0.0.2")
    try:
        token = server.url.split("?token=")[1]
        lock = folder / STATE_DIR / "server.lock"
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600 and token in lock.read_text()
        parts = urlsplit(server.url)
        with closing(http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)) as conn:
            assert raw(parts, conn, "GET", "/api/status", {}) == 401
            assert raw(parts, conn, "GET", "/api/status?token=%C3%A9", {}) == 401
            assert raw(parts, conn, "GET", "/api/status", {"Authorization": "Bearer é"}) == 401
            auth = {"Authorization": f"Bearer {token}"}
            assert raw(parts, conn, "POST", "/login", auth, "name=%C5%81ukasz") == 303
            cookie = {**auth, "Cookie": "saal_annotator=%C5%81ukasz|" + "0" * 32}  # a forged signature
            assert raw(parts, conn, "POST", "/label", cookie, "item_id=1&label=red&csrf=%C3%A9") == 403
            assert raw(parts, conn, "POST", "/label", auth, f"item_id={10**30}&label=red") == 400
            assert raw(parts, conn, "GET", f"/labelled?page={10**20}", auth) == 400
            assert raw(parts, conn, "GET", "/favicon.ico", auth) == 200  # the same connection, still open
    finally:
        server.kill(signal.SIGTERM)
    assert server.process.returncode == 0
    assert not (folder / STATE_DIR / "server.lock").exists()


@pytest.mark.slow
def test_a_server_stopped_with_ctrl_c_removes_its_lock(image_folder, app_helpers):
    folder, _ = image_folder
    server = app_helpers.start_server(folder, "--classes", "red,blue", "--no-model")
    assert "token" not in server.url  # 127.0.0.1 needs none
    assert (folder / STATE_DIR / "server.lock").exists()
    assert server.status()["total"] == 40  # serving (Ctrl-C before that is an interrupted start, exit 130)
    server.kill(signal.SIGINT)
    assert server.process.returncode == 0
    assert not (folder / STATE_DIR / "server.lock").exists()
    with sqlite3.connect(folder / STATE_DIR / "labels.db") as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 40
