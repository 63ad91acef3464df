"""One active-learning run, step by step: rounds of train -> evaluate -> acquire -> label, resumable after any round.

One *run* is one (strategy, seed). The model is scored through the dataset's task
(``bundle.task.evaluate`` returns a :class:`~saal.tasks.Metric`) and items are labelled through the
:class:`~saal.pool.Pool`; each round's result stores the metric under its name (``accuracy`` for
classification). Its folder's files are :mod:`saal.experiment.storage`'s.

Resume: after each round (training, evaluation, acquisition and labelling) the run writes
``rounds.json``/``rounds.csv`` (and ``model.pt`` after the last round), then ``checkpoint.pt``
last: the checkpoint is the commit point. It holds the model, the optimiser state (warm start),
the pool, the train generator and the acquisition generator, the strategy's own state and the
results so far. Every round re-seeds the global torch, numpy and ``random`` generators from the
train generator, so a run killed at any moment and started again continues from the last
committed round and produces the same chosen indices and metric values as an uninterrupted run.

The start: by default the initial set (``initial`` items) is drawn with the true labels, class-balanced (the
paper's protocol; ``initial_balanced``) or uniformly. With ``initial_strategy`` (a ``cold_start`` strategy)
it is chosen by that strategy from zero labels instead, given the untrained model and no ground truth. With
``initial = 0`` nothing is labelled before round 0: round 0 evaluates the untrained model at 0 labels and its
acquisition is the first pick, made by :func:`first_picker`'s choice (``initial_strategy``; else the run's own
strategy when it is cold-start; else ``random``). Every round records which strategy made its acquisition and
why (``acquired_by``, ``reason``); round 0 records how the initial set was chosen (``start``).

When to stop (:mod:`saal.stopping`): a classification run draws a stop set once, after the initial set is labelled
(``stop_set`` items of the unlabelled pool, from the run's ``stop`` seed stream), and every round, after training,
records Cohen's kappa between the model's predictions on it and the previous round's model's (``kappa``; None at
round 0). With ``stop_when = "stable"`` the run ends at the first round where the kappa has been at least
``stop_threshold`` in each of the last ``stop_window`` rounds: that round acquires nothing and is marked ``stopped``,
and the run counts as finished. Until then its rounds are those of the same run without the rule.
"""

from __future__ import annotations

import inspect
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import saal.experiment.storage as storage
from saal.core.acquisition_service import acquire
from saal.data import DatasetBundle, load_dataset
from saal.errors import RunInProgress, SaalError
from saal.experiment.folder_lock import folder_lock
from saal.models import build_model
from saal.pool import Pool, initial_indices
from saal.settings import RunConfig
from saal.stopping import StabilisingPredictions, predict_classes, predicts_classes
from saal.strategies import Strategy, build_strategy, parse_spec, strategy_options
from saal.tasks import Task
from saal.training import evaluation_batch_size, fit
from saal.tuning import tune_training, tuned_details


