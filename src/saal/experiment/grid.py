"""A grid of runs (every strategy x every seed) in one output folder: checks, running, summaries.

``OUT/experiment.json`` lists every strategy and seed run into ``OUT`` (several commands may fill one
folder); ``OUT/results.csv`` and ``OUT/results.json`` hold one row per (strategy, seed, round) of all of
them, the metric under its name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

import saal.experiment.storage as storage
from saal.data import DatasetBundle, load_dataset
from saal.errors import RunInProgress, SaalError
from saal.experiment.folder_lock import folder_lock
from saal.experiment.loop import ActiveLearningRun, RoundResult, build_run_strategy, describe_run, load_run_bundle
from saal.models import build_model
from saal.settings import ExperimentSpec, RunConfig
from saal.stopping import predicts_classes, stop_set_size
from saal.tasks import Task


def check_device(name: str) -> torch.device:
    """Return ``torch.device(name)``.

    Raises:
        SaalError: a name torch does not know, or a CUDA / MPS device this machine lacks.
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SaalError(f"{name!r} is not a torch device; use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SaalError(f"device {name!r} asked for, but no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SaalError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SaalError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    return device


def check_grid(spec: ExperimentSpec, bundle: DatasetBundle) -> None:
    """Fail early, before anything is written, on settings no run of the grid could use. Writes nothing.

    Raises:
        SaalError: unknown strategy or option (as every run builds it: with the shared subset and batch
            size), a strategy or ``initial_strategy`` that does not support the dataset's task, an unknown
            device or model, impossible sizes (the stop set's included), a stopping rule on a task it cannot
            measure, or an output folder that is a file or holds different runs.
    """
    cfg = spec.run
    task = bundle.task
    strategies = {s: build_run_strategy(s, cfg, spec.seeds[0]) for s in spec.strategies}
    pickers = [build_run_strategy(cfg.initial_strategy, cfg, spec.seeds[0])] if cfg.initial_strategy else []
    for strategy in [*strategies.values(), *pickers]:
        check_task = getattr(strategy, "check_task", None)
        if callable(check_task):
            check_task(task)
    check_device(cfg.device)
    with torch.random.fork_rng(devices=[]):  # building a model draws from the global generator
        build_model(cfg.model, bundle.input_shape, bundle.num_classes, task=task.name, options=cfg.model_options)
    n = len(bundle.train)  # type: ignore[arg-type]
    if cfg.initial > n:
        raise SaalError(f"initial set {cfg.initial} is larger than the {n}-item pool; choose a smaller --initial")
    if cfg.query > n - cfg.initial:
        raise SaalError(
            f"query size {cfg.query} is larger than the unlabelled pool ({n - cfg.initial} items); query fewer"
        )
    needed = cfg.initial + cfg.query * cfg.rounds
    if needed > n:
        raise SaalError(
            f"{cfg.rounds} rounds of {cfg.query} after {cfg.initial} initial labels need {needed} items, "
            f"the pool has {n}; use fewer --rounds or a smaller --query"
        )
    if cfg.initial_strategy and cfg.subset is not None and cfg.initial > cfg.subset:
        raise SaalError(
            f"initial set {cfg.initial} is larger than the pool subset {cfg.subset} its strategy scores; "
            "raise --subset or choose a smaller --initial"
        )
    check_stopping(cfg, task, n)
    ground_truth = cfg.initial > 0 and cfg.initial_strategy is None
    if ground_truth and cfg.initial_balanced and task.name == "classification" and cfg.initial % bundle.num_classes:
        raise SaalError(
            f"a class-balanced initial set needs a multiple of the {bundle.num_classes} classes, got {cfg.initial}"
        )
    out = Path(spec.out)
    if out.exists() and not out.is_dir():
        raise SaalError(f"{out} is a file; give --out a folder")
    for s, strategy in strategies.items():
        for seed in spec.seeds:
            folder = storage.run_folder(out, s, seed)
            if (folder / storage.CONFIG_FILE).exists():
                storage.check_run_folder(folder, describe_run(cfg, s, seed, strategy, task))
    _check_experiment_file(spec)


def check_stopping(cfg: RunConfig, task: Task, n: int) -> None:
    """Refuse stopping settings that a run of ``task`` on an ``n``-item pool cannot use. Writes nothing.

    Raises:
        SaalError: ``stop_when`` other than ``none`` for a task without class predictions (detection), or a
            ``stop_set`` larger than the initially unlabelled pool (``n - initial`` items).
    """
    if not predicts_classes(task):
        if cfg.stop_when != "none":
            raise SaalError(
                f"--stop-when {cfg.stop_when}: stabilising predictions needs one class per item, and {task.name} "
                "predicts otherwise; use --stop-when none"
            )
        return
    stop_set_size(cfg.stop_set, n - cfg.initial)


def _check_experiment_file(spec: ExperimentSpec) -> None:
    """Refuse an output folder whose ``experiment.json`` records another protocol (``run`` settings).

    Settings the file lacks count as their defaults (settings added later); ``device`` and ``data_dir`` may differ.

    Raises:
        SaalError: an unreadable file, or a real difference (one line naming the first differing key).
    """
    path = Path(spec.out) / "experiment.json"
    if not path.exists():
        return
    remedy = "delete it or choose another --out"
    theirs = storage.read_json_dict(path, "an experiment's file", remedy)
    run = theirs.get("run")
    if not isinstance(run, dict):
        raise SaalError(f"{path} is not an experiment's file (no run settings); {remedy}")
    there = {"run": storage.identity(run)}
    mine = {"run": storage.identity(storage.jsonable(spec.run.to_dict()))}
    key = storage.first_difference(there, mine)
    if key is not None:
        raise SaalError(
            f"{spec.out} holds a different run protocol ({key}: {storage.lookup(there, key)!r} there, "
            f"{storage.lookup(mine, key)!r} now); choose another --out or delete that folder"
        )


def run_grid(
    spec: ExperimentSpec,
    bundle: DatasetBundle | None = None,
    on_round: Callable[[str, int, RoundResult], None] | None = None,
    on_run_start: Callable[[str, int, int], None] | None = None,
    on_busy: Callable[[str, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume, or skip when finished) every (strategy, seed) run of ``spec``.

    Every check (:func:`check_grid`) passes before anything is written: the output folder is created only then.
    A run that another process is running right now (two commands sharing one output folder) is
    skipped: ``on_busy(strategy, seed)`` is called and its rows are not among those returned.

    Returns:
        One row per (strategy, seed, round) of this grid: ``strategy``, ``seed`` and the ``rounds.json`` row
        (the metric under its name). ``OUT/results.csv`` and ``OUT/results.json`` get the rows of every run in
        ``OUT``: this grid's and those of earlier commands with other strategies or seeds (``OUT/experiment.json``
        lists them all).

    Raises:
        SaalError: bad settings (checked before anything is written).
    """
    bundle = (
        bundle if bundle is not None else load_dataset(spec.run.dataset, spec.run.data_dir, **spec.run.dataset_options)
    )
    check_grid(spec, bundle)
    bundle = load_run_bundle(spec.run, bundle)  # a head on the frozen backbone trains on its cached features
    out = Path(spec.out)
    with folder_lock(out):  # creates the folder: every check has passed
        storage.atomic_write_text(out / "experiment.json", json.dumps(_merged_experiment(spec), indent=2))
    rows: list[dict[str, Any]] = []
    for s in spec.strategies:
        for seed in spec.seeds:
            run = ActiveLearningRun(spec.run, s, seed, storage.run_folder(out, s, seed), bundle=bundle)
            try:
                results = run.run(
                    progress=None if on_round is None else partial(_round_of, on_round, s, seed),
                    on_start=None if on_run_start is None else partial(_start_of, on_run_start, s, seed),
                )
            except RunInProgress:  # another command works on it: go on with the next run
                if on_busy is not None:
                    on_busy(s, seed)
                continue
            rows += [{"strategy": s, "seed": seed, **r.row()} for r in results]
    with folder_lock(out):
        everything = rows_of_folder(out)
        storage.write_summary(out, everything)
        storage.atomic_write_text(out / "results.json", json.dumps(everything, indent=1))
    return rows


def _round_of(on_round: Callable[[str, int, RoundResult], None], strategy: str, seed: int, r: RoundResult) -> None:
    on_round(strategy, seed, r)


def _start_of(on_run_start: Callable[[str, int, int], None], strategy: str, seed: int, done: int) -> None:
    on_run_start(strategy, seed, done)


def _merged_experiment(spec: ExperimentSpec) -> dict[str, Any]:
    """Return ``spec.to_dict()`` keeping the strategies and seeds that ``OUT/experiment.json`` already lists.

    Several commands may fill one output folder (halves of a grid, side by side or over several sittings); the
    file then lists every strategy and seed run into it: in the order of this command when it names them all,
    else earlier ones first.
    """
    mine = spec.to_dict()
    try:
        theirs = json.loads((Path(spec.out) / "experiment.json").read_text())
    except (OSError, ValueError):
        return mine
    if not isinstance(theirs, dict):
        return mine
    for key in ("strategies", "seeds"):
        earlier = [v for v in theirs.get(key, []) if isinstance(v, (str, int)) and not isinstance(v, bool)]
        if not set(earlier) <= set(mine[key]):
            mine[key] = earlier + [v for v in mine[key] if v not in earlier]
    return mine


def rows_of_folder(out: Path) -> list[dict[str, Any]]:
    """Return one row per round of every run that ``OUT/experiment.json`` lists and that has finished a round.

    Raises:
        OSError, ValueError: no readable ``OUT/experiment.json``.
    """
    listed = json.loads((out / "experiment.json").read_text())
    rows: list[dict[str, Any]] = []
    for s in listed["strategies"]:
        for seed in listed["seeds"]:
            try:
                rounds = storage.read_rounds(storage.run_folder(out, s, seed))
            except (OSError, ValueError):  # not started, or being written by another command right now
                continue
            rows += [{"strategy": s, "seed": seed, **r} for r in rounds]
    return rows


def accuracy_table(rows: list[dict[str, Any]], max_columns: int = 6, metric: str | None = None) -> str:
    """Return a plain-text table: mean +- sample std of the test metric (%) over seeds, per strategy and label count.

    Args:
        rows: grid rows (:func:`run_grid`'s).
        max_columns: at most this many label counts, spread over those reached.
        metric: the metric to tabulate (default: the one the rows store, ``accuracy`` for classification).

    Returns:
        The table, headed by the metric's name.
    """
    metric = metric or storage.metric_of_rows(rows)
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    budgets = sorted({r["labelled"] for r in rows})
    if len(budgets) > max_columns:
        pick = np.linspace(0, len(budgets) - 1, max_columns).round().astype(int)
        budgets = [budgets[i] for i in sorted(set(pick))]
    width = max(len("strategy"), *(len(s) for s in strategies))
    head = "strategy".ljust(width) + "".join(f"{b:>15}" for b in budgets)
    lines = [f"test {metric} (%) by number of labels, mean +- sample std over seeds", head, "-" * len(head)]
    for s in strategies:
        cells = []
        for b in budgets:
            values = np.array([r[metric] for r in rows if r["strategy"] == s and r["labelled"] == b]) * 100
            std = values.std(ddof=1) if values.size > 1 else 0.0  # sample std, as in `saal report`
            cells.append(f"{values.mean():8.1f} +- {std:4.1f}" if values.size else f"{'-':>15}")
        lines.append(s.ljust(width) + "".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)
