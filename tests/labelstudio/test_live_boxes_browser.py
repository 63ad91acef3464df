"""``saal label-studio`` against a real Label Studio, for a ``<RectangleLabels>`` project (the detection task:
fcos-lite0 and det-saal), and in a real browser (Debian's Chromium driven by Playwright): the pre-labels render in
Label Studio's labelling page, for boxes and for classes, and the Data Manager sorted by prediction score lists the
tasks in saal's order (its screenshot is written to ``$SAAL_LS_SCREENSHOTS``, default a temporary folder)."""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.labelstudio]
RETRAIN_EVERY = 4
BOX_STRATEGY = "det-saal[score_threshold=0.3]"


def rectangles(boxes: list, side: int = 96) -> list[dict]:
    return [
        {
            "from_name": "box",
            "to_name": "image",
            "type": "rectanglelabels",
            "original_width": side,
            "original_height": side,
            "value": {
                "x": 100 * x1 / side,
                "y": 100 * y1 / side,
                "width": 100 * (x2 - x1) / side,
                "height": 100 * (y2 - y1) / side,
                "rotation": 0,
                "rectanglelabels": [cls],
            },
        }
        for cls, (x1, y1, x2, y2) in boxes
    ]


def choice(cls: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [cls]}}]


def prediction(ls, task: int, version: str) -> dict:
    return next(p for p in ls.api("GET", f"/api/tasks/{task}")["predictions"] if p["model_version"] == version)


@pytest.fixture(scope="module")
def projects(label_studio, ls_helpers, tmp_path_factory):
    """A box project of 16 JPEGs and a class project of 16, both connected to one backend retraining every 4
    annotations; 4 of each annotated, so both have a trained version (saal-v1)."""
    ls = label_studio
    boxes = ls_helpers.make_box_jpegs(16)
    pb = ls.create_project("saal boxes", ls_helpers.BOXES_CONFIG, [(n, d) for n, d, _ in boxes])
    truth = {}
    for task in ls.tasks(pb):
        name = task["data"]["image"].rsplit("-", 1)[-1]
        truth[int(task["id"])] = next(b for n, _, b in boxes if n == name)
    images = ls_helpers.make_jpegs(16, seed=3)
    pc = ls.create_project("saal classes 2", ls_helpers.CHOICES_CONFIG, [(n, d) for n, d, _ in images])
    args = ["--connect", str(pb), "--connect", str(pc), "--retrain-every", str(RETRAIN_EVERY), "--image-size", "32"]
    folder = tmp_path_factory.mktemp("backend-boxes")
    backend = ls_helpers.start_backend(ls, folder, *args, "--box-strategy", BOX_STRATEGY)
    cold = {p: ls.wait_version(p, set()) for p in (pb, pc)}
    for task in ls.tasks(pb, "tasks:predictions_score")[:RETRAIN_EVERY]:
        ls.annotate(int(task["id"]), rectangles(truth[int(task["id"])]))
    for task in ls.tasks(pc, "tasks:predictions_score")[:RETRAIN_EVERY]:
        ls.annotate(int(task["id"]), choice("red" if "_red" in task["data"]["image"] else "blue"))
    state = SimpleNamespace(ls=ls, boxes=pb, classes=pc, truth=truth, backend=backend, folder=folder, cold=cold)
    yield state
    ls_helpers.stop(backend.process)
    print(backend.output())


def test_boxes_are_predicted_in_percent_and_sorted_in_det_saal_order(projects, ls_helpers):
    ls, pid = projects.ls, projects.boxes
    assert projects.cold[pid].startswith("saal-cold-")
    version = ls.wait_version(pid, {projects.cold[pid]})
    assert version == "saal-v1"
    count = lambda: ls.api("GET", f"/api/projects/{pid}/model-versions/").get(version) == 16  # noqa: E731
    assert ls_helpers.wait_for(count, what="every task predicted")
    ordered = [t for t in ls.tasks(pid, "tasks:predictions_score") if not t["is_labeled"]]
    db = projects.folder / f"project-{pid}" / ".saal-label" / "labels.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT path FROM items WHERE state != 1 ORDER BY state, priority DESC, id").fetchall()
        kind = conn.execute("SELECT kind, model FROM models WHERE version = 1").fetchone()
    assert [int(t["id"]) for t in ordered] == [int(Path(p).stem.split("-")[1]) for (p,) in rows]
    assert kind == (BOX_STRATEGY, "fcos-lite0")
    found = [prediction(ls, int(t["id"]), version)["result"] for t in ordered]
    regions = [r for result in found for r in result]
    assert regions, "no pseudo box above the threshold on any image"
    for region in regions:
        value = region["value"]
        assert region["type"] == "rectanglelabels" and value["rectanglelabels"][0] in ("cell", "blob")
        assert 0 <= value["x"] <= 100 and 0 < value["width"] <= 100 and region["original_width"] == 96
        assert value["x"] + value["width"] <= 100.001 and value["y"] + value["height"] <= 100.001