@dataclass
class RoundResult:
    """One round: the test metric after training on ``labelled`` items, and what was acquired next.

    Attributes:
        round: the round index (0 = trained on the initial set).
        labelled: how many items the model was trained on.
        metric: the metric's name (``accuracy`` for classification, ``map`` for detection).
        value: the metric's value, in [0, 1].
        train_seconds, acquire_seconds: wall time of training and of the acquisition.
        chosen: the dataset indices acquired after this round (empty after the last).
        per_class: the metric per class name, where the task gives one (kept in ``rounds.json`` only).
        details: further scores and counts of the round by name (detection: ``map``, ``boxes_labelled``;
            kept in ``rounds.json`` only).
        acquired_by: the spec of the strategy that made this round's acquisition ("" after the last round;
            None in rounds written before saal recorded it).
        reason: why that strategy, and what it said of its choice (:attr:`saal.strategies.Selection.reason`);
            "" when there is nothing to say; None in older rounds.
        start: round 0 only: how the initial set was chosen, ``{"by", "reason", "chosen"}`` (``rounds.json``
            only; None in older rounds and later rounds).
        kappa: Cohen's kappa between this round's model's predictions on the stop set and the previous round's
            (:mod:`saal.stopping`); None at round 0, in rounds of older saal and of tasks other than classification.
        records_kappa: whether the round records a kappa at all (False: rows of older saal, detection), so that a
            round 0 writes ``"kappa": null`` and an older row is written back without the field.
        stopped: the stopping rule (``stop_when = "stable"``) ended the run at this round.
    """

    round: int
    labelled: int
    metric: str
    value: float
    train_seconds: float
    acquire_seconds: float
    chosen: list[int]
    per_class: dict[str, float] = field(default_factory=dict)
    details: dict[str, float] = field(default_factory=dict)
    acquired_by: str | None = None
    reason: str | None = None
    start: dict[str, Any] | None = None
    kappa: float | None = None
    records_kappa: bool = False
    stopped: bool = False

    @property
    def accuracy(self) -> float:
        """The value of a classification round's accuracy.

        Raises:
            AttributeError: the round stores another metric.
        """
        if self.metric != "accuracy":
            raise AttributeError(f"this round stores {self.metric!r}, not accuracy; read .value")
        return self.value

    def row(self) -> dict[str, Any]:
        """Return the round as a ``rounds.json`` row: the metric under its name, ``per_class`` only when known.

        Returns:
            ``{"round", "labelled", <metric>, "train_seconds", "acquire_seconds", "chosen"[, "acquired_by",
            "reason"][, "start"][, "per_class"][, "details"][, "kappa"][, "stopped"]}``: the fields a round of an
            older saal lacks are left out, so that its rows are written back as they were; ``stopped`` only when
            true.
        """
        row: dict[str, Any] = {
            "round": self.round,
            "labelled": self.labelled,
            self.metric: self.value,
            "train_seconds": self.train_seconds,
            "acquire_seconds": self.acquire_seconds,
            "chosen": list(self.chosen),
        }
        if self.acquired_by is not None:
            row["acquired_by"] = self.acquired_by
            row["reason"] = self.reason or ""
        if self.start is not None:
            row["start"] = dict(self.start)
        if self.per_class:
            row["per_class"] = dict(self.per_class)
        if self.details:
            row["details"] = dict(self.details)
        if self.records_kappa:
            row["kappa"] = self.kappa
        if self.stopped:
            row["stopped"] = True
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any], metric: str = storage.DEFAULT_METRIC) -> RoundResult:
        """Return the round a :meth:`row` (or a saal 0.1.0 ``rounds.json`` row) describes.

        Raises:
            KeyError: the row lacks a field or the metric.
        """
        return cls(
            round=int(row["round"]),
            labelled=int(row["labelled"]),
            metric=metric,
            value=float(row[metric]),
            train_seconds=float(row["train_seconds"]),
            acquire_seconds=float(row["acquire_seconds"]),
            chosen=[int(i) for i in row["chosen"]],
            per_class={str(k): float(v) for k, v in dict(row.get("per_class") or {}).items()},
            details={str(k): float(v) for k, v in dict(row.get("details") or {}).items()},
            acquired_by=None if row.get("acquired_by") is None else str(row["acquired_by"]),
            reason=None if row.get("acquired_by") is None else str(row.get("reason") or ""),
            start=dict(row["start"]) if isinstance(row.get("start"), Mapping) else None,
            kappa=None if row.get("kappa") is None else float(row["kappa"]),
            records_kappa="kappa" in row,
            stopped=bool(row.get("stopped", False)),
        )


def seed_streams(seed: int) -> dict[str, int]:
    """Return independent seeds for the initial set, model initialisation, training, acquisition and the stop set.

    The five streams are children of ``numpy.random.SeedSequence(seed)`` (the first four as before the fifth was
    added: a ``SeedSequence``'s n-th child does not depend on how many are spawned):

    - ``initial``: draws the initial labelled set;
    - ``model``: the initial weights (and a strategy's own modules when it is built);
    - ``train``: shuffling, augmentation, dropout (re-seeds the global generators each round);
    - ``acquire``: the strategy's random choices (pool subset, sampling);
    - ``stop``: draws the stopping rule's stop set (:mod:`saal.stopping`).

    The initial set and the initial weights depend only on ``seed``, so every strategy run with
    the same seed starts from the same labelled set and the same weights (a paired comparison),
    and they come from separate streams (Ji et al. 2023), so changing how one is drawn does not
    change the other.

    Returns:
        ``{"initial": int, "model": int, "train": int, "acquire": int, "stop": int}``.
    """
    children = np.random.SeedSequence(seed).spawn(5)
    names = ("initial", "model", "train", "acquire", "stop")
    return {n: int(c.generate_state(1)[0]) for n, c in zip(names, children, strict=True)}


