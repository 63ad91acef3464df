"""The ML backend's pieces without a real Label Studio: label configs, scores and boxes, resumable pushes, the HTTP
protocol's answers to bad input, and ``saal label-studio``'s one-line errors at start."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from saal.app.db import default_url
from saal.labelstudio import labelconfig
from saal.labelstudio.backend import Backend
from saal.labelstudio.client import LabelStudio, LabelStudioError
from saal.labelstudio.labelconfig import UnsupportedConfig, parse
from saal.labelstudio.mirror import Options
from saal.labelstudio.predictions import (
    BadAnnotation,
    annotation_boxes,
    annotation_choice,
    box_result,
    order_scores,
)
from saal.labelstudio.push import PRUNE_STEP, Pruner, Ranking, push
from saal.labelstudio.server import create_app
from saal.labelstudio.store import Store

CHOICES = (
    '<View><Image name="img" value="$photo"/><Choices name="cls" toName="img">'
    '<Choice value="cat"/><Choice value="dog"/></Choices></View>'
)
BOXES = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">'
    '<Label value="RBC"/><Label value="WBC"/></RectangleLabels></View>'
)


# -- label configs -------------------------------------------------------------------------------------------
def test_a_choices_config_gives_its_names_and_classes():
    config = parse(CHOICES)
    assert (config.kind, config.from_name, config.to_name, config.data_key) == ("choices", "cls", "img", "photo")
    assert config.classes == ("cat", "dog")
    assert parse(BOXES).kind == "rectanglelabels" and parse(BOXES).classes == ("RBC", "WBC")


@pytest.mark.parametrize(
    ("xml", "named"),
    [
        (
            '<View><Image name="i" value="$i"/><PolygonLabels name="p" toName="i"><Label value="a"/>'
            "</PolygonLabels></View>",
            "<PolygonLabels>",
        ),
        (
            '<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/>'
            "</Choices></View>",
            "<Text>",
        ),
        (CHOICES.replace("<Choices ", '<Choices choice="multiple" '), "multiple"),
        (
            CHOICES.replace(
                "</View>", '<Choices name="x" toName="img"><Choice value="a"/><Choice value="b"/></Choices></View>'
            ),
            "<Choices>",
        ),
        ("<View><Image", "not XML"),
        ("", "no label config"),
    ],
)
def test_a_config_saal_cannot_serve_is_one_line_naming_the_supported_tags(xml, named):
    with pytest.raises(UnsupportedConfig) as caught:
        parse(xml)
    message = str(caught.value)
    assert named in message and "\n" not in message
    assert "<Choices>" in message or "classes" in message


def test_class_names_saal_cannot_keep_are_refused():
    with pytest.raises(UnsupportedConfig, match="a/b"):
        parse(CHOICES.replace('value="cat"', 'value="a/b"'))
    with pytest.raises(UnsupportedConfig, match="named twice"):
        parse(CHOICES.replace('value="dog"', 'value="cat"'))
    assert "RectangleLabels" in labelconfig.SUPPORTED


# -- scores, boxes and annotations ------------------------------------------------------------------------
def test_scores_rise_along_saals_order_so_an_ascending_sort_is_that_order():
    scores = order_scores([7, 3, 9, 1])
    assert sorted(scores, key=scores.get) == [7, 3, 9, 1]
    assert all(0 < s < 1 for s in scores.values())


def test_boxes_go_to_percent_and_back_to_pixels():
    config = parse(BOXES)
    result = box_result(config, [[10, 20, 60, 40], [-5, 0, 5, 500]], ["RBC", "WBC"], [0.9, 0.7], (200, 100))
    first = result[0]["value"]
    assert (first["x"], first["y"], first["width"], first["height"]) == (5.0, 20.0, 25.0, 20.0)
    assert first["rectanglelabels"] == ["RBC"] and result[0]["original_width"] == 200
    assert result[1]["value"]["height"] == 100.0  # clipped to the image
    back = annotation_boxes(config, result, (200, 100))
    assert back["boxes"][0] == pytest.approx([10, 20, 60, 40]) and back["labels"] == [1, 2]


def test_an_annotation_of_another_class_is_a_clear_error():
    config = parse(CHOICES)
    result = [{"type": "choices", "from_name": "cls", "value": {"choices": ["dog"]}}]
    assert annotation_choice(config, result) == "dog"
    assert annotation_choice(config, []) is None
    with pytest.raises(BadAnnotation, match="'bird' is not one of"):
        annotation_choice(config, [{"type": "choices", "from_name": "cls", "value": {"choices": ["bird"]}}])


# -- resumable pushes ---------------------------------------------------------------------------------------
class FakeLabelStudio:
    """What a push asks of Label Studio, in memory; ``fail_after`` batches, it dies after keeping the batch."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.kept: list[tuple[int, str]] = []
        self.version: str | None = None
        self.fail_after = fail_after
        self.calls = 0

    def import_predictions(self, project: int, predictions: list[dict[str, Any]]) -> int:
        self.calls += 1
        self.kept += [(p["task"], p["model_version"]) for p in predictions]
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # stands for a SIGKILL after Label Studio kept the batch
        return len(predictions)

    def predicted_tasks(self, project: int, name: str) -> set[int]:
        return {t for t, v in self.kept if v == name}

    def set_model_version(self, project: int, name: str) -> None:
        self.version = name


