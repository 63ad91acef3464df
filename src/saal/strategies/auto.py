"""``auto``: a budget-aware choice between a cold-start selector and an uncertainty strategy, from labelled data only.

Uncertainty needs a model that already knows something: with a handful of labels it picks outliers, while
typicality / coverage selectors (TypiClust, ProbCover) win. Which regime a run is in depends on the problem, so
``auto`` tests it on the labelled set, as SelectAL (Hacohen & Weinshall, NeurIPS 2023) does. The rule:

1. While the labelled set cannot support a test, i.e. it holds fewer than ``min_test`` items (default 2 per
   class; zero labels included), the cold-start selector ``cold`` (default ``typiclust``) chooses.
2. Once it can, every round runs a *regime test* on the labelled items alone (test labels are never read). For
   each of ``repeats`` seeded repeats: a seeded validation fold (``validation``, default a quarter) is set
   aside; of the rest, a quarter (q, at least 1) is the pick size and the rest less 2q is the seed set; a
   copy of the model, its trainable layers re-initialised (``reset_parameters``, so that it has not seen the
   validation fold) and trained on the seed set, lets each family choose q of the 2q held-back items: ``cold``
   and the uncertainty strategy ``warm`` (default ``margin``); a fresh copy (the same initial weights) is
   trained on the seed set plus each family's picks, and its accuracy on the validation fold is that family's
   score. Training is :func:`saal.training.fit` with the run's :class:`~saal.settings.TrainConfig`
   (:meth:`use_training`; ``saal run`` passes it), else :data:`TEST_TRAINING`. Each repeat costs three fits.
3. ``auto`` switches to ``warm`` only when ``warm``'s mean validation accuracy beats ``cold``'s by more than
   ``margin`` (default 0.02, two points) *and* ``warm`` is ahead in most repeats (more than half: on small
   validation folds one lucky repeat moves the mean by a lot), else it keeps ``cold``. Once switched it stays
   switched (hysteresis: the test is not run again), also across a resumed run (:meth:`state_dict`).

Every choice is deterministic under the generator given to ``select``. :attr:`Selection.reason` says which
strategy chose and the numbers behind it, starting with that strategy's name and a colon, e.g.
``"typiclust: 12 labels < min_test 20"`` or ``"margin: regime test 0.61 vs 0.55 (typiclust), ahead in 2 of 3
repeats at 40 labels"``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from saal.core.model_state import model_device
from saal.core.scan import Batch, scan
from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.pool import Pool
from saal.settings import TrainConfig, check_cold_start_spec
from saal.strategies.base import Selection, Strategy
from saal.tasks import Task

#: The training of the regime test's models when no run's settings were given (:meth:`Auto.use_training`).
TEST_TRAINING = TrainConfig(epochs=20, batch_size=16)
#: The smallest labelled set a regime test can split (a validation item, a seed item and two held back).
SMALLEST_TEST = 4


@dataclass
class RegimeTest:
    """The validation accuracies of a regime test, one per repeat: ``cold``'s and ``warm``'s (same order)."""

    cold: list[float]
    warm: list[float]


class _LabelledItems(Dataset[Any]):
    """The items ``dataset[indices[i]]`` with the pool's labels as targets (the labelled set as a dataset)."""

    def __init__(self, dataset: Dataset[Any], indices: np.ndarray, labels: np.ndarray) -> None:
        self.dataset, self.indices, self.labels = dataset, indices, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return self.dataset[int(self.indices[i])][0], self.labels[i]


def labelled_dataset(pool: Pool) -> tuple[Dataset[Any], np.ndarray]:
    """Return the pool's labelled items as a dataset of their own (positions ``0 .. n-1``) and their labels.

    The dataset's targets are the labels given through the pool, never the dataset's own targets.
    """
    indices = pool.labelled_indices()
    labels = np.asarray(pool.labels_of(indices), dtype=np.int64)
    if isinstance(pool.dataset, ArrayDataset):
        return ArrayDataset(pool.dataset.inputs[torch.as_tensor(indices, dtype=torch.long)], labels), labels
    return _LabelledItems(pool.dataset, indices, labels), labels


