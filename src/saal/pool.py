"""The labelled / unlabelled state over a dataset, in dataset indices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from saal.core.pool_state import ItemState, PoolState
from saal.core.seeding import as_generator
from saal.errors import SaalError
from saal.tasks import Classification, Task


class Pool:
    """Which items of a dataset are labelled, skipped or unlabelled, with which label, since which round.

    Every public call speaks *dataset indices* (``0 .. len(dataset) - 1``), never positions in an
    internal array. The dataset must return ``(input, target)`` pairs; the target is never read by
    the pool (strategies must not see true labels), only the input. Label values are whatever the
    task says a label is (a class index for classification); the task checks them.

    Args:
        dataset: the torch ``Dataset`` the indices refer to.
        num_classes: for classification, the number of classes (labels lie in ``0 .. num_classes - 1``).
        task: the task instead (e.g. detection); ``num_classes`` is then not needed.

    Raises:
        SaalError: neither or both of ``num_classes`` and ``task``, or ``num_classes < 1``.
    """

    def __init__(self, dataset: Dataset[Any], num_classes: int | None = None, *, task: Task | None = None) -> None:
        if (num_classes is None) == (task is None):
            raise SaalError("give a Pool either num_classes (classification) or task=, not both or neither")
        self.task: Task = task if task is not None else Classification(int(num_classes))  # type: ignore[arg-type]
        self.dataset = dataset
        self.state = PoolState(len(dataset))  # type: ignore[arg-type]

    @property
    def num_classes(self) -> int:
        """The class count of a classification pool.

        Raises:
            SaalError: the pool's task has no classes.
        """
        n = getattr(self.task, "num_classes", None)
        if n is None:
            raise SaalError(f"a {self.task.name} pool has no num_classes")
        return int(n)

    @property
    def current_round(self) -> int:
        return self.state.current_round

    def __len__(self) -> int:
        return len(self.state)

    @property
    def num_labelled(self) -> int:
        return self.state.count(ItemState.LABELLED)

    @property
    def num_unlabelled(self) -> int:
        return self.state.count(ItemState.UNLABELLED)

    def labelled_indices(self) -> np.ndarray:
        """Return the labelled dataset indices, ascending."""
        return self.state.ids(ItemState.LABELLED)

    def unlabelled_indices(self) -> np.ndarray:
        """Return the unlabelled dataset indices (neither labelled nor skipped), ascending."""
        return self.state.ids(ItemState.UNLABELLED)

    def skipped_indices(self) -> np.ndarray:
        """Return the skipped dataset indices, ascending."""
        return self.state.ids(ItemState.SKIPPED)

    def is_labelled(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Return a boolean array: whether each of ``indices`` is labelled."""
        labelled: np.ndarray = self.state.states(indices) == ItemState.LABELLED
        return labelled

    def labels_of(self, indices: Sequence[int] | np.ndarray) -> Any:
        """Return the labels given to ``indices`` (an int64 array for classification).

        Raises:
            SaalError: if an index is out of range or not labelled.
        """
        return self.task.stack_labels(self.state.labels(indices))

    def round_labelled(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Return the round at which each index was labelled (-1 where unlabelled)."""
        return self.state.rounds(indices)

    def label(self, indices: Sequence[int] | np.ndarray, labels: Any, annotator: str | None = None) -> None:
        """Label ``indices`` with ``labels`` at the current round (``annotator``: who, optionally).

        Raises:
            SaalError: an index out of range, already labelled or repeated, a label that is not a
                label of the task, or lengths that differ. Nothing is changed then.
        """
        idx = self.state.check_ids(indices)
        self.state.label(idx, self._values(labels, idx.size), annotator)

    def relabel(self, indices: Sequence[int] | np.ndarray, labels: Any, annotator: str | None = None) -> None:
        """Replace the labels of labelled ``indices``.

        Raises:
            SaalError: as :meth:`label`, and for an index that is not labelled.
        """
        idx = self.state.check_ids(indices)
        self.state.relabel(idx, self._values(labels, idx.size), annotator)

    def unlabel(self, indices: Sequence[int] | np.ndarray) -> None:
        """Return labelled or skipped ``indices`` to the unlabelled pool."""
        self.state.unlabel(indices)

    def skip(self, indices: Sequence[int] | np.ndarray, annotator: str | None = None) -> None:
        """Set unlabelled ``indices`` aside: never offered again unless unlabelled."""
        self.state.skip(indices, annotator)

    def grow(self, dataset: Dataset[Any]) -> np.ndarray:
        """Switch to ``dataset``, which holds this pool's items first and new ones after; return the new indices.

        Raises:
            SaalError: ``dataset`` is smaller than the pool.
        """
        n = len(dataset)  # type: ignore[arg-type]
        if n < len(self):
            raise SaalError(f"a pool of {len(self)} items cannot grow into a dataset of {n}; append items instead")
        self.dataset = dataset
        return self.state.append(n - len(self))

    def next_round(self) -> None:
        """Advance the round counter that :meth:`label` records."""
        self.state.next_round()

    def state_dict(self) -> dict[str, Any]:
        """Return the pool's state (states, labels, rounds, round counter, task) as plain values."""
        return {**self.state.state_dict(), "task": self.task.describe()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`, or one written by saal 0.1.0.

        Raises:
            SaalError: if the state was made for a dataset of another size or another task.
        """
        if "format" not in state:  # saal 0.1.0: labels (-1 = unlabelled), round, current_round, num_classes
            labels = np.asarray(state["labels"], dtype=np.int64)
            state = _from_0_1_0(labels, np.asarray(state["round"]), int(state["current_round"]), state["num_classes"])
        size = len(state["state"])
        if size != len(self) or state.get("task") != self.task.describe():
            raise SaalError(
                f"pool state is for {size} items and task {state.get('task')}, this pool has {len(self)} and "
                f"{self.task.describe()}; load it into a pool over the same dataset"
            )
        self.state.load_state_dict(state)

    def _values(self, labels: Any, count: int) -> list[Any]:
        checked = self.task.check_labels(labels, count)
        return list(checked)


def _from_0_1_0(labels: np.ndarray, rounds: np.ndarray, current: int, num_classes: int) -> dict[str, Any]:
    ids = np.flatnonzero(labels >= 0)
    legacy = PoolState(len(labels))
    legacy.load_state_dict(
        {
            "format": 2,
            "state": (labels >= 0).astype(np.int8),
            "round": rounds,
            "current_round": current,
            "label_ids": ids,
            "label_values": labels[ids].tolist(),
        }
    )
    return {**legacy.state_dict(), "task": {"name": "classification", "num_classes": int(num_classes)}}


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
    n = len(targets)
    if size < 1 or size > n:
        raise SaalError(f"initial set size {size} is impossible for a dataset of {n} items; choose 1..{n}")
    if not balanced:  # the targets are not read: any label values (e.g. detection targets) will do
        return np.sort(rng.choice(n, size=size, replace=False))
    y = np.asarray(targets, dtype=np.int64)
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
