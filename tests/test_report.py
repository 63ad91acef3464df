"""`saal report` on a small real experiment: files, numbers against a hand computation, the matrix, the plot."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from saal.cli import main
from saal.errors import SaalError
from saal.experiment import ExperimentSpec, RunConfig, run_folder, run_grid
from saal.report import (
    build_report,
    compare,
    dataset_title,
    find_runs,
    group_runs,
    normalised_auc,
    win_tie_loss,
)
from saal.training import TrainConfig

STRATEGIES = ["random", "entropy"]
SEEDS = [0, 1, 2]


def protocol(epochs: int = 3) -> RunConfig:
    return RunConfig(initial=20, query=10, rounds=2, train=TrainConfig(epochs=epochs, batch_size=16))


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    out = tmp_path_factory.mktemp("report") / "exp"
    run_grid(ExperimentSpec(run=protocol(), strategies=STRATEGIES, seeds=SEEDS, out=str(out)), digits)
    return out


@pytest.fixture(scope="module")
def report_dir(experiment_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    assert main(["report", str(experiment_dir), "--out", str(out)]) == 0
    return out


def rounds_of(experiment_dir: Path, strategy: str, seed: int) -> list[dict]:
    return json.loads((run_folder(experiment_dir, strategy, seed) / "rounds.json").read_text())


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Return the cells of every strategy row of the first table (strategy name -> cells after it)."""
    rows: dict[str, list[str]] = {}
    for line in markdown.splitlines():
        if line.startswith("| `") and "·" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0].strip("`* "), cells[1:])
    return rows


def hand(values: list[float], digits: int = 1) -> str:
    v = np.array(values) * 100
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def test_report_writes_every_file(report_dir: Path) -> None:
    names = {p.name for p in report_dir.iterdir()}
    assert {"report.md", "curves-digits.png", "rounds.csv", "runs.csv", "comparisons.csv"} <= names
    text = (report_dir / "report.md").read_text()
    assert "## digits" in text and "ttest_rel" in text and "![learning curves](curves-digits.png)" in text
    # the protocol stands beside the numbers
    assert "model `mlp`" in text and "optimizer adam lr 0.001" in text and "3 epochs" in text
    assert "initial 20 labels" in text and "query 10 per round" in text and "2 rounds" in text
    assert f"With {len(SEEDS)} seeds the test has little power" in text


def test_table_numbers_equal_a_hand_computation(experiment_dir: Path, report_dir: Path) -> None:
    rows = table_rows((report_dir / "report.md").read_text())
    assert list(rows) == STRATEGIES  # in the order of experiment.json, not alphabetical
    for s in STRATEGIES:
        runs = [rounds_of(experiment_dir, s, seed) for seed in SEEDS]
        acc = [[r["accuracy"] for r in run] for run in runs]
        labelled = [r["labelled"] for r in runs[0]]
        assert labelled == [20, 30, 40]
        auc = []
        for a in acc:  # trapezoid by hand over 20 -> 30 -> 40 labels, divided by the 20-label range
            auc.append(((a[0] + a[1]) / 2 * 10 + (a[1] + a[2]) / 2 * 10) / 20)
        acquire = [np.mean([r["acquire_seconds"] for r in run if r["chosen"]]) for run in runs]
        v = np.array(acquire)
        expected = [
            "3/3",
            hand([a[0] for a in acc]),
            hand([a[1] for a in acc]),
            hand([a[2] for a in acc]),
            hand(auc, 2),
            hand([a[-1] for a in acc]),
            hand([max(a) for a in acc]),
            f"{v.mean():.2f} ± {v.std(ddof=1):.2f}",
        ]
        assert rows[s] == expected, s
    # every strategy of a seed starts from the same labelled set and the same weights
    assert rows["random"][1] == rows["entropy"][1]


