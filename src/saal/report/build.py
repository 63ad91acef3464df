"""``build_report``: read the runs, compute the numbers, write ``report.md``, ``which-strategy.md``, the figures and
the CSV files into one folder."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saal.errors import SaalError
from saal.experiment.storage import records_acquisition
from saal.report.plots import plot_against_baseline, plot_curves, plot_penalty
from saal.report.runs import Group, budget_points, find_runs, group_runs
from saal.report.statistics import (
    ALPHA,
    PAIRED_ON,
    PenaltyMatrix,
    aubc_by_regime,
    combined_penalty,
    has_pairs,
    paired_values,
    penalty_matrix,
    strategy_summary,
    versus_baseline,
    which_strategy,
    win_tie_loss,
)
from saal.report.tables import (
    AUBC_TEXT,
    aubc_lines,
    aubc_rows,
    auto_lines,
    budgets_text,
    choice_rows,
    comparison_rows,
    describe_start,
    ground_truth_start,
    group_lines,
    penalty_lines,
    penalty_rows,
    round_rows,
    run_row,
    versus_baseline_lines,
    versus_rows,
    which_strategy_page,
    write_csv,
)

WHICH_STRATEGY = "which-strategy"
# The CSV files of a report, in the order report.md names them, and what each holds.
CSV_FILES = {
    "rounds": "every run and round",
    "runs": "per-run AUC, final, best",
    "comparisons": "every pair: outcome, p-value, number of pairs",
    "versus-random": "every strategy against random at every budget",
    "penalty": "the pairwise-penalty counts of every pair",
    "aubc": "AUBC per regime and strategy",
    "which-strategy": "the best strategy per regime and budget",
}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "dataset"


@dataclass
class _Report:
    """What :func:`build_report` writes, gathered group by group."""

    out_dir: Path
    budgets: Sequence[int] | None
    paired_on: str
    alpha: float
    mark_starts: bool = False
    acquisitions: bool = False
    used_png: set[str] = field(default_factory=set)
    csv: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {name: [] for name in CSV_FILES})
    matrices: list[PenaltyMatrix] = field(default_factory=list)

    def png(self, prefix: str, name: str = "") -> str:
        """Return a PNG file name not yet used in the report: ``PREFIX-NAME.png`` (``PREFIX.png`` without a
        name), ``_`` added before ``.png`` until it is new."""
        png = f"{prefix}-{_slug(name)}.png" if name else f"{prefix}.png"
        while png in self.used_png:
            png = png.replace(".png", "_.png")
        self.used_png.add(png)
        return png


def build_report(
    folders: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    budgets: Sequence[int] | None = None,
    paired_on: str = "auc",
    alpha: float = ALPHA,
) -> Path:
    """Read the runs below ``folders`` and write the report into ``out``.

    Writes ``report.md`` (per dataset and protocol: a table, learning curves, a win/tie/loss matrix and, where
    two or more seeds pair runs, the differences to ``random`` and a pairwise-penalty matrix), ``curves-<dataset>.png``
    and ``penalty-<dataset>.png`` per group, ``which-strategy.md`` and ``which-strategy.png`` (one page over every
    dataset and regime: AUBC per regime, the best strategy at each budget, the differences to ``random``), and the
    CSV files of :data:`CSV_FILES`. Tables, plots and columns are labelled with the metric each group's runs stored
    (``accuracy`` for classification).

    Args:
        budgets: labelled counts for the ``acc @ N`` columns (default: five spread over the range).
        paired_on: ``auc`` (one value per seed) or ``rounds`` (one per seed and round) for win/tie/loss.
        alpha: the significance level of every test (confidence intervals are at ``1 - alpha``).

    Returns:
        The path of ``report.md``.

    Raises:
        SaalError: missing or empty folders, unreadable run files, or bad options.
    """
    if paired_on not in PAIRED_ON:
        raise SaalError(f"--paired-on must be one of {', '.join(PAIRED_ON)}, got {paired_on!r}")
    if not 0 < alpha < 1:
        raise SaalError(f"alpha must lie in (0, 1), got {alpha}")
    groups = group_runs(find_runs(folders))
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise SaalError(f"{out_dir} is a file; give a folder for the report")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _Report(out_dir, budgets, paired_on, alpha)
    report.mark_starts = any(not ground_truth_start(g.protocol, g.metric) for g in groups)
    report.acquisitions = records_acquisition(r for g in groups for run in g.runs for r in run.rows)
    sources = [str(f) for f in folders]
    md = ["# Active-learning report", "", "Sources: " + ", ".join(f"`{f}`" for f in sources), ""]
    for group in groups:
        md += _group_section(report, group)
    tested = any(has_pairs(g) for g in groups)
    md += _across_groups(report, groups, sources, in_report=tested and len(groups) > 1)
    for name, rows in report.csv.items():
        write_csv(out_dir / f"{name}.csv", rows)
    names = list(CSV_FILES)[:3]
    md += [
        "Files: " + ", ".join(f"`{n}.csv` ({CSV_FILES[n]})" for n in names) + ".",
        "",
    ]
    if tested:
        more = [n for n in CSV_FILES if n not in names]
        md[-1:-1] = [
            f"Across datasets and regimes: [`{WHICH_STRATEGY}.md`]({WHICH_STRATEGY}.md) (which strategy at which "
            "budget, AUBC per regime, differences to random). Also "
            + ", ".join(f"`{n}.csv` ({CSV_FILES[n]})" for n in more)
            + ".",
        ]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def _group_section(report: _Report, group: Group) -> list[str]:
    """Return ``report.md``'s section of one group, write its figures, and gather its CSV rows."""
    alpha = report.alpha
    cols = sorted(set(report.budgets)) if report.budgets else budget_points(group)
    matrix = win_tie_loss(group, report.paired_on, alpha)
    png = report.png("curves", group.name)
    plot_curves(group, report.out_dir / png)
    lines = group_lines(group, cols, strategy_summary(group, cols), matrix, png, report.paired_on, alpha)
    if report.mark_starts:
        lines[4:4] = [describe_start(group.protocol, group.metric), ""]  # after the protocol line
    penalty = penalty_matrix(group, alpha)
    report.matrices.append(penalty)
    if has_pairs(group):
        acquired = set(group.acquired_budgets)
        lines += versus_baseline_lines(group, versus_baseline(group, [b for b in cols if b in acquired], alpha), alpha)
        if penalty.budgets:
            png = report.png("penalty", group.name)
            plot_penalty(penalty, group.name, report.out_dir / png)
            lines += penalty_lines(group.name, penalty, png, alpha, budgets_text(penalty.budgets))
    lines += auto_lines(group)
    csv = report.csv
    for run in group.runs:
        csv["rounds"] += round_rows(group, run, report.acquisitions)
        csv["runs"].append(run_row(group, run))
    pairs = {(a, b): len(paired_values(group, a, b, report.paired_on)[0]) for a in matrix for b in matrix[a]}
    csv["comparisons"] += comparison_rows(group, matrix, pairs, report.paired_on)
    csv["versus-random"] += versus_rows(group, versus_baseline(group, None, alpha))
    csv["penalty"] += penalty_rows(group.name, penalty)
    return lines


