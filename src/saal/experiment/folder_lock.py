"""Advisory locks on run and experiment folders, so that several processes can share one output folder.

Two ``saal run`` commands given the same (or an overlapping) grid split the work between them: each
(strategy, seed) run is held by one process at a time, and a process that finds a run held by another
goes on to the next one. The lock is ``flock`` on a ``.lock`` file in the folder: the operating system
drops it when its process ends, even by SIGKILL, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are then not protected against a second process
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


@contextmanager
def folder_lock(folder: str | Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the ``with`` block.

    Args:
        folder: the folder to lock.
        wait: block until the lock is free; with False, give up at once.

    Yields:
        True while the lock is held; False (at once) when ``wait`` is False and another process, or
        another open of the same lock in this process, holds it. Always True where ``fcntl`` is missing.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield True
        return
    with open(folder / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
