"""Every bad value of every option of every subcommand: one line ``saal: error: ...``, exit 2, nothing written.

The same bad values go through a protocol file too, where they are config keys.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

RUN = ["run", "--strategies", "random", "--seeds", "1", "--rounds", "1", "--epochs", "1", "--quiet"]

# (options added to RUN, a piece of the error line)
BAD_RUN = [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--dataset", "imagenet"], "--dataset: unknown dataset 'imagenet'"),
    (["--dataset", "folder:"], "--dataset: 'folder:' needs a path"),
    (["--dataset", "npz:/nonexistent/file.npz"], "npz"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/saal-data"], "mnist"),
    (["--model", "vgg"], "--model: unknown model 'vgg'"),
    (["--strategies", "random,oracle"], "--strategies: unknown strategy 'oracle'"),
    (["--strategies", "random["], "--strategies: cannot read strategy"),
    (["--strategies", "random,random"], "--strategies: a strategy is listed twice"),
    (["--strategies", ","], "--strategies: must not be empty"),
    (["--strategies", "entropy[temperature=2]"], "has no option 'temperature'"),
    (["--strategies", "saal[score=mean]"], "score must be one of max, diff"),
    (["--seeds", "0"], "--seeds: a count must be at least 1"),
    (["--seeds=-1,"], "--seeds: seeds must be non-negative"),
    (["--seeds", "x"], "--seeds: takes a count"),
    (["--seeds", "1,1"], "--seeds: a seed is listed twice"),
    (["--seeds", "51"], "--seeds: 51 would run 51 seeds"),
    (["--initial", "-3"], "--initial: must be >= 0, got -3"),
    (["--initial", "0", "--initial-strategy", "margin"], "--initial-strategy: 'margin' cannot choose from zero labels"),
    (["--initial", "x"], "--initial: invalid int value"),
    (["--initial", "2.5"], "--initial: invalid int value"),
    (["--initial", "25"], "multiple of the 10 classes"),
    (["--initial", "5000", "--uniform-initial"], "larger than the"),
    (["--query", "0"], "--query: must be >= 1, got 0"),
    (["--query", "5000"], "larger than the unlabelled pool"),
    (["--rounds", "-1"], "--rounds: must be >= 0, got -1"),
    (["--rounds", "100"], "100 rounds of 20 after 20 initial labels need"),
    (["--subset", "0"], "--subset: must be >= 1, got 0"),
    (["--subset", "-5"], "--subset: must be >= 1, got -5"),
    (["--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["--lr", "nan"], "--lr: must be a finite number, got nan"),
    (["--lr", "inf"], "--lr: must be a finite number, got inf"),
    (["--lr", "0"], "--lr: must be > 0, got 0"),
    (["--lr", "-1"], "--lr: must be > 0, got -1"),
    (["--lr", "fast"], "--lr: invalid float value"),
    (["--optimizer", "rmsprop"], "--optimizer: must be one of 'adam', 'sgd' or 'sam', got 'rmsprop'"),
    (["--optimizer", "sam", "--lr", "0"], "--lr: must be > 0"),
    (["--momentum", "1.5"], "--momentum: must be < 1, got 1.5"),
    (["--momentum", "-0.1"], "--momentum: must be >= 0, got -0.1"),
    (["--weight-decay", "-1"], "--weight-decay: must be >= 0, got -1"),
    (["--sam-rho", "nan"], "--sam-rho: must be a finite number"),
    (["--sam-rho", "-0.5"], "--sam-rho: must be >= 0"),
    (["--score-batch-size", "0"], "--score-batch-size: must be >= 1, got 0"),
    (["--device", "gpu9"], "--device: 'gpu9' is not a torch device"),
    (["--device", "cuda:99"], "cuda:99"),
    (["--dataset-option", "image_size"], "--dataset-option: 'image_size' needs the form KEY=VALUE"),
    (["--dataset-option", "=3"], "--dataset-option: '=3' needs the form KEY=VALUE"),
    (["--dataset-option", "colour=blue"], "colour"),
    (["--set", "run.bogus=1"], "unknown key 'run.bogus'"),
    (["--set", "run.query"], "needs the form dotted.key=value"),
    (["--set", "run.query.size=3"], "run.query has no sub-keys"),
    (["--set", "seeds=[1, 2"], "cannot read the value"),
    (["--set", "run.train.lr=0"], "run.train.lr: must be > 0"),
    (["--set", "run.train.momentum=1.5"], "run.train.momentum: must be < 1"),
    (["--config", "/nonexistent/protocol.yaml"], "config /nonexistent/protocol.yaml: no such file"),
    (["--stop-when", "soon"], "--stop-when: must be one of 'none' or 'stable', got 'soon'"),
    (["--stop-threshold", "0"], "--stop-threshold: must be > 0, got 0"),
    (["--stop-threshold", "-0.5"], "--stop-threshold: must be > 0, got -0.5"),
    (["--stop-threshold", "1.01"], "--stop-threshold: must be <= 1, got 1.01"),
    (["--stop-threshold", "nan"], "--stop-threshold: must be a finite number, got nan"),
    (["--stop-window", "0"], "--stop-window: must be >= 1, got 0"),
    (["--stop-window", "1.5"], "--stop-window: invalid int value"),
    (["--stop-set", "0"], "--stop-set: must be >= 1, got 0"),
    (["--stop-set", "1328"], "--stop-set: 1328 items is larger than the initially unlabelled pool (1327 items)"),
    (["--stop-when", "stable", "--stop-set", "5000"], "--stop-set: 5000 items is larger"),
]


def assert_refused(result: Any, needle: str, out: Path) -> None:
    """Exit 2, one line on stderr starting ``saal: error:`` and holding ``needle``, and ``out`` not created."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("saal: error: ") and needle in lines[0], lines[0]
    assert not out.exists(), f"{out} was created"


