"""``saal report``: tables, learning curves and paired comparisons from experiment folders."""

from __future__ import annotations

import argparse


def _budgets(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets takes labelled counts like 20,60,120, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--budgets takes positive labelled counts like 20,60,120, got {text!r}")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``saal report`` on the ``saal`` command's subparsers."""
    p = subparsers.add_parser(
        "report",
        help="tables, learning curves and win/tie/loss matrices from `saal run` output folders",
        description=(
            "Read every run folder (config.json + rounds.json) below the given `saal run --out` folders, "
            "finished or not, and write report.md (per dataset: accuracy at a few budgets, area under the "
            "budget curve, final and best accuracy, acquisition seconds, the protocol, a win/tie/loss matrix "
            "from paired t-tests over seeds), a learning-curve PNG per dataset and CSV files of every number."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output folders of `saal run` (--out)")
    p.add_argument("--out", required=True, help="folder to write report.md, the PNGs and the CSVs into")
    p.add_argument("--budgets", type=_budgets, help="labelled counts for the accuracy columns, e.g. 20,60,120")
    p.add_argument(
        "--paired-on",
        choices=["auc", "rounds"],
        default="auc",
        help="what the paired t-test compares: the AUC per seed, or the accuracy per seed and round",
    )
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the paired tests")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from saal.report import build_report

    path = build_report(args.run_dirs, args.out, budgets=args.budgets, paired_on=args.paired_on, alpha=args.alpha)
    print(f"report: {path} (curves-*.png, rounds.csv, runs.csv and comparisons.csv beside it)")
    return 0
