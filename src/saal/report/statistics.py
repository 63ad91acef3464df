"""The numbers of a report: AUBC, means over seeds, paired t-tests, win/tie/loss, the pairwise-penalty matrix,
differences against ``random`` and which strategy is best at which budget.

Every test pairs runs by seed (the runs of one seed share the initial set and the initial weights) and is a
two-sided paired t-test (``scipy.stats.ttest_rel``). Metric values are in [0, 1]; tables scale them to %.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saal.errors import SaalError
from saal.report.runs import Group

ALPHA = 0.05
PAIRED_ON = ("auc", "rounds")
BASELINE = "random"
_TOLERANCE = 1e-12  # differences this small are equal (metric values are fractions of a test set)


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Return (mean, sample standard deviation with ddof=1, count) of the finite ``values``.

    The standard deviation is nan for fewer than two values; the mean is nan for none.
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


# -- paired tests -------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of ``x`` against ``y`` over seeds.

    Attributes:
        n: the number of pairs.
        mean: the mean difference ``x - y`` (nan for no pairs).
        low, high: the two-sided ``1 - alpha`` t confidence interval of ``mean`` (nan for fewer than two pairs;
            ``mean`` itself when every difference is the same).
        p: the two-sided paired t-test's p-value; nan for fewer than two pairs or when every difference is the
            same (no variance: the t statistic is undefined).
        wins, ties, losses: the pairs in which ``x`` is higher, equal, lower.
    """

    n: int
    mean: float
    low: float
    high: float
    p: float
    wins: int
    ties: int
    losses: int

    def better(self, alpha: float = ALPHA) -> bool:
        """Return whether ``x`` is significantly higher than ``y``: a positive mean and p < alpha."""
        return self.p < alpha and self.mean > 0

    def worse(self, alpha: float = ALPHA) -> bool:
        """Return whether ``x`` is significantly lower than ``y``."""
        return self.p < alpha and self.mean < 0