def test_csv_holds_every_round_and_run(experiment_dir: Path, report_dir: Path) -> None:
    with open(report_dir / "rounds.csv") as fh:
        long = list(csv.DictReader(fh))
    assert len(long) == len(STRATEGIES) * len(SEEDS) * 3
    assert {"dataset", "strategy", "seed", "round", "labelled", "accuracy", "acquire_seconds"} <= set(long[0])
    row = next(r for r in long if r["strategy"] == "entropy" and r["seed"] == "1" and r["round"] == "2")
    assert float(row["accuracy"]) == rounds_of(experiment_dir, "entropy", 1)[2]["accuracy"]
    with open(report_dir / "runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    assert len(runs) == 6
    one = next(r for r in runs if r["strategy"] == "random" and r["seed"] == "2")
    acc = [r["accuracy"] for r in rounds_of(experiment_dir, "random", 2)]
    assert math.isclose(float(one["auc"]), np.trapezoid(acc, [20, 30, 40]) / 20, rel_tol=1e-12)
    assert float(one["best_accuracy"]) == max(acc) and float(one["final_accuracy"]) == acc[-1]


def test_matrix_is_antisymmetric(experiment_dir: Path, report_dir: Path) -> None:
    flip = {"W": "L", "L": "W", "T": "T", "": ""}
    with open(report_dir / "comparisons.csv") as fh:
        rows = {(r["strategy"], r["against"]): r for r in csv.DictReader(fh)}
    assert set(rows) == {("random", "entropy"), ("entropy", "random")}
    a, b = rows[("random", "entropy")], rows[("entropy", "random")]
    assert a["outcome"] == flip[b["outcome"]] and a["outcome"] in "WTL" and a["p_value"] == b["p_value"]
    assert a["pairs"] == "3"
    # the test is the paired t-test on per-seed AUC
    from scipy.stats import ttest_rel

    auc = {s: [normalised_auc([20, 30, 40], [r["accuracy"] for r in rounds_of(experiment_dir, s, k)]) for k in SEEDS]
           for s in STRATEGIES}  # fmt: skip
    assert math.isclose(float(a["p_value"]), ttest_rel(auc["random"], auc["entropy"]).pvalue, rel_tol=1e-9)


def test_compare_outcomes_and_antisymmetry_on_synthetic_groups() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0.6, 0.01, 5)
    assert compare(x + 0.1, x + rng.normal(0, 0.001, 5))[0] == "W"
    assert compare(x, x + 0.1 + rng.normal(0, 0.001, 5))[0] == "L"
    assert compare(x, x) == ("T", 1.0)
    assert compare(x[:1], x[:1])[0] == ""
    for _ in range(20):
        a, b = rng.normal(0.5, 0.05, 3), rng.normal(0.5, 0.05, 3)
        oa, pa = compare(a, b)
        ob, pb = compare(b, a)
        assert {"W": "L", "L": "W", "T": "T"}[oa] == ob and math.isclose(pa, pb)


