"""Tuned training: the weight decay (and epochs) chosen each round by k-fold cross-validation on the labelled items.

Untuned training can make any strategy look good or bad (Munjal et al. 2022; Lueth et al. 2023): a model trained
with one fixed setting on 10 labels and on 1,000 labels is over- or under-regularised at one end. With
``TrainConfig(tune="cv")`` every round first scores each setting of the grid ``tune_weight_decay`` x
``tune_epochs`` by ``tune_folds``-fold cross-validation on the labelled items alone (never the test set), each fold
trained from the run's initial weights, and then trains the round's model with the best setting. Ties go to the
earlier setting of the grid, so list the grid in order of preference (the default starts from no weight decay).

Folds are stratified by label when every class has at least ``tune_folds`` labelled items, else plain seeded
k-fold; with fewer labelled items than folds (a run's first rounds) nothing is tuned and the settings are kept.
Everything is seeded from the ``seed`` given, and the global torch generators are left as they were, so a tuned
run is as reproducible and resumable as an untuned one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import KFold, StratifiedKFold
from torch import nn
from torch.utils.data import Dataset, Subset

from saal.settings import TrainConfig
from saal.tasks import Task
from saal.training import fit


@dataclass
class Tuned:
    """The training settings chosen for a round and the cross-validated score of every setting tried.

    Attributes:
        config: the settings to train the round's model with (``config`` unchanged when nothing was tuned).
        scores: ``{"weight_decay=...,epochs=...": mean validation metric}`` in grid order; empty when not tuned.
        reason: one line saying what was chosen and why (empty when tuning is off).
    """

    config: TrainConfig
    scores: dict[str, float] = field(default_factory=dict)
    reason: str = ""


def fold_splits(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return ``folds`` seeded ``(train positions, validation positions)`` splits of ``len(labels)`` items.

    Stratified by label when every class present has at least ``folds`` items, else plain shuffled k-fold.

    Raises:
        ValueError: fewer items than folds.
    """
    y = np.asarray(labels)
    _, counts = np.unique(y, return_counts=True)
    splitter: KFold | StratifiedKFold
    if y.ndim == 1 and len(counts) > 1 and counts.min() >= folds:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    else:
        splitter = KFold(folds, shuffle=True, random_state=seed)
    return [(np.asarray(a), np.asarray(b)) for a, b in splitter.split(np.zeros(len(y)), y if y.ndim == 1 else None)]


def candidate_configs(config: TrainConfig) -> list[TrainConfig]:
    """Return the settings the grid of ``config`` tries: ``tune_weight_decay`` x ``tune_epochs`` (None: its own)."""
    epochs = config.tune_epochs or [config.epochs]
    return [
        config.model_copy(update={"weight_decay": float(wd), "epochs": int(e)})
        for wd, e in product(config.tune_weight_decay, epochs)
    ]


def cross_validate(
    twin: nn.Module,
    initial_state: dict[str, Any],
    dataset: Dataset,
    indices: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    splits: list[tuple[np.ndarray, np.ndarray]],
    seed: int,
    task: Task,
) -> float:
    """Return the mean validation metric of ``config`` over ``splits`` (positions into ``indices``), each fold
    trained on ``twin`` from ``initial_state`` with seeds derived from ``seed`` (the global generators are seeded)."""
    y = np.asarray(labels)
    values = []
    for f, (train, val) in enumerate(splits):
        torch.manual_seed(seed + f)
        twin.load_state_dict(initial_state)
        fit(twin, dataset, indices[train], y[train], config, torch.Generator().manual_seed(seed + f), task=task)
        values.append(float(task.evaluate(twin, Subset(dataset, indices[val].tolist())).value))
    return float(np.mean(values))


def tune_training(
    model: nn.Module,
    initial_state: dict[str, Any],
    dataset: Dataset,
    indices: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    seed: int,
    task: Task,
) -> Tuned:
    """Return the round's training settings, chosen by cross-validation on the labelled items when
    ``config.tune == "cv"`` (module docstring); ``config`` itself otherwise.

    ``model`` is not changed: each fold trains a copy loaded with ``initial_state``. The metric is the task's
    (accuracy for classification; higher is better).

    Returns:
        A :class:`Tuned`.
    """
    if config.tune == "none":
        return Tuned(config)
    if len(indices) < config.tune_folds:
        return Tuned(config, reason=f"tuning: {len(indices)} labels < {config.tune_folds} folds, settings kept")
    splits = fold_splits(np.asarray(labels), config.tune_folds, seed)
    twin = copy.deepcopy(model)
    scores: dict[str, float] = {}
    best, best_score = config, -np.inf
    with torch.random.fork_rng(devices=[]):  # the run's global generators are left as they were
        for candidate in candidate_configs(config):
            score = cross_validate(twin, initial_state, dataset, indices, labels, candidate, splits, seed, task)
            scores[f"weight_decay={candidate.weight_decay:g},epochs={candidate.epochs}"] = score
            if score > best_score:  # ties keep the earlier setting
                best, best_score = candidate, score
    chosen = f"weight_decay={best.weight_decay:g},epochs={best.epochs}"
    reason = f"tuning: {chosen} ({config.tune_folds}-fold {scores[chosen]:.3f} on {len(indices)} labels)"
    return Tuned(best, scores, reason)


def tuned_details(tuned: Tuned) -> dict[str, float]:
    """Return what a round records of its tuning: ``{"tuned_weight_decay": ..., "tuned_epochs": ...}`` when the
    settings were chosen by cross-validation, else nothing."""
    if not tuned.scores:
        return {}
    return {"tuned_weight_decay": float(tuned.config.weight_decay), "tuned_epochs": float(tuned.config.epochs)}


__all__ = ["Tuned", "candidate_configs", "cross_validate", "fold_splits", "tune_training", "tuned_details"]
