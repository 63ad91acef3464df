"""Shared helpers of the ``saal label`` tests: generated image folders and real servers in subprocesses."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

CLASSES = ("red", "blue")


def make_images(folder: Path, n: int, size: int = 32, seed: int = 0) -> dict[str, str]:
    """Write ``n`` PNGs into ``folder`` (some in a subfolder): red- or blue-dominant noise with a random square.

    Returns:
        ``{relative path: true class}``.
    """
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        cls = i % 2
        image = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
        image[..., 0 if cls == 0 else 2] += np.uint8(120 + rng.integers(0, 40))
        y, x = rng.integers(0, size // 2, 2)
        image[y : y + size // 3, x : x + size // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
        name = f"img{i:03d}.png" if i % 5 else f"sub/img{i:03d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name)
        truth[name] = CLASSES[cls]
    return truth


@dataclass
class Server:
    """A ``saal label`` server running in its own process."""

    process: subprocess.Popen[str]
    url: str
    folder: Path
    output: list[str] = field(default_factory=list)

    def client(self, name: str | None = None) -> httpx.Client:
        """Return an HTTP client, signed in as ``name`` when given."""
        base, _, query = self.url.partition("?")
        headers = {"accept": "application/json"}
        if query.startswith("token="):
            headers["authorization"] = f"Bearer {query[6:]}"
        client = httpx.Client(base_url=base.rstrip("/"), timeout=30, headers=headers)
        if name is not None:
            assert client.post("/login", data={"name": name}).status_code == 303
        return client

    def db(self) -> sqlite3.Connection:
        """Return a read connection to the project's SQLite database."""
        return sqlite3.connect(self.folder / ".saal-label" / "labels.db", timeout=30)

    def status(self) -> dict:
        """Return ``/api/status``."""
        with self.client() as c:
            return c.get("/api/status").json()

    def wait(self, predicate, timeout: float = 30.0, what: str = "condition") -> dict:
        """Poll ``/api/status`` until ``predicate(status)``; return that status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last status {status}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the server and wait for it to end."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(20)


def start_server(folder: Path, *args: str, timeout: float = 60.0) -> Server:
    """Start ``saal label FOLDER --port 0 ARGS`` and return it once it prints its address.

    Raises:
        AssertionError: it exits or prints no address within ``timeout``.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "saal", "label", str(folder), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"open (http://\S+)", line)
        if found:
            return Server(process, found.group(1), folder, lines)
    process.kill()
    raise AssertionError("saal label did not start: " + "".join(lines) + (process.stdout.read() or ""))


@pytest.fixture(scope="session")
def app_helpers() -> SimpleNamespace:
    """The helpers above (conftest modules are not imported by name)."""
    return SimpleNamespace(make_images=make_images, start_server=start_server, CLASSES=CLASSES)


@pytest.fixture
def image_folder(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A fresh folder of 40 generated 32x32 images and their true classes."""
    folder = tmp_path / "photos"
    yield folder, make_images(folder, 40)
