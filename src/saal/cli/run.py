"""``saal run``: active-learning rounds for several strategies and seeds.

The settings come from one nested mapping of :class:`~saal.settings.ExperimentSpec` keys, built in
this order and validated once: the defaults (or the ``--config`` file's data), then ``--set``
overrides, then the command-line options on top. Strategies, sizes and the output folder are all
checked before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from tqdm import tqdm

from saal.cli.options import add_option, default_of, validate_options
from saal.config import apply_overrides, check_required, default_out_of, read_protocol
from saal.core.acquisition_service import AcquisitionService
from saal.core.progress import with_progress
from saal.data import load_dataset
from saal.errors import SaalError
from saal.experiment import RoundResult, accuracy_table, check_grid, run_grid
from saal.experiment.loop import load_run_bundle
from saal.models import MODEL_NAMES
from saal.settings import OPTIMIZERS, ExperimentSpec
from saal.strategies import build_strategy, parse_value, split_specs

MAX_SEED_COUNT = 50

# (option, dotted ExperimentSpec key, argparse type, help) of every option that sets one key to its value.
VALUE_OPTIONS: tuple[tuple[str, str, type, str], ...] = (
    (
        "--dataset",
        "run.dataset",
        str,
        "dataset name, folder:PATH (image folder), npz:PATH, npy:FOLDER (.npy files, read a batch at a time), "
        "voc:PATH or coco:PATH",
    ),
    ("--model", "run.model", str, f"model name: {', '.join(MODEL_NAMES)}"),
    (
        "--initial",
        "run.initial",
        int,
        "initial labelled set size; 0 starts from no labels (round 0 evaluates the untrained model and makes the "
        "first pick; see the initial-strategy option)",
    ),
    ("--query", "run.query", int, "items acquired per round (K)"),
    (
        "--rounds",
        "run.rounds",
        int,
        "acquisition rounds; each run records rounds + 1 accuracies. 0 trains on the initial set and "
        "evaluates it, acquiring nothing",
    ),
    ("--epochs", "run.train.epochs", int, "training epochs per round"),
    ("--batch-size", "run.train.batch_size", int, "training batch size"),
    ("--lr", "run.train.lr", float, "learning rate"),
    ("--optimizer", "run.train.optimizer", str, f"optimiser: {', '.join(OPTIMIZERS)}"),
    ("--momentum", "run.train.momentum", float, "momentum for sgd and sam, in [0, 1)"),
    ("--weight-decay", "run.train.weight_decay", float, "weight decay"),
    ("--sam-rho", "run.train.sam_rho", float, "SAM training radius"),
    ("--score-batch-size", "run.score_batch_size", int, "pool items scored at once"),
    ("--device", "run.device", str, "torch device, e.g. cpu or cuda"),
)

# The stopping rule's options (:mod:`saal.stopping`), as :data:`VALUE_OPTIONS`; ``--stop-set`` is added apart.
STOP_OPTIONS: tuple[tuple[str, str, type, str], ...] = (
    (
        "--stop-when",
        "run.stop_when",
        str,
        "none: run every round; stable: end a run once its model's predictions on a fixed stop set stabilise "
        "(Cohen's kappa between successive rounds' predictions at least --stop-threshold for --stop-window rounds "
        "in a row; classification only). rounds.csv records each round's kappa either way",
    ),
    ("--stop-threshold", "run.stop_threshold", float, "the kappa that counts as stable, in (0, 1]"),
    ("--stop-window", "run.stop_window", int, "successive rounds the kappa must reach --stop-threshold"),
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``saal run`` on the ``saal`` command's subparsers."""
    p = subparsers.add_parser(
        "run",
        help="run active-learning rounds for several strategies and seeds",
        description=(
            "Rounds of train -> evaluate -> acquire K -> label (from the dataset's true labels) for every "
            "strategy and seed. With no arguments: digits, MLP, random vs entropy vs saal, 3 seeds. "
            "Results (per-round CSV/JSON, final weights) go under --out; a run that was stopped resumes "
            "where it left off when the same command is given again. Settings: the defaults (or the "
            "--config file), then --set overrides, then the options below."
        ),
    )
    _add_protocol_options(p)
    _add_data_options(p)
    _add_switches(p)
    _add_stopping_options(p)
    add_option(
        p,
        "--out",
        ExperimentSpec,
        "out",
        "output folder",
        shown_default=f"{default_of(ExperimentSpec, 'out')}, or runs/<stem> of --config",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress: neither the rounds bar nor that of long scans, selections and feature caching",
    )
    p.set_defaults(func=with_progress(run_command))


