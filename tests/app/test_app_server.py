"""A real ``saal label`` server in its own process: many annotators at once, SIGKILL, access and forgery."""

from __future__ import annotations

import http.client
import signal
import threading
import time
from contextlib import closing
from urllib.parse import urlsplit

import pytest

TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def busy(tmp_path_factory, app_helpers):
    """A server (with an access token, without the model job) on 340 small images."""
    folder = tmp_path_factory.mktemp("busy") / "photos"
    app_helpers.make_images(folder, 340, size=16)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing after")  # listed, never offered
    server = app_helpers.start_server(folder, "--classes", "red,blue", "--no-model", "--token", TOKEN)
    yield server
    server.kill()


def authed(server, name):
    assert server.url.endswith(f"?token={TOKEN}")
    return server.client(name)


@pytest.mark.slow
def test_hundreds_of_labels_from_several_threads_are_all_recorded_once(busy):
    threads, per_thread = 4, 60
    confirmed: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def annotate(t: int) -> None:
        with closing(authed(busy, f"worker{t}")) as client:
            for i in range(per_thread):
                got = client.get("/api/next").json()
                item, csrf = got["item"], got["csrf"]
                body = {"item_id": item["id"], "label": "red" if i % 2 else "blue", "request_id": f"w{t}-{i}"}
                response = client.post("/api/label", json=body, headers={"x-csrf-token": csrf})
                if response.status_code != 200 or response.json()["repeated"]:
                    errors.append(response.text)
                    continue
                with lock:
                    confirmed[body["request_id"]] = item["id"]
                if i % 8 == 0:  # the same request again (a retry, a double click): recorded once
                    again = client.post("/api/label", json=body, headers={"x-csrf-token": csrf})
                    if again.json()["repeated"] is not True:
                        errors.append(f"a repeated request was recorded again: {again.text}")

    workers = [threading.Thread(target=annotate, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    with busy.db() as conn:
        rows = conn.execute("SELECT request_id, item_id, annotator, label FROM events").fetchall()
        labelled = conn.execute("SELECT count(*) FROM items WHERE state = 1").fetchone()[0]
    assert len(rows) == threads * per_thread == len(confirmed)
    assert {r[0]: r[1] for r in rows} == confirmed  # every confirmed label, once, on the image it was given for
    assert len({r[1] for r in rows}) == len(rows)  # claims gave every annotator different images
    assert labelled == len(rows)
    status = busy.status()
    assert status["labelled"] == len(rows) and sum(status["per_class"].values()) == len(rows)


def raw_get(server, path: str, host: str | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host or parts.netloc)
    for key, value in {"Authorization": f"Bearer {TOKEN}", **(headers or {})}.items():
        conn.putheader(key, value)
    conn.endheaders()
    response = conn.getresponse()
    return response.status, response.read()


@pytest.mark.slow
def test_unreadable_images_are_listed_and_never_offered(busy):
    with closing(authed(busy, "lister")) as client:
        assert client.get("/api/status").json()["unreadable"] == 1
        page = client.get("/unreadable", headers={"accept": "text/html"}).text
        assert "broken.png" in page
        assert "1 unreadable" in client.get("/", headers={"accept": "text/html"}).text
    with busy.db() as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM events e JOIN items i ON i.id = e.item_id WHERE NOT i.readable"
            ).fetchone()[0]
            == 0
        )


@pytest.mark.slow
def test_images_are_served_only_from_inside_the_project(busy):
    assert raw_get(busy, "/image/img001.png")[0] == 200
    (busy.folder.parent / "outside.png").write_bytes((busy.folder / "img001.png").read_bytes())
    for path in (
        "/image/../outside.png",
        "/image/..%2Foutside.png",
        "/image/%2e%2e/%2e%2e/etc/passwd",
        "/image//etc/passwd",
        "/image/%2Fetc%2Fpasswd",
        f"/image/{busy.folder.parent / 'outside.png'}",
        "/image/sub/../../outside.png",
        "/image/.saal-label/secret",
        "/image/.saal-label/labels.db",
    ):
        status, body = raw_get(busy, path)
        assert status in (400, 404), (path, status)
        assert b"PNG" not in body and b"root:" not in body


