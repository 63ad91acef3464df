"""The labelling state of a pool: which item is unlabelled, labelled or skipped, with what label, since
which round and by whom.

Items are stable integer ids ``0 .. len - 1`` (a dataset-backed pool uses the dataset indices), and
the pool can grow: :meth:`PoolState.append` adds ids at the end and never reuses one. Label values are
opaque here (a class, a list of boxes): the task checks them before they arrive.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any

import numpy as np

from saal.errors import SaalError

NOT_LABELLED = -1


class ItemState(IntEnum):
    """Where an item stands."""

    UNLABELLED = 0
    LABELLED = 1
    SKIPPED = 2


STATE_FORMAT = 2  # version of :meth:`PoolState.state_dict`; 0.1.0 wrote an unversioned dict of labels


class PoolState:
    """Labelling state over ``size`` item ids, growable.

    Args:
        size: the number of items to start with.
    """

    def __init__(self, size: int = 0) -> None:
        if size < 0:
            raise SaalError(f"a pool cannot hold {size} items")
        self._state = np.zeros(size, dtype=np.int8)
        self._round = np.full(size, NOT_LABELLED, dtype=np.int64)
        self._labels: dict[int, Any] = {}
        self._annotators: dict[int, str] = {}
        self.current_round = 0

    def __len__(self) -> int:
        return len(self._state)

    # -- reading ---------------------------------------------------------------------------
    def ids(self, state: ItemState) -> np.ndarray:
        """Return the ids in ``state``, ascending."""
        return np.flatnonzero(self._state == state).astype(np.int64)

    def count(self, state: ItemState) -> int:
        """Return how many items are in ``state``."""
        return int((self._state == state).sum())

    def states(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Return the :class:`ItemState` value of each id."""
        states: np.ndarray = self._state[self.check_ids(ids)].copy()
        return states

    def labels(self, ids: Sequence[int] | np.ndarray) -> list[Any]:
        """Return the label given to each id.

        Raises:
            SaalError: an id out of range or not labelled.
        """
        idx = self.check_ids(ids)
        missing = idx[self._state[idx] != ItemState.LABELLED]
        if missing.size:
            raise SaalError(f"dataset index {int(missing[0])} is not labelled; label it first")
        return [self._labels[int(i)] for i in idx]

    def rounds(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Return the round at which each id was labelled (-1 where it is not labelled)."""
        rounds: np.ndarray = self._round[self.check_ids(ids)].copy()
        return rounds

    def annotators(self, ids: Sequence[int] | np.ndarray) -> list[str | None]:
        """Return who labelled each id (None where nobody was named)."""
        return [self._annotators.get(int(i)) for i in self.check_ids(ids)]

    # -- changing --------------------------------------------------------------------------
    def append(self, n: int) -> np.ndarray:
        """Add ``n`` unlabelled items; return their new ids.

        Raises:
            SaalError: ``n < 0``.
        """
        if n < 0:
            raise SaalError(f"cannot append {n} items; give a count >= 0")
        start = len(self)
        self._state = np.concatenate([self._state, np.zeros(n, dtype=np.int8)])
        self._round = np.concatenate([self._round, np.full(n, NOT_LABELLED, dtype=np.int64)])
        return np.arange(start, start + n, dtype=np.int64)

    def label(self, ids: Sequence[int] | np.ndarray, values: Sequence[Any], annotator: str | None = None) -> None:
        """Label unlabelled (or skipped) ids at the current round.

        Raises:
            SaalError: an id out of range, repeated or already labelled, or a count mismatch. Nothing changes then.
        """
        idx = self._check_new(ids, values)
        already = idx[self._state[idx] == ItemState.LABELLED]
        if already.size:
            raise SaalError(f"dataset index {int(already[0])} is already labelled; label only unlabelled indices")
        self._set(idx, values, annotator)

    def relabel(self, ids: Sequence[int] | np.ndarray, values: Sequence[Any], annotator: str | None = None) -> None:
        """Replace the labels of labelled ids (the round becomes the current one).

        Raises:
            SaalError: an id out of range, repeated or not labelled, or a count mismatch. Nothing changes then.
        """
        idx = self._check_new(ids, values)
        missing = idx[self._state[idx] != ItemState.LABELLED]
        if missing.size:
            raise SaalError(f"dataset index {int(missing[0])} is not labelled; use label() for it")
        self._set(idx, values, annotator)

    def unlabel(self, ids: Sequence[int] | np.ndarray) -> None:
        """Make labelled or skipped ids unlabelled again (their label is forgotten).

        Raises:
            SaalError: an id out of range.
        """
        idx = self.check_ids(ids)
        self._state[idx] = ItemState.UNLABELLED
        self._round[idx] = NOT_LABELLED
        for i in idx.tolist():
            self._labels.pop(i, None)
            self._annotators.pop(i, None)

    def skip(self, ids: Sequence[int] | np.ndarray, annotator: str | None = None) -> None:
        """Set unlabelled ids aside: they are neither labelled nor offered for labelling again.

        Raises:
            SaalError: an id out of range or already labelled.
        """
        idx = self.check_ids(ids)
        labelled = idx[self._state[idx] == ItemState.LABELLED]
        if labelled.size:
            raise SaalError(f"dataset index {int(labelled[0])} is labelled; unlabel it before skipping it")
        self._state[idx] = ItemState.SKIPPED
        self._round[idx] = self.current_round
        for i in idx.tolist():
            if annotator is not None:
                self._annotators[i] = annotator

    def next_round(self) -> None:
        """Advance the round counter that labelling records."""
        self.current_round += 1

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Return the whole state as plain arrays, lists and numbers."""
        ids = np.asarray(sorted(self._labels), dtype=np.int64)
        return {
            "format": STATE_FORMAT,
            "state": self._state.copy(),
            "round": self._round.copy(),
            "current_round": self.current_round,
            "label_ids": ids,
            "label_values": [self._labels[int(i)] for i in ids],
            "annotators": dict(self._annotators),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (any size: the pool takes the saved size).

        Raises:
            SaalError: a state of an unknown format.
        """
        if state.get("format") != STATE_FORMAT:
            raise SaalError(f"unknown pool state format {state.get('format')!r}; it was written by a newer saal")
        self._state = np.asarray(state["state"], dtype=np.int8).copy()
        self._round = np.asarray(state["round"], dtype=np.int64).copy()
        self.current_round = int(state["current_round"])
        self._labels = {int(i): v for i, v in zip(state["label_ids"], state["label_values"], strict=True)}
        self._annotators = {int(k): str(v) for k, v in state.get("annotators", {}).items()}

    # -- checks ----------------------------------------------------------------------------
    def check_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Return ``ids`` as a 1-D int64 array.

        Raises:
            SaalError: a non-integer id, or one out of range.
        """
        idx = np.asarray(ids)
        if idx.size == 0:
            return idx.astype(np.int64).reshape(-1)
        if not np.issubdtype(idx.dtype, np.integer):
            raise SaalError(f"dataset indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        bad = idx[(idx < 0) | (idx >= len(self))]
        if bad.size:
            raise SaalError(f"dataset index {int(bad[0])} is out of range; the dataset has {len(self)} items")
        return idx

    def _check_new(self, ids: Sequence[int] | np.ndarray, values: Sequence[Any]) -> np.ndarray:
        idx = self.check_ids(ids)
        if len(values) != idx.size:
            raise SaalError(f"label() got {idx.size} indices but {len(values)} labels; give one label per index")
        uniq, counts = np.unique(idx, return_counts=True)
        if (counts > 1).any():
            raise SaalError(f"dataset index {int(uniq[counts > 1][0])} is repeated; give each index once")
        return idx

    def _set(self, idx: np.ndarray, values: Sequence[Any], annotator: str | None) -> None:
        self._state[idx] = ItemState.LABELLED
        self._round[idx] = self.current_round
        for i, v in zip(idx.tolist(), values, strict=True):
            self._labels[i] = v
            if annotator is not None:
                self._annotators[i] = annotator
            else:
                self._annotators.pop(i, None)