def _add_protocol_options(p: argparse.ArgumentParser) -> None:
    """Add ``--config``, ``--set``, the strategies and seeds, the :data:`VALUE_OPTIONS`, the initial strategy and
    the data folder."""
    p.add_argument("--config", help="a protocol YAML file (see configs/); --set and the options below override it")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set run.train.lr=0.01 (repeatable)",
    )
    spec = ExperimentSpec
    add_option(p, "--strategies", spec, "strategies", "comma-separated strategy specs, e.g. random,saal[score=diff]")
    add_option(
        p,
        "--seeds",
        spec,
        "seeds",
        "number of seeds (3 -> 0,1,2) or a comma-separated list (123,456,789; one seed: 123,)",
    )
    for flag, key, kind, text in VALUE_OPTIONS:
        add_option(p, flag, spec, key, text, type=kind)
    add_option(
        p,
        "--initial-strategy",
        spec,
        "run.initial_strategy",
        "a cold-start strategy (random, typiclust, auto, ...) that chooses from zero labels, without the ground "
        "truth: the initial set with --initial N, the first pick with --initial 0",
        shown_default="a class-balanced initial set drawn with the true labels (the paper's protocol); with "
        "--initial 0, the run's own strategy when it is cold-start, else random",
        metavar="NAME",
    )
    add_option(
        p,
        "--data-dir",
        spec,
        "run.data_dir",
        "folder holding the standard dataset files",
        shown_default="$SAAL_DATA_DIR or ~/.cache/saal",
    )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """Add the loader and model options, ``--task``, ``--weights`` and ``--subset``."""
    p.add_argument(
        "--dataset-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a loader option, e.g. image_size=32 or test_fraction=0.2 for folder: data (repeatable)",
    )
    p.add_argument(
        "--task",
        choices=("classification", "detection"),
        default=None,
        help="the task, checked against the dataset's (default: inferred: voc: and coco: data are detection)",
    )
    p.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a detector option, e.g. frozen=false, min_size=256 or head_convs=4 (repeatable)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="detectors: a weights file (fcos-lite0: EfficientNet-Lite0 weights; torchvision's detectors: a "
        "detector state dict), or 'torchvision' for the COCO weights in torchvision's cache (never downloaded)",
    )
    add_option(
        p,
        "--subset",
        ExperimentSpec,
        "run.subset",
        "score only a random subset of this many unlabelled items per round",
        shown_default="the whole pool",
        type=int,
    )


def _add_switches(p: argparse.ArgumentParser) -> None:
    """Add the on/off options: ``--uniform-initial``, ``--augment``, ``--warm-start``."""
    p.add_argument(
        "--uniform-initial", action="store_true", help="draw the initial set uniformly instead of class-balanced"
    )
    p.add_argument("--augment", action="store_true", help="random crop (pad 4) + horizontal flip")
    p.add_argument(
        "--warm-start",
        action="store_true",
        help="continue from last round's weights instead of re-initialising to the same initial weights",
    )


def _add_stopping_options(p: argparse.ArgumentParser) -> None:
    """Add the stopping rule's options (:mod:`saal.stopping`): :data:`STOP_OPTIONS` and ``--stop-set``."""
    for flag, key, kind, text in STOP_OPTIONS:
        add_option(p, flag, ExperimentSpec, key, text, type=kind)
    add_option(
        p,
        "--stop-set",
        ExperimentSpec,
        "run.stop_set",
        "how many items of the initially unlabelled pool (drawn once, seeded; they stay selectable) the kappa is "
        "measured on",
        shown_default="1000, or the whole initially unlabelled pool when smaller",
        type=int,
        metavar="N",
    )


def parse_seeds(text: str) -> list[int]:
    """Return the seeds ``--seeds`` names: ``3`` -> [0, 1, 2]; ``123,456`` -> [123, 456]; ``5,`` -> [5].

    Raises:
        SaalError: not a count or a list of integers, or a count below 1 or above :data:`MAX_SEED_COUNT`.
    """
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        n = int(text)
    except ValueError:
        raise SaalError(f"--seeds: takes a count (3) or a list (123,456,789), got {text!r}") from None
    if n < 1:
        raise SaalError(f"--seeds: a count must be at least 1, got {n}")
    if n > MAX_SEED_COUNT:
        raise SaalError(
            f"--seeds: {n} would run {n} seeds (0..{n - 1}); to run the single seed {n}, write --seeds {n},"
        )
    return list(range(n))


