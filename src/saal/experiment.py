"""Active-learning runs: rounds of train -> evaluate -> acquire -> label, resumable after any round.

One *run* is one (strategy, seed). Its folder holds ``config.json`` (the resolved settings),
``rounds.csv`` and ``rounds.json`` (one row per round), ``checkpoint.pt`` (everything needed to
continue, written atomically after every round) and, when finished, ``model.pt``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from saal.data import DatasetBundle, load_dataset
from saal.errors import SaalError
from saal.models import build_model
from saal.pool import Pool, initial_indices
from saal.strategies import Strategy, build_strategy
from saal.training import TrainConfig, evaluate, fit

ROUND_FIELDS = ("round", "labelled", "accuracy", "train_seconds", "acquire_seconds", "chosen")


@dataclass
class RunConfig:
    """Everything that defines one active-learning run, apart from the strategy and the seed.

    Attributes:
        dataset: a registry name, ``folder:PATH`` or ``npz:PATH``.
        model: a registry name.
        initial: size of the initial labelled set.
        initial_balanced: class-balanced (initial / classes per class) or uniform initial set.
        query: items acquired per round.
        rounds: acquisition rounds (the run records rounds + 1 accuracies).
        reinit: re-initialise to the same initial weights every round (else warm-start).
        subset: pool subset size for every strategy (None: whole pool).
        score_batch_size: pool items scored at once.
        device: torch device for training and scoring.
        train: the training settings.
    """

    dataset: str = "digits"
    model: str = "mlp"
    initial: int = 20
    initial_balanced: bool = True
    query: int = 20
    rounds: int = 5
    reinit: bool = True
    subset: int | None = None
    score_batch_size: int = 256
    device: str = "cpu"
    data_dir: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        for key in ("initial", "query", "score_batch_size"):
            if getattr(self, key) < 1:
                raise SaalError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.rounds < 0:
            raise SaalError(f"rounds must be >= 0, got {self.rounds}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    The initial set and the initial weights depend only on ``seed``, so every strategy run with
    the same seed starts from the same labelled set and the same weights (paired comparison),
    and the two are drawn from separate streams (Ji et al. 2023).
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
        self.strategy = build_strategy(strategy, subset=config.subset, batch_size=config.score_batch_size)
        self.seed = int(seed)
        self.folder = Path(folder) if folder is not None else None
        self.bundle = bundle if bundle is not None else load_dataset(config.dataset, config.data_dir)
        self.streams = seed_streams(self.seed)
        self.device = torch.device(config.device)
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
    def run(self, progress: Callable[[RoundResult], None] | None = None) -> list[RoundResult]:
        """Run (or resume) every remaining round; return all round results.

        Raises:
            SaalError: the folder holds a different run, a corrupt checkpoint, or an impossible size.
        """
        if self.folder is not None:
            self._prepare_folder()
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
        # Global torch randomness (dropout) is re-seeded from the run's own stream every round,
        # so that a resumed run draws exactly what an uninterrupted one would.
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.train_generator)))
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
        assert self.folder is not None
        cfg_path = self.folder / "config.json"
        mine = json.loads(json.dumps(self.describe()))
        if cfg_path.exists():
            try:
                theirs = json.loads(cfg_path.read_text())
            except (OSError, json.JSONDecodeError):
                raise SaalError(f"{cfg_path} is unreadable; delete {self.folder} or choose another --out") from None
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and k != "device")
            if diff:
                raise SaalError(
                    f"{self.folder} holds a different run ({diff[0]}: {theirs.get(diff[0])!r} there, "
                    f"{mine.get(diff[0])!r} now); choose another --out or delete that folder"
                )
            if (self.folder / "checkpoint.pt").exists():
                self._load()
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(cfg_path, json.dumps(mine, indent=2))

    def _save(self) -> None:
        assert self.folder is not None
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
        rows = [asdict(r) for r in self.results]
        _atomic_write_text(self.folder / "rounds.json", json.dumps(rows, indent=1))
        _atomic_write_text(self.folder / "rounds.csv", _rounds_csv(rows))
        if self.finished:
            _atomic_torch_save(self.model.state_dict(), self.folder / "model.pt")

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
    fields = ["strategy", "seed", *ROUND_FIELDS[:-1]]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@dataclass
class ExperimentSpec:
    """A grid of runs: every strategy x every seed, under one :class:`RunConfig`."""

    run: RunConfig = field(default_factory=RunConfig)
    strategies: list[str] = field(default_factory=lambda: ["random", "entropy", "saal"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out: str = "runs/default"

    def __post_init__(self) -> None:
        if isinstance(self.run, dict):
            self.run = RunConfig(**self.run)
        if not self.strategies:
            raise SaalError("no strategies given; name at least one, e.g. --strategies random,entropy")
        if not self.seeds:
            raise SaalError("no seeds given; give a count (--seeds 3) or a list (--seeds 123,456)")
        if len(set(self.seeds)) != len(self.seeds):
            raise SaalError(f"seeds repeat: {self.seeds}; give each seed once")

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run.to_dict(),
            "strategies": list(self.strategies),
            "seeds": list(self.seeds),
            "out": self.out,
        }


def check_grid(spec: ExperimentSpec, bundle: DatasetBundle) -> None:
    """Fail early, before anything is written, on settings no run of the grid could use.

    Raises:
        SaalError: unknown strategy or option, impossible sizes, or an output folder that
            holds different runs.
    """
    for s in spec.strategies:
        build_strategy(s)
    cfg = spec.run
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
                # Constructing the run compares the stored config with this one and raises on a mismatch.
                ActiveLearningRun(cfg, s, seed, folder, bundle=bundle)._prepare_folder()


def run_grid(
    spec: ExperimentSpec,
    bundle: DatasetBundle | None = None,
    on_round: Callable[[str, int, RoundResult], None] | None = None,
    on_run_start: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume, or skip when finished) every (strategy, seed) run of ``spec``.

    Returns:
        One row per (strategy, seed, round), also written to ``OUT/results.csv`` and
        ``OUT/results.json``.

    Raises:
        SaalError: bad settings (checked before anything is written).
    """
    bundle = bundle if bundle is not None else load_dataset(spec.run.dataset, spec.run.data_dir)
    check_grid(spec, bundle)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "experiment.json", json.dumps(spec.to_dict(), indent=2))
    rows: list[dict[str, Any]] = []
    for s in spec.strategies:
        for seed in spec.seeds:
            run = ActiveLearningRun(spec.run, s, seed, run_folder(out, s, seed), bundle=bundle)
            run._prepare_folder()
            if on_run_start is not None:
                on_run_start(s, seed, len(run.results))
            results = run.run(progress=None if on_round is None else lambda r, s=s, seed=seed: on_round(s, seed, r))
            rows += [{"strategy": s, "seed": seed, **asdict(r)} for r in results]
    write_summary(out, rows)
    _atomic_write_text(out / "results.json", json.dumps(rows, indent=1))
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
    lines = ["test accuracy (%) by number of labels, mean +- std over seeds", head, "-" * len(head)]
    for s in strategies:
        cells = []
        for b in budgets:
            acc = np.array([r["accuracy"] for r in rows if r["strategy"] == s and r["labelled"] == b]) * 100
            cells.append(f"{acc.mean():8.1f} +- {acc.std():4.1f}" if acc.size else f"{'-':>15}")
        lines.append(s.ljust(width) + "".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)
