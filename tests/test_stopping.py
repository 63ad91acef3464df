"""The stabilising-predictions stopping rule: kappa, the window, the stop set, and ``saal run --stop-when stable``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score

from saal.cli import main
from saal.errors import SaalError
from saal.experiment import ActiveLearningRun, RoundResult, RunConfig
from saal.experiment.grid import check_stopping
from saal.experiment.storage import run_finished
from saal.stopping import (
    DEFAULT_STOP_SET,
    StabilisingPredictions,
    cohen_kappa,
    draw_stop_set,
    predict_classes,
    stop_set_size,
)
from saal.tasks import Classification
from saal.tasks.detection import Detection
from saal.training import TrainConfig


# -- kappa -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b", "kappa"),
    [
        # p_o = 3/4; p_e = 1/2 * 1/4 + 1/2 * 3/4 = 1/2; (3/4 - 1/2) / (1 - 1/2) = 1/2
        ([0, 1, 0, 1], [0, 1, 1, 1], 0.5),
        # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15: p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5
        ([1] * 25 + [0] * 25, [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15, 0.4),
        ([0, 1], [1, 0], -1.0),  # p_o = 0, p_e = 1/2
        ([2, 0, 1, 1], [2, 0, 1, 1], 1.0),  # identical
        ([3, 3, 3], [3, 3, 3], 1.0),  # identical and constant: p_e = 1, agreement is perfect
        ([0, 0, 0], [1, 1, 1], 0.0),  # both constant, on different labels: p_o = p_e = 0
        ([0, 0, 0, 0], [0, 0, 0, 1], 0.0),  # one constant: p_o = p_e = 3/4
        # three classes: p_o = 5/6; counts a (2, 2, 2), b (3, 1, 2): p_e = (6 + 2 + 4) / 36 = 1/3; (1/2) / (2/3)
        ([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 2, 2], 0.75),
        (["cat", "dog", "dog"], ["cat", "dog", "cat"], 0.4),  # p_o = 2/3, p_e = (1*2 + 2*1)/9 = 4/9
    ],
)
def test_kappa_of_hand_computed_cases(a: list, b: list, kappa: float) -> None:
    assert cohen_kappa(a, b) == pytest.approx(kappa, abs=1e-12)
    assert cohen_kappa(b, a) == pytest.approx(kappa, abs=1e-12)  # symmetric


def test_kappa_equals_scikit_learn_where_it_is_defined() -> None:
    rng = np.random.default_rng(0)
    for n, classes in [(1, 2), (7, 2), (100, 10), (1000, 3)]:
        a = rng.integers(0, classes, n)
        b = np.where(rng.random(n) < 0.7, a, rng.integers(0, classes, n))
        if len(np.unique(np.concatenate([a, b]))) > 1:
            assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)


@pytest.mark.parametrize(
    ("a", "b", "needle"),
    [([0, 1], [0], "same items"), ([], [], "at least one"), ([[0, 1]], [[0, 1]], "1-d")],
)
def test_kappa_refuses_what_is_not_two_label_vectors(a: list, b: list, needle: str) -> None:
    with pytest.raises(SaalError, match=needle):
        cohen_kappa(a, b)


# -- the rule ----------------------------------------------------------------------------------
def fed(rule: StabilisingPredictions, predictions: list[list[int]]) -> list[tuple[float | None, bool]]:
    """Feed ``predictions`` one round at a time; return ``(kappa, should_stop)`` after each."""
    return [(rule.update(p), rule.should_stop) for p in predictions]


def test_the_rule_stops_once_the_kappa_stays_above_the_threshold_over_the_window() -> None:
    same, other = [0, 1, 0, 1], [0, 1, 1, 1]  # kappa(same, other) = 0.5
    steps = fed(StabilisingPredictions(threshold=0.9, window=3), [same, same, other, other, other, other])
    assert steps == [(None, False), (1.0, False), (0.5, False), (1.0, False), (1.0, False), (1.0, True)]
    rule = StabilisingPredictions(threshold=0.9, window=3)
    assert [s for _, s in fed(rule, [same] * 4)] == [False, False, False, True]
    assert rule.update(other) == 0.5 and not rule.should_stop  # a change breaks the window again


def test_a_window_of_one_and_a_threshold_of_one() -> None:
    a, b = [0, 1, 2, 2], [0, 1, 2, 1]  # p_o = 3/4, p_e = (1 + 2 + 2) / 16: kappa = (12 - 5) / (16 - 5) = 7/11
    assert fed(StabilisingPredictions(threshold=1.0, window=1), [a, b, b]) == [
        (None, False),
        (pytest.approx(7 / 11), False),
        (1.0, True),  # the threshold is reached, not only exceeded
    ]
    assert fed(StabilisingPredictions(threshold=0.6, window=1), [a, b]) == [
        (None, False),
        (pytest.approx(7 / 11), True),
    ]
    assert fed(StabilisingPredictions(threshold=0.7, window=1), [a, b]) == [
        (None, False),
        (pytest.approx(7 / 11), False),
    ]


def test_the_rule_refuses_bad_settings_naming_the_option() -> None:
    for kwargs, needle in [
        ({"threshold": 0.0}, "--stop-threshold: must lie in"),
        ({"threshold": 1.5}, "--stop-threshold"),
        ({"threshold": float("nan")}, "--stop-threshold"),
        ({"window": 0}, "--stop-window: must be >= 1"),
        ({"stop_set_size": 0}, "--stop-set: must be >= 1"),
    ]:
        with pytest.raises(SaalError, match=needle):
            StabilisingPredictions(**kwargs)  # type: ignore[arg-type]


def test_the_stop_set_is_seeded_sorted_and_drawn_from_the_candidates() -> None:
    candidates = np.arange(5, 2005, 2)
    first = draw_stop_set(candidates, 300, np.random.default_rng(4))
    assert np.array_equal(first, draw_stop_set(candidates, 300, np.random.default_rng(4)))
    assert not np.array_equal(first, draw_stop_set(candidates, 300, np.random.default_rng(5)))
    assert len(set(first.tolist())) == 300 and set(first.tolist()) <= set(candidates.tolist())
    assert np.all(np.diff(first) > 0) and first.dtype == np.int64
    rule = StabilisingPredictions()
    assert len(rule.choose_stop_set(candidates, np.random.default_rng(0))) == min(DEFAULT_STOP_SET, len(candidates))
    assert stop_set_size(None, 40) == 40 and stop_set_size(None, 5000) == DEFAULT_STOP_SET
    assert stop_set_size(40, 40) == 40
    with pytest.raises(SaalError, match="--stop-set: 41 items is larger than the initially unlabelled pool"):
        stop_set_size(41, 40)
    with pytest.raises(SaalError, match="--stop-set"):
        StabilisingPredictions(stop_set_size=1001).choose_stop_set(candidates, np.random.default_rng(0))
    with pytest.raises(SaalError, match="got 3 predictions for a stop set of 1000"):
        rule.update([0, 1, 2])


def test_the_state_continues_the_rule_exactly() -> None:
    rounds = [[0, 1, 0, 1], [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]
    straight = StabilisingPredictions(threshold=0.9, window=2)
    expected = fed(straight, rounds)
    first = StabilisingPredictions(threshold=0.9, window=2)
    head = fed(first, rounds[:2])
    state = json.loads(json.dumps(first.state_dict()))  # plain values
    second = StabilisingPredictions(threshold=0.9, window=2)
    second.load_state_dict(state)
    assert head + fed(second, rounds[2:]) == expected
    assert second.kappas == straight.kappas and second.should_stop == straight.should_stop
    with pytest.raises(SaalError, match="not a stopping rule's state"):
        second.load_state_dict({"kappas": []})


def test_predictions_are_the_models_classes_and_leave_it_as_it_was(digits) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(64, 10)).train()
    indices = np.array([3, 1, 400, 7])
    before = torch.get_rng_state()
    pred = predict_classes(model, digits.train, indices, Classification(10), batch_size=3)
    assert torch.equal(torch.get_rng_state(), before) and model.training
    with torch.no_grad():
        expected = model.eval()(torch.stack([digits.train[int(i)][0] for i in indices])).argmax(1).numpy()
    assert pred.tolist() == expected.tolist()
    with pytest.raises(SaalError, match="one class per item"):
        predict_classes(model, digits.train, indices, Detection(["cell"]), batch_size=3)


def test_stopping_settings_a_task_cannot_use_are_refused() -> None:
    check_stopping(RunConfig(stop_when="stable"), Classification(3), 100)
    check_stopping(RunConfig(stop_set=5000), Detection(["cell"]), 100)  # no kappa for detection: nothing drawn
    with pytest.raises(SaalError, match="--stop-when stable: stabilising predictions needs one class per item"):
        check_stopping(RunConfig(stop_when="stable"), Detection(["cell"]), 100)
    with pytest.raises(SaalError, match=r"--stop-set: 81 items is larger .* \(80 items\)"):
        check_stopping(RunConfig(initial=20, stop_set=81), Classification(3), 100)


# -- saal run --stop-when stable -----------------------------------------------------------------
RUN = ["run", "--strategies", "entropy", "--seeds", "0,", "--initial", "20", "--query", "20", "--rounds", "5",
       "--epochs", "30", "--batch-size", "16", "--quiet"]  # fmt: skip
SECONDS = ("train_seconds", "acquire_seconds")


def rounds_of(out: Path) -> list[dict]:
    return json.loads((out / "entropy" / "seed-0" / "rounds.json").read_text())


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in SECONDS} for r in rows]


def files_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The rounds of the run without the stopping rule (its kappas are recorded all the same)."""
    out = tmp_path_factory.mktemp("plain") / "out"
    assert main([*RUN, "--out", str(out)]) == 0
    return rounds_of(out)