def _put(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in nested ``data``, creating mappings on the way (a non-mapping is left to validation)."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):  # e.g. `run: 3` in a file: validation reports it
            return
        node = child
    node[last] = value


def _get(data: dict[str, Any], key: str) -> Any:
    """Return the value at dotted ``key`` in nested ``data`` (None where it is not set)."""
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _dataset_options(items: list[str], start: Any, flag: str = "--dataset-option") -> dict[str, Any]:
    """Return ``start`` (the file's dataset or model options) updated with ``FLAG KEY=VALUE`` items.

    Raises:
        SaalError: an item without ``=`` or a key.
    """
    options = dict(start) if isinstance(start, dict) else {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SaalError(f"{flag}: {item!r} needs the form KEY=VALUE, e.g. image_size=32")
        options[key.strip()] = parse_value(value.strip())
    return options


def spec_from_args(args: argparse.Namespace) -> ExperimentSpec:
    """Return the validated settings ``saal run`` was given.

    Raises:
        SaalError: one line naming the option (or the config key) of the first bad value.
    """
    source: str | None = None
    data: dict[str, Any] = {}
    if args.config:
        source = f"config {args.config}"
        data = read_protocol(args.config)
    data = apply_overrides(data, args.set, source or "--set")
    flags: dict[str, str] = {}

    def put(key: str, value: Any, flag: str) -> None:
        _put(data, key, value)
        flags[key] = flag

    if args.strategies is not None:
        put("strategies", split_specs(args.strategies), "--strategies")
    if args.seeds is not None:
        put("seeds", parse_seeds(args.seeds), "--seeds")
    named = [(flag, key) for flag, key, _, _ in VALUE_OPTIONS + STOP_OPTIONS] + [
        ("--initial-strategy", "run.initial_strategy"),
        ("--data-dir", "run.data_dir"),
        ("--subset", "run.subset"),
        ("--stop-set", "run.stop_set"),
    ]
    for flag, key in named:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            put(key, value, flag)
    if args.dataset_option:
        put("run.dataset_options", _dataset_options(args.dataset_option, _get(data, "run.dataset_options")),
            "--dataset-option")  # fmt: skip
    if args.model_option or args.weights is not None:
        options = _dataset_options(args.model_option, _get(data, "run.model_options"), "--model-option")
        if args.weights is not None:
            options["weights"] = args.weights
        put("run.model_options", options, "--model-option")
    if args.uniform_initial:
        put("run.initial_balanced", False, "--uniform-initial")
    if args.augment:
        put("run.train.augment", True, "--augment")
    if args.warm_start:
        put("run.reinit", False, "--warm-start")
    if args.out is not None:
        put("out", args.out, "--out")
    if args.config:
        check_required(data, f"config {args.config}")
        if data.get("out") is None:
            data["out"] = default_out_of(args.config)
    return validate_options(ExperimentSpec, data, flags, source or ("--set" if args.set else None))


def check_strategies(spec: ExperimentSpec) -> None:
    """Build every strategy of ``spec`` once (under a forked torch RNG), to refuse bad options early.

    Raises:
        SaalError: an unknown strategy or option, or a bad option value.
    """
    with torch.random.fork_rng(devices=[]):
        for s in spec.strategies:
            build_strategy(s, subset=spec.run.subset, batch_size=spec.run.score_batch_size)


def run_command(args: argparse.Namespace) -> int:
    """Run ``saal run``.

    Returns:
        The exit code, 0.

    Raises:
        SaalError: any bad setting, raised before anything is written.
    """
    spec = spec_from_args(args)
    check_strategies(spec)
    bundle = load_dataset(spec.run.dataset, spec.run.data_dir, **spec.run.dataset_options)
    if args.task is not None and args.task != bundle.task.name:
        raise SaalError(f"--task {args.task}: dataset {spec.run.dataset!r} is labelled for {bundle.task.name}")
    check_grid(spec, bundle)
    # Under torchrun, rank 0 runs the experiment and every rank scores its share of each acquisition.
    service = AcquisitionService(spec.to_dict(), device=spec.run.device)
    if not service.is_main:
        try:
            service.serve(lambda: load_run_bundle(spec.run, bundle).train)
        finally:
            service.stop()
        return 0
    total = len(spec.strategies) * len(spec.seeds) * (spec.run.rounds + 1)
    bar = tqdm(total=total, disable=args.quiet, unit="round", dynamic_ncols=True, file=sys.stderr)

    def on_run_start(strategy: str, seed: int, done: int) -> None:
        bar.update(done)
        bar.set_description(f"{strategy} seed {seed}")

    stopped: list[str] = []

    def on_round(strategy: str, seed: int, r: RoundResult) -> None:
        bar.update(1)
        if r.stopped:  # the rounds it will not run
            bar.update(spec.run.rounds - r.round)
            stopped.append(f"{strategy} seed {seed} at round {r.round} ({r.labelled} labels)")
        bar.set_postfix({"labels": r.labelled, "acc" if r.metric == "accuracy" else r.metric: f"{100 * r.value:.1f}%"})

    busy: list[str] = []

    def on_busy(strategy: str, seed: int) -> None:
        bar.update(spec.run.rounds + 1)
        busy.append(f"{strategy} seed {seed}")

    try:
        rows = run_grid(spec, bundle, on_round=on_round, on_run_start=on_run_start, on_busy=on_busy)
    finally:
        bar.close()
        service.stop()
    if rows:
        print(accuracy_table(rows))
    if stopped:
        print(f"\nstopped early, predictions stable: {', '.join(stopped)}")
    if busy:
        print(
            f"\nleft to another process running in {spec.out} now: {', '.join(busy)}; "
            "give this command again when it is done to see every run here"
        )
    print(
        f"\nresults: {spec.out}/results.csv (one row per strategy, seed and round); per-run folders under {spec.out}/"
    )
    return 0
