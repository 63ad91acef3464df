"""When to stop labelling: stabilising predictions (Bloodgood & Vijay-Shanker, 2009).

Labelling can stop when more labels no longer change what the model predicts. The rule measures this on a *stop
set*: a fixed, seeded sample of the pool's initially unlabelled items, drawn once before the first round. After
each round's training the model predicts a class for every stop-set item; Cohen's kappa between these predictions
and those of the previous round's model says how much the model changed (1: not at all; 0: no more agreement than
chance). The rule fires once the kappa has been at least ``threshold`` (default 0.99) in each of the last ``window``
rounds (default 3).

The stop set needs no labels, and its items are not held out: a strategy may choose them like any other item (as in
the paper, it is a sample of the *initial* unlabelled pool, not a set kept unlabelled forever).

This module depends on the tasks, the data and :mod:`saal.core` only; :mod:`saal.experiment` uses it in
``saal run`` (a ``kappa`` column in ``rounds.csv``, ``--stop-when stable``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from saal.core.model_state import model_device, preserved
from saal.core.scan import batches
from saal.errors import SaalError
from saal.tasks import Classification, Task

# The stop set's size when none is asked for (fewer when the initially unlabelled pool is smaller).
DEFAULT_STOP_SET = 1000
# The rule's defaults: the paper's.
DEFAULT_THRESHOLD = 0.99
DEFAULT_WINDOW = 3


def stop_set_size(requested: int | None, available: int) -> int:
    """Return the size of the stop set: ``requested``, or ``min(DEFAULT_STOP_SET, available)`` when None.

    Args:
        requested: the size asked for (None: the default).
        available: how many items the stop set is drawn from (the initially unlabelled pool).

    Returns:
        The size, between 1 and ``available``.

    Raises:
        SaalError: ``requested`` below 1 or above ``available``, or nothing ``available`` (one line naming the
            ``--stop-set`` option).
    """
    if available < 1:
        raise SaalError("--stop-set: the pool has no unlabelled item to draw a stop set from")
    if requested is None:
        return min(DEFAULT_STOP_SET, available)
    if requested < 1:
        raise SaalError(f"--stop-set: must be >= 1, got {requested}")
    if requested > available:
        raise SaalError(
            f"--stop-set: {requested} items is larger than the initially unlabelled pool ({available} items); "
            "choose a smaller --stop-set"
        )
    return int(requested)


def draw_stop_set(candidates: Sequence[int] | np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``size`` distinct items of ``candidates``, drawn uniformly without replacement by ``rng``.

    Returns:
        The chosen items as a sorted int64 array (sorted: the pool is read in order).

    Raises:
        SaalError: ``size`` below 1 or above the number of candidates.
    """
    pool = np.asarray(candidates, dtype=np.int64).reshape(-1)
    if size < 1 or size > len(pool):
        raise SaalError(f"--stop-set: must lie in 1..{len(pool)} (the initially unlabelled pool), got {size}")
    return np.sort(rng.choice(pool, size=size, replace=False)).astype(np.int64)


