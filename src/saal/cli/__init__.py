"""The ``saal`` command line: ``saal run``, ``saal score``, ``saal analyze``, ``saal report``.

Each subcommand lives in its own module (:mod:`saal.cli.run`, :mod:`saal.cli.score`,
:mod:`saal.cli.analyze`, :mod:`saal.cli.report`) with an ``add_parser(subparsers)`` that registers
it. Every user mistake, in any option, is one line ``saal: error: ...`` on stderr and exit code 2,
before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from saal.cli import analyze, label, label_studio, report, run, score
from saal.errors import SaalError

COMMANDS = (run, score, analyze, report, label, label_studio)


class UsageError(SaalError):
    """A command line that argparse cannot read (unknown option, missing value, bad number)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are raised as :class:`UsageError` (``main`` prints them as one line)."""

    def error(self, message: str) -> NoReturn:
        """Raise the parse error.

        Raises:
            UsageError: always.
        """
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``saal`` argument parser with every subcommand registered."""
    parser = _Parser(
        prog="saal",
        description="Sharpness-Aware Active Learning and its baselines: run, score, analyse and report.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``saal`` command ``argv`` (default: ``sys.argv[1:]``; no arguments: ``saal run``).

    Returns:
        The exit code: 0 done, 2 a user mistake (one line ``saal: error: ...`` on stderr),
        130 interrupted.

    Raises:
        SystemExit: for ``--help`` (argparse prints the help and exits 0).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["run"]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except SaalError as exc:
        print(f"saal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saal: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


__all__ = ["UsageError", "build_parser", "main"]
