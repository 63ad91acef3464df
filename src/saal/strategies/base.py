"""The one interface every acquisition function implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from torch import nn

from saal.core.model_state import preserved
from saal.core.seeding import as_generator
from saal.core.selection import top_k
from saal.errors import SaalError
from saal.pool import Pool
from saal.tasks import Task, check_task_support

if TYPE_CHECKING:
    from saal.settings import TrainConfig
    from saal.training import TrainingHook


def check_count(name: str, value: Any, low: int = 1) -> int:
    """Return a strategy option that must be an integer ``>= low``, as an int.

    Raises:
        SaalError: anything else, in one line naming the option.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise SaalError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_optional_count(name: str, value: Any, low: int = 1) -> int | None:
    """Return :func:`check_count` of ``value``, or None when it is None.

    Raises:
        SaalError: anything else, in one line naming the option.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise SaalError(f"{name} must be an integer >= {low} or None, got {value!r}")
    return int(value)


@dataclass
class Selection:
    """What a strategy chose, and why.

    Attributes:
        indices: the chosen dataset indices, in the order they were picked.
        scored_indices: every dataset index the strategy scored this round.
        scores: the score of each of ``scored_indices`` (same order); what the score means is
            in the strategy's docstring. Empty for strategies that score nothing.
        reason: what the strategy did and why, in one line, where it has more to say than its name (e.g.
            ``auto``'s choice: ``"margin: regime test 0.61 vs 0.55 over 3 repeats"``); empty otherwise. A
            strategy that hands the choice to another one starts it with that one's name and a colon.
    """

    indices: np.ndarray
    scored_indices: np.ndarray
    scores: np.ndarray
    reason: str = ""


class Strategy(ABC):
    """An acquisition function: ``select(model, pool, k, generator) -> Selection``.

    Args:
        batch_size: how many pool items are scored at once; scores never depend on it.
        subset: score only a seeded uniform random subset of this many unlabelled items
            (the reference protocol's pool subset); ``None`` scores the whole pool.

    Subclasses implement :meth:`query` on the candidate indices. The model is in eval mode
    inside :meth:`query`, and everything about it (modes, weights, gradients, buffers) is
    restored afterwards.
    """

    name: ClassVar[str] = "strategy"
    #: The tasks (``Task.name``) this strategy can score; ``"*"`` for any task.
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    #: Whether the strategy can choose from zero labels, without a trained model (its choice does not rest on
    #: what the model learned: random, typicality, coverage). Only such a strategy may pick a run's initial set.
    cold_start: ClassVar[bool] = False

    def __init__(self, *, batch_size: int = 256, subset: int | None = None) -> None:
        if batch_size < 1:
            raise SaalError(f"batch_size must be at least 1, got {batch_size}")
        if subset is not None and subset < 1:
            raise SaalError(f"subset must be a positive number of items or None, got {subset}")
        self.batch_size = int(batch_size)
        self.subset = None if subset is None else int(subset)

    def select(
        self,
        model: nn.Module,
        pool: Pool,
        k: int,
        generator: np.random.Generator | int | None = None,
    ) -> Selection:
        """Choose ``k`` unlabelled dataset indices to label next.

        Args:
            model: the current model (left exactly as it was found).
            pool: the labelled / unlabelled state.
            k: how many to choose.
            generator: numpy generator or seed; the same one gives the same choice.

        Returns:
            The :class:`Selection`: chosen indices, the scores behind them and the strategy's ``reason``.

        Raises:
            SaalError: if ``k`` is not in ``1 .. number of candidates``, or the strategy does not
                support the pool's task.
        """
        self.check_task(pool.task)
        rng = as_generator(generator)
        candidates = self.candidates(pool, k, rng)
        with preserved(model):
            sel = self.query(model, pool, candidates, int(k), rng)
        chosen = np.asarray(sel.indices, dtype=np.int64)
        if len(chosen) != k or len(np.unique(chosen)) != k or pool.is_labelled(chosen).any():
            raise RuntimeError(f"{self.name} returned an invalid selection: {chosen[:10]}...")  # a bug, not input
        return Selection(
            chosen, np.asarray(sel.scored_indices, dtype=np.int64), np.asarray(sel.scores), str(sel.reason)
        )

    def check_task(self, task: Task) -> None:
        """Raise a one-line error naming the strategies that can work on ``task`` when this one cannot.

        Raises:
            SaalError: the strategy does not support ``task``.
        """
        from saal.strategies import strategies_for

        check_task_support(self.name, self.tasks, task, strategies_for(task.name))

    def candidates(self, pool: Pool, k: int, rng: np.random.Generator) -> np.ndarray:
        """Return the unlabelled indices to score: all of them, or a seeded random subset."""
        unlabelled = pool.unlabelled_indices()
        if k < 1:
            raise SaalError(f"query size must be at least 1, got {k}")
        if k > len(unlabelled):
            raise SaalError(f"query size {k} is larger than the unlabelled pool ({len(unlabelled)} items); query fewer")
        if self.subset is not None and self.subset < len(unlabelled):
            if k > self.subset:
                raise SaalError(f"query size {k} is larger than the pool subset {self.subset}; raise subset")
            return np.sort(rng.choice(unlabelled, size=self.subset, replace=False))
        return unlabelled

    @abstractmethod
    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        """Choose ``k`` of ``candidates`` (sorted unlabelled dataset indices)."""

    def training_hook(self) -> TrainingHook | None:
        """Return a hook that trains something of the strategy's own beside the model, or None."""
        return None

    def use_training(self, config: TrainConfig) -> None:
        """Take the run's training settings, for a strategy that trains models of its own to decide (``auto``).

        ``saal run`` calls it once, after building the strategy; the default ignores them.
        """
        del config

    def state_dict(self) -> dict[str, Any]:
        """Return what the strategy learned across rounds (for resuming a run); empty by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        del state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_size={self.batch_size}, subset={self.subset})"


class ScoreStrategy(Strategy):
    """A strategy that scores each candidate and takes the top ``k``.

    ``ascending = True`` takes the smallest scores instead. Ties go to the smaller dataset index.
    """

    ascending: ClassVar[bool] = False

    @abstractmethod
    def score(self, model: nn.Module, pool: Pool, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return one score per candidate (same order)."""

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        scores = np.asarray(self.score(model, pool, candidates, rng), dtype=np.float64)
        return Selection(candidates[top_k(scores, k, ascending=self.ascending)], candidates, scores)


__all__ = ["ScoreStrategy", "Selection", "Strategy", "top_k"]