def reset_trainable(model: nn.Module) -> None:
    """Re-initialise, from the global torch generator, every module of ``model`` that has trainable parameters of
    its own and a ``reset_parameters`` method (frozen layers, e.g. a pretrained backbone, keep their weights)."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        reset = getattr(module, "reset_parameters", None)
        if own and any(p.requires_grad for p in own) and callable(reset):
            reset()


class Auto(Strategy):
    """Cold-start selection while the labelled set is small, uncertainty once a regime test on it says so.

    The rule is in the module's docstring. Chooses from zero labels (``cold_start``): at 0 labels ``cold``
    chooses.

    Args:
        cold: the cold-start selector's spec (a ``cold_start`` strategy).
        warm: the uncertainty strategy's spec.
        min_test: the fewest labels the regime test runs on (None: 2 per class; at least 4).
        repeats: seeded repeats of the regime test (1 .. 50).
        margin: how much higher ``warm``'s mean validation accuracy must be to switch, in [0, 1).
        validation: the share of the labelled set each repeat validates on, in (0, 0.5].

    Raises:
        SaalError: an unknown strategy, a ``cold`` that is not cold-start, or an option out of range.
    """

    name = "auto"
    tasks = ("classification",)
    cold_start = True

    def __init__(
        self,
        *,
        cold: str = "typiclust",
        warm: str = "margin",
        min_test: int | None = None,
        repeats: int = 3,
        margin: float = 0.02,
        validation: float = 0.25,
        batch_size: int = 256,
        subset: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        from saal.strategies import build_strategy, parse_spec

        if min_test is not None and (isinstance(min_test, bool) or not isinstance(min_test, int)):
            raise SaalError(f"min_test must be a whole number of labels or none, got {min_test!r}")
        if min_test is not None and min_test < SMALLEST_TEST:
            raise SaalError(f"min_test must be at least {SMALLEST_TEST} labels, got {min_test}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= 50:
            raise SaalError(f"repeats must be a whole number in 1..50, got {repeats!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
            raise SaalError(f"margin must be a number in [0, 1), got {margin!r}")
        if isinstance(validation, bool) or not isinstance(validation, (int, float)) or not 0 < validation <= 0.5:
            raise SaalError(f"validation must be a share in (0, 0.5], got {validation!r}")
        for option, spec in (("cold", cold), ("warm", warm)):
            if parse_spec(str(spec))[0] == self.name:
                raise SaalError(f"{option}: auto cannot hand its choice to auto; name another strategy")
        try:
            check_cold_start_spec(str(cold))
        except ValueError as exc:
            raise SaalError(f"cold: {exc}") from None
        self.cold_spec, self.warm_spec = str(cold), str(warm)
        try:
            self.cold = build_strategy(self.cold_spec, batch_size=batch_size)
        except SaalError as exc:
            raise SaalError(f"cold: {exc}") from None
        try:
            self.warm = build_strategy(self.warm_spec, batch_size=batch_size)
        except SaalError as exc:
            raise SaalError(f"warm: {exc}") from None
        if self.warm.tasks != ("*",) and "classification" not in self.warm.tasks:
            raise SaalError(f"warm: {self.warm_spec!r} does not work on classification")
        self.min_test, self.repeats, self.margin = min_test, int(repeats), float(margin)
        self.validation = float(validation)
        self.train_config: TrainConfig | None = None
        self.switched = ""  # the reason it switched to warm; "" while it has not

    def use_training(self, config: TrainConfig) -> None:
        """Train the regime test's models with ``config`` (the run's settings) instead of :data:`TEST_TRAINING`."""
        self.train_config = config

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        """Choose with ``cold`` or ``warm`` by the rule of the module's docstring.

        Returns:
            The chosen strategy's selection, with the :attr:`Selection.reason` of the choice.
        """
        n = pool.num_labelled
        need = self.min_test if self.min_test is not None else max(SMALLEST_TEST, 2 * pool.num_classes)
        if self.switched:
            use, reason = self.warm, f"{self.warm_spec}: switched earlier ({self.switched}); stays switched"
        elif n < need:
            use, reason = self.cold, f"{self.cold_spec}: {n} labels < min_test {need}"
        else:
            use, reason = self._test_regime(model, pool, n, int(rng.integers(2**62)))
        chosen = use.query(model, pool, candidates, k, rng)
        return Selection(chosen.indices, chosen.scored_indices, chosen.scores, reason)

    def _test_regime(self, model: nn.Module, pool: Pool, n: int, seed: int) -> tuple[Strategy, str]:
        """Run the regime test and decide (step 3 of the module's docstring); remember a switch.

        Returns:
            ``(the strategy to use, the reason)``.
        """
        result = self.regime_test(model, pool, seed)
        cold, warm = float(np.mean(result.cold)), float(np.mean(result.warm))
        ahead = sum(w > c for c, w in zip(result.cold, result.warm, strict=True))
        test = f"ahead in {ahead} of {self.repeats} repeats at {n} labels"
        # a difference of exactly the margin does not switch (1e-9: accuracies are ratios of small counts)
        if warm - cold > self.margin + 1e-9 and 2 * ahead > self.repeats:
            reason = f"{self.warm_spec}: regime test {warm:.2f} vs {cold:.2f} ({self.cold_spec}), {test}"
            self.switched = reason.split(": ", 1)[1]
            return self.warm, reason
        return self.cold, (
            f"{self.cold_spec}: regime test {cold:.2f} vs {warm:.2f} ({self.warm_spec}), {self.warm_spec} {test}; "
            f"it must win by more than {self.margin:g} and in most repeats"
        )

    def regime_test(self, model: nn.Module, pool: Pool, seed: int) -> RegimeTest:
        """Run the regime test on the pool's labelled items (the module's docstring, step 2); ``model`` is copied.

        Returns:
            The validation accuracy of each family in each repeat.

        Raises:
            SaalError: fewer than :data:`SMALLEST_TEST` labelled items.
        """
        data, labels = labelled_dataset(pool)
        n = len(labels)
        if n < SMALLEST_TEST:
            raise SaalError(f"the regime test needs at least {SMALLEST_TEST} labelled items, the pool has {n}")
        rng = np.random.default_rng(seed)
        scores: dict[str, list[float]] = {"cold": [], "warm": []}
        for _ in range(self.repeats):
            order = rng.permutation(n)
            n_val = min(max(1, round(n * self.validation)), n - (SMALLEST_TEST - 1))
            val, rest = order[:n_val], order[n_val:]
            q = max(1, len(rest) // 4)
            seed_set = np.sort(rest[: len(rest) - 2 * q])  # the other 2q are held back, to choose from
            repeat_seed = int(rng.integers(2**62))
            base = self._trained_copy(model, data, seed_set, labels, repeat_seed, pool.task)
            for family, strategy in (("cold", self.cold), ("warm", self.warm)):
                sub = Pool(data, task=pool.task)
                sub.label(seed_set, labels[seed_set])
                sub.skip(val)  # the held-back items are all the family may choose from
                picked = strategy.select(base, sub, q, np.random.default_rng(repeat_seed)).indices
                trained = self._trained_copy(model, data, np.concatenate([seed_set, picked]), labels, repeat_seed,
                                             pool.task)  # fmt: skip
                scores[family].append(self._accuracy(trained, data, val, labels[val], pool.task))
        return RegimeTest(scores["cold"], scores["warm"])

    def _trained_copy(
        self, model: nn.Module, data: Dataset[Any], indices: np.ndarray, labels: np.ndarray, seed: int, task: Task
    ) -> nn.Module:
        """Return a copy of ``model``, re-initialised under ``seed`` and trained on ``data[indices]``; the global
        generators are left as they were."""
        from saal.training import fit

        device = model_device(model)
        devices = [device.index or 0] if device.type == "cuda" else []
        trained = copy.deepcopy(model)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            reset_trainable(trained)
            config = self.train_config if self.train_config is not None else TEST_TRAINING
            fit(trained, data, indices, labels[indices], config, torch.Generator().manual_seed(seed), task=task)
        return trained

    def _accuracy(
        self, model: nn.Module, data: Dataset[Any], indices: np.ndarray, labels: np.ndarray, task: Task
    ) -> float:
        """Return the share of ``data[indices]`` whose predicted class is its label in ``labels``."""
        device = model_device(model)
        model.eval()

        def predictions(batch: Batch) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return {"pred": task.forward(model, task.to_device(batch.inputs, device)).argmax(1)}

        out = scan(data, indices, predictions, batch_size=self.batch_size, collate=task.collate, shard=False)
        return float(np.mean(out["pred"].cpu().numpy() == labels))

    def state_dict(self) -> dict[str, Any]:
        """Return whether (and why) ``auto`` switched, and its two strategies' states."""
        return {"switched": self.switched, "cold": self.cold.state_dict(), "warm": self.warm.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.switched = str(state.get("switched", ""))
        self.cold.load_state_dict(dict(state.get("cold", {})))
        self.warm.load_state_dict(dict(state.get("warm", {})))

    def __repr__(self) -> str:
        return (
            f"Auto(cold={self.cold_spec!r}, warm={self.warm_spec!r}, min_test={self.min_test}, "
            f"repeats={self.repeats}, margin={self.margin}, validation={self.validation}, "
            f"batch_size={self.batch_size}, subset={self.subset})"
        )