def test_png_opens(report_dir: Path) -> None:
    with Image.open(report_dir / "curves-digits.png") as im:
        im.verify()
    with Image.open(report_dir / "curves-digits.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_unfinished_runs_and_missing_seeds_are_flagged(experiment_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(experiment_dir, partial)
    cut = run_folder(partial, "entropy", 2) / "rounds.json"
    cut.write_text(json.dumps(json.loads(cut.read_text())[:2]))  # stopped after round 1
    shutil.rmtree(run_folder(partial, "random", 1))  # never started
    out = tmp_path / "rep"
    build_report([partial], out)
    text = (out / "report.md").read_text()
    rows = table_rows(text)
    assert rows["entropy"][0] == "2/3" and rows["random"][0] == "2/2"
    assert "`entropy` *" in text and "`random` *" in text
    assert "entropy`: 3 of 3 seeds, 2 finished" in text and "random`: 2 of 3 seeds, 2 finished" in text
    # accuracy at 30 labels uses all three entropy runs; AUC only the two finished ones
    acc = {k: [r["accuracy"] for r in rounds_of(experiment_dir, "entropy", k)] for k in SEEDS}
    assert rows["entropy"][2] == hand([acc[k][1] for k in SEEDS])
    assert rows["entropy"][4] == hand([normalised_auc([20, 30, 40], acc[k]) for k in (0, 1)], 2)


def test_two_protocols_of_one_dataset_are_two_groups(experiment_dir: Path, digits, tmp_path: Path) -> None:
    other = tmp_path / "other-protocol"
    run_grid(ExperimentSpec(run=protocol(epochs=1), strategies=["random"], seeds=[0], out=str(other)), digits)
    groups = group_runs(find_runs([experiment_dir, other]))
    assert sorted(g.name for g in groups) == ["digits (exp)", "digits (other-protocol)"]
    out = tmp_path / "rep"
    build_report([experiment_dir, other], out, budgets=[20, 40])
    text = (out / "report.md").read_text()
    assert "## digits (exp)" in text and "## digits (other-protocol)" in text and "acc @ 40" in text
    assert "acc @ 30" not in text
    assert len(list(out.glob("curves-*.png"))) == 2
    single = next(g for g in groups if g.name.endswith("(other-protocol)"))
    assert win_tie_loss(single) == {"random": {}}


def test_the_same_protocol_in_two_folders_is_pooled(experiment_dir: Path, digits, tmp_path: Path) -> None:
    more = tmp_path / "more-seeds"
    run_grid(ExperimentSpec(run=protocol(), strategies=["random"], seeds=[7], out=str(more)), digits)
    groups = group_runs(find_runs([experiment_dir, more]))
    assert len(groups) == 1 and groups[0].name == "digits"
    assert [r.seed for r in groups[0].runs_of("random")] == [0, 1, 2, 7]
    build_report([experiment_dir, more], tmp_path / "report")
    assert "With 4 seeds the test has little power" in (tmp_path / "report" / "report.md").read_text()


def test_runs_written_before_a_setting_existed_share_the_protocol(experiment_dir: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(experiment_dir, old)
    config_path = run_folder(old, "random", 0) / "config.json"
    config = json.loads(config_path.read_text())
    assert config.pop("dataset_options") == {}  # a run written before `dataset_options` existed
    config_path.write_text(json.dumps(config))
    (group,) = group_runs(find_runs([old]))
    assert [r.seed for r in group.runs_of("random")] == SEEDS
    config["dataset_options"] = {"size": 10}  # a real difference still splits
    config_path.write_text(json.dumps(config))
    assert len(group_runs(find_runs([old]))) == 2


def test_missing_or_empty_folders_are_one_line_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for folders, needle in [
        ([tmp_path / "nope"], "no such folder"),
        ([tmp_path / "empty"], "holds no runs"),
        ([tmp_path / "file.txt"], "is not a folder"),
        ([], "no experiment folders"),
    ]:
        with pytest.raises(SaalError, match=needle):
            build_report(folders, tmp_path / "out")
    capsys.readouterr()
    code = main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    proc = SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saal: error:") and "holds no runs" in lines[0]
    assert not (tmp_path / "out").exists()


def test_corrupt_rounds_file_is_a_one_line_error(experiment_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(experiment_dir, broken)
    (run_folder(broken, "random", 0) / "rounds.json").write_text("{not json")
    with pytest.raises(SaalError, match=r"rounds.json is unreadable \(JSONDecodeError\)"):
        build_report([broken], tmp_path / "out")


@pytest.mark.parametrize(
    ("dataset", "title"),
    [("folder:/data/cifar10-jpg", "cifar10-jpg"), ("folder:/data/cifar10-jpg/", "cifar10-jpg"),
     ("npz:runs/../x.npz", "x.npz"), ("mnist", "mnist"), ("folder:", "folder:")],
)  # fmt: skip
def test_headings_name_folders_by_their_last_part(dataset: str, title: str) -> None:
    assert dataset_title(dataset) == title