def cohen_kappa(a: Sequence[Any] | np.ndarray, b: Sequence[Any] | np.ndarray) -> float:
    """Return Cohen's kappa between two raters' labels of the same items.

    kappa = (p_o - p_e) / (1 - p_e), with p_o the share of items on which ``a`` and ``b`` agree and p_e the
    agreement expected by chance from each one's label frequencies. It is computed from integer counts, so it is
    exact up to the one division. Degenerate case: when both give every item the same one label (p_e = 1) the
    agreement is perfect and the kappa is 1.0 (scikit-learn's ``cohen_kappa_score`` gives nan there).

    Returns:
        The kappa, in [-1, 1].

    Raises:
        SaalError: ``a`` and ``b`` of different lengths, empty, or not one-dimensional.
    """
    x, y = np.asarray(a), np.asarray(b)
    if x.ndim != 1 or y.ndim != 1:
        raise SaalError(f"kappa needs two 1-d label vectors, got shapes {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise SaalError(f"kappa needs labels of the same items, got {len(x)} and {len(y)} labels")
    if len(x) == 0:
        raise SaalError("kappa needs at least one item")
    n = len(x)
    labels, codes = np.unique(np.concatenate([x, y]), return_inverse=True)
    ca = np.bincount(codes[:n], minlength=len(labels)).astype(np.int64)
    cb = np.bincount(codes[n:], minlength=len(labels)).astype(np.int64)
    agree = int(np.count_nonzero(codes[:n] == codes[n:]))
    chance = int(ca @ cb)  # n^2 p_e
    if chance == n * n:  # both constant, on the same label
        return 1.0
    return float((n * agree - chance) / (n * n - chance))


def predicts_classes(task: Task) -> bool:
    """Return whether the rule applies to ``task``: its predictions are one class per item (classification)."""
    return isinstance(task, Classification)


def predict_classes(
    model: nn.Module, dataset: Dataset[Any], indices: np.ndarray, task: Task, batch_size: int
) -> np.ndarray:
    """Return the class ``model`` predicts (in eval mode, without gradients) for ``dataset``'s items at ``indices``.

    The model's modes, gradients and buffers are restored, and no random generator is drawn from.

    Returns:
        One int64 class index per item, in the order of ``indices``.

    Raises:
        SaalError: a task whose predictions are not classes (:func:`predicts_classes`), or a model that does not
            return class scores.
    """
    if not predicts_classes(task):
        raise SaalError(f"stabilising predictions needs one class per item; {task.name} predicts otherwise")
    device = model_device(model)
    out: list[np.ndarray] = []
    with preserved(model), torch.no_grad():
        for batch in batches(dataset, indices, batch_size, collate=task.collate):
            outputs = task.forward(model, task.to_device(batch.inputs, device))
            out.append(np.asarray(task.pseudo_targets(outputs).cpu().numpy(), dtype=np.int64).reshape(-1))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class StabilisingPredictions:
    """The stabilising-predictions stopping rule: stop once successive models agree on a fixed stop set.

    Feed it the predictions of each round's model on the stop set (:meth:`update`); :attr:`should_stop` says
    whether the kappa has been at least ``threshold`` in each of the last ``window`` rounds.

    Args:
        threshold: the kappa to reach, in (0, 1].
        window: how many successive rounds the kappa must reach it, at least 1.
        stop_set_size: the stop set's size (None: :data:`DEFAULT_STOP_SET`, or the whole candidate list when
            smaller), at least 1.

    Attributes:
        stop_set: the stop set's items (None until :meth:`choose_stop_set` or :meth:`load_state_dict`).
        kappas: one entry per :meth:`update`: the kappa with the previous predictions (None for the first).
        previous: the last predictions given (None before the first).

    Raises:
        SaalError: a threshold outside (0, 1], a window below 1 or a stop-set size below 1.
    """

    def __init__(
        self, threshold: float = DEFAULT_THRESHOLD, window: int = DEFAULT_WINDOW, stop_set_size: int | None = None
    ) -> None:
        if not (0 < threshold <= 1):  # nan fails too
            raise SaalError(f"--stop-threshold: must lie in (0, 1], got {threshold}")
        if window < 1:
            raise SaalError(f"--stop-window: must be >= 1, got {window}")
        if stop_set_size is not None and stop_set_size < 1:
            raise SaalError(f"--stop-set: must be >= 1, got {stop_set_size}")
        self.threshold = float(threshold)
        self.window = int(window)
        self.stop_set_size = stop_set_size
        self.stop_set: np.ndarray | None = None
        self.kappas: list[float | None] = []
        self.previous: np.ndarray | None = None

    def choose_stop_set(self, candidates: Sequence[int] | np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw the stop set from ``candidates`` (the initially unlabelled items) with ``rng``, and keep it.

        Returns:
            The stop set, sorted.

        Raises:
            SaalError: a ``stop_set_size`` larger than the number of candidates, or no candidate.
        """
        size = stop_set_size(self.stop_set_size, len(candidates))
        self.stop_set = draw_stop_set(candidates, size, rng)
        return self.stop_set

    def update(self, predictions: Sequence[Any] | np.ndarray) -> float | None:
        """Record one round's predictions on the stop set.

        Returns:
            Cohen's kappa between ``predictions`` and the previous round's (None at the first round).

        Raises:
            SaalError: predictions not one per stop-set item (when the stop set is known) or of another length
                than the previous ones.
        """
        current = np.asarray(predictions).reshape(-1).copy()
        if self.stop_set is not None and len(current) != len(self.stop_set):
            raise SaalError(f"got {len(current)} predictions for a stop set of {len(self.stop_set)} items")
        kappa = None if self.previous is None else cohen_kappa(self.previous, current)
        self.kappas.append(kappa)
        self.previous = current
        return kappa

    @property
    def should_stop(self) -> bool:
        """Whether the kappa has been at least ``threshold`` in each of the last ``window`` updates."""
        last = self.kappas[-self.window :]
        return len(last) == self.window and all(k is not None and k >= self.threshold for k in last)

    def describe(self) -> str:
        """Return the rule in words, e.g. ``kappa >= 0.99 in each of the last 3 rounds``."""
        rounds = "round" if self.window == 1 else f"{self.window} rounds"
        last = "the last" if self.window == 1 else "each of the last"
        return f"kappa >= {self.threshold:g} in {last} {rounds}"

    def state_dict(self) -> dict[str, Any]:
        """Return what :meth:`load_state_dict` needs to continue: the stop set, the kappas, the last predictions.

        Returns:
            ``{"stop_set": list[int] | None, "kappas": list[float | None], "previous": list | None}`` (plain
            values; the settings are not included: they come from the constructor).
        """
        return {
            "stop_set": None if self.stop_set is None else self.stop_set.tolist(),
            "kappas": list(self.kappas),
            "previous": None if self.previous is None else self.previous.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`.

        Raises:
            SaalError: a state that is not one (missing keys, or predictions not one per stop-set item).
        """
        try:
            stop_set = state["stop_set"]
            kappas = [None if k is None else float(k) for k in state["kappas"]]
            previous = state["previous"]
        except (KeyError, TypeError, ValueError) as exc:
            raise SaalError(f"not a stopping rule's state ({type(exc).__name__})") from None
        self.stop_set = None if stop_set is None else np.asarray(stop_set, dtype=np.int64)
        self.previous = None if previous is None else np.asarray(previous)
        if self.stop_set is not None and self.previous is not None and len(self.previous) != len(self.stop_set):
            raise SaalError("not a stopping rule's state (predictions not one per stop-set item)")
        self.kappas = kappas


__all__ = [
    "DEFAULT_STOP_SET",
    "DEFAULT_THRESHOLD",
    "DEFAULT_WINDOW",
    "StabilisingPredictions",
    "cohen_kappa",
    "draw_stop_set",
    "predict_classes",
    "predicts_classes",
    "stop_set_size",
]
