"""Cold start in whole runs: no initial labels, or an initial set chosen without the ground truth; resume; the
records of who picked; the report's marks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import saal.experiment.loop as loop
from saal.experiment import ActiveLearningRun, ExperimentSpec, RoundResult, RunConfig, run_grid, seed_streams
from saal.pool import Pool
from saal.report import build_report
from saal.strategies import build_strategy
from saal.training import TrainConfig


class Interrupt(Exception):
    pass


def tiny(**changes: object) -> RunConfig:
    base: dict[str, object] = dict(initial=0, query=10, rounds=3, train=TrainConfig(epochs=3, batch_size=16))
    base.update(changes)
    return RunConfig(**base)


def rows_of(results: list[RoundResult]) -> list[tuple]:
    return [(r.round, r.labelled, r.accuracy, r.chosen, r.acquired_by, r.reason) for r in results]


@pytest.fixture
def no_ground_truth_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the run draws its initial set with the true labels."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the ground-truth initial set was drawn")

    monkeypatch.setattr(loop, "initial_indices", refuse)


def test_a_run_from_zero_labels(digits, tmp_path: Path, no_ground_truth_start: None) -> None:
    run = ActiveLearningRun(tiny(), "entropy", 3, tmp_path / "run", bundle=digits)
    results = run.run()
    assert [r.labelled for r in results] == [0, 10, 20, 30]
    assert results[0].train_seconds < 1.0 and 0.0 <= results[0].accuracy <= 1.0  # the untrained model
    # entropy needs a trained model: random makes the first pick, with the run's acquisition stream
    assert [r.acquired_by for r in results] == ["random", "entropy", "entropy", ""]
    assert results[0].reason == "entropy cannot choose from zero labels: random makes the first pick"
    expected = build_strategy("random").select(
        run.model, Pool(digits.train, digits.num_classes), 10, np.random.default_rng(seed_streams(3)["acquire"])
    )
    assert results[0].chosen == expected.indices.tolist()
    assert results[0].start is not None and results[0].start["chosen"] == []
    assert run.pool.round_labelled(results[0].chosen).tolist() == [1] * 10
    rows = list(csv.DictReader((tmp_path / "run" / "rounds.csv").read_text().splitlines()))
    assert [(r["acquired_by"], r["reason"]) for r in rows] == [(r.acquired_by, r.reason) for r in results]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["initial"] == 0


def test_the_first_pick_follows_the_documented_rule(digits, no_ground_truth_start: None) -> None:
    def first(strategy: str, **changes: object) -> RoundResult:
        return ActiveLearningRun(tiny(rounds=1, **changes), strategy, 0, bundle=digits).run()[0]

    assert (first("random").acquired_by, first("random").reason) == (
        "random",
        "random is cold-start: it makes the first pick, from zero labels",
    )
    picked = first("margin", initial_strategy="auto[cold=random]")
    assert picked.acquired_by == "auto[cold=random]"
    assert picked.reason == "random: 0 labels < min_test 20; initial_strategy: the first pick, from zero labels"
    # the same seed and the same first picker: every strategy starts from the same first pick (paired runs)
    assert first("margin").chosen == first("entropy").chosen == first("random").chosen


def test_an_initial_set_chosen_without_labels(digits, no_ground_truth_start: None) -> None:
    cfg = tiny(initial=15, initial_strategy="random", rounds=1)  # 15: no class balance is needed
    run = ActiveLearningRun(cfg, "margin", 2, bundle=digits)
    results = run.run()
    expected = build_strategy("random").select(
        run.model, Pool(digits.train, digits.num_classes), 15, np.random.default_rng(seed_streams(2)["initial"])
    )
    start = run.pool.labelled_indices()[run.pool.round_labelled(run.pool.labelled_indices()) == 0]
    assert start.tolist() == sorted(expected.indices.tolist())
    assert results[0].start == {
        "by": "random",
        "reason": "initial_strategy: chosen from zero labels",
        "chosen": start.tolist(),
    }
    assert [r.labelled for r in results] == [15, 25] and results[0].acquired_by == "margin"


def test_the_ground_truth_start_is_kept_and_recorded(digits) -> None:
    results = ActiveLearningRun(tiny(initial=20, rounds=1), "random", 1, bundle=digits).run()
    assert results[0].start is not None and results[0].start["by"] == "ground truth, class-balanced"
    assert np.bincount(digits.train_targets[results[0].start["chosen"]], minlength=10).tolist() == [2] * 10


@pytest.mark.parametrize("strategy", ["entropy", "auto[cold=random,min_test=10,repeats=1]"])
def test_a_cold_start_run_resumed_mid_way_equals_an_uninterrupted_one(digits, tmp_path: Path, strategy: str) -> None:
    cfg = tiny(rounds=3)
    reference = ActiveLearningRun(cfg, strategy, 5, bundle=digits).run()

    def stop_after_round_1(result: RoundResult) -> None:
        if result.round == 1:
            raise Interrupt

    folder = tmp_path / "run"
    with pytest.raises(Interrupt):
        ActiveLearningRun(cfg, strategy, 5, folder, bundle=digits).run(progress=stop_after_round_1)
    resumed = ActiveLearningRun(cfg, strategy, 5, folder, bundle=digits).run()
    assert rows_of(resumed) == rows_of(reference)
    assert json.loads((folder / "rounds.json").read_text()) == [r.row() for r in resumed]


def test_the_report_marks_how_runs_started_and_what_auto_chose(digits, tmp_path: Path) -> None:
    cold = ExperimentSpec(
        run=tiny(rounds=2), strategies=["random", "auto[cold=random,min_test=10,repeats=1]"], seeds=[0],
        out=str(tmp_path / "cold"),
    )  # fmt: skip
    truth = ExperimentSpec(run=tiny(initial=20, rounds=1), strategies=["random"], seeds=[0], out=str(tmp_path / "gt"))
    rows = run_grid(cold, digits)
    run_grid(truth, digits)
    autos = [r for r in rows if r["strategy"].startswith("auto")]
    assert autos[0]["reason"].startswith("random: 0 labels < min_test 10")
    build_report([tmp_path / "cold", tmp_path / "gt"], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Start: **ground-truth balanced start**" in text and text.count("Start: chosen without labels") == 1
    assert "initial 0 labels (chosen without labels)" in text
    assert "### What auto chose" in text
    line = next(x for x in text.splitlines() if x.startswith("- `auto[cold=random,min_test=10,repeats=1]` seed 0"))
    assert "`random` at 0" in line
    with open(tmp_path / "report" / "rounds.csv") as fh:
        header = next(csv.reader(fh))
    assert "acquired_by" in header and "reason" in header
    # a report of ground-truth starts alone is written as before: no start line
    build_report([tmp_path / "gt"], tmp_path / "report-gt")
    assert "Start:" not in (tmp_path / "report-gt" / "report.md").read_text()
