"""``saal report``: tables, learning curves, paired comparisons and which strategy at which budget from experiment
folders."""

from __future__ import annotations

import argparse
from typing import Annotated, Literal

from pydantic import Field

from saal.cli.options import add_option, given, validate_options
from saal.errors import SaalError
from saal.report import ALPHA, CSV_FILES, build_report
from saal.validation import Settings

FLAGS = {"run_dirs": "RUN_DIR", "out": "--out", "budgets": "--budgets", "paired_on": "--paired-on", "alpha": "--alpha"}


class ReportOptions(Settings):
    """The options of ``saal report``."""

    run_dirs: list[str] = Field(min_length=1)
    out: str
    budgets: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1)
    paired_on: Literal["auc", "rounds"] = "auc"
    alpha: float = Field(default=ALPHA, gt=0, lt=1)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``saal report`` on the ``saal`` command's subparsers."""
    p = subparsers.add_parser(
        "report",
        help="tables, learning curves, paired tests and which strategy at which budget from `saal run` folders",
        description=(
            "Read every run folder (config.json + rounds.json) below the given `saal run --out` folders, "
            "finished or not, and write report.md (per dataset and protocol: accuracy at a few budgets, area under "
            "the budget curve (AUBC), final and best accuracy, acquisition seconds, the protocol, a win/tie/loss "
            "matrix from paired t-tests over seeds, and where two or more seeds pair the runs every strategy's "
            "difference to random and a pairwise-penalty matrix), which-strategy.md (one page over every dataset "
            "and regime: AUBC per regime, the best strategy at each budget and those not significantly worse, a "
            "figure of the differences to random), PNG figures and CSV files of every number."
        ),
    )
    m = ReportOptions
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output folders of `saal run` (--out)")
    p.add_argument("--out", required=True, help="folder to write report.md, the PNGs and the CSVs into")
    add_option(
        p,
        "--budgets",
        m,
        "budgets",
        "labelled counts for the accuracy columns, e.g. 20,60,120",
        shown_default="five spread over the range",
    )
    add_option(
        p,
        "--paired-on",
        m,
        "paired_on",
        "what the paired t-test compares: auc (the AUC per seed) or rounds (the accuracy per seed and round)",
    )
    add_option(
        p,
        "--alpha",
        m,
        "alpha",
        "significance level of the paired tests, in (0, 1); confidence intervals are at 1 - alpha",
        type=float,
    )
    p.set_defaults(func=run_report)


def parse_budgets(text: str) -> list[int]:
    """Return the labelled counts ``--budgets`` names: ``20,60,120`` -> [20, 60, 120].

    Raises:
        SaalError: not a comma-separated list of integers.
    """
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SaalError(f"--budgets: takes labelled counts like 20,60,120, got {text!r}") from None


def options_from_args(args: argparse.Namespace) -> ReportOptions:
    """Return the validated options of ``saal report``.

    Raises:
        SaalError: ``--option: what is wrong`` for the first bad value.
    """
    values, flags = given(args, {k: v for k, v in FLAGS.items() if k != "run_dirs"})
    values["run_dirs"], flags["run_dirs"] = args.run_dirs, FLAGS["run_dirs"]
    if "budgets" in values:
        values["budgets"] = parse_budgets(values["budgets"])
    return validate_options(ReportOptions, values, flags)


def run_report(args: argparse.Namespace) -> int:
    """Run ``saal report``.

    Returns:
        The exit code, 0.

    Raises:
        SaalError: a bad option, or folders without readable runs (raised before anything is written).
    """
    opts = options_from_args(args)
    path = build_report(opts.run_dirs, opts.out, budgets=opts.budgets, paired_on=opts.paired_on, alpha=opts.alpha)
    csv_files = ", ".join(f"{name}.csv" for name in CSV_FILES)
    print(f"report: {path} (which-strategy.md, curves-*.png, penalty-*.png, which-strategy.png, {csv_files} beside it)")
    return 0
