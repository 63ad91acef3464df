"""Active-learning runs: rounds of train -> evaluate -> acquire -> label, resumable after any round.

One *run* is one (strategy, seed). Its folder holds ``config.json`` (the resolved settings),
``rounds.csv`` and ``rounds.json`` (one row per round), ``checkpoint.pt`` (everything needed to
continue, written atomically after every round) and, when finished, ``model.pt``.

Resume: after each round (training, evaluation, acquisition and labelling) the run writes
``rounds.json``/``rounds.csv`` (and ``model.pt`` after the last round), then ``checkpoint.pt``
last: the checkpoint is the commit point. It holds the model, the optimiser state (warm start),
the pool, the train generator and the acquisition generator, the strategy's own state and the
results so far. Every round re-seeds the global torch, numpy and ``random`` generators from the
train generator, so a run killed at any moment and started again continues from the last
committed round and produces the same chosen indices and accuracies as an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from saal.data import DatasetBundle, load_dataset
from saal.errors import RunInProgress, SaalError
from saal.folder_lock import folder_lock
from saal.models import build_model
from saal.pool import Pool, initial_indices
from saal.settings import ExperimentSpec, RunConfig
from saal.strategies import Strategy, build_strategy
from saal.training import evaluate, fit

ROUND_FIELDS = ("round", "labelled", "accuracy", "train_seconds", "acquire_seconds", "chosen")


@dataclass
class RoundResult:
    """One round: accuracy after training on ``labelled`` items, and what was acquired next."""

    round: int
    labelled: int
    accuracy: float
    train_seconds: float
    acquire_seconds: float
    chosen: list[int]


def seed_streams(seed: int) -> dict[str, int]:
    """Return independent seeds for the initial set, model initialisation, training and acquisition.

    The four streams are children of ``numpy.random.SeedSequence(seed)``:

    - ``initial``: draws the initial labelled set;
    - ``model``: the initial weights (and a strategy's own modules when it is built);
    - ``train``: shuffling, augmentation, dropout (re-seeds the global generators each round);
    - ``acquire``: the strategy's random choices (pool subset, sampling).

    The initial set and the initial weights depend only on ``seed``, so every strategy run with
    the same seed starts from the same labelled set and the same weights (a paired comparison),
    and they come from separate streams (Ji et al. 2023), so changing how one is drawn does not
    change the other.

    Returns:
        ``{"initial": int, "model": int, "train": int, "acquire": int}``.
    """
    children = np.random.SeedSequence(seed).spawn(4)
    names = ("initial", "model", "train", "acquire")
    return {n: int(c.generate_state(1)[0]) for n, c in zip(names, children, strict=True)}


def slug(spec: str) -> str:
    """Return a folder-safe name for a strategy spec."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", spec.replace("[", "_").replace("]", "")).strip("_")


def run_folder(out: str | os.PathLike, spec: str, seed: int) -> Path:
    """Return the folder of one (strategy, seed) run under ``out``."""
    return Path(out) / slug(spec) / f"seed-{seed}"