def test_changed_classes_are_refused_in_one_line_and_keep_the_model(projects):
    config = projects.ls.api("GET", f"/api/projects/{projects.boxes}")["label_config"]
    changed = config.replace('<Label value="blob"/>', '<Label value="blob"/><Label value="spot"/>')
    answer = httpx.post(f"{projects.backend.url}/setup", json={"project": f"{projects.boxes}.1", "schema": changed})
    assert answer.status_code == 409
    error = answer.json()["error"]
    assert "cell,blob -> rectanglelabels cell,blob,spot" in error and "\n" not in error
    assert projects.backend.project(projects.boxes)["model_version"] == "saal-v1"


@pytest.fixture(scope="module")
def page(projects, ls_helpers, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 820})
    page.goto(f"{projects.ls.url}/user/login/")
    page.fill("#email", ls_helpers.LS_USER)
    page.fill("#password", ls_helpers.LS_PASSWORD)
    with page.expect_navigation():
        page.click("button.login-button")
    yield page
    page.close()


def test_box_prelabels_render_in_the_labelling_page(projects, page):
    ls, pid = projects.ls, projects.boxes
    version = ls.wait_version(pid, {projects.cold[pid]})
    ordered = [t for t in ls.tasks(pid, "tasks:predictions_score") if not t["is_labeled"]]
    task = next(int(t["id"]) for t in ordered if prediction(ls, int(t["id"]), version)["result"])
    expected = sorted(r["value"]["rectanglelabels"][0] for r in prediction(ls, task, version)["result"])
    page.goto(f"{ls.url}/projects/{pid}/data?task={task}")
    items = page.locator(".lsf-outliner-item__title")
    items.first.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    shown = sorted(items.all_inner_texts())  # the regions panel renders the rows in view (about 6)
    assert len(shown) >= min(len(expected), 5)
    assert not Counter(shown) - Counter(expected)  # every region shown is one of saal's boxes


def test_class_prelabels_render_in_the_labelling_page(projects, page):
    ls, pid = projects.ls, projects.classes
    version = ls.wait_version(pid, {projects.cold[pid]})
    task = next(int(t["id"]) for t in ls.tasks(pid, "tasks:predictions_score") if not t["is_labeled"])
    predicted = prediction(ls, task, version)["result"][0]["value"]["choices"][0]
    page.goto(f"{ls.url}/projects/{pid}/data?task={task}")
    box = page.locator(f"input.ant-checkbox-input[name={predicted}]")
    box.wait_for(state="attached", timeout=60_000)
    assert box.is_checked()
    other = "blue" if predicted == "red" else "red"
    assert not page.locator(f"input.ant-checkbox-input[name={other}]").is_checked()


def test_the_data_manager_sorted_by_prediction_score_is_saals_order(projects, page):
    ls, pid = projects.ls, projects.classes
    ls.wait_version(pid, {projects.cold[pid]})
    hidden = ["tasks:inner_id", "tasks:annotators", "tasks:annotations_results", "tasks:annotations_ids"]
    hidden += ["tasks:predictions_model_versions", "tasks:file_upload", "tasks:storage_filename", "tasks:created_at"]
    hidden += ["tasks:updated_at", "tasks:updated_by", "tasks:avg_lead_time", "tasks:draft_exists"]
    data = {
        "title": "saal order",
        "ordering": ["tasks:predictions_score"],
        "hiddenColumns": {"explore": hidden, "labeling": hidden},
    }
    view = ls.api("POST", "/api/dm/views/", json={"project": pid, "data": data})
    page.goto(f"{ls.url}/projects/{pid}/data?tab={view['id']}")
    rows = page.locator(".lsf-table__row-wrapper")
    rows.first.wait_for(timeout=60_000)
    page.wait_for_timeout(2000)  # the thumbnails
    shown = [rows.nth(i).inner_text().split()[0] for i in range(5)]
    assert shown == [str(t["id"]) for t in ls.tasks(pid, "tasks:predictions_score")][:5]
    db = projects.folder / f"project-{pid}" / ".saal-label" / "labels.db"
    with sqlite3.connect(db) as conn:
        rows_db = conn.execute("SELECT path FROM items WHERE state != 1 ORDER BY state, priority DESC, id").fetchall()
    assert shown == [Path(p).stem.split("-")[1] for (p,) in rows_db][:5]  # saal's own top 5
    out = Path(os.environ.get("SAAL_LS_SCREENSHOTS") or projects.folder)
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / "label-studio-data-manager.png"))
