"""Run the ``saal`` command in this process: ``saal("run", "--help")`` gives the exit code and what it printed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from saal.cli import main


@dataclass
class Result:
    """What one ``saal`` command did: its exit code and what it wrote to stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def saal(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Return a function that runs ``saal ARGS...`` in-process (``saal.cli.main``) and returns its :class:`Result`."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