@pytest.mark.slow
def test_every_request_needs_the_token_and_forged_posts_are_refused(busy):
    with closing(busy.client()) as anonymous:
        anonymous.headers.pop("authorization")
        assert anonymous.get("/api/status").status_code == 401
        assert "access token" in anonymous.get("/").text
        first = anonymous.get(f"/labelled?token={TOKEN}")
        assert first.status_code == 303 and first.headers["location"] == "/labelled"
        assert anonymous.get("/api/status").status_code == 200  # the cookie set by ?token= now carries it
    client = authed(busy, "ana")
    item = client.get("/api/next").json()["item"]
    no_csrf = client.post("/label", data={"item_id": item["id"], "label": "red"})
    assert no_csrf.status_code == 403 and "stale or came from another site" in no_csrf.text
    csrf = client.get("/api/next").json()["csrf"]
    form = {"item_id": item["id"], "label": "red", "csrf": csrf}
    evil = client.post("/label", data=form, headers={"origin": "http://evil.example"})
    assert evil.status_code == 403
    cross = client.post("/label", data=form, headers={"sec-fetch-site": "cross-site"})
    assert cross.status_code == 403
    assert client.get("/label").status_code == 405  # changes are POSTs only
    assert raw_get(busy, "/api/status", host="evil.example:80")[0] == 400  # DNS rebinding
    ok = client.post("/label", data=form)
    assert ok.status_code == 303
    unknown = client.post("/label", data={**form, "label": "green"})
    assert unknown.status_code == 400 and "'green' is not a class" in unknown.text
    bad = client.post("/label", data={**form, "item_id": "seven"})
    assert bad.status_code == 400 and bad.text.startswith("item_id:") and "\n" not in bad.text
    assert client.get("/items/99999").status_code == 404
    assert client.get("/no-such-page").text == "Not Found"


def test_only_loopback_addresses_go_without_a_token():
    from saal.app.security import host_allowed, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    assert host_allowed("127.0.0.1:8765") and host_allowed("[::1]:80") and not host_allowed("evil.example:8765")


@pytest.mark.slow
def test_a_second_server_on_the_same_project_is_one_line(busy, capsys):
    from saal.cli import main

    before = (busy.folder / ".saal-label" / "project.json").read_text()
    assert main(["label", str(busy.folder), "--port", "0", "--no-model", "--strategy", "entropy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another saal label server is running on this project" in err
    assert busy.url.split("?")[0] in err
    assert (busy.folder / ".saal-label" / "project.json").read_text() == before  # nothing written


@pytest.fixture
def doomed(tmp_path, app_helpers):
    """A server of its own (with a token, without the model job) on 150 small images, for a test that kills it;
    5 labels are already recorded."""
    folder = tmp_path / "photos"
    app_helpers.make_images(folder, 150, size=16)
    server = app_helpers.start_server(folder, "--classes", "red,blue", "--no-model", "--token", TOKEN)
    try:
        with closing(server.client("first")) as client:
            for i in range(5):
                got = client.get("/api/next").json()
                body = {"item_id": got["item"]["id"], "label": "blue", "request_id": f"first-{i}"}
                assert client.post("/api/label", json=body, headers={"x-csrf-token": got["csrf"]}).status_code == 200
        yield server
    finally:
        server.kill()


@pytest.mark.slow
def test_a_server_killed_with_sigkill_restarts_with_every_confirmed_label(doomed, app_helpers):
    """Kills its own server (not the module's shared one) in the middle of a stream of labels."""
    busy = doomed
    with busy.db() as conn:
        already = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    assert already == 5
    confirmed: dict[str, int] = {}
    stop = threading.Event()

    def annotate(t: int) -> None:
        try:
            with closing(busy.client(f"k{t}")) as client:
                i = 0
                while not stop.is_set():
                    got = client.get("/api/next").json()
                    body = {"item_id": got["item"]["id"], "label": "red", "request_id": f"k{t}-{i}"}
                    if client.post("/api/label", json=body, headers={"x-csrf-token": got["csrf"]}).status_code == 200:
                        confirmed[body["request_id"]] = body["item_id"]
                    i += 1
        except Exception:  # the server died mid-request: that label was never confirmed
            return

    workers = [threading.Thread(target=annotate, args=(t,)) for t in range(3)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 20
    while len(confirmed) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    busy.kill(signal.SIGKILL)  # in the middle of the stream of labels
    stop.set()
    for w in workers:
        w.join()
    assert len(confirmed) >= 30
    again = app_helpers.start_server(busy.folder, "--no-model", "--token", TOKEN)
    try:
        with again.db() as conn:
            rows = dict(conn.execute("SELECT request_id, item_id FROM events").fetchall())
        assert all(rows.get(r) == i for r, i in confirmed.items())
        assert len(rows) >= already + len(confirmed)
        assert again.status()["labelled"] == len(rows)
    finally:
        again.kill()
