"""The report's statistics on numbers small enough to check by hand: AUBC from the first nonzero budget, the paired
test, the pairwise-penalty matrix of three strategies at three budgets over four seeds, which strategy is best at
which budget, and the differences to random."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t

from saal.report import (
    Group,
    RunRecord,
    aubc,
    combined_penalty,
    normalised_auc,
    paired_test,
    penalty_matrix,
    versus_baseline,
    which_strategy,
)
from saal.report.statistics import curve_against

T_975_3 = 3.182446305284263  # the 97.5 % quantile of Student's t with 3 degrees of freedom (a table's number)
SEEDS = [0, 1, 2, 3]
BASE = [0.5, 0.6, 0.7, 0.8]  # `random`'s metric on seeds 0-3 at every budget
# other strategy's metric = random's minus these differences, per budget (labels) and seed
MINUS = {
    "b": {20: [0.10, 0.12, 0.08, 0.10], 30: [0.02, 0.02, 0.02, 0.02], 40: [0.0, 0.0, 0.0, 0.0]},
    "c": {20: [0.05, -0.05, 0.05, -0.03], 30: [0.10, 0.11, 0.09, 0.10], 40: [-0.10, -0.12, -0.08, -0.10]},
}


def toy_group() -> Group:
    """Three strategies, four seeds, round 0 at 10 labels (shared) and rounds 1-3 at 20, 30, 40 labels."""
    runs = []
    for strategy in ("random", "b", "c"):
        for seed in SEEDS:
            rows = [{"round": 0, "labelled": 10, "accuracy": 0.3 + seed / 100, "chosen": [1]}]
            for rnd, budget in enumerate((20, 30, 40), start=1):
                minus = MINUS[strategy][budget][seed] if strategy != "random" else 0.0
                rows.append({"round": rnd, "labelled": budget, "accuracy": BASE[seed] - minus, "chosen": [rnd]})
            config = {"strategy": strategy, "seed": seed, "rounds": 3, "dataset": "toy"}
            runs.append(RunRecord(Path(f"/toy/{strategy}/seed-{seed}"), config, rows))
    return Group("toy", {"dataset": "toy"}, runs, order=["random", "b", "c"])


def hand_t(d: list[float]) -> float:
    v = np.array(d)
    return float(v.mean() / (v.std(ddof=1) / math.sqrt(len(v))))


def test_the_hand_t_statistics_are_on_the_intended_sides_of_the_critical_value() -> None:
    # the toy's design, checked once: |t| > 3.18 is significant at 0.05 with four seeds
    assert hand_t(MINUS["b"][20]) == pytest.approx(12.247, abs=1e-3)  # random > b
    assert abs(hand_t(MINUS["c"][20])) < 0.2  # random ~ c
    assert hand_t(np.subtract(MINUS["c"][20], MINUS["b"][20]).tolist()) == pytest.approx(-2.875, abs=1e-3)  # b ~ c
    assert hand_t(MINUS["c"][30]) == pytest.approx(24.495, abs=1e-3)  # random > c
    assert hand_t(np.subtract(MINUS["c"][30], MINUS["b"][30]).tolist()) == pytest.approx(19.596, abs=1e-3)  # b > c
    assert hand_t(MINUS["c"][40]) == pytest.approx(-12.247, abs=1e-3)  # c > random, and c > b (b equals random)


def test_penalty_matrix_of_three_strategies_at_three_budgets_by_hand() -> None:
    m = penalty_matrix(toy_group())
    assert m.strategies == ["random", "b", "c"] and m.budgets == [20, 30, 40]  # round 0 (10 labels) never
    # budgets compared: random-b at 20 and 30 (at 40 b equals random on every seed); the others at all three.
    # At 30 random - b is 0.02 on every seed: no variance, compared but not significant.
    assert m.compared["random"]["b"] == m.compared["b"]["random"] == 2
    assert m.compared["random"]["c"] == m.compared["b"]["c"] == m.compared["c"]["b"] == 3
    expected = {  # (better at, of budgets compared)
        ("random", "b"): 1 / 2,  # at 20
        ("b", "random"): 0 / 2,
        ("random", "c"): 1 / 3,  # at 30
        ("c", "random"): 1 / 3,  # at 40
        ("b", "c"): 1 / 3,  # at 30 (at 20: t = -2.88, not significant)
        ("c", "b"): 1 / 3,  # at 40
    }
    for (a, b), share in expected.items():
        assert m.share(a, b) == pytest.approx(share), (a, b)
    assert m.row_total("random") == pytest.approx(1 / 2 + 1 / 3) and m.column_total("b") == pytest.approx(1 / 2 + 1 / 3)
    # alpha 0.001 keeps t = 24.5 and 19.6 (p 0.00015, 0.00029 with 3 degrees of freedom), not 12.2 (p 0.0012)
    strict = penalty_matrix(toy_group(), alpha=0.001)
    assert [strict.better["random"]["b"], strict.better["random"]["c"], strict.better["b"]["c"]] == [0, 1, 1]
    assert strict.better["c"]["random"] == strict.better["c"]["b"] == 0
    # two regimes: counts add up, shares stay
    both = combined_penalty([m, penalty_matrix(toy_group())])
    assert both.compared["random"]["c"] == 6 and both.share("random", "b") == pytest.approx(1 / 2)


def test_paired_test_mean_interval_p_and_counts_by_hand() -> None:
    x = np.array(BASE)
    y = x - np.array(MINUS["b"][20])
    test = paired_test(x, y)
    sd = np.std(MINUS["b"][20], ddof=1)
    assert test.n == 4 and test.mean == pytest.approx(0.10)
    assert test.low == pytest.approx(0.10 - T_975_3 * sd / 2) and test.high == pytest.approx(0.10 + T_975_3 * sd / 2)
    assert test.p == pytest.approx(2 * student_t.sf(hand_t(MINUS["b"][20]), 3))
    assert (test.wins, test.ties, test.losses) == (4, 0, 0) and test.better() and not test.worse()
    constant = paired_test(x, x - 0.02)  # no variance: the t statistic is undefined
    assert math.isnan(constant.p) and constant.low == constant.high == pytest.approx(0.02)
    assert not constant.better() and not constant.worse()
    one = paired_test([0.5], [0.4])
    assert one.n == 1 and one.mean == pytest.approx(0.1) and math.isnan(one.p) and math.isnan(one.low)
    mixed = paired_test([0.5, 0.5, 0.4], [0.4, 0.5, 0.5])
    assert (mixed.wins, mixed.ties, mixed.losses) == (1, 1, 1)
    assert paired_test([], []).n == 0


def test_aubc_runs_from_the_first_nonzero_budget() -> None:
    # trapezoid over 10 -> 20 -> 30 labels by hand, divided by the 20-label range; the untrained point at 0 left out
    assert aubc([0, 10, 20, 30], [0.1, 0.3, 0.5, 0.6]) == pytest.approx(
        ((0.3 + 0.5) / 2 * 10 + (0.5 + 0.6) / 2 * 10) / 20
    )
    assert normalised_auc([0, 10, 20, 30], [0.1, 0.3, 0.5, 0.6]) == pytest.approx((2 + 4 + 5.5) / 30)
    assert aubc([20, 30, 40], [0.2, 0.4, 0.6]) == normalised_auc([20, 30, 40], [0.2, 0.4, 0.6])
    assert aubc([0], [0.1]) == pytest.approx(0.1) and aubc([0, 10], [0.1, 0.4]) == pytest.approx(0.4)


def test_which_strategy_at_which_budget_by_hand() -> None:
    choices = {c.budget: c for c in which_strategy(toy_group())}
    assert list(choices) == [20, 30, 40]
    # 20: random (0.65) is best; c (0.645) is not significantly worse, b is (t = 12.2)
    assert choices[20].best == "random" and choices[20].contenders == ["random", "c"]
    assert choices[20].means["c"] == pytest.approx(0.645) and choices[20].baseline_gap is None
    # 30: random is best; b is 0.02 behind on every seed (no test possible: kept), c is significantly worse
    assert choices[30].best == "random" and choices[30].contenders == ["random", "b"]
    # 40: c is 0.10 ahead of random (and of b, which equals random): alone
    assert choices[40].best == "c" and choices[40].contenders == ["c"]
    gap = choices[40].baseline_gap
    assert gap is not None and gap.mean == pytest.approx(0.10) and gap.better()


def test_differences_to_random_per_budget() -> None:
    group = toy_group()
    tests = {(s, b): t for s, b, t in versus_baseline(group)}
    assert set(tests) == {(s, b) for s in ("b", "c") for b in (20, 30, 40)}
    assert tests[("b", 20)].mean == pytest.approx(-0.10) and tests[("b", 20)].losses == 4
    assert tests[("c", 40)].mean == pytest.approx(0.10) and tests[("c", 40)].wins == 4
    assert tests[("b", 40)].ties == 4 and math.isnan(tests[("b", 40)].p)
    assert [b for _, b, _ in versus_baseline(group, budgets=[30])] == [30, 30]
    budgets, curve = curve_against(group, "c")
    assert budgets == [10, 20, 30, 40] and curve[0].mean == 0.0  # round 0 drawn: every strategy shares it
    no_random = Group("toy", {}, [r for r in group.runs if r.strategy != "random"])
    assert versus_baseline(no_random) == [] and which_strategy(no_random)[0].baseline_gap is None
