"""Run folders written by saal 0.1.0 (tests/fixtures/v0.1.0) report and resume unchanged under this saal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from saal.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "v0.1.0"

# The commands of tests/fixtures/v0.1.0/MAKE.py.txt, lists A and B.
A = ["run", "--dataset", "digits", "--model", "mlp", "--strategies", "random,saal[scope=last-layer]", "--seeds", "7,",
     "--initial", "20", "--query", "10", "--rounds", "3", "--epochs", "3", "--batch-size", "16", "--subset", "300",
     "--quiet"]  # fmt: skip
B = ["run", "--dataset", "folder:images", "--model", "cnn", "--strategies", "entropy,random", "--seeds", "7,",
     "--initial", "20", "--query", "10", "--rounds", "3", "--epochs", "3", "--batch-size", "16", "--quiet"]  # fmt: skip
COMMANDS = {"digits": A, "images-run": B}
COMPARED = ("round", "labelled", "accuracy", "chosen")  # the seconds differ from machine to machine


@pytest.fixture
def fixture_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the 0.1.0 folders, and the working directory there (the image folder is ``folder:images``)."""
    root = tmp_path / "v0.1.0"
    shutil.copytree(FIXTURE, root)
    monkeypatch.chdir(root)
    return root


def expected_runs(out: str) -> dict[tuple[str, str], Path]:
    """Return ``{(strategy folder, seed folder): expected rounds.json}`` of the runs of one 0.1.0 output folder."""
    runs = {}
    for path in sorted((FIXTURE / "expected").glob(f"{out}__*.json")):
        _, strategy, seed = path.stem.split("__")
        runs[(strategy, seed)] = path
    return runs


def compared(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in COMPARED} for r in rows]


@pytest.mark.slow
def test_report_of_0_1_0_folders_is_byte_identical(fixture_copy: Path) -> None:
    shutil.rmtree(fixture_copy / "report")
    assert main(["report", "digits", "images-run", "--out", "report"]) == 0
    assert (fixture_copy / "report" / "report.md").read_bytes() == (FIXTURE / "report" / "report.md").read_bytes()
    for name in ("runs.csv", "rounds.csv", "comparisons.csv"):
        assert (fixture_copy / "report" / name).read_text() == (FIXTURE / "report" / name).read_text(), name


@pytest.mark.parametrize("out", ["digits", "images-run"])
def test_0_1_0_folders_resume_to_the_rounds_of_an_uninterrupted_run(fixture_copy: Path, out: str) -> None:
    """``digits``: a finished run (left untouched) and one stopped after 2 of 4 rounds; ``images-run`` (an image
    folder by relative path): one stopped after 2 rounds and one never started."""
    runs = expected_runs(out)
    assert len(runs) == 2
    before = {key: (fixture_copy / out / key[0] / key[1] / "rounds.json").read_bytes() for key in runs
              if (fixture_copy / out / key[0] / key[1] / "model.pt").exists()}  # fmt: skip
    assert main([*COMMANDS[out], "--out", out]) == 0
    for (strategy, seed), expected in runs.items():
        folder = fixture_copy / out / strategy / seed
        rows = json.loads((folder / "rounds.json").read_text())
        assert compared(rows) == compared(json.loads(expected.read_text())), f"{out}/{strategy}/{seed}"
        assert (folder / "model.pt").is_file()
    for (strategy, seed), text in before.items():  # a finished 0.1.0 run is not rewritten
        assert (fixture_copy / out / strategy / seed / "rounds.json").read_bytes() == text
    results = json.loads((fixture_copy / out / "results.json").read_text())
    assert len(results) == 2 * 4 and all("accuracy" in r for r in results)


def test_a_resumed_0_1_0_run_gains_the_kappas_of_a_new_run(fixture_copy: Path) -> None:
    """A 0.1.0 checkpoint holds no stopping rule: the stop set is drawn as a new run draws it and the first resumed
    round is measured against the checkpoint's model, so the resumed rounds get the kappas of a run made today."""
    assert main([*A, "--out", "digits"]) == 0
    assert main([*A, "--out", "today"]) == 0
    folder = Path("digits") / "saal_scope=last-layer" / "seed-7"
    resumed = json.loads((folder / "rounds.json").read_text())
    today = json.loads((Path("today") / "saal_scope=last-layer" / "seed-7" / "rounds.json").read_text())
    assert ["kappa" in r for r in resumed] == [False, False, True, True]  # the 0.1.0 rows are written back as they were
    assert [r["kappa"] for r in resumed[2:]] == [r["kappa"] for r in today[2:]]
    lines = (folder / "rounds.csv").read_text().splitlines()
    assert lines[0].endswith(",kappa") and lines[1].endswith(",") and not lines[3].endswith(",")