def test_a_push_killed_after_a_batch_resumes_and_sends_each_prediction_once(tmp_path):
    store = Store(default_url(str(tmp_path / "store.db")))
    tasks = list(range(100, 130))
    scores = order_scores(tasks)
    ranking = Ranking("saal-v1", 1, 6, "saal", {t: {"result": [], "score": scores[t]} for t in tasks}, tasks)
    dying = FakeLabelStudio(fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        push(dying, store, 1, ranking, print, batch=10)  # type: ignore[arg-type]
    assert len(dying.kept) == 20 and dying.version is None
    fresh = Store(default_url(str(tmp_path / "store.db")))  # a restarted backend
    dying.fail_after = None
    sent = push(dying, fresh, 1, ranking, print, batch=10)  # type: ignore[arg-type]
    assert sent == 10 and sorted(t for t, _ in dying.kept) == tasks  # every task once
    assert dying.version == "saal-v1" and fresh.version(1, "saal-v1")["finished_at"] is not None


class PredictionsLabelStudio:
    """Predictions by id, deleted one at a time (what :class:`Pruner` asks)."""

    def __init__(self, versions: dict[str, int]) -> None:
        self.rows = {i: v for i, v in enumerate(v for v, n in versions.items() for _ in range(n))}
        self.deletes = 0

    def prediction_ids(self, project: int, names: set[str]) -> list[int]:
        return [i for i, v in self.rows.items() if v in names]

    def delete_prediction(self, prediction: int) -> None:
        self.deletes += 1
        self.rows.pop(prediction, None)


def test_old_versions_are_deleted_a_few_predictions_at_a_time(tmp_path):
    store = Store(default_url(str(tmp_path / "store.db")))
    names = ["saal-cold-e0", "saal-v1", "saal-v2", "saal-v3"]
    for name in names:
        store.start_version(1, name, 0, 0, "saal")
        store.finish_version(1, name)
    ls = PredictionsLabelStudio({name: 120 for name in names})
    pruner = Pruner(ls, store, 1, 2, print)  # type: ignore[arg-type]
    steps = 0
    while pruner.step():
        steps += 1
        assert ls.deletes <= steps * PRUNE_STEP  # never more than a step's worth at once
    assert sorted(set(ls.rows.values())) == ["saal-v2", "saal-v3"]
    assert [v["removed"] for v in store.versions(1)] == [True, True, False, False]
    assert not pruner.step()  # nothing left: no request


# -- the HTTP protocol --------------------------------------------------------------------------------------
class NoLabelStudio:
    """A Label Studio with no tasks (the mirrors find nothing to read)."""

    url = "http://ls.invalid"

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return []

    def ml_backends(self, project: int) -> list[dict[str, Any]]:
        return []


@pytest.fixture
def client(tmp_path):
    store = Store(default_url(str(tmp_path / "store.db")))
    backend = Backend(tmp_path, NoLabelStudio(), store, Options(model_job=False), lambda m: None)  # type: ignore[arg-type]
    with TestClient(create_app(backend, basic_auth=("ls", "secret"))) as c:
        c.auth = ("ls", "secret")
        yield c
    backend.stop()


def test_health_says_up_and_basic_auth_is_required(client):
    assert client.get("/health").json()["status"] == "UP"
    assert client.get("/health", auth=("ls", "wrong")).status_code == 401


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/webhook", b"{not json", 400, "not JSON"),
        ("/webhook", b"[1, 2]", 400, "not an object"),
        ("/webhook", b"", 400, "empty"),
        ("/webhook", b'{"project": {"id": 3}}', 400, "no 'action'"),
        ("/setup", b'{"project": "3.17", "schema": "<View/>"}', 400, "<RectangleLabels>"),
        ("/setup", b'{"schema": "<View/>"}', 400, "names no Label Studio project"),
        ("/predict", b'{"tasks": 5}', 400, "needs {'tasks'"),
        ("/predict", b'{"tasks": [{"id": 1}], "project": "9.1"}', 400, "not connected"),
    ],
)
def test_bad_requests_are_a_4xx_with_one_line(client, path, body, status, says):
    answer = client.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status
    error = answer.json()["error"]
    assert says in error and "\n" not in error and "Traceback" not in error