class ActiveLearningRun:
    """One (strategy, seed) run over a loaded dataset; resumable from its folder.

    Args:
        config: the shared settings.
        strategy: a strategy spec string or instance.
        seed: the run's seed.
        folder: where results and the checkpoint go (None: keep nothing on disk).
        bundle: the loaded dataset (loaded from ``config`` if None).
        model: a user's own ``nn.Module`` instead of ``config.model`` (its current weights are
            the initial weights).
    """

    def __init__(
        self,
        config: RunConfig,
        strategy: str | Strategy,
        seed: int,
        folder: str | os.PathLike | None = None,
        bundle: DatasetBundle | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.config = config
        self.spec = strategy if isinstance(strategy, str) else strategy.name
        self.seed = int(seed)
        self.streams = seed_streams(self.seed)
        # A strategy that builds modules of its own when constructed must not depend on what ran
        # before it in this process (nor differ in a resumed process): build it under a fixed seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.streams["model"] ^ 0x5EED)
            self.strategy = build_strategy(strategy, subset=config.subset, batch_size=config.score_batch_size)
        self.folder = Path(folder) if folder is not None else None
        self.bundle = (
            bundle if bundle is not None else load_dataset(config.dataset, config.data_dir, **config.dataset_options)
        )
        self.device = torch.device(config.device)
        self._prepared = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.streams["model"])
            base = build_model(
                model if model is not None else config.model, self.bundle.input_shape, self.bundle.num_classes
            )
        self.model = base.to(self.device)
        self.initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.pool = Pool(self.bundle.train, self.bundle.num_classes)
        self.train_generator = torch.Generator().manual_seed(self.streams["train"])
        self.acquire_rng = np.random.default_rng(self.streams["acquire"])
        self.optimizer_state: dict | None = None
        self.results: list[RoundResult] = []

    # -- describing the run -------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Return the resolved settings written to ``config.json``."""
        return {
            "strategy": self.spec,
            "strategy_repr": repr(self.strategy),
            "seed": self.seed,
            "seed_streams": self.streams,
            **self.config.to_dict(),
        }

    @property
    def finished(self) -> bool:
        return len(self.results) == self.config.rounds + 1

    # -- the loop -----------------------------------------------------------------------
    def run(
        self,
        progress: Callable[[RoundResult], None] | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> list[RoundResult]:
        """Run (or resume) every remaining round; return all round results.

        The run folder is locked while the run works in it (:func:`saal.folder_lock.folder_lock`).

        Args:
            progress: called with the result of each new round.
            on_start: called once, before the first new round, with the number of rounds already done.

        Raises:
            RunInProgress: another process is running this folder's run right now.
            SaalError: the folder holds a different run, a corrupt checkpoint, or an impossible size.
        """
        if self.folder is None:
            return self._run_rounds(progress, on_start)
        self.check_folder()  # a folder holding another run is refused before anything is written into it
        with folder_lock(self.folder, wait=False) as held:
            if not held:
                raise RunInProgress(
                    f"{self.folder} is being run by another process right now; "
                    "wait for it, or give the same command again later to resume it"
                )
            self._prepare_folder()
            return self._run_rounds(progress, on_start)

    def _run_rounds(
        self, progress: Callable[[RoundResult], None] | None, on_start: Callable[[int], None] | None
    ) -> list[RoundResult]:
        if on_start is not None:
            on_start(len(self.results))
        if not self.results:
            start = initial_indices(
                self.bundle.train_targets,
                self.config.initial,
                np.random.default_rng(self.streams["initial"]),
                balanced=self.config.initial_balanced,
                num_classes=self.bundle.num_classes,
            )
            self.pool.label(start, self.bundle.train_targets[start])
        while not self.finished:
            result = self._round(len(self.results))
            self.results.append(result)
            if self.folder is not None:
                self._save()
            if progress is not None:
                progress(result)
        return self.results

    def _round(self, r: int) -> RoundResult:
        cfg = self.config
        if cfg.reinit:
            self.model.load_state_dict(self.initial_state)
        # Global randomness (dropout, and any library that draws from the global generators) is
        # re-seeded from the run's own stream every round, so that a resumed run draws exactly
        # what an uninterrupted one would.
        round_seed = int(torch.randint(0, 2**62, (1,), generator=self.train_generator))
        torch.manual_seed(round_seed)
        np.random.seed(round_seed % 2**32)
        random.seed(round_seed)
        labelled = self.pool.labelled_indices()
        fitted = fit(
            self.model,
            self.bundle.train,
            labelled,
            self.pool.labels_of(labelled),
            cfg.train,
            self.train_generator,
            hook=self.strategy.training_hook(),
            optimizer_state=None if cfg.reinit else self.optimizer_state,
        )
        if not cfg.reinit:
            self.optimizer_state = fitted.optimizer_state
        accuracy = evaluate(self.model, self.bundle.test, cfg.score_batch_size)
        chosen: list[int] = []
        t0 = time.perf_counter()
        if r < cfg.rounds:
            k = min(cfg.query, self.pool.num_unlabelled)
            selection = self.strategy.select(self.model, self.pool, k, self.acquire_rng)
            self.pool.next_round()
            self.pool.label(selection.indices, self.bundle.train_targets[selection.indices])
            chosen = [int(i) for i in selection.indices]
        return RoundResult(r, len(labelled), accuracy, fitted.seconds, time.perf_counter() - t0, chosen)

    # -- files --------------------------------------------------------------------------
    def _prepare_folder(self) -> None:
        """Check the folder holds this run (or nothing), and load its checkpoint; once per object.

        Raises:
            SaalError: the folder holds a run with other settings, or an unreadable file.
        """
        assert self.folder is not None
        if self._prepared:
            return
        if self.check_folder():
            if (self.folder / "checkpoint.pt").exists():
                self._load()
                self._write_rounds()
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.folder / "config.json", json.dumps(self.describe(), indent=2))
        self._prepared = True

    def check_folder(self) -> bool:
        """Return whether the run folder already holds this run's ``config.json``; write nothing.

        Raises:
            SaalError: the folder holds a run with other settings, or an unreadable config.
        """
        assert self.folder is not None
        cfg_path = self.folder / "config.json"
        mine = json.loads(json.dumps(self.describe()))
        if cfg_path.exists():
            try:
                theirs = json.loads(cfg_path.read_text())
            except (OSError, json.JSONDecodeError):
                raise SaalError(f"{cfg_path} is unreadable; delete {self.folder} or choose another --out") from None
            if not isinstance(theirs, dict):
                raise SaalError(f"{cfg_path} is not a run's config; delete {self.folder} or choose another --out")
            key = _first_difference(theirs, mine, ignore=RESUME_IGNORED)
            if key is not None:
                raise SaalError(
                    f"{self.folder} holds a different run ({key}: {_lookup(theirs, key)!r} there, "
                    f"{_lookup(mine, key)!r} now); choose another --out or delete that folder"
                )
            return True
        return False

    def _write_rounds(self) -> None:
        """Write ``rounds.json`` / ``rounds.csv`` from the results (unless they already say the same)."""
        assert self.folder is not None
        rows = [asdict(r) for r in self.results]
        text = json.dumps(rows, indent=1)
        path = self.folder / "rounds.json"
        if path.exists() and path.read_text() == text:
            return
        _atomic_write_text(path, text)
        _atomic_write_text(self.folder / "rounds.csv", _rounds_csv(rows))

    def _save(self) -> None:
        # The checkpoint is written last: it is the commit point. A kill before it leaves files
        # one round ahead of the checkpoint; the resumed run recomputes that round identically.
        assert self.folder is not None
        self._write_rounds()
        if self.finished:
            _atomic_torch_save(self.model.state_dict(), self.folder / "model.pt")
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer_state,
            "pool": self.pool.state_dict(),
            "train_generator": self.train_generator.get_state(),
            "acquire_rng": self.acquire_rng.bit_generator.state,
            "strategy": self.strategy.state_dict(),
            "results": [asdict(r) for r in self.results],
        }
        _atomic_torch_save(state, self.folder / "checkpoint.pt")

    def _load(self) -> None:
        assert self.folder is not None
        path = self.folder / "checkpoint.pt"
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
            self.model.load_state_dict(state["model"])
            self.pool.load_state_dict(state["pool"])
            self.train_generator.set_state(state["train_generator"])
            self.acquire_rng.bit_generator.state = state["acquire_rng"]
            self.strategy.load_state_dict(state["strategy"])
            self.results = [RoundResult(**r) for r in state["results"]]
            self.optimizer_state = state["optimizer"]
        except SaalError:
            raise
        except Exception as exc:  # a truncated or foreign file
            raise SaalError(f"{path} is corrupt ({type(exc).__name__}); delete it to restart that run") from None


