"""Helpers of the ``saal label-studio`` tests: generated JPEGs, a fake Label Studio for unit tests, a real Label
Studio (the PyPI package in ``.venv-labelstudio``, SQLite) started once per session, and the backend in a
subprocess.

Tests marked ``labelstudio`` need the real one; they run only when selected (``-m labelstudio``:
``make test-labelstudio``, a step of ``.ci/run``), as its first start takes about a minute on 2 cores.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
LS_BIN = REPO / ".venv-labelstudio" / "bin" / "label-studio"
LS_USER, LS_PASSWORD, LS_TOKEN = "saal@example.com", "saal-test-pass", "saaltesttoken0123456789"
CLASSES = ("red", "blue")
CHOICES_CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
    '<Choice value="red"/><Choice value="blue"/></Choices></View>'
)
BOXES_CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">'
    '<Label value="cell"/><Label value="blob"/></RectangleLabels></View>'
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests that need a real Label Studio unless ``-m`` selects them."""
    if "labelstudio" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="needs a real Label Studio: make test-labelstudio (pytest -m labelstudio)")
    for item in items:
        if item.get_closest_marker("labelstudio") is not None:
            item.add_marker(skip)


def jpeg(array: np.ndarray, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_jpegs(n: int, size: int = 32, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """Return ``n`` small JPEGs ``(name, bytes, true class)``: red- or blue-dominant noise with a random square."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cls = i % 2
        image = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
        image[..., 0 if cls == 0 else 2] += np.uint8(120 + rng.integers(0, 40))
        y, x = rng.integers(0, size // 2, 2)
        image[y : y + size // 3, x : x + size // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
        out.append((f"img{i:03d}_{CLASSES[cls]}.jpg", jpeg(image), CLASSES[cls]))
    return out


def make_box_jpegs(n: int, size: int = 96, seed: int = 0) -> list[tuple[str, bytes, list[tuple[str, list[float]]]]]:
    """Return ``n`` JPEGs with 1-3 bright objects on a dark noisy field: ``(name, bytes, [(class, x1 y1 x2 y2)])``;
    a ``cell`` is a red square, a ``blob`` a green one."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.integers(0, 50, (size, size, 3), dtype=np.uint8)
        boxes = []
        for _ in range(int(rng.integers(1, 4))):
            side = int(rng.integers(size // 6, size // 3))
            x, y = (int(v) for v in rng.integers(0, size - side, 2))
            cls = "cell" if rng.random() < 0.5 else "blob"
            image[y : y + side, x : x + side, 0 if cls == "cell" else 1] = 230
            boxes.append((cls, [float(x), float(y), float(x + side), float(y + side)]))
        out.append((f"box{i:03d}.jpg", jpeg(image), boxes))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LabelStudioServer:
    """A real Label Studio in a subprocess, and what the tests do with it through its API."""

    url: str
    process: subprocess.Popen[bytes] | None
    version: str = ""
    log: Path | None = None

    @property
    def token(self) -> str:
        return LS_TOKEN

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Token {LS_TOKEN}"}, timeout=120)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        with self.client() as c:
            answer = c.request(method, path, **kwargs)
        assert answer.status_code < 300, f"{method} {path}: {answer.status_code} {answer.text[:500]}"
        return answer.json() if answer.content else None

    def create_project(self, title: str, config: str, images: list[tuple[str, bytes]]) -> int:
        """Create a project, upload ``images`` (one task each) and return its id."""
        project = self.api("POST", "/api/projects", json={"title": title, "label_config": config})
        for start in range(0, len(images), 100):  # Label Studio takes at most 100 files per request
            chunk = images[start : start + 100]
            files = {f"file{i}": (name, data, "image/jpeg") for i, (name, data) in enumerate(chunk)}
            self.api("POST", f"/api/projects/{project['id']}/import", files=files)
        return int(project["id"])

    def tasks(self, project: int, ordering: str | None = None) -> list[dict[str, Any]]:
        """Return the project's tasks as the Data Manager lists them (sorted by ``ordering``, e.g.
        ``tasks:predictions_score``)."""
        query = {"ordering": [ordering]} if ordering else {}
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            found = self.api(
                "GET",
                "/api/tasks",
                params={"project": project, "page": page, "page_size": 100, "query": json.dumps(query)},
            )
            out += found["tasks"]
            if len(out) >= found["total"]:
                return out
            page += 1

    def annotate(self, task: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        found: dict[str, Any] = self.api("POST", f"/api/tasks/{task}/annotations/", json={"result": result})
        return found

    def model_version(self, project: int) -> str:
        return str(self.api("GET", f"/api/projects/{project}")["model_version"] or "")

    def wait_version(self, project: int, other_than: set[str], timeout: float = 180.0, prefix: str = "saal-") -> str:
        """Wait until the project's model version is a saal version not in ``other_than``; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            version = self.model_version(project)
            if version.startswith(prefix) and version not in other_than:
                return version
            time.sleep(0.1)
        raise AssertionError(f"project {project} kept model version {self.model_version(project)!r}")


def start_label_studio(data_dir: Path, port: int, timeout: float = 240.0) -> LabelStudioServer:
    """Start ``label-studio start`` on ``port`` with its data in ``data_dir`` and wait until it answers."""
    if not LS_BIN.exists():
        pytest.fail(f"{LS_BIN} is missing: make labelstudio-env installs Label Studio there", pytrace=False)
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "LABEL_STUDIO_USERNAME": LS_USER,
        "LABEL_STUDIO_PASSWORD": LS_PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": LS_TOKEN,
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(data_dir / "local"),
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    log = data_dir / "label-studio.log"
    command = [str(LS_BIN), "start", "--no-browser", "--port", str(port), "--data-dir", str(data_dir)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--enable-legacy-api-token", "--internal-host", "127.0.0.1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = LabelStudioServer(f"http://127.0.0.1:{port}", process, log=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"label-studio exited with {process.returncode}: {log.read_text()[-3000:]}", pytrace=False)
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                server.version = str(server.api("GET", "/api/version").get("release", ""))
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(process)
    pytest.fail(f"label-studio did not answer within {timeout:.0f} s: {log.read_text()[-3000:]}", pytrace=False)


def stop(process: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    """End a process started in its own session, and its children."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(20)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A real Label Studio for the session (legacy token, local addresses allowed for the backend and webhooks)."""
    server = start_label_studio(tmp_path_factory.mktemp("label-studio"), free_port())
    yield server
    assert server.process is not None
    stop(server.process)


@dataclass
class Backend:
    """``saal label-studio`` in a subprocess."""

    process: subprocess.Popen[str]
    url: str
    folder: Path
    lines: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        found: dict[str, Any] = httpx.get(f"{self.url}/metrics", timeout=10).json()
        return found

    def project(self, project: int) -> dict[str, Any]:
        return next(p for p in self.metrics()["projects"] if p["project"] == project)

    def output(self) -> str:
        """Return what it printed so far (read by a thread: never blocks)."""
        return "".join(self.lines)


def start_backend(ls: LabelStudioServer, folder: Path, *args: str, timeout: float = 120.0) -> Backend:
    """Start ``saal label-studio --port 0 --dir FOLDER ARGS`` against ``ls``; return it once it serves."""
    import threading

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "saal", "label-studio", "--label-studio-url", ls.url]
    process = subprocess.Popen(
        [*command, "--label-studio-token", ls.token, "--port", "0", "--dir", str(folder), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: list[str] = []
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"serving (http://\S+)", line)
        if found:
            backend = Backend(process, found.group(1), folder, lines)
            threading.Thread(target=_read, args=(process.stdout, lines), daemon=True).start()
            return backend
    stop(process, signal.SIGKILL)
    raise AssertionError("saal label-studio did not start: " + "".join(lines))


def _read(stream: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def wait_for(predicate: Any, timeout: float = 120.0, what: str = "condition", every: float = 0.2) -> Any:
    """Poll ``predicate()`` until it returns something true; return it."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def ls_helpers() -> Any:
    """The helpers above (conftest modules are not imported by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        make_jpegs=make_jpegs,
        make_box_jpegs=make_box_jpegs,
        start_backend=start_backend,
        start_label_studio=start_label_studio,
        stop=stop,
        wait_for=wait_for,
        free_port=free_port,
        CHOICES_CONFIG=CHOICES_CONFIG,
        BOXES_CONFIG=BOXES_CONFIG,
        CLASSES=CLASSES,
        LS_USER=LS_USER,
        LS_PASSWORD=LS_PASSWORD,
    )