@pytest.mark.parametrize(("extra", "needle"), BAD_RUN, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_run_option(saal: Callable, tmp_path: Path, extra: list[str], needle: str) -> None:
    out = tmp_path / "out"
    assert_refused(saal(*RUN, "--out", str(out), *extra), needle, out)


# (config keys set in the file, a piece of the error line after "config FILE: ")
BAD_KEYS = [
    ({"run": {"dataset": "imagenet"}}, "run.dataset: unknown dataset 'imagenet'"),
    ({"run": {"model": "vgg"}}, "run.model: unknown model 'vgg'"),
    ({"strategies": ["random", "oracle"]}, "strategies[1]: unknown strategy 'oracle'"),
    ({"strategies": ["random["]}, "strategies[0]: cannot read strategy"),
    ({"strategies": ["entropy[temperature=2]"]}, "has no option 'temperature'"),
    ({"strategies": []}, "strategies: must not be empty"),
    ({"seeds": [-1]}, "seeds: seeds must be non-negative"),
    ({"seeds": [1, 1]}, "seeds: a seed is listed twice"),
    ({"seeds": ["x"]}, "seeds[0]: must be an integer"),
    ({"run": {"initial": -1}}, "run.initial: must be >= 0, got -1"),
    ({"run": {"initial": 25}}, "multiple of the 10 classes"),
    ({"run": {"query": 0}}, "run.query: must be >= 1, got 0"),
    ({"run": {"query": 5000}}, "larger than the unlabelled pool"),
    ({"run": {"rounds": -1}}, "run.rounds: must be >= 0, got -1"),
    ({"run": {"subset": 0}}, "run.subset: must be >= 1, got 0"),
    ({"run": {"score_batch_size": 0}}, "run.score_batch_size: must be >= 1, got 0"),
    ({"run": {"device": "gpu9"}}, "run.device: 'gpu9' is not a torch device"),
    ({"run": {"dataset_options": {"colour": "blue"}}}, "colour"),
    ({"run": {"bogus": 1}}, "run.bogus: unknown key"),
    ({"run": {"train": {"epochs": 0}}}, "run.train.epochs: must be >= 1, got 0"),
    ({"run": {"train": {"batch_size": 0}}}, "run.train.batch_size: must be >= 1, got 0"),
    ({"run": {"train": {"lr": float("nan")}}}, "run.train.lr: must be a finite number, got nan"),
    ({"run": {"train": {"lr": 0}}}, "run.train.lr: must be > 0, got 0"),
    ({"run": {"train": {"optimizer": "rmsprop"}}}, "run.train.optimizer: must be one of"),
    ({"run": {"train": {"momentum": 1.5}}}, "run.train.momentum: must be < 1, got 1.5"),
    ({"run": {"train": {"weight_decay": -1}}}, "run.train.weight_decay: must be >= 0, got -1"),
    ({"run": {"train": {"sam_rho": float("inf")}}}, "run.train.sam_rho: must be a finite number, got inf"),
    ({"run": {"train": {"augment": "sometimes"}}}, "run.train.augment: must be true or false"),
    ({"run": {"stop_when": "soon"}}, "run.stop_when: must be one of 'none' or 'stable', got 'soon'"),
    ({"run": {"stop_threshold": 0}}, "run.stop_threshold: must be > 0, got 0"),
    ({"run": {"stop_threshold": 2}}, "run.stop_threshold: must be <= 1, got 2"),
    ({"run": {"stop_window": 0}}, "run.stop_window: must be >= 1, got 0"),
    ({"run": {"stop_set": 0}}, "run.stop_set: must be >= 1, got 0"),
    ({"run": {"stop_set": 99999}}, "--stop-set: 99999 items is larger than the initially unlabelled pool"),
]


def _protocol(keys: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"strategies": ["random"], "seeds": [1], "run": {"rounds": 1, "train": {"epochs": 1}}}
    for key, value in keys.items():
        if key == "run":
            for k, v in value.items():
                data["run"][k] = {**data["run"].get(k, {}), **v} if k == "train" else v
        else:
            data[key] = value
    return data


def _needle_id(value: object) -> str | None:
    return str(value)[:60] if isinstance(value, dict) else None


@pytest.mark.parametrize(("keys", "needle"), BAD_KEYS, ids=_needle_id)
def test_config_key(saal: Callable, tmp_path: Path, keys: dict, needle: str) -> None:
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(_protocol(keys)))
    out = tmp_path / "out"
    # a bad key is named after the file; what only the data or the strategy can tell is said as it is
    expected = f"config {path}: {needle}" if needle.startswith(("run.", "strategies", "seeds")) else needle
    assert_refused(saal("run", "--config", str(path), "--quiet", "--out", str(out)), expected, out)


