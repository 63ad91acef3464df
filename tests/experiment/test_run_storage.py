"""Run-folder files without training: what identifies a run, rows that store the metric by name, and a report of
a metric other than accuracy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from saal.errors import SaalError
from saal.experiment import RoundResult, RunConfig, accuracy_table, check_run_folder, write_summary
from saal.experiment.storage import (
    first_difference,
    identity,
    read_rounds,
    rounds_csv,
    run_record,
    with_defaults,
    write_rounds,
)
from saal.report import build_report


def record(**changes: object) -> dict:
    base = run_record(
        RunConfig(rounds=2),
        "saal[scope=last-layer]",
        3,
        strategy_repr="SAAL(rho=0.05)",
        strategy_options={"rho": 0.05, "scope": "last-layer"},
        seed_streams={"initial": 1, "model": 2, "train": 3, "acquire": 4},
        task={"name": "classification", "num_classes": 10},
        metric="accuracy",
    )
    base.update(changes)
    return base


def write(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_record_keeps_the_0_1_0_layout_and_adds_informational_fields() -> None:
    rec = record()
    assert list(rec)[:4] == ["strategy", "strategy_repr", "seed", "seed_streams"]
    assert {k: rec[k] for k in RunConfig().to_dict()} == json.loads(json.dumps(RunConfig(rounds=2).to_dict()))
    assert rec["metric"] == "accuracy" and rec["task"]["name"] == "classification" and "saal_version" in rec
    # what is compared: the spec, the seed and the settings that change results
    assert set(identity(rec)) == {"strategy", "seed", *RunConfig().to_dict()} - {"device", "data_dir"}
    assert "score_batch_size" in identity(rec)  # BALD's Monte-Carlo masks fall on items by batch


def test_missing_settings_take_their_current_default_nested_ones_too() -> None:
    old = record()
    del old["dataset_options"], old["train"]["sam_rho"]
    filled = with_defaults(old, {"dataset_options": {}, "train": {"sam_rho": 0.05, "lr": 1.0}})
    assert filled["dataset_options"] == {} and filled["train"]["sam_rho"] == 0.05
    assert filled["train"]["lr"] == old["train"]["lr"]  # present settings are kept
    assert first_difference(identity(old), identity(record())) is None


def test_only_a_real_difference_refuses_a_folder(tmp_path: Path) -> None:
    assert check_run_folder(tmp_path / "empty", record()) is False
    old = record(strategy_repr="SAAL(rho=0.05, a_new_option=1)", strategy_options={}, saal_version="9.9",
                 device="cuda:3", data_dir="/elsewhere")  # fmt: skip
    for key in ("metric", "task", "seed_streams"):
        del old[key]
    assert check_run_folder(write(tmp_path / "old", old), record()) is True
    other = record()
    other["train"]["epochs"] = 7
    with pytest.raises(SaalError, match=r"holds a different run \(train.epochs: 7 there, 50 now\)") as info:
        check_run_folder(write(tmp_path / "other", other), record())
    assert "\n" not in str(info.value)
    newer = record(a_setting_this_saal_lacks=1)
    with pytest.raises(SaalError, match=r"\(a_setting_this_saal_lacks: 1 there, None now\)"):
        check_run_folder(write(tmp_path / "newer", newer), record())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(SaalError, match="unreadable"):
        check_run_folder(tmp_path / "bad", record())


def test_rows_store_the_metric_by_name(tmp_path: Path) -> None:
    acc = RoundResult(0, 20, "accuracy", 0.5, 1.0, 0.1, [3, 4], {"cat": 0.25})
    assert list(acc.row()) == ["round", "labelled", "accuracy", "train_seconds", "acquire_seconds", "chosen",
                               "per_class"]  # fmt: skip
    assert acc.accuracy == 0.5 and RoundResult.from_row(acc.row()) == acc
    old = {"round": 1, "labelled": 30, "accuracy": 0.6, "train_seconds": 0.1, "acquire_seconds": 0.0, "chosen": []}
    assert RoundResult.from_row(old).row() == old  # a 0.1.0 row comes back as it was: no per_class
    detection = RoundResult(0, 20, "map", 0.3, 1.0, 0.1, [1])
    assert "map" in detection.row() and "accuracy" not in detection.row()
    with pytest.raises(AttributeError, match="map"):
        _ = detection.accuracy
    assert RoundResult.from_row(detection.row(), "map") == detection
    assert (
        rounds_csv([detection.row()], "map").splitlines()[0]
        == "round,labelled,map,train_seconds,acquire_seconds,chosen"
    )
    write_rounds(tmp_path, [detection.row()], "map")
    assert read_rounds(tmp_path) == [detection.row()]
    rows = [{"strategy": "random", "seed": s, **RoundResult(0, 20, "map", v, 1.0, 0.1, []).row()}
            for s, v in ((0, 0.2), (1, 0.4))]  # fmt: skip
    with open(write_summary(tmp_path, rows)) as fh:
        assert next(csv.reader(fh)) == ["strategy", "seed", "round", "labelled", "map", "train_seconds",
                                        "acquire_seconds"]  # fmt: skip
    table = accuracy_table(rows)
    assert table.startswith("test map (%)") and table.splitlines()[-1].endswith("30.0 +- 14.1")


def test_a_report_names_the_metric_its_runs_stored(tmp_path: Path) -> None:
    for seed, values in ((0, (0.2, 0.4)), (1, (0.3, 0.5))):
        config = record(strategy="random", seed=seed, metric="map", rounds=1)
        folder = write(tmp_path / "exp" / "random" / f"seed-{seed}", config)
        rows = [RoundResult(r, 20 + 10 * r, "map", v, 0.1, 0.01, [] if r else [1]).row() for r, v in enumerate(values)]
        write_rounds(folder, rows, "map")
    build_report([tmp_path / "exp"], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| map @ 20 | map @ 30 |" in text and "Test map in %" in text and "acc @" not in text
    assert "| `random` | 2/2 | 25.0 ± 7.1 | 45.0 ± 7.1 |" in text
    with open(tmp_path / "rep" / "runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    assert {float(r["final_map"]) for r in runs} == {0.4, 0.5} and "final_accuracy" not in runs[0]
    with open(tmp_path / "rep" / "rounds.csv") as fh:
        assert "map" in next(csv.reader(fh))


def test_rows_record_who_acquired_and_why_and_older_rows_stay_as_they_were(tmp_path: Path) -> None:
    new = RoundResult(0, 0, "accuracy", 0.1, 0.0, 0.2, [5, 6], acquired_by="auto", reason="typiclust: 0, then more",
                      start={"by": "", "reason": "none", "chosen": []})  # fmt: skip
    assert list(new.row())[6:9] == ["acquired_by", "reason", "start"]
    assert RoundResult.from_row(new.row()) == new
    last = RoundResult(1, 2, "accuracy", 0.3, 0.1, 0.0, [], acquired_by="", reason="")
    assert RoundResult.from_row(last.row()) == last and last.row()["acquired_by"] == ""
    old = {"round": 2, "labelled": 4, "accuracy": 0.4, "train_seconds": 0.1, "acquire_seconds": 0.0, "chosen": []}
    assert "acquired_by" not in RoundResult.from_row(old).row()
    assert rounds_csv([old]).splitlines()[0] == "round,labelled,accuracy,train_seconds,acquire_seconds,chosen"
    text = rounds_csv([new.row(), last.row(), old])
    assert text.splitlines()[0].endswith(",chosen,acquired_by,reason")
    rows = list(csv.DictReader(text.splitlines()))
    assert [(r["acquired_by"], r["reason"]) for r in rows] == [("auto", "typiclust: 0, then more"), ("", ""), ("", "")]
    assert text.splitlines()[1] == '0,0,0.100000,0.000000,0.200000,5 6,auto,"typiclust: 0, then more"'
    rows_grid = [{"strategy": "auto", "seed": 0, **new.row()}]
    with open(write_summary(tmp_path, rows_grid)) as fh:
        assert next(csv.reader(fh))[-2:] == ["acquired_by", "reason"]