def test_setup_predict_and_webhooks_of_a_connected_project(client):
    assert client.post("/setup", json={"project": "4.17", "schema": CHOICES}).json() == {"model_version": "saal-v0"}
    results = client.post("/predict", json={"project": "4.17", "tasks": [{"id": 1}, {"id": 2}]}).json()["results"]
    assert [r["model_version"] for r in results] == ["saal-v0", "saal-v0"]
    ignored = client.post("/webhook", json={"action": "LABEL_LINK_CREATED", "project": {"id": 4}})
    assert ignored.status_code == 201 and ignored.json()["status"] == "ignored"
    changed = CHOICES.replace('value="dog"', 'value="bird"')
    refused = client.post("/setup", json={"project": "4.17", "schema": changed})
    assert refused.status_code == 409 and "cat,dog -> choices cat,bird" in refused.json()["error"]
    bad = {"action": "ANNOTATION_CREATED", "project": {"id": 4}, "annotation": {"id": 1, "task": 5, "result": 3}}
    assert client.post("/webhook", json=bad).status_code == 201  # a task not read yet: queued
    assert client.get("/versions", params={"project": "4.17"}).json() == {"versions": []}


# -- saal label-studio at start -----------------------------------------------------------------------------
class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"detail": "Invalid token."}')

    def log_message(self, *args: Any) -> None:
        pass


def _saal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saal", "label-studio", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_start_fails_in_one_line_when_label_studio_is_unreachable_or_refuses_the_token(tmp_path):
    done = _saal("--label-studio-url", "http://127.0.0.1:9", "--label-studio-token", "x" * 20, "--dir", str(tmp_path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "cannot reach Label Studio at http://127.0.0.1:9" in done.stderr
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        done = _saal("--label-studio-url", url, "--label-studio-token", "wrong-token", "--dir", str(tmp_path))
    finally:
        server.shutdown()
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "refused the token (401 Invalid token.)" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--host", "0.0.0.0"), "give --basic-auth USER:PASS"),
        (("--basic-auth", "nopass"), "USER:PASS"),
        (("--retrain-every", "0"), "--retrain-every must be at least 1"),
        (("--strategy", "nonsense"), "nonsense"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(tmp_path, args, says):
    done = _saal("--label-studio-token", "t" * 20, "--dir", str(tmp_path), *args)
    assert done.returncode == 2 and says in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_missing_token_names_the_option():
    with pytest.raises(LabelStudioError):
        LabelStudio("http://127.0.0.1:9", "token").check()
    done = _saal("--dir", str(Path("/nonexistent")))
    assert done.returncode == 2 and "--label-studio-token" in done.stderr
