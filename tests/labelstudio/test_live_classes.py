"""``saal label-studio`` against a real Label Studio, for a ``<Choices>`` project: connect, predictions in saal's
order, the live loop (annotations -> retrain -> new model version pushed), deletions, "Start Training", a SIGKILL and
restart, unreadable images and a label config saal cannot serve."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.labelstudio]
N_IMAGES = 36
RETRAIN_EVERY = 6
TOP = 10


def choice(cls: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [cls]}}]


def app_db(project) -> sqlite3.Connection:
    return sqlite3.connect(project.folder / f"project-{project.pid}" / ".saal-label" / "labels.db", timeout=30)


def saal_order(project) -> list[int]:
    """The unlabelled tasks in the order of the ranking in saal's own database (first = next to label)."""
    with app_db(project) as conn:
        rows = conn.execute(
            "SELECT path FROM items WHERE readable = 1 AND state != 1 ORDER BY state, priority DESC, id"
        ).fetchall()
    return [int(Path(p).stem.split("-")[1]) for (p,) in rows]


def sorted_by_score(project) -> list[dict]:
    """The tasks as the Data Manager lists them sorted by prediction score, ascending."""
    return project.ls.tasks(project.pid, "tasks:predictions_score")


def counts(project) -> dict[str, int]:
    return project.ls.api("GET", f"/api/projects/{project.pid}/model-versions/")


@pytest.fixture(scope="module")
def project(label_studio, ls_helpers, tmp_path_factory):
    """A project of 36 uploaded JPEGs, 2 in Label Studio's local storage, one whose image is missing and one that is
    not an image, connected to a backend retraining every 6 annotations."""
    ls = label_studio
    images = ls_helpers.make_jpegs(N_IMAGES)
    pid = ls.create_project("saal classes", ls_helpers.CHOICES_CONFIG, [(n, d) for n, d, _ in images])
    truth = {}
    for task in ls.tasks(pid):
        name = task["data"]["image"].rsplit("/", 1)[-1]
        truth[int(task["id"])] = "red" if "_red" in name else "blue"
    local = Path(ls.log).parent / "local" / "photos"
    local.mkdir(parents=True)
    for name, data, _ in ls_helpers.make_jpegs(2, seed=7):
        (local / name).write_bytes(data)
    storage = ls.api(
        "POST", "/api/storages/localfiles", json={"project": pid, "path": str(local), "use_blob_urls": True}
    )
    ls.api("POST", f"/api/storages/localfiles/{storage['id']}/sync")
    bad = [{"image": "/data/upload/999/missing.jpg"}, {"image": "https://saal.invalid/nowhere.jpg"}]
    ls.api("POST", f"/api/projects/{pid}/import", json=bad)
    for task in ls.tasks(pid):
        if "local-files" in task["data"]["image"]:
            truth[int(task["id"])] = "red" if "_red" in task["data"]["image"] else "blue"
    folder = tmp_path_factory.mktemp("backend")
    port = ls_helpers.free_port()  # fixed: the connection in Label Studio keeps the address across a restart
    args = ("--port", str(port), "--connect", str(pid), "--retrain-every", str(RETRAIN_EVERY), "--image-size", "32")
    backend = ls_helpers.start_backend(ls, folder, *args)
    state = SimpleNamespace(ls=ls, pid=pid, truth=truth, backend=backend, folder=folder, args=args, versions=[])
    yield state
    ls_helpers.stop(state.backend.process)
    print(state.backend.output())


def test_every_task_gets_a_prediction_and_the_score_sorts_in_saals_order(project, ls_helpers):
    ls, pid = project.ls, project.pid
    first = ls.wait_version(pid, set())
    assert first.startswith("saal-cold-"), first
    readable = len(project.truth)
    assert ls_helpers.wait_for(lambda: counts(project).get(first) == readable, what="every readable task predicted")
    tasks = sorted_by_score(project)
    scored = [t for t in tasks if t["predictions_score"] is not None]
    assert len(scored) == readable  # the two unreadable tasks get none
    ascending = [int(t["id"]) for t in scored]
    assert ascending[:TOP] == saal_order(project)[:TOP]
    assert project.backend.project(pid)["order"][:TOP] == ascending[:TOP]
    out = project.backend.output()
    assert out.count("its image cannot be read") == 2, out  # each reported once
    project.versions.append(first)


def test_annotations_retrain_and_push_a_new_version_that_reorders(project, ls_helpers):
    ls, pid = project.ls, project.pid
    before = [int(t["id"]) for t in sorted_by_score(project)][:TOP]
    picked = before[:RETRAIN_EVERY]
    for task in picked:
        ls.annotate(task, choice(project.truth[task]))
    annotated = time.monotonic()
    version = ls.wait_version(pid, set(project.versions))
    latency = time.monotonic() - annotated
    assert version == "saal-v1"
    assert ls_helpers.wait_for(lambda: counts(project).get(version) == len(project.truth), what="all predicted")
    after = sorted_by_score(project)
    order = [int(t["id"]) for t in after if t["predictions_score"] is not None]
    assert order[:TOP] == saal_order(project)[:TOP]
    assert set(picked) & set(order[:TOP]) == set()  # labelled tasks sort last (score 1)
    assert order[:TOP] != before[:TOP]
    task = ls.api("GET", f"/api/tasks/{order[0]}")
    prediction = next(p for p in task["predictions"] if p["model_version"] == version)
    assert prediction["result"][0]["value"]["choices"][0] in ("red", "blue")
    assert 0 < prediction["score"] < 1
    project.versions.append(version)
    print(f"Label Studio {ls.version}: annotation -> {version} in Label Studio in {latency:.2f} s")
    (project.folder / "latency.json").write_text(json.dumps({"version": ls.version, "seconds": latency}))


