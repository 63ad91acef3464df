"""Tables, learning curves and paired comparisons from the run folders of one or more experiments.

:func:`build_report` reads every run folder (``config.json`` + ``rounds.json``) below the given
experiment folders, so a grid that is still running, or was stopped, reports what it has. Runs
are grouped by dataset and protocol (every setting except the strategy, the seed, the device and
the data folder); runs of one protocol found in several folders are pooled. Such a group is a *regime* when a
report holds several. For each group it writes a markdown table, a learning-curve PNG and a win/tie/loss matrix;
where two or more seeds pair the runs, also every strategy's difference to ``random`` at the report's budgets and a
pairwise-penalty matrix (Lueth et al. 2023) with its heatmap. ``which-strategy.md`` is one page over every group:
AUBC per regime, the best strategy at each budget with those not significantly worse, and a figure of every
strategy's difference to ``random``. CSV files hold every number behind them.

Each run stores one test metric per round under its name (``config.json``'s ``metric``: ``accuracy`` for
classification, ``map`` for detection; a folder without it, written by saal 0.1.0, stores ``accuracy``).
Tables, plots and CSV columns are labelled with that name. Numbers of one run (the metric in [0, 1],
reported in %):

- the metric at a budget: its value after training on that many labels;
- AUC (AUBC, the area under the budget curve): the area under the metric-vs-labels curve (trapezoid rule over
  the labelled counts) from the first nonzero labelled count to the last, divided by that range, so it lies in
  [0, 1]; a run that starts from 0 labels has the untrained model's metric there, drawn in the curves but left
  out of the area;
- final: the metric after the last round; best: its largest value over all rounds (the
  headline number of the SAAL paper);
- acquisition seconds per round: mean wall time of ``select`` over the rounds that acquired.

AUC, final and best are computed over finished runs only; the metric at a budget and the seconds
use every round that exists.

How runs started: where a report holds a group whose initial labels were chosen without the ground truth
(``initial_strategy``, ``initial: 0`` or a uniform draw), every group says how it started: a **ground-truth
balanced start** (the initial set drawn class-balanced with the true labels: the paper's protocol, which a
person labelling their own data cannot do) or chosen without labels; a report of ground-truth starts only is
written as before. For every ``auto`` run, one line says which strategy ``auto`` used at which budgets (from
``rounds.json``'s ``acquired_by`` and ``reason``).

One job per module: :mod:`~saal.report.runs` reads run folders, :mod:`~saal.report.statistics` computes,
:mod:`~saal.report.tables` writes markdown and CSV, :mod:`~saal.report.plots` draws, and
:mod:`~saal.report.build` puts them together.
"""

from __future__ import annotations

from saal.report.area import aubc, normalised_auc
from saal.report.build import CSV_FILES, build_report
from saal.report.plots import plot_against_baseline, plot_curves, plot_penalty
from saal.report.runs import (
    Group,
    RunRecord,
    accuracy_at,
    budget_points,
    dataset_title,
    find_runs,
    group_runs,
    protocol_of,
    strategy_order,
    used_by,
)
from saal.report.statistics import (
    ALPHA,
    BASELINE,
    PAIRED_ON,
    BudgetChoice,
    PairedTest,
    PenaltyMatrix,
    aubc_by_regime,
    combined_penalty,
    compare,
    mean_std,
    paired_test,
    paired_values,
    penalty_matrix,
    strategy_summary,
    versus_baseline,
    which_strategy,
    win_tie_loss,
)
from saal.report.tables import auto_lines, describe_protocol, describe_start, ground_truth_start

__all__ = [
    "ALPHA",
    "BASELINE",
    "CSV_FILES",
    "PAIRED_ON",
    "BudgetChoice",
    "Group",
    "PairedTest",
    "PenaltyMatrix",
    "RunRecord",
    "accuracy_at",
    "aubc",
    "aubc_by_regime",
    "auto_lines",
    "budget_points",
    "build_report",
    "combined_penalty",
    "compare",
    "dataset_title",
    "describe_protocol",
    "describe_start",
    "find_runs",
    "ground_truth_start",
    "group_runs",
    "mean_std",
    "normalised_auc",
    "paired_test",
    "paired_values",
    "penalty_matrix",
    "plot_against_baseline",
    "plot_curves",
    "plot_penalty",
    "protocol_of",
    "strategy_order",
    "strategy_summary",
    "used_by",
    "versus_baseline",
    "which_strategy",
    "win_tie_loss",
]
