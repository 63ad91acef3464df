"""`saal report` over two regimes of tiny real runs (a ground-truth start at 20 labels and a cold start at 0): AUBC
per regime, the differences to random, the pairwise-penalty matrix and the which-strategy page, each against a
computation from the runs' own rounds.json."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import ttest_rel

from saal.cli import main
from saal.experiment import ExperimentSpec, RunConfig, run_folder, run_grid
from saal.training import TrainConfig

SEEDS = [0, 1, 2, 3]
REGIMES = {"gt": (20, ["random", "entropy", "margin"]), "cold": (0, ["random", "entropy", "typiclust"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    root = tmp_path_factory.mktemp("regimes")
    for name, (initial, strategies) in REGIMES.items():
        cfg = RunConfig(initial=initial, query=10, rounds=2, train=TrainConfig(epochs=3, batch_size=16))
        run_grid(ExperimentSpec(run=cfg, strategies=strategies, seeds=SEEDS, out=str(root / name)), digits)
    return root


@pytest.fixture(scope="module")
def report(runs: Path) -> Path:
    out = runs / "report"
    assert main(["report", str(runs / "gt"), str(runs / "cold"), "--out", str(out)]) == 0
    return out


def rows_of(runs: Path, regime: str, strategy: str, seed: int) -> list[dict]:
    return json.loads((run_folder(runs / regime, strategy, seed) / "rounds.json").read_text())


def values(runs: Path, regime: str, strategy: str) -> dict[int, np.ndarray]:
    """Return ``{labelled: accuracy per seed}`` of one strategy."""
    out: dict[int, list[float]] = {}
    for seed in SEEDS:
        for r in rows_of(runs, regime, strategy, seed):
            out.setdefault(r["labelled"], []).append(r["accuracy"])
    return {b: np.array(v) for b, v in out.items()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_every_new_file_is_written_and_the_figures_open(report: Path) -> None:
    names = {p.name for p in report.iterdir()}
    expected = {
        *("which-strategy.md", "which-strategy.png", "penalty.csv", "versus-random.csv", "aubc.csv"),
        *("which-strategy.csv", "penalty-digits_gt.png", "penalty-digits_cold.png", "penalty-all-regimes.png"),
    }
    assert expected <= names
    for png in ("which-strategy.png", "penalty-digits_cold.png", "penalty-all-regimes.png"):
        with Image.open(report / png) as im:
            assert im.format == "PNG" and im.size[0] > 300
    text = (report / "report.md").read_text()
    for heading in ("### Against `random` (digits (gt))", "### Pairwise penalty matrix (digits (cold))",
                    "## AUBC per regime", "![pairwise penalty matrix](penalty-digits_gt.png)"):  # fmt: skip
        assert heading in text, heading
    assert "[`which-strategy.md`](which-strategy.md)" in text


def test_aubc_of_a_cold_start_runs_from_the_first_nonzero_budget(runs: Path, report: Path) -> None:
    text = (report / "report.md").read_text()
    assert text.count("the AUC runs from the first nonzero budget (10 labels) to the last") == 1  # the cold group
    rows = rows_of(runs, "cold", "typiclust", 1)
    assert [r["labelled"] for r in rows] == [0, 10, 20]
    acc = [r["accuracy"] for r in rows]
    by_hand = (acc[1] + acc[2]) / 2 * 10 / 10  # 10 -> 20 labels; the untrained model at 0 left out
    run = next(r for r in read_csv(report / "runs.csv") if r["dataset"] == "digits (cold)" and r["strategy"] ==
               "typiclust" and r["seed"] == "1")  # fmt: skip
    assert math.isclose(float(run["auc"]), by_hand, rel_tol=1e-12)
    aubc = {(r["regime"], r["strategy"]): r for r in read_csv(report / "aubc.csv")}
    assert set(aubc) == {(f"digits ({g}) {lo}-{lo + 20}", s) for g, (lo, ss) in REGIMES.items() for s in ss}
    cold = [sum(r["accuracy"] for r in rows_of(runs, "cold", "typiclust", k)[1:]) / 2 for k in SEEDS]
    row = aubc[("digits (cold) 0-20", "typiclust")]
    assert math.isclose(float(row["aubc_mean"]), np.mean(cold), rel_tol=1e-12) and row["finished_runs"] == "4"
    assert "| strategy | digits (gt) 20-40 | digits (cold) 0-20 |" in (report / "which-strategy.md").read_text()


def test_penalty_counts_equal_paired_tests_on_the_rounds(runs: Path, report: Path) -> None:
    got = {(r["dataset"], r["strategy"], r["against"]): r for r in read_csv(report / "penalty.csv")}
    significant = 0
    for regime, (initial, strategies) in REGIMES.items():
        v = {s: values(runs, regime, s) for s in strategies}
        for a in strategies:
            for b in strategies:
                if a == b:
                    continue
                better = compared = 0
                for budget in (initial + 10, initial + 20):  # round 0 is shared
                    d = v[a][budget] - v[b][budget]
                    if np.all(d == 0):
                        continue  # the same picks: not compared
                    compared += 1
                    with np.errstate(all="ignore"):
                        p = ttest_rel(v[a][budget], v[b][budget]).pvalue
                    better += bool(np.std(d) > 1e-12 and p < 0.05 and d.mean() > 0)
                row = got[(f"digits ({regime})", a, b)]
                assert (int(row["better_at"]), int(row["budgets"])) == (better, compared), (regime, a, b)
                significant += better
    assert significant > 0  # these seeds give two: typiclust over random at 20 labels, margin over entropy at 40


def test_differences_to_random_and_the_best_strategy_per_budget(runs: Path, report: Path) -> None:
    versus = {(r["dataset"], r["strategy"], int(r["labelled"])): r for r in read_csv(report / "versus-random.csv")}
    choices = {(r["dataset"], int(r["labelled"])): r for r in read_csv(report / "which-strategy.csv")}
    for regime, (initial, strategies) in REGIMES.items():
        v = {s: values(runs, regime, s) for s in strategies}
        for budget in (initial + 10, initial + 20):
            for s in strategies[1:]:
                row = versus[(f"digits ({regime})", s, budget)]
                d = v[s][budget] - v["random"][budget]
                assert math.isclose(float(row["mean_difference"]), d.mean(), abs_tol=1e-12)
                assert int(row["ahead"]) == int(np.sum(d > 0)) and int(row["behind"]) == int(np.sum(d < 0))
                if np.std(d) > 0:
                    assert math.isclose(float(row["p_value"]), ttest_rel(v[s][budget], v["random"][budget]).pvalue)
            means = {s: v[s][budget].mean() for s in strategies}
            choice = choices[(f"digits ({regime})", budget)]
            assert choice["best"] == max(strategies, key=lambda s: means[s])
            assert choice["best"] in choice["not_significantly_worse"].split()
    page = (report / "which-strategy.md").read_text()
    assert "### digits (gt) 20-40" in page and "### digits (cold) 0-20" in page
    assert "![difference to random](which-strategy.png)" in page and "## Pairwise penalty over every regime" in page


def test_a_single_seed_report_has_no_paired_sections(runs: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    for s in REGIMES["gt"][1]:
        target = run_folder(one, s, 0)
        target.mkdir(parents=True)
        for name in ("config.json", "rounds.json"):
            (target / name).write_bytes((run_folder(runs / "gt", s, 0) / name).read_bytes())
    assert main(["report", str(one), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Against `random`" not in text and "penalty" not in text and "AUBC per regime" not in text
    assert "1 seed: no test is possible" in (tmp_path / "rep" / "which-strategy.md").read_text()
