"""Progress of scans, greedy selections and CLI commands on stderr: a bar on a terminal, lines otherwise,
nothing when quiet (or, for library use, when stderr is not a terminal)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from saal.cli import main
from saal.core import progress
from saal.core.progress import Progress, progress_mode, progress_settings
from saal.core.scan import Batch, scan
from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.strategies.badge import kmeans_pp
from saal.strategies.coreset import k_center_greedy


def _scan(n: int = 10, batch_size: int = 4) -> dict[str, torch.Tensor]:
    data = ArrayDataset(torch.arange(2.0 * n).view(n, 2), np.zeros(n))

    def fn(b: Batch) -> dict[str, torch.Tensor]:
        return {"sum": b.inputs.sum(1)}

    return scan(data, np.arange(n), fn, batch_size=batch_size, desc="scoring")


def test_lines_count_every_batch_and_end_with_done(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_settings("lines", interval_s=0):
        out = _scan()
    assert out["sum"].tolist() == [4.0 * i + 1 for i in range(10)]  # progress changes nothing scanned
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r", \d+ s", "", line) for line in lines] == [
        "scoring: 4/10 item (40%)",
        "scoring: 8/10 item (80%)",
        "scoring: 10/10 item (100%)",
        "scoring: 10/10 item (100%), done",
    ]


@pytest.mark.parametrize(("mode", "interval"), [("off", 0.0), ("tty", 0.0), ("auto", 60.0), ("lines", 60.0)])
def test_quiet_untty_or_quick_scans_write_nothing(mode: str, interval: float, capsys) -> None:
    """Off, the library default off a terminal, and lines before the first interval has passed: silent."""
    assert progress_mode().mode == "tty"  # the library default
    with progress_settings(mode, interval_s=interval):
        _scan()
    assert capsys.readouterr().err == ""
    assert progress_mode().mode == "tty"  # restored after the block


def test_a_bar_is_drawn_on_the_stream(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(progress, "BAR_DELAY_S", 0.0)
    with progress_settings("bar"):
        _scan()
    err = capsys.readouterr().err
    assert "scoring" in err and "/10" in err  # tqdm's "scoring:   0%|   | 0/10 ..."


def test_a_terminal_gets_a_bar_and_anything_else_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            pass

    with progress_settings("auto"):
        assert Progress(5, "x").form == "lines"  # pytest's captured stderr is not a terminal
        monkeypatch.setattr("sys.stderr", Terminal())
        with Progress(5, "x") as shown:
            assert shown.form == "bar"
        assert Progress(0, "x").form == "off"  # nothing to count


def test_greedy_selections_report_their_picks(capsys: pytest.CaptureFixture[str]) -> None:
    points = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    with progress_settings("lines", interval_s=0):
        picks, _ = k_center_greedy(points, points[:2], 3, np.random.default_rng(0))
        seeds, _ = kmeans_pp(torch.softmax(points, 1), points, 4, np.random.default_rng(0))
    assert len(set(picks.tolist())) == 3 and len(set(seeds.tolist())) == 4
    err = capsys.readouterr().err
    assert "k-center greedy: 3/3 pick (100%)" in err and "k-means++ seeding: 4/4 pick (100%)" in err


def test_bad_settings_are_one_line() -> None:
    mode = r"^progress mode must be one of auto, tty, bar, lines, off, got 'loud'$"
    with pytest.raises(SaalError, match=mode), progress_settings("loud"):
        pass
    with (
        pytest.raises(SaalError, match=r"^progress interval must be >= 0 seconds, got -1$"),
        progress_settings("lines", -1),
    ):
        pass


def test_saal_score_shows_progress_lines_unless_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)  # a line at every batch
    args = ["score", "--strategy", "entropy", "--k", "3", "--batch-size", "64", "--epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "a.csv")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^scan: \d+/\d+ item \(100%\), \d+ s, done$", err, re.M), err
    assert progress_mode().mode == "tty"  # the command's setting ends with it
    assert main([*args, "--out", str(tmp_path / "b.csv"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()  # the same command, quiet