def paired_test(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, alpha: float = ALPHA) -> PairedTest:
    """Return the :class:`PairedTest` of ``x`` against ``y`` (equal lengths, pair ``i`` is ``x[i], y[i]``)."""
    from scipy.stats import t as student_t
    from scipy.stats import ttest_rel

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    d = a - b
    n = int(d.size)
    wins, losses = int(np.sum(d > _TOLERANCE)), int(np.sum(d < -_TOLERANCE))
    counts = (wins, n - wins - losses, losses)
    if n == 0:
        return PairedTest(0, math.nan, math.nan, math.nan, math.nan, *counts)
    mean = float(d.mean())
    if n == 1:
        return PairedTest(1, mean, math.nan, math.nan, math.nan, *counts)
    if np.allclose(d, d[0], rtol=0.0, atol=_TOLERANCE):
        return PairedTest(n, mean, mean, mean, math.nan, *counts)
    half = float(student_t.ppf(1 - alpha / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return PairedTest(n, mean, mean - half, mean + half, float(ttest_rel(a, b).pvalue), *counts)


def paired_at(group: Group, a: str, b: str, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the metric of strategies ``a`` and ``b`` at ``budget`` labels, one pair per seed both reached it."""
    va, vb = group.values_at(a, budget), group.values_at(b, budget)
    seeds = sorted(set(va) & set(vb))
    return np.array([va[s] for s in seeds]), np.array([vb[s] for s in seeds])


def paired_values(group: Group, a: str, b: str, paired_on: str = "auc") -> tuple[np.ndarray, np.ndarray]:
    """Return the paired samples of strategies ``a`` and ``b``.

    ``auc``: one AUC per seed that both finished. ``rounds``: one metric value per (seed, round) that
    both reached, round 0 left out (every strategy of a seed shares it).

    Raises:
        SaalError: an unknown ``paired_on``.
    """
    if paired_on not in PAIRED_ON:
        raise SaalError(f"paired_on must be one of {', '.join(PAIRED_ON)}, got {paired_on!r}")
    ra = {r.seed: r for r in group.runs_of(a)}
    rb = {r.seed: r for r in group.runs_of(b)}
    xs: list[float] = []
    ys: list[float] = []
    for seed in sorted(set(ra) & set(rb)):
        if paired_on == "auc":
            if ra[seed].finished and rb[seed].finished:
                xs.append(ra[seed].auc())
                ys.append(rb[seed].auc())
        else:
            acc_a = {int(r["round"]): float(r[ra[seed].metric]) for r in ra[seed].rows}
            acc_b = {int(r["round"]): float(r[rb[seed].metric]) for r in rb[seed].rows}
            for rnd in sorted(set(acc_a) & set(acc_b) - {0}):
                xs.append(acc_a[rnd])
                ys.append(acc_b[rnd])
    return np.array(xs), np.array(ys)


def compare(x: np.ndarray, y: np.ndarray, alpha: float = ALPHA) -> tuple[str, float]:
    """Return ("W" | "T" | "L" | "", p-value) for ``x`` against ``y`` by a two-sided paired t-test.

    "W": the mean difference is positive and p < alpha; "L": negative and p < alpha; "T"
    otherwise; "" when fewer than two pairs exist (no test possible). Identical samples are a tie
    with p = 1.
    """
    from scipy.stats import ttest_rel

    if len(x) < 2:
        return "", math.nan
    d = x - y
    if np.allclose(d, d[0], rtol=0.0, atol=_TOLERANCE):
        # Constant differences have no variance: the t statistic is undefined.
        if abs(d[0]) <= _TOLERANCE:
            return "T", 1.0
        return ("W" if d[0] > 0 else "L"), 0.0
    p = float(ttest_rel(x, y).pvalue)
    if p < alpha:
        return ("W" if d.mean() > 0 else "L"), p
    return "T", p


def win_tie_loss(group: Group, paired_on: str = "auc", alpha: float = ALPHA) -> dict[str, dict[str, tuple[str, float]]]:
    """Return ``m[a][b] = (outcome of a against b, p-value)`` for every pair of strategies.

    The matrix is antisymmetric: ``m[a][b]`` is "W" exactly when ``m[b][a]`` is "L".
    """
    names = group.strategies
    m: dict[str, dict[str, tuple[str, float]]] = {a: {} for a in names}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x, y = paired_values(group, a, b, paired_on)
            outcome, p = compare(x, y, alpha)
            m[a][b] = (outcome, p)
            m[b][a] = ({"W": "L", "L": "W"}.get(outcome, outcome), p)
    return m


def strategy_summary(group: Group, budgets: Sequence[int]) -> list[dict[str, Any]]:
    """Return one row per strategy: seeds, finished runs, and (mean, std, n) of every metric."""
    out = []
    for s in group.strategies:
        runs = group.runs_of(s)
        done = [r for r in runs if r.finished]
        out.append(
            {
                "strategy": s,
                "seeds": [r.seed for r in runs],
                "finished": len(done),
                "at": {b: mean_std([r.value_at(b) for r in runs]) for b in budgets},
                "auc": mean_std([r.auc() for r in done]),
                "final": mean_std([float(r.scores[-1]) for r in done]),
                "best": mean_std([float(r.scores.max()) for r in done]),
                "acquire_seconds": mean_std([r.acquire_seconds() for r in runs]),
            }
        )
    return out


def has_pairs(group: Group) -> bool:
    """Return whether two strategies of ``group`` share two or more seeds (so that paired tests exist)."""
    seeds = [{r.seed for r in group.runs_of(s)} for s in group.strategies]
    return any(len(a & b) >= 2 for i, a in enumerate(seeds) for b in seeds[i + 1 :])


# -- the pairwise-penalty matrix ------------------------------------------------------------
@dataclass
class PenaltyMatrix:
    """How often each strategy is significantly better than each other one (Lueth et al. 2023, after Ash et al.
    2020).

    Attributes:
        strategies: row and column order.
        better: ``better[a][b]``: the budgets at which ``a`` is significantly better than ``b``.
        compared: ``compared[a][b]``: the budgets at which ``a`` and ``b`` were tested (two or more seeds).
        budgets: every budget tested for some pair.
    """

    strategies: list[str]
    better: dict[str, dict[str, int]] = field(default_factory=dict)
    compared: dict[str, dict[str, int]] = field(default_factory=dict)
    budgets: list[int] = field(default_factory=list)

    def share(self, a: str, b: str) -> float:
        """Return the share of the budgets compared at which ``a`` is significantly better than ``b`` (nan for
        none)."""
        n = self.compared.get(a, {}).get(b, 0)
        return self.better[a][b] / n if n else math.nan

    def row_total(self, a: str) -> float:
        """Return the sum of ``a``'s row: against how many strategies' worth of budgets it is better."""
        return float(np.nansum([self.share(a, b) for b in self.strategies if b != a]))

    def column_total(self, b: str) -> float:
        """Return the sum of ``b``'s column: how much the others beat it (lower is better)."""
        return float(np.nansum([self.share(a, b) for a in self.strategies if a != b]))


def penalty_matrix(group: Group, alpha: float = ALPHA) -> PenaltyMatrix:
    """Return the group's pairwise-penalty matrix.

    For each pair of strategies and each budget after the first acquisition at which both have two or more
    seeds in common, a two-sided paired t-test over seeds of their metric there; ``better[a][b]`` counts the
    budgets with p < ``alpha`` and a positive mean difference. A pair with the same result on every seed there
    (the same picks, e.g. a strategy that let ``random`` make its first pick) is not compared at that budget;
    the same nonzero difference on every seed (no variance: the t statistic is undefined) counts as compared,
    not significant. Round 0 is never compared: the strategies of a seed share its labelled set.
    """
    names = group.strategies
    m = PenaltyMatrix(names, {a: dict.fromkeys(names, 0) for a in names}, {a: dict.fromkeys(names, 0) for a in names})
    for budget in group.acquired_budgets:
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                x, y = paired_at(group, a, b, budget)
                if len(x) < 2 or np.allclose(x, y, rtol=0.0, atol=_TOLERANCE):
                    continue
                test = paired_test(x, y, alpha)
                m.compared[a][b] += 1
                m.compared[b][a] += 1
                m.better[a][b] += int(test.better(alpha))
                m.better[b][a] += int(test.worse(alpha))
                if budget not in m.budgets:
                    m.budgets.append(budget)
    return m


def combined_penalty(matrices: Sequence[PenaltyMatrix]) -> PenaltyMatrix:
    """Return the penalty matrix over several groups: counts summed, so each entry is the share of all (group,
    budget) comparisons of that pair at which the row was significantly better."""
    names: list[str] = []
    for m in matrices:
        names += [s for s in m.strategies if s not in names]
    out = PenaltyMatrix(names, {a: dict.fromkeys(names, 0) for a in names}, {a: dict.fromkeys(names, 0) for a in names})
    for m in matrices:
        for a in m.strategies:
            for b in m.strategies:
                out.better[a][b] += m.better[a][b]
                out.compared[a][b] += m.compared[a][b]
        out.budgets = sorted(set(out.budgets) | set(m.budgets))
    return out


# -- against random, and which strategy at which budget -------------------------------------
def versus_baseline(
    group: Group, budgets: Sequence[int] | None = None, alpha: float = ALPHA, baseline: str = BASELINE
) -> list[tuple[str, int, PairedTest]]:
    """Return ``(strategy, budget, test of strategy against baseline)`` for every other strategy and budget (default:
    those after the first acquisition) at which both have a seed in common; empty without ``baseline`` runs."""
    if baseline not in group.strategies:
        return []
    out = []
    for s in group.strategies:
        if s == baseline:
            continue
        for b in group.acquired_budgets if budgets is None else budgets:
            x, y = paired_at(group, s, baseline, b)
            if len(x):
                out.append((s, b, paired_test(x, y, alpha)))
    return out


@dataclass
class BudgetChoice:
    """The best strategy at one budget of one group.

    Attributes:
        budget: labelled count.
        best: the strategy with the highest mean metric there.
        means: the mean metric of every strategy that reached the budget.
        contenders: ``best`` and every strategy not significantly worse than it (paired t-test), in group order.
        baseline_gap: ``best`` against ``random`` (paired), None when ``best`` is ``random`` or there is none.
    """

    budget: int
    best: str
    means: dict[str, float]
    contenders: list[str]
    baseline_gap: PairedTest | None


def which_strategy(group: Group, alpha: float = ALPHA, baseline: str = BASELINE) -> list[BudgetChoice]:
    """Return, per budget after the first acquisition, the best strategy by mean metric and those not
    significantly worse than it (fewer than two seeds in common: not shown worse, so kept)."""
    out = []
    for b in group.acquired_budgets:
        means = {s: float(np.mean(list(v.values()))) for s in group.strategies if (v := group.values_at(s, b))}
        if not means:
            continue
        best = max(means, key=lambda s: means[s])  # the first of equals, in group order
        contenders = [
            s for s in means if s == best or not paired_test(*paired_at(group, best, s, b), alpha=alpha).better(alpha)
        ]
        gap = None
        if baseline in means and best != baseline:
            gap = paired_test(*paired_at(group, best, baseline, b), alpha=alpha)
        out.append(BudgetChoice(b, best, means, contenders, gap))
    return out


def curve_against(
    group: Group, strategy: str, alpha: float = ALPHA, baseline: str = BASELINE
) -> tuple[list[int], list[PairedTest]]:
    """Return every budget of ``group`` at which ``strategy`` and ``baseline`` share a seed, and the paired test of
    ``strategy`` against ``baseline`` there (round 0 included: a difference of 0)."""
    budgets, tests = [], []
    for b in group.budgets:
        x, y = paired_at(group, strategy, baseline, b)
        if len(x):
            budgets.append(b)
            tests.append(paired_test(x, y, alpha))
    return budgets, tests


def aubc_by_regime(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """Return one row per (group, strategy): the group's regime label and the mean, sample std and count of the
    AUBC of its finished runs."""
    rows = []
    for g in groups:
        for s in g.strategies:
            mean, std, n = mean_std([r.auc() for r in g.runs_of(s) if r.finished])
            rows.append({"regime": g.regime, "group": g.name, "strategy": s, "mean": mean, "std": std, "n": n})
    return rows
