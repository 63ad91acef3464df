"""Markdown and CSV of a report: the per-group tables of ``report.md``, the one page ``which-strategy.md``, and
the CSV files of every number behind them."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saal.experiment.storage import DEFAULT_METRIC
from saal.report.area import aubc
from saal.report.runs import Group, RunRecord, used_by
from saal.report.statistics import (
    BASELINE,
    BudgetChoice,
    PairedTest,
    PenaltyMatrix,
    compare,
    mean_std,
)

# Short names of metrics for column heads (others are used as they are).
_SHORT_NAMES = {"accuracy": "acc"}


def mean_std_text(ms: tuple[float, float, int], digits: int = 1, scale: float = 100.0) -> str:
    """Format ``(mean, std, n)`` as ``mean ± std`` (scaled; 100 gives %); the std is left out for one value."""
    mean, std, n = ms
    if n == 0:
        return "–"
    if n == 1 or math.isnan(std):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def describe_protocol(protocol: dict[str, Any]) -> str:
    """Return a one-paragraph description of a protocol (model, training, budgets)."""
    t = protocol.get("train", {}) or {}
    opt = str(t.get("optimizer", "?"))
    opt_text = f"{opt} lr {t.get('lr')}"
    if opt in ("sgd", "sam"):
        opt_text += f", momentum {t.get('momentum')}"
    if opt == "sam":
        opt_text += f", rho {t.get('sam_rho')}"
    if t.get("weight_decay"):
        opt_text += f", weight decay {t.get('weight_decay')}"
    start = "re-initialised to the same initial weights each round" if protocol.get("reinit") else "warm-started"
    balanced = "class-balanced" if protocol.get("initial_balanced") else "uniform"
    initial = f"initial {protocol.get('initial')} labels ({balanced})"
    if protocol.get("initial_strategy") or protocol.get("initial") == 0:
        initial = f"initial {protocol.get('initial')} labels (chosen without labels)"
    subset = protocol.get("subset")
    return (
        f"dataset `{protocol.get('dataset')}`; model `{protocol.get('model')}`; optimizer {opt_text}, {start}; "
        f"{t.get('epochs')} epochs, batch {t.get('batch_size')}, augmentation {'on' if t.get('augment') else 'off'}; "
        f"{initial}, query {protocol.get('query')} per round, "
        f"{protocol.get('rounds')} round{'' if protocol.get('rounds') == 1 else 's'}; "
        f"{'pool subset ' + str(subset) + ' per round' if subset else 'whole pool scored'}."
    )


def ground_truth_start(protocol: dict[str, Any], metric: str = DEFAULT_METRIC) -> bool:
    """Return whether runs of ``protocol`` started from an initial set drawn class-balanced with the true labels
    (``initial > 0``, no ``initial_strategy``, ``initial_balanced``, a classification metric)."""
    return (
        int(protocol.get("initial") or 0) > 0
        and not protocol.get("initial_strategy")
        and bool(protocol.get("initial_balanced"))
        and metric == DEFAULT_METRIC
    )


def describe_start(protocol: dict[str, Any], metric: str = DEFAULT_METRIC) -> str:
    """Return one markdown line saying how runs of ``protocol`` got their first labels."""
    initial, by = int(protocol.get("initial") or 0), protocol.get("initial_strategy")
    if ground_truth_start(protocol, metric):
        return (
            f"Start: **ground-truth balanced start**: the initial {initial} labels were drawn class-balanced with "
            "the true labels (the paper's protocol; a person labelling their own data cannot do this)."
        )
    if initial == 0:
        first = f"`{by}`" if by else "each run's own strategy when it is cold-start, else `random`"
        return f"Start: chosen without labels: no initial labels; the first pick by {first} (see `acquired_by`)."
    if by:
        return f"Start: chosen without labels: the initial {initial} labels were picked by `{by}` from zero labels."
    return f"Start: chosen without labels: the initial {initial} labels were drawn uniformly at random."


def auto_lines(group: Group) -> list[str]:
    """Return markdown: per ``auto`` run of ``group``, which strategy it used at which budgets (none without
    ``auto`` runs that record it)."""
    lines: list[str] = []
    for run in sorted(group.runs, key=lambda r: (r.strategy, r.seed)):
        if not re.match(r"^\s*auto\b", run.strategy):
            continue
        spans: list[list[Any]] = []  # [strategy, first budget, last budget]
        for row in run.rows:
            used = used_by(row)
            if not used:
                continue
            if spans and spans[-1][0] == used:
                spans[-1][2] = int(row["labelled"])
            else:
                spans.append([used, int(row["labelled"]), int(row["labelled"])])
        if spans:
            text = ", ".join(f"`{u}` at {a}{'' if a == b else f'-{b}'} labels" for u, a, b in spans)
            lines.append(f"- `{run.strategy}` seed {run.seed}: {text}")
    if not lines:
        return []
    return [f"### What auto chose ({group.name})", "", *lines, ""]


def group_lines(
    group: Group,
    budgets: list[int],
    summary: list[dict[str, Any]],
    matrix: dict[str, dict[str, tuple[str, float]]],
    png: str,
    paired_on: str,
    alpha: float,
) -> list[str]:
    """Return the markdown of one group in ``report.md``: the protocol, the table of numbers per strategy, the
    learning curves, the per-class table (detection) and the win/tie/loss matrix."""
    lines = [f"## {group.name}", "", f"Protocol: {describe_protocol(group.protocol)}", ""]
    lines += summary_lines(group, budgets, summary)
    lines += ["", f"![learning curves]({png})", ""]
    lines += per_class_lines(group, alpha)
    lines += win_tie_loss_lines(group, matrix, paired_on, alpha)
    return lines


def summary_lines(group: Group, budgets: list[int], summary: list[dict[str, Any]]) -> list[str]:
    """Return the markdown table of one group's numbers per strategy, with what they mean and which runs are
    incomplete."""
    expected_seeds = len(group.seeds)
    metric = group.metric
    short = _SHORT_NAMES.get(metric, metric)
    head = ["strategy", "seeds", *[f"{short} @ {b}" for b in budgets], "AUC", "final", "best", "acquire s/round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for row in summary:
        n_seeds = len(row["seeds"])
        flag = ""
        if n_seeds < expected_seeds or row["finished"] < n_seeds:
            flag = " *"
            notes.append(
                f"`{row['strategy']}`: {n_seeds} of {expected_seeds} seeds, {row['finished']} finished "
                f"(seeds {', '.join(map(str, row['seeds']))})"
            )
        cells = [
            f"`{row['strategy']}`{flag}",
            f"{row['finished']}/{n_seeds}",
            *[mean_std_text(row["at"][b]) for b in budgets],
            mean_std_text(row["auc"], 2),
            mean_std_text(row["final"]),
            mean_std_text(row["best"]),
            mean_std_text(row["acquire_seconds"], 2, scale=1.0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Test {metric} in %, mean ± sample standard deviation (ddof = 1) over seeds. `seeds` is finished/started "
        f"runs. `{short} @ N`: after training on N labels (every run that reached N). AUC: area under the "
        f"{metric}-vs-labels curve by the trapezoid rule, divided by the budget range, in % (finished runs). "
        "final: after the last round; best: the best round (the SAAL paper's headline metric); both over "
        "finished runs. acquire s/round: mean wall seconds of one acquisition." + zero_label_note(group),
    ]
    if notes:
        lines += ["", "\\* incomplete: " + "; ".join(notes) + "."]
    return lines


def zero_label_note(group: Group) -> str:
    """Return a sentence on runs that start from 0 labels ("" when the group has none)."""
    budgets = group.budgets
    if not budgets or budgets[0] != 0:
        return ""
    first = next((b for b in budgets if b > 0), None)
    where = f"the first nonzero budget ({first} labels)" if first else "the first nonzero budget"
    return (
        f" Runs start from 0 labels: the {group.metric} there is the untrained model's; the curves show it, but "
        f"the AUC runs from {where} to the last."
    )


def win_tie_loss_lines(
    group: Group, matrix: dict[str, dict[str, tuple[str, float]]], paired_on: str, alpha: float
) -> list[str]:
    """Return the markdown of one group's win/tie/loss matrix."""
    names = group.strategies
    seeds = len(group.seeds)
    unit = "normalised AUC per seed" if paired_on == "auc" else f"{group.metric} per (seed, round), round 0 left out"
    lines = [
        f"### Win / tie / loss ({group.name})",
        "",
        f"Row strategy against column strategy: a two-sided paired t-test (scipy.stats.ttest_rel) on the "
        f"{unit}, paired by seed; **W** when the row's mean is higher and p < {alpha}, **L** when lower and "
        f"p < {alpha}, **T** otherwise, blank when fewer than two pairs exist."
        + (
            f" With {seeds} seeds the test has little power: a tie often means 'not enough seeds to tell'."
            if seeds < 10
            else ""
        ),
        "",
        "| | " + " | ".join(f"`{n}`" for n in names) + " | W-T-L |",
        "|" + "---|" * (len(names) + 2),
    ]
    for a in names:
        cells = ["·" if a == b else matrix[a][b][0] for b in names]
        w, t, lo = (sum(matrix[a][b][0] == c for b in names if b != a) for c in "WTL")
        lines.append(f"| `{a}` | " + " | ".join(cells) + f" | {w}-{t}-{lo} |")
    lines.append("")
    return lines