def test_a_protocol_without_out_writes_nothing_anywhere(
    saal: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``out`` defaults to runs/<stem> of the file: a bad file must not create that either."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "proto.yaml"
    path.write_text(yaml.safe_dump(_protocol({"run": {"train": {"momentum": 1.5}}})))
    assert_refused(saal("run", "--config", str(path), "--quiet"), "run.train.momentum", tmp_path / "runs")


def test_an_option_fixes_what_the_file_got_wrong(saal: Callable, tmp_path: Path) -> None:
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(_protocol({"run": {"train": {"momentum": 1.5}}})))
    out = tmp_path / "out"
    result = saal("run", "--config", str(path), "--momentum", "0.5", "--rounds", "0", "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr


MODEL_OPTIONS = [
    (["--dataset", "imagenet"], "--dataset: unknown dataset"),
    (["--model", "vgg"], "--model: unknown model"),
    (["--seed", "-1"], "--seed: must be >= 0, got -1"),
    (["--seed", "x"], "--seed: invalid int value"),
    (["--train-on", "-1"], "--train-on: must be >= 0, got -1"),
    (["--train-on", "5000"], "cannot train on 5000 items"),
    (["--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["--split", "val"], "--split: must be one of 'train' or 'test', got 'val'"),
    (["--device", "gpu9"], "--device: 'gpu9' is not a torch device"),
    (["--weights", "/nonexistent/model.pt"], "does not exist"),
    (["--bogus"], "unrecognized arguments"),
]

BAD_SCORE = [
    *MODEL_OPTIONS,
    (["--strategy", "oracle"], "unknown strategy 'oracle'"),
    (["--strategy", "saal[score=mean]"], "score must be one of max, diff"),
    (["--strategy", "entropy[temperature=2]"], "has no option 'temperature'"),
    (["--k", "0"], "--k: the query size"),
    (["--k", "-2"], "--k: the query size"),
    (["--k", "x"], "--k: invalid int value"),
    (["--subset", "0"], "--subset: must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_SCORE, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_score_option(saal: Callable, tmp_path: Path, extra: list[str], needle: str) -> None:
    out = tmp_path / "out"
    assert_refused(saal("score", "--out", str(out / "s.csv"), *extra), needle, out)


BAD_ANALYZE = [
    *MODEL_OPTIONS,
    (["--subset", "1"], "--subset: must be >= 2, got 1"),
    (["--subset", "x"], "--subset: invalid int value"),
    (["--rho", "nan"], "--rho: must be a finite number"),
    (["--rho", "-1"], "--rho: must be >= 0, got -1"),
    (["--perturbation", "adam"], "--perturbation: perturbation must be one of asam, sam"),
    (["--score", "mean"], "--score: score must be one of max, diff"),
    (["--power-iters", "0"], "--power-iters: must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_ANALYZE, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_analyze_option(saal: Callable, tmp_path: Path, extra: list[str], needle: str) -> None:
    out = tmp_path / "out"
    assert_refused(saal("analyze", "--subset", "5", "--out", str(out), *extra), needle, out)


BAD_REPORT = [
    ([], "holds no runs"),
    (["--alpha", "1.5"], "--alpha: must be < 1, got 1.5"),
    (["--alpha", "0"], "--alpha: must be > 0, got 0"),
    (["--alpha", "nan"], "--alpha: must be a finite number"),
    (["--alpha", "x"], "--alpha: invalid float value"),
    (["--budgets", "0,20"], "--budgets: must be >= 1, got 0"),
    (["--budgets", "x"], "--budgets: takes labelled counts"),
    (["--budgets", ","], "--budgets: must not be empty"),
    (["--paired-on", "median"], "--paired-on: must be one of 'auc' or 'rounds', got 'median'"),
    (["--bogus"], "unrecognized arguments"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_REPORT, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_report_option(saal: Callable, tmp_path: Path, extra: list[str], needle: str) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_refused(saal("report", str(tmp_path / "empty"), "--out", str(out), *extra), needle, out)


def test_report_folders(saal: Callable, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_refused(saal("report", str(tmp_path / "nope"), "--out", str(out)), "no such folder", out)
    assert_refused(saal("report", str(tmp_path)), "the following arguments are required: --out", out)
    assert_refused(saal("report", "--out", str(out)), "the following arguments are required: RUN_DIR", out)


def test_unknown_command(saal: Callable, tmp_path: Path) -> None:
    assert_refused(saal("frobnicate"), "invalid choice: 'frobnicate'", tmp_path / "out")
