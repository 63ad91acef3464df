"""Progress of long loops (scans, greedy selections, feature caching) on stderr.

One setting, for the whole process, says how :class:`Progress` shows itself:

* ``"auto"``: a tqdm bar when stderr is a terminal, else a plain line every ``interval_s`` seconds
  (what ``saal score`` and ``saal run`` use, see :func:`with_progress`);
* ``"tty"`` (the default for library use): a tqdm bar when stderr is a terminal, else nothing, so that
  scripts, tests and the labelling app's jobs stay silent;
* ``"bar"``, ``"lines"``: always that form; ``"off"``: nothing (``--quiet``).

Only the main process (rank 0 under ``torch.distributed``) shows progress. A bar appears after a
short delay and a line only once ``interval_s`` has passed, so quick loops show nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from saal.core.distributed import is_main_process
from saal.errors import SaalError

MODES = ("auto", "tty", "bar", "lines", "off")
# Seconds between two progress lines when stderr is not a terminal.
LINE_INTERVAL_S = 5.0
# Seconds before a bar appears (a loop finished sooner shows none).
BAR_DELAY_S = 1.0


@dataclass
class ProgressSettings:
    """How :class:`Progress` shows itself: one of :data:`MODES`, and the seconds between lines."""

    mode: str = "tty"
    interval_s: float = LINE_INTERVAL_S


_SETTINGS = ProgressSettings()


def progress_mode() -> ProgressSettings:
    """Return the settings in force (a copy)."""
    return ProgressSettings(_SETTINGS.mode, _SETTINGS.interval_s)


@contextlib.contextmanager
def progress_settings(mode: str, interval_s: float = LINE_INTERVAL_S) -> Iterator[None]:
    """Show progress as ``mode`` (one of :data:`MODES`) inside the block, then as before.

    Raises:
        SaalError: an unknown ``mode`` or a negative ``interval_s``.
    """
    if mode not in MODES:
        raise SaalError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not interval_s >= 0:
        raise SaalError(f"progress interval must be >= 0 seconds, got {interval_s}")
    before = progress_mode()
    _SETTINGS.mode, _SETTINGS.interval_s = mode, float(interval_s)
    try:
        yield
    finally:
        _SETTINGS.mode, _SETTINGS.interval_s = before.mode, before.interval_s


def with_progress(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a ``saal`` subcommand so that it shows progress (``"auto"``), or none with ``args.quiet``.

    Returns:
        The wrapped command, returning what ``command`` returns.
    """

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        with progress_settings("off" if getattr(args, "quiet", False) else "auto", LINE_INTERVAL_S):
            return command(args)

    return run


def _form(stream: TextIO) -> str:
    """Return how to show progress now on ``stream``: ``"bar"``, ``"lines"`` or ``"off"``."""
    mode = _SETTINGS.mode
    if mode == "off" or not is_main_process():
        return "off"
    if mode in ("auto", "tty"):
        isatty = getattr(stream, "isatty", None)
        if isatty is not None and isatty():
            return "bar"
        return "lines" if mode == "auto" else "off"
    return mode


class Progress:
    """The progress of one loop over ``total`` units; a context manager. ``update(n)`` after each step.

    Shown on ``sys.stderr`` (as it is when the loop starts) according to :func:`progress_settings`.
    """

    def __init__(self, total: int, desc: str, unit: str = "item") -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = 0
        self.stream: TextIO = sys.stderr
        self.form = _form(self.stream) if self.total > 0 else "off"
        self.interval_s = _SETTINGS.interval_s
        self.start = self.last = time.monotonic()
        self.lines = 0
        self.bar: Any = None
        if self.form == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                desc=desc,
                unit=unit,
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
                delay=BAR_DELAY_S,
            )

    def update(self, n: int) -> None:
        """Count ``n`` more units done; draw the bar, or write a line when ``interval_s`` has passed."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.form == "lines":
            now = time.monotonic()
            if now - self.last >= self.interval_s:
                self.last = now
                self._line(now)

    def _line(self, now: float, end: str = "") -> None:
        share = 100 * self.done / self.total
        text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({share:.0f}%), {now - self.start:.0f} s{end}"
        print(text, file=self.stream, flush=True)
        self.lines += 1

    def close(self) -> None:
        """Remove the bar; after progress lines, write a last one saying the loop is over."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.form == "lines" and self.lines and self.done >= self.total:
            self._line(time.monotonic(), ", done")
        self.form = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