# Settings that may change between a run and its resumption: they do not change its results.
RESUME_IGNORED = frozenset({"device", "data_dir"})
OPTIONAL_EMPTY: tuple[Any, ...] = ({},)


def _first_difference(a: Any, b: Any, ignore: frozenset[str] = frozenset(), prefix: str = "") -> str | None:
    """Return the dotted key of the first difference between two JSON-like dicts (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key in ignore:
                continue
            if key not in a and b.get(key) in OPTIONAL_EMPTY:
                continue  # a setting added after that run was written, left at its empty default
            found = _first_difference(a.get(key), b.get(key), ignore, f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else prefix.rstrip(".")


def _lookup(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _rounds_csv(rows: list[dict[str, Any]]) -> str:
    lines = [",".join(ROUND_FIELDS)]
    for row in rows:
        values = [row[f] if f != "chosen" else " ".join(map(str, row[f])) for f in ROUND_FIELDS]
        lines.append(",".join(f"{v:.6f}" if isinstance(v, float) else str(v) for v in values))
    return "\n".join(lines) + "\n"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_rounds(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Return the round rows of a run folder (from ``rounds.json``)."""
    return json.loads((Path(folder) / "rounds.json").read_text())


def write_summary(out: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write one CSV row per (strategy, seed, round) under ``out``; return its path."""
    path = Path(out) / "results.csv"
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["strategy", "seed", *ROUND_FIELDS[:-1]], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write_text(path, text.getvalue())
    return path


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
    """Fail early, before anything is written, on settings no run of the grid could use.

    Raises:
        SaalError: unknown strategy or option, impossible sizes, or an output folder that
            holds different runs.
    """
    for s in spec.strategies:
        build_strategy(s)
    cfg = spec.run
    check_device(cfg.device)
    build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    n = len(bundle.train)
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
    if cfg.initial_balanced and cfg.initial % bundle.num_classes:
        raise SaalError(
            f"a class-balanced initial set needs a multiple of the {bundle.num_classes} classes, got {cfg.initial}"
        )
    for s in spec.strategies:
        for seed in spec.seeds:
            folder = run_folder(spec.out, s, seed)
            if (folder / "config.json").exists():
                ActiveLearningRun(cfg, s, seed, folder, bundle=bundle).check_folder()
    _check_experiment_file(spec)


def _check_experiment_file(spec: ExperimentSpec) -> None:
    """Refuse an output folder whose ``experiment.json`` records another protocol (``run`` settings)."""
    path = Path(spec.out) / "experiment.json"
    if not path.exists():
        return
    try:
        theirs = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise SaalError(f"{path} is unreadable; delete it or choose another --out") from None
    mine = json.loads(json.dumps(spec.to_dict()))
    key = _first_difference(
        theirs.get("run") if isinstance(theirs, dict) else None, mine["run"], ignore=RESUME_IGNORED, prefix="run."
    )
    if key is not None:
        raise SaalError(
            f"{spec.out} holds a different run protocol ({key}: {_lookup(theirs, key)!r} there, "
            f"{_lookup(mine, key)!r} now); choose another --out or delete that folder"
        )


def run_grid(
    spec: ExperimentSpec,
    bundle: DatasetBundle | None = None,
    on_round: Callable[[str, int, RoundResult], None] | None = None,
    on_run_start: Callable[[str, int, int], None] | None = None,
    on_busy: Callable[[str, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume, or skip when finished) every (strategy, seed) run of ``spec``.

    A run that another process is running right now (two commands sharing one output folder) is
    skipped: ``on_busy(strategy, seed)`` is called and its rows are not among those returned.

    Returns:
        One row per (strategy, seed, round) of this grid. ``OUT/results.csv`` and ``OUT/results.json``
        get the rows of every run in ``OUT``: this grid's and those of earlier commands with other
        strategies or seeds (``OUT/experiment.json`` lists them all).

    Raises:
        SaalError: bad settings (checked before anything is written).
    """
    bundle = (
        bundle if bundle is not None else load_dataset(spec.run.dataset, spec.run.data_dir, **spec.run.dataset_options)
    )
    check_grid(spec, bundle)
    out = Path(spec.out)
    with folder_lock(out):
        _atomic_write_text(out / "experiment.json", json.dumps(_merged_experiment(spec), indent=2))
    rows: list[dict[str, Any]] = []
    for s in spec.strategies:
        for seed in spec.seeds:
            run = ActiveLearningRun(spec.run, s, seed, run_folder(out, s, seed), bundle=bundle)
            try:
                results = run.run(
                    progress=None if on_round is None else lambda r, s=s, seed=seed: on_round(s, seed, r),
                    on_start=None if on_run_start is None else lambda n, s=s, seed=seed: on_run_start(s, seed, n),
                )
            except RunInProgress:  # another command works on it: go on with the next run
                if on_busy is not None:
                    on_busy(s, seed)
                continue
            rows += [{"strategy": s, "seed": seed, **asdict(r)} for r in results]
    with folder_lock(out):
        everything = _rows_of_folder(out)
        write_summary(out, everything)
        _atomic_write_text(out / "results.json", json.dumps(everything, indent=1))
    return rows


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


def _rows_of_folder(out: Path) -> list[dict[str, Any]]:
    """Return one row per round of every run that ``OUT/experiment.json`` lists and that has finished a round."""
    listed = json.loads((out / "experiment.json").read_text())
    rows: list[dict[str, Any]] = []
    for s in listed["strategies"]:
        for seed in listed["seeds"]:
            try:
                rounds = read_rounds(run_folder(out, s, seed))
            except (OSError, ValueError):  # not started, or being written by another command right now
                continue
            rows += [{"strategy": s, "seed": seed, **r} for r in rounds]
    return rows


def accuracy_table(rows: list[dict[str, Any]], max_columns: int = 6) -> str:
    """Return a plain-text table: mean +- std test accuracy (%) over seeds, per strategy and label count."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    budgets = sorted({r["labelled"] for r in rows})
    if len(budgets) > max_columns:
        pick = np.linspace(0, len(budgets) - 1, max_columns).round().astype(int)
        budgets = [budgets[i] for i in sorted(set(pick))]
    width = max(len("strategy"), *(len(s) for s in strategies))
    head = "strategy".ljust(width) + "".join(f"{b:>15}" for b in budgets)
    lines = ["test accuracy (%) by number of labels, mean +- sample std over seeds", head, "-" * len(head)]
    for s in strategies:
        cells = []
        for b in budgets:
            acc = np.array([r["accuracy"] for r in rows if r["strategy"] == s and r["labelled"] == b]) * 100
            std = acc.std(ddof=1) if acc.size > 1 else 0.0  # sample std, as in `saal report`
            cells.append(f"{acc.mean():8.1f} +- {std:4.1f}" if acc.size else f"{'-':>15}")
        lines.append(s.ljust(width) + "".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)