def test_every_round_records_a_kappa(plain_run: list[dict], tmp_path: Path) -> None:
    kappas = [r["kappa"] for r in plain_run]
    assert kappas[0] is None and all(isinstance(k, float) and -1 <= k <= 1 for k in kappas[1:])
    assert len(plain_run) == 6 and not any("stopped" in r for r in plain_run)


def test_stop_when_stable_ends_early_with_the_rounds_of_the_run_without_it(
    plain_run: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kappas = [r["kappa"] for r in plain_run]
    threshold = min(kappas[1:3])  # with a window of 2 the rule fires at round 2: the first with two kappas
    assert threshold > 0
    out = tmp_path / "stable"
    options = ["--stop-when", "stable", "--stop-threshold", repr(threshold), "--stop-window", "2"]
    capsys.readouterr()
    assert main([*RUN, *options, "--out", str(out)]) == 0
    assert "stopped early, predictions stable: entropy seed 0 at round 2 (60 labels)" in capsys.readouterr().out
    rows = rounds_of(out)
    assert len(rows) == 3
    assert without_seconds(rows[:2]) == without_seconds(plain_run[:2])
    last, same = rows[2], plain_run[2]
    assert {k: last[k] for k in ("round", "labelled", "accuracy", "kappa", "per_class")} == {
        k: same[k] for k in ("round", "labelled", "accuracy", "kappa", "per_class")
    }
    assert (last["chosen"], last["acquired_by"], last["stopped"]) == ([], "", True)
    assert last["reason"] == f"stopped: predictions stable (kappa >= {threshold:g} in each of the last 2 rounds)"
    folder = out / "entropy" / "seed-0"
    lines = (folder / "rounds.csv").read_text().splitlines()
    assert lines[0].endswith(",acquired_by,reason,kappa") and lines[1].endswith(",") and len(lines) == 4
    assert lines[3].endswith(f",{kappas[2]:.6f}")
    assert (folder / "model.pt").is_file()
    assert (out / "results.csv").read_text().splitlines()[0].endswith(",kappa")
    config = json.loads((folder / "config.json").read_text())
    assert (config["stop_when"], config["stop_window"], config["stop_set"]) == ("stable", 2, None)
    # the run is finished: the same command skips it; another stopping setting is another run
    before = files_of(folder)
    assert main([*RUN, *options, "--out", str(out)]) == 0
    assert files_of(folder) == before
    capsys.readouterr()
    assert main([*RUN, *options[2:], "--out", str(out)]) == 2  # the same but --stop-when
    assert "holds a different run (stop_when: 'stable' there, 'none' now)" in capsys.readouterr().err
    assert files_of(folder) == before


class Interrupt(Exception):
    pass


def test_a_resumed_run_gives_the_same_kappas_and_stops_at_the_same_round(digits, tmp_path: Path) -> None:
    base = dict(initial=20, query=20, rounds=5, train=TrainConfig(epochs=20, batch_size=16), stop_set=300)
    kappas = [r.kappa for r in ActiveLearningRun(RunConfig(**base), "margin", 2, bundle=digits).run()]
    cfg = RunConfig(**base, stop_when="stable", stop_window=2, stop_threshold=min(kappas[1:3]))
    straight = ActiveLearningRun(cfg, "margin", 2, bundle=digits).run()
    assert [r.kappa for r in straight] == kappas[:3] and straight[-1].stopped

    def interrupt_after_round_1(result: RoundResult) -> None:
        if result.round == 1:
            raise Interrupt

    folder = tmp_path / "run"
    with pytest.raises(Interrupt):
        ActiveLearningRun(cfg, "margin", 2, folder, bundle=digits).run(progress=interrupt_after_round_1)
    state = torch.load(folder / "checkpoint.pt", weights_only=False)["stability"]
    assert len(state["stop_set"]) == 300 and state["kappas"] == kappas[:2]
    torch.manual_seed(99)  # a fresh process's global generators are elsewhere
    resumed = ActiveLearningRun(cfg, "margin", 2, folder, bundle=digits).run()
    assert [(r.kappa, r.stopped, r.chosen, r.accuracy, r.reason) for r in resumed] == [
        (r.kappa, r.stopped, r.chosen, r.accuracy, r.reason) for r in straight
    ]
    again = ActiveLearningRun(cfg, "margin", 2, folder, bundle=digits)
    assert len(again.run()) == 3 and again.finished  # a finished (stopped) run does no more rounds


def test_a_run_stopped_early_counts_as_finished() -> None:
    assert run_finished({"rounds": 2}, [{}, {}, {}]) and not run_finished({"rounds": 2}, [{}, {}])
    assert run_finished({"rounds": 5}, [{"kappa": None}, {"kappa": 1.0, "stopped": True}])
    assert not run_finished({"rounds": 5}, [])