def build_run_strategy(strategy: str | Strategy, config: RunConfig, seed: int) -> Strategy:
    """Return the strategy of a run, built as the run builds it (shared subset and batch size, fixed seed).

    A strategy that builds modules of its own when constructed must not depend on what ran before it in
    this process (nor differ in a resumed process): it is built under a seed from the run's ``model`` stream,
    and the global generator is left as it was.

    Raises:
        SaalError: an unknown strategy, option or option value.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_streams(seed)["model"] ^ 0x5EED)
        return build_strategy(strategy, subset=config.subset, batch_size=config.score_batch_size)


def load_run_bundle(config: RunConfig, bundle: DatasetBundle | None = None, own_model: bool = False) -> DatasetBundle:
    """Return the data a run of ``config`` trains on: ``bundle`` (default ``config``'s dataset, loaded), turned into
    the frozen backbone's cached features when ``config.model`` is a head on it (``pretrained-linear``,
    ``pretrained-mlp``) and no model of one's own is given (``own_model``).

    Raises:
        SaalError: an unknown or unreadable dataset, bad model options, or inputs the backbone cannot take.
    """
    if bundle is None:
        bundle = load_dataset(config.dataset, config.data_dir, **config.dataset_options)
    if own_model or config.model not in ("pretrained-linear", "pretrained-mlp"):
        return bundle
    from saal.models.frozen_backbone import bundle_for_model  # pulls in timm only when asked for

    return bundle_for_model(bundle, config.model, config.model_options, device=config.device)


def resolved_options(strategy: str | Strategy, config: RunConfig) -> dict[str, Any]:
    """Return the options a strategy spec resolves to (its defaults, the shared settings, then the spec's own).

    An instance given instead of a spec has no spec to resolve: ``{}``.
    """
    if not isinstance(strategy, str):
        return {}
    name, options = parse_spec(strategy)
    known = strategy_options(name)
    shared = {"subset": config.subset, "batch_size": config.score_batch_size}
    return {
        **{k: v for k, v in known.items() if v is not inspect.Parameter.empty},
        **{k: v for k, v in shared.items() if k in known and v is not None},
        **options,
    }


def first_picker(config: RunConfig, spec: str, strategy: Strategy) -> tuple[str, str]:
    """Return which strategy makes the first pick of a run that starts from no labels, and why.

    The rule: ``config.initial_strategy`` when given; else the run's own strategy (``spec``, built as
    ``strategy``) when it can choose from zero labels (``cold_start``); else ``random``. Later acquisitions are
    the run's own strategy's.

    Returns:
        ``(strategy spec, reason)``.
    """
    if config.initial_strategy is not None:
        return config.initial_strategy, "initial_strategy: the first pick, from zero labels"
    if strategy.cold_start:
        return spec, f"{spec} is cold-start: it makes the first pick, from zero labels"
    return "random", f"{spec} cannot choose from zero labels: random makes the first pick"


def describe_run(config: RunConfig, spec: str | Strategy, seed: int, strategy: Strategy, task: Task) -> dict[str, Any]:
    """Return the ``config.json`` record of the run of ``spec`` (built as ``strategy``) with ``seed`` on ``task``."""
    return storage.run_record(
        config,
        spec if isinstance(spec, str) else spec.name,
        seed,
        strategy_repr=repr(strategy),
        strategy_options=resolved_options(spec, config),
        seed_streams=seed_streams(seed),
        task=task.describe(),
        metric=task.metric_name,
    )


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

    Raises:
        SaalError: an unknown strategy, model or dataset, or settings they refuse.
    """

    def __init__(
        self,
        config: RunConfig,
        strategy: str | Strategy,
        seed: int,
        folder: str | os.PathLike[str] | None = None,
        bundle: DatasetBundle | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.config = config
        self.spec = strategy if isinstance(strategy, str) else strategy.name
        self.seed = int(seed)
        self.streams = seed_streams(self.seed)
        self._given = strategy
        self.strategy = build_run_strategy(strategy, config, self.seed)
        self.strategy.use_training(config.train)
        self._pickers: dict[str, Strategy] = {self.spec: self.strategy}
        self._start: dict[str, Any] | None = None
        self.folder = Path(folder) if folder is not None else None
        self.bundle = load_run_bundle(config, bundle, own_model=model is not None)
        self.task = self.bundle.task
        self.metric = self.task.metric_name
        self.device = torch.device(config.device)
        self._prepared = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.streams["model"])
            base = build_model(
                model if model is not None else config.model,
                self.bundle.input_shape,
                self.bundle.num_classes,
                task=self.task.name,
                options=config.model_options,
            )
        self.model = base.to(self.device)
        self.initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.pool = Pool(self.bundle.train, task=self.task)
        self.train_generator = torch.Generator().manual_seed(self.streams["train"])
        self.acquire_rng = np.random.default_rng(self.streams["acquire"])
        self.optimizer_state: dict[str, Any] | None = None
        self.results: list[RoundResult] = []
        # the stopping rule's measure, recorded every round of a classification run (stop_when or not)
        self.stability = (
            StabilisingPredictions(config.stop_threshold, config.stop_window, config.stop_set)
            if predicts_classes(self.task)
            else None
        )

    # -- describing the run -------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Return the run's record written to ``config.json`` (see :func:`saal.experiment.storage.run_record`)."""
        return describe_run(self.config, self._given, self.seed, self.strategy, self.task)

    @property
    def finished(self) -> bool:
        """Whether every round (``rounds + 1`` evaluations) is done, or the stopping rule ended the run."""
        return len(self.results) == self.config.rounds + 1 or bool(self.results and self.results[-1].stopped)

    # -- the loop -----------------------------------------------------------------------
    def run(
        self,
        progress: Callable[[RoundResult], None] | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> list[RoundResult]:
        """Run (or resume) every remaining round; return all round results.

        The run folder is locked while the run works in it (:func:`saal.experiment.folder_lock.folder_lock`).

        Args:
            progress: called with the result of each new round.
            on_start: called once, before the first new round, with the number of rounds already done.

        Returns:
            Every round's result, those of earlier sittings first.

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
            self._start = self._label_initial_set()
            self._draw_stop_set()
        while not self.finished:
            result = self._round(len(self.results))
            self.results.append(result)
            if self.folder is not None:
                self._save()
            if progress is not None:
                progress(result)
        return self.results

    def picker(self, spec: str) -> Strategy:
        """Return the strategy ``spec`` as this run builds it: the run's own when ``spec`` is its spec.

        Raises:
            SaalError: an unknown strategy, option or option value.
        """
        if spec not in self._pickers:
            built = build_run_strategy(spec, self.config, self.seed)
            built.use_training(self.config.train)
            self._pickers[spec] = built
        return self._pickers[spec]

    def _label_initial_set(self) -> dict[str, Any]:
        """Choose and label the initial set (see the module's docstring).

        Returns:
            Round 0's ``start`` record: ``{"by", "reason", "chosen"}``.
        """
        cfg = self.config
        if cfg.initial == 0:
            return {"by": "", "reason": "no initial labels: round 0's acquisition is the first pick", "chosen": []}
        if cfg.initial_strategy is None:
            balanced = cfg.initial_balanced and self.task.name == "classification"
            start = initial_indices(
                self.bundle.train_targets,
                cfg.initial,
                np.random.default_rng(self.streams["initial"]),
                balanced=balanced,
                num_classes=self.bundle.num_classes,
            )
            by = "ground truth, class-balanced" if balanced else "uniform"
            reason = "drawn with the true labels" if balanced else "drawn uniformly at random"
        else:
            rng = np.random.default_rng(self.streams["initial"])
            selection = acquire(self.picker(cfg.initial_strategy), self.model, self.pool, cfg.initial, rng)
            start, by = selection.indices, cfg.initial_strategy
            reason = "; ".join(t for t in (selection.reason, "initial_strategy: chosen from zero labels") if t)
        self.pool.label(start, self.bundle.train_targets[start])
        return {"by": by, "reason": reason, "chosen": [int(i) for i in np.sort(start)]}

    def _draw_stop_set(self) -> None:
        """Draw the stopping rule's stop set from the unlabelled pool (once, after the initial set is labelled)."""
        if self.stability is not None:
            self.stability.choose_stop_set(self.pool.unlabelled_indices(), np.random.default_rng(self.streams["stop"]))

    def _stop_set_predictions(self) -> np.ndarray:
        """Return the model's predicted class of every stop-set item."""
        assert self.stability is not None and self.stability.stop_set is not None
        batch = evaluation_batch_size(self.config.score_batch_size, self.device, self.bundle.input_shape, self.task)
        return predict_classes(self.model, self.bundle.train, self.stability.stop_set, self.task, batch)

    def _measure_stability(self, r: int) -> tuple[float | None, bool]:
        """Record the kappa of round ``r``'s model (after its training) and whether the rule ends the run now.

        Returns:
            ``(kappa or None, stop)``: ``stop`` only with ``stop_when = "stable"``, before the last round.
        """
        if self.stability is None:
            return None, False
        kappa = self.stability.update(self._stop_set_predictions())
        stop = self.config.stop_when == "stable" and self.stability.should_stop and r < self.config.rounds
        return kappa, stop

    def _acquire(self, r: int, stop: bool = False) -> tuple[list[int], str, str]:
        """Make round ``r``'s acquisition and label it (nothing after the last round, or when ``stop``).

        Returns:
            ``(chosen indices, the spec of the strategy that chose, why)``.
        """
        cfg = self.config
        if stop:
            assert self.stability is not None
            return [], "", f"stopped: predictions stable ({self.stability.describe()})"
        if r >= cfg.rounds:
            return [], "", ""
        spec, why = (self.spec, "") if r > 0 or cfg.initial > 0 else first_picker(cfg, self.spec, self.strategy)
        k = min(cfg.query, self.pool.num_unlabelled)
        # under torchrun every rank scores its share of the pool (saal.core.acquisition_service)
        selection = acquire(self.picker(spec), self.model, self.pool, k, self.acquire_rng)
        self.pool.next_round()
        # the simulated annotator: the true labels of the chosen items, given through the pool
        self.pool.label(selection.indices, self.bundle.train_targets[selection.indices])
        # the strategy's own reason first: a strategy that hands its choice on names the one it used first
        return [int(i) for i in selection.indices], spec, "; ".join(t for t in (selection.reason, why) if t)

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
        tuned = tune_training(
            self.model, self.initial_state, self.bundle.train, labelled, self.pool.labels_of(labelled), cfg.train,
            round_seed % 2**31, self.task,
        )  # fmt: skip
        fitted = fit(
            self.model,
            self.bundle.train,
            labelled,
            self.pool.labels_of(labelled),
            tuned.config,
            self.train_generator,
            hook=self.strategy.training_hook(),
            optimizer_state=None if cfg.reinit else self.optimizer_state,
            task=self.task,
        )
        if not cfg.reinit:
            self.optimizer_state = fitted.optimizer_state
        eval_batch = evaluation_batch_size(cfg.score_batch_size, self.device, self.bundle.input_shape, self.task)
        score = self.task.evaluate(self.model, self.bundle.test, eval_batch)
        kappa, stop = self._measure_stability(r)
        t0 = time.perf_counter()
        chosen, acquired_by, reason = self._acquire(r, stop)
        return RoundResult(
            round=r,
            labelled=len(labelled),
            metric=score.name,
            value=float(score.value),
            train_seconds=fitted.seconds,
            acquire_seconds=time.perf_counter() - t0,
            chosen=chosen,
            per_class=dict(score.per_class),
            details={**score.details, **self.task.label_summary(self.pool.labels_of(labelled)), **tuned_details(tuned)},
            acquired_by=acquired_by,
            reason=reason,
            start=self._start if r == 0 else None,
            kappa=kappa,
            records_kappa=self.stability is not None,
            stopped=stop,
        )

    # -- files --------------------------------------------------------------------------
    def check_folder(self) -> bool:
        """Return whether the run folder already holds this run's ``config.json``; write nothing.

        Raises:
            SaalError: the folder holds a run with other settings, or an unreadable config.
        """
        assert self.folder is not None
        return storage.check_run_folder(self.folder, self.describe())

    def _prepare_folder(self) -> None:
        """Check the folder holds this run (or nothing), and load its checkpoint; once per object.

        Raises:
            SaalError: the folder holds a run with other settings, or an unreadable file.
        """
        assert self.folder is not None
        if self._prepared:
            return
        if self.check_folder():
            if storage.has_checkpoint(self.folder):
                self._load()
                self._write_rounds()
        else:
            storage.write_config(self.folder, self.describe())
        self._prepared = True

    def _rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.results]

    def _write_rounds(self) -> None:
        """Write ``rounds.json`` / ``rounds.csv`` from the results (unless they already say the same)."""
        assert self.folder is not None
        storage.write_rounds(self.folder, self._rows(), self.metric)

    def _save(self) -> None:
        # The checkpoint is written last: it is the commit point. A kill before it leaves files
        # one round ahead of the checkpoint; the resumed run recomputes that round identically.
        assert self.folder is not None
        self._write_rounds()
        if self.finished:
            storage.save_model(self.folder, self.model.state_dict())
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer_state,
            "pool": self.pool.state_dict(),
            "train_generator": self.train_generator.get_state(),
            "acquire_rng": self.acquire_rng.bit_generator.state,
            "strategy": self.strategy.state_dict(),
            "metric": self.metric,
            "results": self._rows(),
            "stability": None if self.stability is None else self.stability.state_dict(),
        }
        storage.save_checkpoint(self.folder, state)

    def _load(self) -> None:
        """Restore everything from ``checkpoint.pt`` (one written by saal 0.1.0 too).

        Raises:
            SaalError: a corrupt checkpoint, or one of another dataset or task.
        """
        assert self.folder is not None
        state = storage.load_checkpoint(self.folder, self.device)
        try:
            metric = str(state.get("metric", storage.DEFAULT_METRIC))
            self.model.load_state_dict(state["model"])
            self.pool.load_state_dict(state["pool"])
            self.train_generator.set_state(state["train_generator"])
            self.acquire_rng.bit_generator.state = state["acquire_rng"]
            self.strategy.load_state_dict(state["strategy"])
            self.results = [RoundResult.from_row(r, metric) for r in state["results"]]
            self.optimizer_state = state["optimizer"]
            self._load_stability(state.get("stability"))
        except SaalError:
            raise
        except Exception as exc:  # a truncated or foreign file
            raise storage.corrupt_checkpoint(self.folder / storage.CHECKPOINT_FILE, exc) from None

    def _load_stability(self, state: dict[str, Any] | None) -> None:
        """Restore the stopping rule's state; a checkpoint written before saal had the rule has none: the stop set is
        drawn as a new run draws it (from the initially unlabelled pool: the unlabelled items and those acquired so
        far), and the previous predictions are those of the checkpoint's model (the last round's), so the rounds
        still to come get the kappas of an uninterrupted run.

        Raises:
            SaalError: a state that is not the rule's.
        """
        if self.stability is None:
            return
        if state is not None:
            self.stability.load_state_dict(state)
            return
        acquired = [i for r in self.results for i in r.chosen]
        initially_unlabelled = np.union1d(self.pool.unlabelled_indices(), np.asarray(acquired, dtype=np.int64))
        self.stability.choose_stop_set(initially_unlabelled, np.random.default_rng(self.streams["stop"]))
        self.stability.kappas = [r.kappa for r in self.results]
        self.stability.previous = self._stop_set_predictions()