def _across_groups(report: _Report, groups: list[Group], sources: list[str], in_report: bool) -> list[str]:
    """Write ``which-strategy.md`` and its figures, gather their CSV rows, and return ``report.md``'s section on
    AUBC per regime (only when ``in_report``)."""
    alpha = report.alpha
    table = aubc_by_regime(groups)
    choices = {g.name: which_strategy(g, alpha) for g in groups}
    figure = report.png(WHICH_STRATEGY)
    plot_against_baseline(groups, report.out_dir / figure, alpha)
    combined = None
    if len(groups) > 1 and any(m.budgets for m in report.matrices):
        matrix = combined_penalty(report.matrices)
        png = report.png("penalty", "all-regimes")
        plot_penalty(matrix, "all regimes", report.out_dir / png)
        combined = (matrix, png)
    page = which_strategy_page(sources, groups, choices, table, combined, figure, alpha)
    (report.out_dir / f"{WHICH_STRATEGY}.md").write_text(page)
    report.csv["aubc"] = aubc_rows(table)
    report.csv["which-strategy"] = [row for g in groups for row in choice_rows(g, choices[g.name])]
    if not in_report:
        return []
    return ["## AUBC per regime", "", *aubc_lines(table), "", AUBC_TEXT, "", f"Which strategy at which budget, "
            f"per regime: [`{WHICH_STRATEGY}.md`]({WHICH_STRATEGY}.md).", ""]  # fmt: skip
