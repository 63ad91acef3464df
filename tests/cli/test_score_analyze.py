"""`saal score` and `saal analyze` end to end on digits (real, bundled with scikit-learn)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from saal.cli import main
from saal.data import DatasetBundle
from saal.models import build_model
from saal.pool import Pool
from saal.strategies import build_strategy


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("saal: error: ")
    return err


def test_score_saal_writes_every_candidate_and_flags_the_top_k(tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    code = main(["score", "--strategy", "saal[score=diff]", "--k", "4", "--subset", "60", "--out", str(out)])
    assert code == 0
    rows = _rows(out)
    assert len(rows) == 60
    scores = np.array([float(r["score"]) for r in rows])
    chosen = np.array([r["chosen"] == "1" for r in rows])
    assert chosen.sum() == 4
    assert scores[chosen].min() >= scores[~chosen].max()
    picks = sorted(int(r["pick"]) for r in rows if r["chosen"] == "1")
    assert picks == [0, 1, 2, 3]


def test_score_from_saved_weights_equals_scoring_the_model(tmp_path: Path, digits: DatasetBundle) -> None:
    torch.manual_seed(11)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "s.csv"
    args = ["score", "--strategy", "entropy", "--weights", str(tmp_path / "model.pt"), "--split", "test"]
    assert main([*args, "--k", "3", "--out", str(out)]) == 0
    direct = build_strategy("entropy").select(model, Pool(digits.test, 10), 3, 0)
    rows = _rows(out)
    np.testing.assert_array_equal([int(r["dataset_index"]) for r in rows], direct.scored_indices)
    np.testing.assert_allclose([float(r["score"]) for r in rows], direct.scores, rtol=1e-6)
    # A checkpoint.pt-style dict holding the state_dict under "model" works too.
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint.pt")
    assert main([*args[:-4], "--weights", str(tmp_path / "checkpoint.pt"), "--out", str(out)]) == 0


def test_score_with_training_excludes_the_trained_items(tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    code = main(
        ["score", "--strategy", "saal[scope=last-layer]", "--train-on", "20", "--epochs", "2", "--out", str(out)]
    )
    assert code == 0
    assert len(_rows(out)) == 1347 - 20


def test_score_with_a_strategy_that_scores_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.csv"
    assert main(["score", "--strategy", "random", "--k", "5", "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 5 and all(r["score"] == "" and r["chosen"] == "1" for r in rows)
    assert "scores nothing" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (lambda d: d / "absent.pt", "does not exist"),
        (lambda d: (d / "junk.pt").write_text("not a torch file") and d / "junk.pt", "not a readable"),
        (
            lambda d: torch.save(build_model("cnn", (1, 8, 8), 10).state_dict(), d / "cnn.pt") or d / "cnn.pt",
            "does not fit this model",
        ),
        (
            lambda d: torch.save({"body.1.weight": torch.zeros(3, 3)}, d / "shape.pt") or d / "shape.pt",
            "does not fit this model",
        ),
        (lambda d: torch.save([1, 2], d / "list.pt") or d / "list.pt", "state_dict of tensors"),
    ],
)
def test_bad_weights_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], Path], text: str
) -> None:
    path = make(tmp_path)
    assert main(["score", "--weights", str(path), "--out", str(tmp_path / "s.csv")]) == 2
    assert text in _error_line(capsys)


def test_bad_strategy_and_k_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", "--strategy", "saal[score=mean]", "--out", str(tmp_path / "s.csv")]) == 2
    assert "score must be one of max, diff" in _error_line(capsys)
    assert main(["score", "--k", "0", "--out", str(tmp_path / "s.csv")]) == 2
    assert "query size" in _error_line(capsys)


def test_analyze_writes_terms_correlations_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "an"
    args = ["analyze", "--train-on", "30", "--epochs", "3", "--subset", "25", "--power-iters", "4", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "rho*||g||" in printed and "0.5*rho^2*lambda_1" in printed
    rows = _rows(out / "terms.csv")
    assert len(rows) == 25
    summary = json.loads((out / "correlations.json").read_text())
    r = summary["correlation_with_score"]
    assert all(v is None or -1 <= v <= 1 for v in r.values())
    assert r["loss"] is not None and r["loss"] > 0.5
    assert summary["model"] == "mlp" and summary["instances"] == 25
    assert (out / "scatter.png").stat().st_size > 1000


def test_analyze_bad_option_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--perturbation", "adam", "--subset", "5", "--out", str(tmp_path)]) == 2
    assert "perturbation must be one of asam, sam" in _error_line(capsys)
    assert main(["analyze", "--subset", "1", "--out", str(tmp_path)]) == 2
    assert "--subset" in _error_line(capsys)
