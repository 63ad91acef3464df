"""The ``saal`` command line: ``saal run``, ``saal score``, ``saal analyze``, ``saal report``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from saal.errors import SaalError

DEFAULT_OUT = "runs/default"
MAX_SEED_COUNT = 50


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit 2), like every saal error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _seeds(text: str) -> list[int]:
    """``3`` -> [0, 1, 2]; ``123,456`` -> [123, 456]."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a list (123,456,789), got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--seeds count must be at least 1, got {n}")
    if n > MAX_SEED_COUNT:
        raise argparse.ArgumentTypeError(
            f"--seeds {n} would run {n} seeds (0..{n - 1}); to run the single seed {n}, write --seeds {n},"
        )
    return list(range(n))


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run active-learning rounds for several strategies and seeds",
        description=(
            "Rounds of train -> evaluate -> acquire K -> label (from the dataset's true labels) for every "
            "strategy and seed. With no arguments: digits, MLP, random vs entropy vs saal, 3 seeds. "
            "Results (per-round CSV/JSON, final weights) go under --out; a run that was stopped resumes "
            "where it left off when the same command is given again."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="a protocol YAML file (see configs/); options given here override it")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set run.train.lr=0.01 (repeatable)",
    )
    p.add_argument("--dataset", help="dataset name, folder:PATH (image folder) or npz:PATH [digits]")
    p.add_argument("--data-dir", help="folder holding the standard dataset files [$SAAL_DATA_DIR or ~/.cache/saal]")
    p.add_argument(
        "--dataset-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a loader option, e.g. image_size=32 or test_fraction=0.2 for folder: data (repeatable)",
    )
    p.add_argument("--model", help="model name: mlp, cnn, resnet18 [mlp]")
    p.add_argument(
        "--strategies", help="comma-separated strategy specs, e.g. random,saal[score=diff] [random,entropy,saal]"
    )
    p.add_argument(
        "--seeds",
        type=_seeds,
        help="number of seeds (3 -> 0,1,2) or a comma-separated list (123,456,789; one seed: 123,) [3]",
    )
    p.add_argument("--initial", type=int, help="initial labelled set size [20]")
    p.add_argument(
        "--uniform-initial",
        action="store_true",
        default=None,
        help="draw the initial set uniformly instead of class-balanced",
    )
    p.add_argument("--query", type=int, help="items acquired per round (K) [20]")
    p.add_argument("--rounds", type=int, help="acquisition rounds [5]")
    p.add_argument("--subset", type=int, help="score only a random subset of this many unlabelled items per round")
    p.add_argument("--epochs", type=int, help="training epochs per round [50]")
    p.add_argument("--batch-size", type=int, help="training batch size [64]")
    p.add_argument("--lr", type=float, help="learning rate [0.001]")
    p.add_argument("--optimizer", choices=["adam", "sgd", "sam"], help="optimiser [adam]")
    p.add_argument("--momentum", type=float, help="momentum for sgd and sam [0.9]")
    p.add_argument("--weight-decay", type=float, help="weight decay [0]")
    p.add_argument("--sam-rho", type=float, help="SAM training radius [0.05]")
    p.add_argument("--augment", action="store_true", default=None, help="random crop (pad 4) + horizontal flip")
    p.add_argument(
        "--warm-start",
        action="store_true",
        default=None,
        help="continue from last round's weights instead of re-initialising to the same initial weights",
    )
    p.add_argument("--score-batch-size", type=int, help="pool items scored at once [256]")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda [cpu]")
    p.add_argument("--out", help=f"output folder [{DEFAULT_OUT}]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)


def _spec_from_args(args: argparse.Namespace) -> Any:
    from saal.experiment import ExperimentSpec, RunConfig
    from saal.strategies import split_specs
    from saal.training import TrainConfig

    if args.config:
        from saal.config import load_experiment

        spec = load_experiment(args.config, overrides=args.set)
    else:
        if args.set:
            raise SaalError("--set overrides config keys; use it together with --config FILE")
        spec = ExperimentSpec(run=RunConfig(train=TrainConfig(epochs=50, batch_size=64)), out=DEFAULT_OUT)
    run, train = spec.run.to_dict(), spec.run.train.to_dict()
    for key in ("dataset", "data_dir", "model", "initial", "query", "rounds", "subset", "score_batch_size", "device"):
        if getattr(args, key) is not None:
            run[key] = getattr(args, key)
    if args.dataset_option:
        from saal.strategies import parse_value

        options = dict(run.get("dataset_options") or {})
        for item in args.dataset_option:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise SaalError(f"--dataset-option {item!r} needs the form KEY=VALUE, e.g. image_size=32")
            options[key.strip()] = parse_value(value.strip())
        run["dataset_options"] = options
    if args.uniform_initial:
        run["initial_balanced"] = False
    if args.warm_start:
        run["reinit"] = False
    for key in ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "sam_rho", "augment"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    run["train"] = TrainConfig(**train)
    return ExperimentSpec(
        run=RunConfig(**run),
        strategies=split_specs(args.strategies) if args.strategies else spec.strategies,
        seeds=args.seeds if args.seeds else spec.seeds,
        out=args.out or spec.out,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from saal.data import load_dataset
    from saal.experiment import accuracy_table, check_grid, run_grid

    spec = _spec_from_args(args)
    bundle = load_dataset(spec.run.dataset, spec.run.data_dir, **spec.run.dataset_options)
    check_grid(spec, bundle)
    total = len(spec.strategies) * len(spec.seeds) * (spec.run.rounds + 1)
    bar = tqdm(total=total, disable=args.quiet, unit="round", dynamic_ncols=True, file=sys.stderr)

    def on_run_start(strategy: str, seed: int, done: int) -> None:
        bar.update(done)
        bar.set_description(f"{strategy} seed {seed}")

    def on_round(strategy: str, seed: int, r: Any) -> None:
        bar.update(1)
        bar.set_postfix(labels=r.labelled, acc=f"{100 * r.accuracy:.1f}%")

    busy: list[str] = []

    def on_busy(strategy: str, seed: int) -> None:
        bar.update(spec.run.rounds + 1)
        busy.append(f"{strategy} seed {seed}")

    rows = run_grid(spec, bundle, on_round=on_round, on_run_start=on_run_start, on_busy=on_busy)
    bar.close()
    if rows:
        print(accuracy_table(rows))
    if busy:
        print(
            f"\nleft to another process running in {spec.out} now: {', '.join(busy)}; "
            "give this command again when it is done to see every run here"
        )
    print(
        f"\nresults: {spec.out}/results.csv (one row per strategy, seed and round); per-run folders under {spec.out}/"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the ``saal`` argument parser."""
    parser = _Parser(
        prog="saal",
        description="Sharpness-Aware Active Learning and its baselines: run, score, analyse and report.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    for extra in ("saal.cli_score", "saal.cli_analyze", "saal.cli_report"):
        try:
            module = __import__(extra, fromlist=["add_parser"])
        except ModuleNotFoundError:
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the command; a :class:`SaalError` becomes one line on stderr and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["run"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SaalError as exc:
        print(f"saal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saal: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
