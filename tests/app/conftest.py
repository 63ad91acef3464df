"""Shared helpers of the ``saal label`` tests: generated image folders, real servers in subprocesses, and a
throwaway PostgreSQL cluster (Debian's server binaries, started for the test session, removed after it)."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
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


PG_HINT = "install them (Debian/Ubuntu: apt-get install postgresql; CI does) or point SAAL_TEST_PG_BIN at their folder"


def postgres_bin() -> Path:
    """Return the folder of PostgreSQL's ``initdb`` and ``pg_ctl``: ``$SAAL_TEST_PG_BIN``, the newest
    ``/usr/lib/postgresql/*/bin`` (Debian), or ``PATH``.

    Fails the test (never skips it) when there is none: the PostgreSQL tests are part of the suite.
    """
    given = os.environ.get("SAAL_TEST_PG_BIN")
    candidates = [Path(given)] if given else []
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(debian, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    on_path = shutil.which("initdb")
    candidates += [Path(on_path).parent] if on_path else []
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {PG_HINT}", pytrace=False)


@dataclass
class PostgresCluster:
    """A PostgreSQL cluster listening only on a unix socket in its own temporary folder."""

    socket_dir: Path
    port: int
    version: str
    counter: itertools.count = field(default_factory=itertools.count)

    def url(self, database: str) -> str:
        """Return the plain ``postgresql://`` URL of ``database`` (saal maps it to psycopg 3)."""
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def new_database(self) -> str:
        """Create an empty database and return its URL."""
        from sqlalchemy import create_engine, text

        name = f"saal_test_{next(self.counter)}"
        engine = create_engine(self.url("postgres").replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f"CREATE DATABASE {name}"))
        finally:
            engine.dispose()
        return self.url(name)


def _as_postgres(folder: Path) -> list[str]:
    """Return the command prefix that runs PostgreSQL's binaries as a non-root user (the server refuses root)."""
    if os.geteuid() != 0:
        return []
    import pwd

    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(f"running as root, PostgreSQL needs a 'postgres' user to run as: {PG_HINT}", pytrace=False)
    if shutil.which("runuser") is None:
        pytest.fail("running as root, the PostgreSQL tests need runuser (util-linux) to start it", pytrace=False)
    os.chown(folder, user.pw_uid, user.pw_gid)
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster for the session (initdb + pg_ctl in a temporary folder, unix socket only)."""
    binaries = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="saal-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    prefix, data, port = _as_postgres(root), root / "data", 5432

    def run(*args: str) -> str:
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(args[:2])} failed: {done.stdout}{done.stderr}", pytrace=False)
        return done.stdout

    version = run(str(binaries / "pg_ctl"), "--version").strip()
    run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    with open(data / "postgresql.conf", "a") as conf:  # a unix socket in the private folder: no port clash
        conf.write(
            f"listen_addresses = ''\nunix_socket_directories = '{root}'\nport = {port}\nmax_connections = 200\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )
    run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "start")
    try:
        yield PostgresCluster(root, port, version)
    finally:
        subprocess.run(
            [*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], check=False
        )
        shutil.rmtree(root, ignore_errors=True)
