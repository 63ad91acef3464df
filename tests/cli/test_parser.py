"""The parser: help that shows each default once (read from the settings models), loud imports, the entry point."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import saal.cli
from saal.cli import build_parser, main
from saal.cli.options import default_of, show_default
from saal.settings import ExperimentSpec, RunConfig, TrainConfig


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Return the subcommand parsers of the ``saal`` parser, by name."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _help(*command: str) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0


@pytest.mark.parametrize("command", ["run", "score", "analyze", "report"])
def test_help_shows_each_default_once(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    _help(command)
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "(default: None)" not in text and "[default" not in text
    parser = build_parser()
    sub = _subparsers(parser)[command]
    for action in sub._actions:
        shown = (action.help or "").count("(default:")
        assert shown <= 1, action.help
        # argparse holds no defaults of its own (the models do), so none can be shown twice or drift
        assert action.default in (None, [], False, argparse.SUPPRESS), (action.dest, action.default)
        assert not re.search(r"\[[^\]=,]*\]$", action.help or ""), action.help  # no hand-written [x] default


def test_run_help_defaults_come_from_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    _help("run")
    text = " ".join(capsys.readouterr().out.split())
    train, run, spec = TrainConfig(), RunConfig(), ExperimentSpec()
    expected = {
        "--lr": train.lr,
        "--momentum": train.momentum,
        "--epochs": train.epochs,
        "--batch-size": train.batch_size,
        "--optimizer": train.optimizer,
        "--sam-rho": train.sam_rho,
        "--initial": run.initial,
        "--query": run.query,
        "--rounds": run.rounds,
        "--model": run.model,
        "--dataset": run.dataset,
        "--device": run.device,
        "--score-batch-size": run.score_batch_size,
        "--strategies": ",".join(spec.strategies),
        "--seeds": ",".join(map(str, spec.seeds)),
    }
    for option, value in expected.items():
        entry = text.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert f"(default: {value})" in entry, (option, entry)
        assert entry.count("(default:") == 1
    assert text.count(f"(default: {train.lr})") == 1
    assert default_of(ExperimentSpec, "run.train.lr") == train.lr and show_default([0, 1]) == "0,1"


def test_rounds_zero_trains_and_evaluates_without_acquiring(
    saal: Callable, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _help("run")
    assert "0 trains on the initial set and evaluates it, acquiring nothing" in " ".join(
        capsys.readouterr().out.split()
    )
    out = tmp_path / "out"
    result = saal("run", "--strategies", "entropy", "--seeds", "1", "--rounds", "0", "--epochs", "1", "--quiet",
                  "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    rounds = json.loads((out / "entropy" / "seed-0" / "rounds.json").read_text())
    assert [r["labelled"] for r in rounds] == [20] and 0 <= rounds[0]["accuracy"] <= 1


def test_a_broken_subcommand_module_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """No subcommand quietly disappears: a module that cannot be imported is an ImportError, not 'invalid choice'."""
    for name in [m for m in sys.modules if m == "saal.cli" or m.startswith("saal.cli.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "saal.cli.score", None)  # import saal.cli.score now raises ImportError
    with pytest.raises(ImportError, match=r"saal\.cli\.score"):
        importlib.import_module("saal.cli")
    monkeypatch.undo()
    assert sys.modules["saal.cli"] is saal.cli


def test_a_broken_subcommand_registration_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(subparsers: object) -> None:
        raise ModuleNotFoundError("No module named 'something_score_needs'")

    monkeypatch.setattr(saal.cli.score, "add_parser", broken)
    with pytest.raises(ModuleNotFoundError, match="something_score_needs"):
        build_parser()


def test_every_subcommand_is_registered() -> None:
    assert set(_subparsers(build_parser())) == {"run", "score", "analyze", "report", "label", "label-studio"}


def test_interrupt_is_exit_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(saal.cli, "build_parser", _parser_with(interrupted))
    assert main(["report", "x", "--out", "y"]) == 130
    assert "interrupted" in capsys.readouterr().err


def _parser_with(func: Callable) -> Callable:
    def build() -> object:
        parser = build_parser()
        _subparsers(parser)["report"].set_defaults(func=func)
        return parser

    return build


@pytest.mark.slow
def test_python_dash_m_saal_is_the_entry_point() -> None:
    """The one test that starts a process: ``python -m saal`` exists and reports a mistake as one line, exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "saal", "run", "--momentum", "1.5"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "saal: error: --momentum: must be < 1, got 1.5"
