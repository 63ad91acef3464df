"""The labelled / unlabelled state over a dataset, in dataset indices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from saal.errors import SaalError
from saal.seeding import as_generator

UNLABELLED = -1


class Pool:
    """Which items of a dataset are labelled, with which label, and since which round.

    Every public call speaks *dataset indices* (``0 .. len(dataset) - 1``), never positions
    in an internal array. The dataset must return ``(input, target)`` pairs; the target is
    never read by the pool (strategies must not see true labels), only the input.

    Args:
        dataset: the torch ``Dataset`` the indices refer to.
        num_classes: number of classes; labels must lie in ``0 .. num_classes - 1``.
    """

    def __init__(self, dataset: Dataset, num_classes: int) -> None:
        if num_classes < 1:
            raise SaalError(f"num_classes must be at least 1, got {num_classes}")
        self.dataset = dataset
        self.num_classes = int(num_classes)
        n = len(dataset)  # type: ignore[arg-type]
        self._labels = np.full(n, UNLABELLED, dtype=np.int64)
        self._round = np.full(n, UNLABELLED, dtype=np.int64)
        self.current_round = 0

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def num_labelled(self) -> int:
        return int((self._labels != UNLABELLED).sum())

    @property
    def num_unlabelled(self) -> int:
        return len(self) - self.num_labelled

    def labelled_indices(self) -> np.ndarray:
        """Return the labelled dataset indices, ascending."""
        return np.flatnonzero(self._labels != UNLABELLED)

    def unlabelled_indices(self) -> np.ndarray:
        """Return the unlabelled dataset indices, ascending."""
        return np.flatnonzero(self._labels == UNLABELLED)

    def is_labelled(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Return a boolean array: whether each of ``indices`` is labelled."""
        idx = self._check_range(indices)
        return self._labels[idx] != UNLABELLED

    def labels_of(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Return the labels given to ``indices``.

        Raises:
            SaalError: if an index is out of range or not labelled.
        """
        idx = self._check_range(indices)
        missing = idx[self._labels[idx] == UNLABELLED]
        if missing.size:
            raise SaalError(f"dataset index {int(missing[0])} is not labelled; label it first")
        return self._labels[idx].copy()

    def round_labelled(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Return the round at which each index was labelled (-1 where unlabelled)."""
        return self._round[self._check_range(indices)].copy()

    def label(
        self,
        indices: Sequence[int] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
    ) -> None:
        """Label ``indices`` with ``labels`` at the current round.

        Raises:
            SaalError: an index out of range, already labelled or repeated, a label that is
                not a class, or lengths that differ. Nothing is changed then.
        """
        idx = self._check_range(indices)
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        if lab.shape != idx.shape:
            raise SaalError(f"label() got {idx.size} indices but {lab.size} labels; give one label per index")
        uniq, counts = np.unique(idx, return_counts=True)
        if (counts > 1).any():
            raise SaalError(f"dataset index {int(uniq[counts > 1][0])} is repeated; give each index once")
        already = idx[self._labels[idx] != UNLABELLED]
        if already.size:
            raise SaalError(f"dataset index {int(already[0])} is already labelled; label only unlabelled indices")
        bad = lab[(lab < 0) | (lab >= self.num_classes)]
        if bad.size:
            raise SaalError(f"label {int(bad[0])} is not a class; labels must lie in 0..{self.num_classes - 1}")
        self._labels[idx] = lab
        self._round[idx] = self.current_round

    def next_round(self) -> None:
        """Advance the round counter that :meth:`label` records."""
        self.current_round += 1

    def labelled_dataset(self) -> Dataset:
        """Return a ``Dataset`` of ``(input, given_label)`` over the labelled items."""
        return LabelledSubset(self.dataset, self.labelled_indices(), self._labels)

    def inputs(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        """Return a ``Dataset`` yielding ``(input, dataset_index)`` for ``indices``, no labels."""
        return InputSubset(self.dataset, self._check_range(indices))

    def loader(self, indices: Sequence[int] | np.ndarray, batch_size: int) -> DataLoader:
        """Return an ordered ``DataLoader`` of ``(inputs, dataset_indices)`` batches over ``indices``."""
        return DataLoader(self.inputs(indices), batch_size=batch_size, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        """Return the pool's state (labels, rounds, round counter) as plain arrays."""
        return {
            "labels": self._labels.copy(),
            "round": self._round.copy(),
            "current_round": self.current_round,
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`.

        Raises:
            SaalError: if the state was made for a dataset of another size or class count.
        """
        labels = np.asarray(state["labels"], dtype=np.int64)
        if labels.shape != self._labels.shape or int(state["num_classes"]) != self.num_classes:
            raise SaalError(
                f"pool state is for {labels.size} items and {state['num_classes']} classes, "
                f"this pool has {len(self)} and {self.num_classes}; load it into a pool over the same dataset"
            )
        self._labels = labels.copy()
        self._round = np.asarray(state["round"], dtype=np.int64).copy()
        self.current_round = int(state["current_round"])

    def _check_range(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.size == 0:
            return idx.astype(np.int64).reshape(-1)
        if not np.issubdtype(idx.dtype, np.integer):
            raise SaalError(f"dataset indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        bad = idx[(idx < 0) | (idx >= len(self))]
        if bad.size:
            raise SaalError(f"dataset index {int(bad[0])} is out of range; the dataset has {len(self)} items")
        return idx


def initial_indices(
    targets: Sequence[int] | np.ndarray,
    size: int,
    generator: np.random.Generator | int | None,
    *,
    balanced: bool = True,
    num_classes: int | None = None,
) -> np.ndarray:
    """Draw a seeded initial labelled set.

    Args:
        targets: the true class of every dataset item (used only to balance).
        size: total number of items. With ``balanced``, it must be a multiple of the class count
            and each class gets ``size / num_classes`` items.
        generator: a numpy generator or a seed.
        balanced: class-balanced (n per class) or uniform over the dataset.

    Returns:
        The chosen dataset indices, sorted.

    Raises:
        SaalError: if the size is impossible for the dataset.
    """
    rng = as_generator(generator)
    y = np.asarray(targets, dtype=np.int64)
    if size < 1 or size > len(y):
        raise SaalError(f"initial set size {size} is impossible for a dataset of {len(y)} items; choose 1..{len(y)}")
    if not balanced:
        return np.sort(rng.choice(len(y), size=size, replace=False))
    c = num_classes if num_classes is not None else int(y.max()) + 1
    if size % c:
        raise SaalError(
            f"a class-balanced initial set of {size} needs a multiple of the {c} classes; "
            f"use e.g. {max(c, size - size % c)} or a uniform initial set"
        )
    per = size // c
    chosen = []
    for cls in range(c):
        members = np.flatnonzero(y == cls)
        if members.size < per:
            raise SaalError(f"class {cls} has only {members.size} items, fewer than {per} per class requested")
        chosen.append(rng.choice(members, size=per, replace=False))
    return np.sort(np.concatenate(chosen))


class LabelledSubset(Dataset):
    """``(input, given_label)`` for a fixed set of labelled dataset indices."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, labels: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x = self.dataset[int(self.indices[i])][0]
        return x, int(self.labels[i])


class InputSubset(Subset):
    """``(input, dataset_index)`` for a fixed set of dataset indices: never the target."""

    def __getitem__(self, i: int) -> tuple[Any, int]:  # type: ignore[override]
        idx = int(self.indices[i])
        return self.dataset[idx][0], idx

    def __getitems__(self, items: list[int]) -> list[tuple[Any, int]]:  # type: ignore[override]
        return [self[i] for i in items]


def as_index_tensor(indices: np.ndarray) -> torch.Tensor:
    """Return ``indices`` as a 1-D int64 tensor."""
    return torch.as_tensor(np.asarray(indices, dtype=np.int64))
