"""The command line on a detection dataset: runs that repeat exactly, reports, scores with pseudo boxes and a
picture; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from detection_cases import Result

RUN = ["--model", "fcos-lite0", "--model-option", "min_size=64", "--model-option", "max_size=96"]
RUN += [
    "--initial",
    "4",
    "--query",
    "2",
    "--rounds",
    "1",
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--seeds",
    "1",
    "--quiet",
]


@pytest.mark.slow
def test_runs_repeat_exactly_and_report_map(run_saal: Callable[..., Result], voc_root: Path, tmp_path: Path) -> None:
    strategies = "det-saal[score_threshold=0.05]"
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        done = run_saal("run", "--dataset", f"voc:{voc_root}", "--strategies", strategies, *RUN, "--out", str(out))
        assert done.returncode == 0, done.stderr
    rows = [json.loads((o / "det-saal_score_threshold=0.05" / "seed-0" / "rounds.json").read_text()) for o in outs]
    assert rows[0] == [{**r, "train_seconds": a["train_seconds"], "acquire_seconds": a["acquire_seconds"]}
                       for r, a in zip(rows[1], rows[0], strict=True)]  # fmt: skip
    first = rows[0][0]
    assert len(first["chosen"]) == 2 and 0 <= first["map50"] <= 1 and set(first["details"]) >= {"map", "boxes_labelled"}
    assert rows[0][1]["details"]["boxes_labelled"] > first["details"]["boxes_labelled"]
    report = run_saal("report", str(outs[0]), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "map50" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "cnn"], "is a classifier; a detection dataset needs a detector"),
        (["--strategies", "entropy"], "'entropy' does not support detection"),
        (["--model-option", "colour=red"], "has no option 'colour'"),
        (["--dataset", "digits", "--strategies", "random"], "is a detector; use it with a detection dataset"),
        (["--dataset-option", "classes=bar"], "class 'square' is not one of the classes"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    run_saal: Callable[..., Result], voc_root: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    base = ["run", "--dataset", f"voc:{voc_root}", "--strategies", "det-loss", *RUN, "--out", str(tmp_path / "o")]
    done = run_saal(*base, *args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_corrupt_annotation_is_refused_before_anything_is_written(
    run_saal: Callable[..., Result], voc_copy: Path, tmp_path: Path
) -> None:
    (voc_copy / "Annotations" / "img005.xml").write_text("<annotation")
    done = run_saal(
        "run", "--dataset", f"voc:{voc_copy}", "--strategies", "det-saal", *RUN, "--out", str(tmp_path / "o")
    )
    assert done.returncode == 2 and "is not valid XML" in done.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_score_writes_scores_pseudo_boxes_and_a_picture(
    run_saal: Callable[..., Result], voc_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores.csv"
    done = run_saal(
        "score", "--dataset", f"voc:{voc_root}", "--model", "fcos-lite0", "--strategy",
        "det-saal[score_threshold=0.05]", "--train-on", "4", "--epochs", "1", "--k", "3", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open()))
    records = json.loads(out.with_suffix(".json").read_text())
    assert len(rows) == len(records) == 8 and sum(r["chosen"] == "1" for r in rows) == 3
    assert [r["score"] for r in records] == sorted((r["score"] for r in records), reverse=True)
    assert all(b["class"] in ("bar", "square") and b["score"] >= 0.05 for r in records for b in r["pseudo_boxes"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
