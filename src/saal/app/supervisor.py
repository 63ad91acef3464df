"""Starts the model job process beside the server and restarts it when it stops, saying why on the page.

The job's output goes to ``FOLDER/.saal-label/job.log``. When the process ends while the server still runs, the
supervisor records ``job_error`` (how it ended and the last line it wrote, e.g. the exception of a traceback) and
starts it again after a pause that doubles with each crash in a row (1 s up to 60 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import Engine

from saal.app import db

MAX_PAUSE = 60.0


def _last_line(log: Path) -> str:
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - 4096))
            lines = [ln.strip() for ln in handle.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def describe_exit(code: int) -> str:
    """Return how a process with return code ``code`` ended, in words."""
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class JobSupervisor:
    """Runs ``python -m saal.app.model_job`` for one project and keeps it running.

    Args:
        engine: the project's database (for the job's state and errors).
        state_dir: the project's state folder.
        url: the database URL, handed to the job in its environment.
        module: the job's module, run as ``python -m MODULE --state-dir ... --parent PID`` (``saal label-studio``
            runs its box job this way).
    """

    def __init__(self, engine: Engine, state_dir: Path, url: str, module: str = "saal.app.model_job") -> None:
        self.engine, self.state_dir, self.url, self.module = engine, state_dir, url, module
        self.process: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="saal-model-job", daemon=True)
        self.restarts = 0
        self.started_at = 0.0

    def start(self) -> None:
        """Start the job and the thread that watches it."""
        with db.write(self.engine) as conn:
            for key in ("error", "restarts", "pid", "state", "message"):
                db.set_meta(conn, f"job_{key}", None)
            db.set_meta(conn, "job_state", "starting")
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        env = {**os.environ, "SAAL_LABEL_DB": self.url, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.started_at = time.time()
        log = open(self.state_dir / "job.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            cmd = [sys.executable, "-m", self.module, "--state-dir", str(self.state_dir)]
            self.process = subprocess.Popen(
                [*cmd, "--parent", str(os.getpid())], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        finally:
            log.close()

    def _watch(self) -> None:
        crashes_in_a_row = 0
        while not self._stop.is_set():
            process = self.process
            if process is None or process.poll() is None:
                self._stop.wait(0.5)
                continue
            if self._stop.is_set():
                break
            how = describe_exit(process.returncode)
            last = _last_line(self.state_dir / "job.log")
            self.restarts += 1
            crashes_in_a_row = crashes_in_a_row + 1 if time.time() - self.started_at < 60 else 1
            pause = min(MAX_PAUSE, 2.0 ** (crashes_in_a_row - 1))
            when = time.strftime("%H:%M:%S")
            message = (
                f"the model job {how} at {when}" + (f" ({last})" if last else "") + f"; restarting in {pause:.0f} s"
            )
            with db.write(self.engine) as conn:
                db.set_meta(conn, "job_error", message)
                db.set_meta(conn, "job_restarts", self.restarts)
                db.set_meta(conn, "job_state", "restarting")
            if self._stop.wait(pause):
                break
            self._spawn()

    def stop(self) -> None:
        """Stop the job (SIGTERM, then SIGKILL after 5 s) and the watching thread."""
        self._stop.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._thread.is_alive():
            self._thread.join(2)