def _final_values(run: RunRecord, key: str) -> dict[str, float]:
    """Return the last round's ``per_class`` or ``details`` values of a run (empty when it has none)."""
    value = run.rows[-1].get(key) if run.rows else None
    return {str(k): float(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _class_auc(run: RunRecord, name: str) -> float:
    """Return the normalised AUC of one class's per-class metric over a run's rounds (nan where a round lacks it)."""
    values = [float((r.get("per_class") or {}).get(name, math.nan)) for r in run.rows]
    return aubc(run.labelled, np.asarray(values))


def per_class_lines(group: Group, alpha: float) -> list[str]:
    """Return markdown: per strategy, the final per-class metric and other recorded values (detection: ``map``,
    ``boxes_labelled``), and each class's AUC with a paired test against ``random`` when the group has it.
    Nothing for runs that record no per-class values."""
    finished = [r for r in group.runs if r.finished]
    classes = sorted({c for r in finished for c in _final_values(r, "per_class")})
    details = sorted({d for r in finished for d in _final_values(r, "details")})
    if not classes or group.metric == DEFAULT_METRIC:
        return []
    head = ["strategy", *[f"{c} final" for c in classes], *[f"{c} AUC" for c in classes], *details]
    lines = [f"### Per class ({group.name})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_seed = {s: {r.seed: r for r in finished if r.strategy == s} for s in group.strategies}
    base = by_seed.get("random", {})
    for s in group.strategies:
        runs = list(by_seed[s].values())
        cells = [f"`{s}`"]
        cells += [
            mean_std_text(mean_std([_final_values(r, "per_class").get(c, math.nan) for r in runs])) for c in classes
        ]
        for c in classes:
            text = mean_std_text(mean_std([_class_auc(r, c) for r in runs]), 2)
            seeds = sorted(set(by_seed[s]) & set(base))
            if s != "random" and len(seeds) >= 2:
                x = np.array([_class_auc(by_seed[s][k], c) for k in seeds])
                y = np.array([_class_auc(base[k], c) for k in seeds])
                outcome, p = compare(x, y, alpha)
                text += f" {outcome} (p {p:.2f})" if outcome else ""
            cells.append(text)
        for d in details:
            scale = 100.0 if d.startswith("map") else 1.0
            cells.append(
                mean_std_text(mean_std([_final_values(r, "details").get(d, math.nan) for r in runs]), 1, scale)
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Final: the per-class {group.metric} after the last round, in %; AUC: the area under each class's curve "
        f"(as above), with W / T / L against `random` by a paired t-test over seeds (p < {alpha}); further "
        "columns: the other values each round records (`map`: mAP@[.5:.95] in %; `boxes_labelled`: boxes in the "
        "labelled set at the last round), mean ± std over finished runs.",
        "",
    ]
    return lines


def round_rows(group: Group, run: RunRecord, acquisitions: bool) -> list[dict[str, Any]]:
    """Return the report's ``rounds.csv`` rows of one run; ``acquired_by`` and ``reason`` when ``acquisitions``
    (some run of the report records them; empty for the rounds that do not)."""
    t = group.protocol.get("train", {}) or {}
    rows = []
    for r in run.rows:
        extra = {"acquired_by": r.get("acquired_by", ""), "reason": r.get("reason", "")} if acquisitions else {}
        rows.append(
            {
                "dataset": group.name,
                "strategy": run.strategy,
                "seed": run.seed,
                "round": r["round"],
                "labelled": r["labelled"],
                group.metric: r[group.metric],
                "train_seconds": r.get("train_seconds"),
                "acquire_seconds": r.get("acquire_seconds"),
                "chosen": " ".join(map(str, r.get("chosen", []))),
                **extra,
                "finished": run.finished,
                "model": group.protocol.get("model"),
                "optimizer": t.get("optimizer"),
                "run_folder": str(run.folder),
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts with the same keys) as a CSV file with a header (only an empty line for none)."""
    fields = list(rows[0]) if rows else []
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def run_row(group: Group, run: RunRecord) -> dict[str, Any]:
    """Return the report's ``runs.csv`` row of one run (AUC, final and best only when it finished)."""
    return {
        "dataset": group.name,
        "strategy": run.strategy,
        "seed": run.seed,
        "rounds_done": len(run.rows),
        "finished": run.finished,
        "auc": run.auc() if run.finished else "",
        f"final_{group.metric}": float(run.scores[-1]) if run.finished else "",
        f"best_{group.metric}": float(run.scores.max()) if run.finished else "",
        "acquire_seconds_per_round": run.acquire_seconds(),
        "run_folder": str(run.folder),
    }


def comparison_rows(group: Group, matrix: dict[str, dict[str, tuple[str, float]]], pairs: dict[tuple[str, str], int],
                    paired_on: str) -> list[dict[str, Any]]:  # fmt: skip
    """Return the report's ``comparisons.csv`` rows of one group: every ordered pair's outcome, p-value and
    number of pairs."""
    return [
        {
            "dataset": group.name,
            "strategy": a,
            "against": b,
            "outcome": matrix[a][b][0],
            "p_value": matrix[a][b][1],
            "pairs": pairs[(a, b)],
            "paired_on": paired_on,
        }
        for a in group.strategies
        for b in group.strategies
        if a != b
    ]


# -- the new tables: against random, the penalty matrix, AUBC per regime, which strategy where ------------------
def points_text(value: float, digits: int = 1) -> str:
    """Format a difference of fractions in signed points (``0.012`` -> ``+1.2``); ``–`` for nan."""
    return f"{100 * value:+.{digits}f}" if math.isfinite(value) else "–"


def p_text(p: float) -> str:
    """Format a p-value: three decimals, ``<0.001`` below that, ``–`` for none (no test)."""
    if not math.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def interval_text(test: PairedTest) -> str:
    """Format a test's confidence interval in points, ``–`` for none."""
    if not math.isfinite(test.low):
        return "–"
    return f"[{points_text(test.low)}, {points_text(test.high)}]"


def confidence(alpha: float) -> str:
    """Return ``95 %`` for alpha 0.05: the level of the confidence intervals."""
    return f"{100 * (1 - alpha):g} %"


def versus_baseline_lines(group: Group, tests: list[tuple[str, int, PairedTest]], alpha: float) -> list[str]:
    """Return markdown: every strategy against ``random`` at the report's budgets, paired by seed (nothing
    without tests)."""
    if not tests:
        return []
    short = _SHORT_NAMES.get(group.metric, group.metric)
    lines = [
        f"### Against `{BASELINE}` ({group.name})",
        "",
        f"| strategy | labels | Δ {short} (points) | {confidence(alpha)} CI | p | ahead / level / behind |",
        "|---|---|---|---|---|---|",
    ]
    for s, b, t in tests:
        lines.append(
            f"| `{s}` | {b} | {points_text(t.mean)} | {interval_text(t)} | {p_text(t.p)} | "
            f"{t.wins} / {t.ties} / {t.losses} |"
        )
    lines += [
        "",
        f"The strategy's test {group.metric} minus `{BASELINE}`'s at the same budget and seed, in points: the mean "
        f"over the seeds both reached, its {confidence(alpha)} t confidence interval, the p-value of a two-sided "
        "paired t-test (scipy.stats.ttest_rel; – where it is undefined: one seed, or the same difference on every "
        "seed), and on how many seeds the strategy is ahead, level, behind. Every budget is in `versus-random.csv`.",
        "",
    ]
    return lines


def _share_text(matrix: PenaltyMatrix, a: str, b: str, with_count: bool) -> str:
    share = matrix.share(a, b)
    if not math.isfinite(share):
        return "–"
    return f"{share:.2f} ({matrix.compared[a][b]})" if with_count else f"{share:.2f}"


def penalty_lines(title: str, matrix: PenaltyMatrix, png: str, alpha: float, over: str) -> list[str]:
    """Return markdown: the pairwise-penalty matrix, what it means, and its heatmap ``png``.

    Args:
        over: what an entry is a share of, e.g. ``the 4 budgets 30, 40, 50, 60``.
    """
    names = matrix.strategies
    counts = {matrix.compared[a][b] for a in names for b in names if a != b}
    with_count = len(counts) > 1
    lines = [
        f"### Pairwise penalty matrix ({title})",
        "",
        "| | " + " | ".join(f"`{n}`" for n in names) + " | Σ |",
        "|" + "---|" * (len(names) + 2),
    ]
    for a in names:
        cells = ["·" if a == b else _share_text(matrix, a, b, with_count) for b in names]
        lines.append(f"| `{a}` | " + " | ".join(cells) + f" | {matrix.row_total(a):.2f} |")
    lines.append("| Σ | " + " | ".join(f"{matrix.column_total(b):.2f}" for b in names) + " | |")
    lines += [
        "",
        f"Entry: the share of {over} at which the row strategy is significantly better than the column strategy: "
        "at each budget a two-sided paired t-test over seeds (scipy.stats.ttest_rel) with p < "
        f"{alpha} and a higher mean (Lueth et al. 2023, *Navigating the pitfalls of active learning evaluation*; "
        "after Ash et al. 2020). A pair is compared at a budget where it has two or more seeds in common and not "
        "the same result on every seed (the same picks: round 0, where the strategies of a seed share its "
        "labelled set, or a strategy that let another make its picks); the same nonzero difference on every seed "
        "(the t statistic is undefined) counts as not significant."
        + (" (n) after an entry: at how many budgets that pair was compared." if with_count else "")
        + " Σ: the row's sum (how often it beats the others); the last row sums each column (how often it is "
        "beaten: lower is better). Every pair's counts are in `penalty.csv`.",
        "",
        f"![pairwise penalty matrix]({png})",
        "",
    ]
    return lines


def budgets_text(budgets: Sequence[int]) -> str:
    """Return ``the 3 budgets 30, 40, 50`` (``the budget 30`` for one)."""
    listed = ", ".join(map(str, budgets))
    return f"the budget {listed}" if len(budgets) == 1 else f"the {len(budgets)} budgets {listed}"


def penalty_rows(group_name: str, matrix: PenaltyMatrix) -> list[dict[str, Any]]:
    """Return ``penalty.csv`` rows: every ordered pair's significant budgets, budgets compared and share."""
    return [
        {
            "dataset": group_name,
            "strategy": a,
            "against": b,
            "better_at": matrix.better[a][b],
            "budgets": matrix.compared[a][b],
            "share": matrix.share(a, b),
        }
        for a in matrix.strategies
        for b in matrix.strategies
        if a != b
    ]


def versus_rows(group: Group, tests: list[tuple[str, int, PairedTest]]) -> list[dict[str, Any]]:
    """Return ``versus-random.csv`` rows: one per strategy and budget (differences as fractions, not points)."""
    return [
        {
            "dataset": group.name,
            "strategy": s,
            "against": BASELINE,
            "labelled": b,
            "pairs": t.n,
            "mean_difference": t.mean,
            "ci_low": t.low,
            "ci_high": t.high,
            "p_value": t.p,
            "ahead": t.wins,
            "level": t.ties,
            "behind": t.losses,
        }
        for s, b, t in tests
    ]


def aubc_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Return markdown: the AUBC of every strategy (rows) in every regime (columns), the best mean in bold."""
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    cell = {(r["regime"], r["strategy"]): r for r in rows}
    best = {}
    for regime in regimes:
        means = [(r["mean"], r["strategy"]) for r in rows if r["regime"] == regime and math.isfinite(r["mean"])]
        best[regime] = max(means)[1] if means else None
    lines = ["| strategy | " + " | ".join(regimes) + " |", "|" + "---|" * (len(regimes) + 1)]
    for s in strategies:
        cells = []
        for regime in regimes:
            r = cell.get((regime, s))
            text = mean_std_text((r["mean"], r["std"], r["n"]), 2) if r else ""
            cells.append(f"**{text}**" if r and best[regime] == s else text)
        lines.append(f"| `{s}` | " + " | ".join(cells) + " |")
    return lines


AUBC_TEXT = (
    "AUBC: the area under the test-metric-vs-labels curve by the trapezoid rule from the first nonzero budget to "
    "the last, divided by that range, in %: mean ± sample standard deviation over the finished seeds, the best "
    "mean of each regime in bold. A regime is one group of runs (a dataset under one protocol), named by the "
    "group and its budget range. Runs that start from 0 labels have the untrained model's metric there: the "
    "curves show it, the AUBC leaves it out."
)


def aubc_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return ``aubc.csv`` rows (fractions, not %)."""
    return [
        {"regime": r["regime"], "dataset": r["group"], "strategy": r["strategy"], "aubc_mean": r["mean"],
         "aubc_std": r["std"], "finished_runs": r["n"]}
        for r in rows
    ]  # fmt: skip


def choice_lines(group: Group, choices: list[BudgetChoice], alpha: float) -> list[str]:
    """Return markdown: per budget of one group, the best strategy, those not significantly worse, and the gap
    to ``random``."""
    short = _SHORT_NAMES.get(group.metric, group.metric)
    has_baseline = BASELINE in group.strategies
    head = ["labels", "best", f"{short} (%)", "not significantly worse"]
    head += [f"`{BASELINE}` (%)", f"best − `{BASELINE}` (points)", "p"] if has_baseline else []
    lines = [f"### {group.regime}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in choices:
        others = [f"`{s}`" for s in c.contenders if s != c.best]
        cells = [str(c.budget), f"`{c.best}`", f"{100 * c.means[c.best]:.1f}", ", ".join(others) or "none"]
        if has_baseline:
            base = c.means.get(BASELINE, math.nan)
            gap = c.baseline_gap
            cells += [
                f"{100 * base:.1f}" if math.isfinite(base) else "–",
                "–" if c.best == BASELINE else points_text(c.means[c.best] - base),
                p_text(gap.p) if gap else "",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = len(group.seeds)
    lines += ["", f"{seeds} seed{'' if seeds == 1 else 's'}" + (": no test is possible, every strategy is kept."
                                                                 if seeds < 2 else "."), ""]  # fmt: skip
    return lines


def which_strategy_page(
    sources: Sequence[str],
    groups: Sequence[Group],
    choices: dict[str, list[BudgetChoice]],
    aubc_table: list[dict[str, Any]],
    combined: tuple[PenaltyMatrix, str] | None,
    figure: str,
    alpha: float,
) -> str:
    """Return ``which-strategy.md``: one page over every dataset and regime of a report.

    Args:
        choices: :func:`saal.report.statistics.which_strategy` of each group, by group name.
        aubc_table: :func:`saal.report.statistics.aubc_by_regime` of the groups.
        combined: the penalty matrix over every group and its heatmap's file name, or None (one group, or no
            pair with two seeds).
        figure: the file name of the differences-to-random figure.
    """
    lines = [
        "# Which strategy at which budget",
        "",
        "Sources: " + ", ".join(f"`{f}`" for f in sources),
        "",
        f"![difference to {BASELINE}]({figure})",
        "",
        f"Each panel is one regime: every strategy's mean test metric minus `{BASELINE}`'s at the same budget "
        f"and seed, in points, with its {confidence(alpha)} t confidence interval shaded (two or more seeds).",
        "",
        "## AUBC per regime",
        "",
        *aubc_lines(aubc_table),
        "",
        AUBC_TEXT,
        "",
        "## Best strategy per budget",
        "",
        "At every budget after the first acquisition: the strategy with the highest mean test metric over the "
        "seeds that reached it, and every other strategy that is not significantly worse than it (a two-sided "
        f"paired t-test over the seeds both reached, p < {alpha}; with fewer than two seeds in common, or the "
        "same difference on every seed, no test is possible and the strategy is kept). "
        f"best − `{BASELINE}`: the difference of their means, in points (– where `{BASELINE}` is best); p: their "
        "paired t-test.",
        "",
    ]
    for g in groups:
        lines += choice_lines(g, choices[g.name], alpha)
    if combined is not None:
        matrix, png = combined
        over = f"all (regime, budget) comparisons of that pair ({len(groups)} regimes)"
        lines += ["## Pairwise penalty over every regime", "", *penalty_lines("all regimes", matrix, png, alpha, over)]
    return "\n".join(lines)


def choice_rows(group: Group, choices: list[BudgetChoice]) -> list[dict[str, Any]]:
    """Return ``which-strategy.csv`` rows: one per group and budget (means as fractions)."""
    rows = []
    for c in choices:
        base = c.means.get(BASELINE, math.nan)
        rows.append(
            {
                "regime": group.regime,
                "dataset": group.name,
                "labelled": c.budget,
                "best": c.best,
                "best_mean": c.means[c.best],
                "not_significantly_worse": " ".join(c.contenders),
                f"{BASELINE}_mean": base,
                f"best_minus_{BASELINE}": c.means[c.best] - base,
                "p_value": c.baseline_gap.p if c.baseline_gap else math.nan,
            }
        )
    return rows
