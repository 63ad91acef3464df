"""Folder locks: one holder at a time, released when the holder ends, even by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from saal.experiment.folder_lock import LOCK_FILE, folder_lock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

HOLD = """
import sys, time
from saal.experiment.folder_lock import folder_lock
with folder_lock(sys.argv[1]) as held:
    print("held" if held else "free", flush=True)
    time.sleep(120)
"""


def test_a_held_folder_is_refused_until_released(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "run"
    with folder_lock(folder) as first:
        assert first and (folder / LOCK_FILE).is_file()  # the folder is created
        with folder_lock(folder, wait=False) as second:
            assert second is False
    with folder_lock(folder, wait=False) as again:
        assert again is True


@pytest.mark.slow
def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with folder_lock(tmp_path, wait=False) as held:
            assert held is False
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    with folder_lock(tmp_path, wait=False) as held:
        assert held is True