def test_update_and_delete_of_annotations_reach_saal(project, ls_helpers):
    ls, pid = project.ls, project.pid
    labelled = [t for t in ls.tasks(pid) if t["total_annotations"]]
    task = int(labelled[0]["id"])
    annotation = ls.api("GET", f"/api/tasks/{task}/annotations/")[0]
    other = "blue" if project.truth[task] == "red" else "red"
    ls.api("PATCH", f"/api/annotations/{annotation['id']}/", json={"result": choice(other)})

    def label():
        with app_db(project) as conn:
            return conn.execute(
                "SELECT state, label FROM items WHERE path LIKE ?", (f"images/task-{task}.%",)
            ).fetchone()

    assert ls_helpers.wait_for(lambda: label() == (1, other), what="the updated label in saal")
    ls.api("DELETE", f"/api/annotations/{annotation['id']}/")
    assert ls_helpers.wait_for(lambda: label()[0] == 0, what="the task unlabelled in saal")
    with app_db(project) as conn:  # the history keeps both labels and the undos
        kinds = [k for (k,) in conn.execute("SELECT kind FROM events WHERE annotator = ?", (f"ls-task-{task}",))]
    assert kinds.count("label") == 2 and kinds.count("undo") == 2


def test_start_training_retrains_at_once(project):
    ls, pid = project.ls, project.pid
    connection = ls.api("GET", "/api/ml/", params={"project": pid})[0]
    ls.api("POST", f"/api/ml/{connection['id']}/train")
    version = ls.wait_version(pid, set(project.versions))
    assert version == "saal-v2"
    project.versions.append(version)


def test_sigkill_and_restart_lose_no_version_and_push_nothing_twice(project, ls_helpers):
    ls, pid = project.ls, project.pid
    ls_helpers.wait_for(lambda: counts(project).get(project.versions[-1]) == len(project.truth), what="pushed")
    before = counts(project)
    with app_db(project) as conn:
        models = conn.execute("SELECT version FROM models ORDER BY version").fetchall()
    project.backend.process.send_signal(signal.SIGKILL)
    project.backend.process.wait(10)
    project.backend = ls_helpers.start_backend(ls, project.folder, *project.args)
    assert ls_helpers.wait_for(
        lambda: project.backend.project(pid)["model_version"] == project.versions[-1], what="the version resumed"
    )
    time.sleep(2)  # a push that was not needed would have happened by now
    assert counts(project) == before  # nothing pushed twice
    with app_db(project) as conn:
        assert conn.execute("SELECT version FROM models ORDER BY version").fetchall() == models
    unlabelled = [int(t["id"]) for t in sorted_by_score(project) if t["predictions_score"] is not None]
    for task in unlabelled[:RETRAIN_EVERY]:
        ls.annotate(task, choice(project.truth[task]))
    version = ls.wait_version(pid, set(project.versions))
    assert version == "saal-v3"
    assert ls_helpers.wait_for(lambda: counts(project).get(version) == len(project.truth), what="pushed once")
    assert not [v for v, n in counts(project).items() if n > len(project.truth)]
    kept = lambda: len([v for v in counts(project) if v.startswith("saal-")]) <= 3  # noqa: E731 - --keep-versions 3
    assert ls_helpers.wait_for(kept, what="the oldest version deleted")


def test_a_label_config_saal_cannot_serve_is_refused_in_one_line(project):
    ls = project.ls
    polygons = (
        '<View><Image name="image" value="$image"/><PolygonLabels name="p" toName="image">'
        '<Label value="a"/></PolygonLabels></View>'
    )
    other = ls.api("POST", "/api/projects", json={"title": "polygons", "label_config": polygons})
    answer = httpx.post(f"{project.backend.url}/setup", json={"project": f"{other['id']}.1", "schema": polygons})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert "<PolygonLabels>" in error and "<Choices>" in error and "<RectangleLabels>" in error
    assert "\n" not in error
    with ls.client() as c:  # Label Studio checks /setup before it keeps a connection: it refuses this one
        refused = c.post("/api/ml/", json={"url": project.backend.url, "project": other["id"], "title": "saal"})
        assert refused.status_code == 400, refused.text
        assert c.get("/api/ml/", params={"project": other["id"]}).json() == []
    assert "Traceback" not in project.backend.output()


def test_a_personal_access_token_reads_tasks_and_images(project):
    from saal.labelstudio.client import LabelStudio, LabelStudioError

    token = project.ls.api("POST", "/api/token/")["token"]  # a JWT refresh token, as Account & Settings makes
    client = LabelStudio(project.ls.url, token)
    assert client.check() == project.ls.version
    task = next(t for t in client.tasks(project.pid) if "/data/upload/" in t["data"]["image"])
    assert client.download(task["data"]["image"])[:2] == b"\xff\xd8"  # a JPEG, read with the access token
    with pytest.raises(LabelStudioError, match="refused"):
        LabelStudio(project.ls.url, "not-a-token").check()
