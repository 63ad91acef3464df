"""What a task is to saal: what a label is, how items batch, what the model predicts, which loss and
embedding an item has, and how a test set is scored.

Everything that depends on the kind of prediction (a class, a set of boxes) lives behind this one
interface; training, evaluation, the sharpness engine, the strategies and the experiment loop speak
to it and to nothing task-specific.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class Metric:
    """A test-set score.

    Attributes:
        name: what it is (``accuracy``, ``map``); the column the results store it under.
        value: the score, in [0, 1].
        per_class: the score of each class by class name, where the metric has one.
        details: further scores of the same evaluation by name (detection: ``map``, mAP@[.5:.95]).
    """

    name: str
    value: float
    per_class: dict[str, float] = field(default_factory=dict)
    details: dict[str, float] = field(default_factory=dict)


class Task(ABC):
    """One kind of prediction. Subclasses say what a label, a batch, a loss and a metric are.

    Methods that run the model take it as it is: the caller chooses eval mode and gradients
    (:func:`saal.core.model_state.preserved`), except :meth:`item_losses`, which puts the model in
    the mode the task's loss needs (a detector has losses only in train mode) and leaves it there.
    """

    name: ClassVar[str] = "task"
    metric_name: ClassVar[str] = "metric"

    @abstractmethod
    def check_labels(self, labels: Any, count: int) -> Any:
        """Return ``count`` label values in the form the pool stores them.

        Raises:
            SaalError: a value that is not a label of this task, or not ``count`` of them.
        """

    def stack_labels(self, values: list[Any]) -> Any:
        """Return the labels of several items as the task hands them out (default: the list itself)."""
        return values

    def collate(self, inputs: list[Any]) -> Any:
        """Return one batch from a list of item inputs (default: stack same-shaped tensors)."""
        from saal.core.scan import stack_inputs  # the scan reads datasets, which name tasks: imported late

        return stack_inputs(inputs)

    def collate_targets(self, targets: list[Any]) -> Any:
        """Return one batch of targets from a list of label values."""
        return torch.as_tensor(targets)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """Return a collated batch (inputs or targets) on ``device``."""
        return batch.to(device)

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """Return the model's outputs for a batch of inputs."""
        return model(inputs)

    @abstractmethod
    def pseudo_targets(self, outputs: Any) -> Any:
        """Return the model's own prediction as targets (what SAAL's loss is measured against)."""

    @abstractmethod
    def output_losses(self, outputs: Any, targets: Any) -> torch.Tensor:
        """Return the loss of each item, ``(batch,)``, from the outputs of :meth:`forward`."""

    def training_losses(self, model: nn.Module, inputs: Any, targets: Any) -> tuple[Any, torch.Tensor]:
        """Return ``(outputs, per-item losses)`` of one training step, the model in train mode (default:
        :meth:`forward`, then :meth:`output_losses`; a detector computes its losses from inputs and targets)."""
        outputs = self.forward(model, inputs)
        return outputs, self.output_losses(outputs, targets)

    def label_summary(self, labels: Any) -> dict[str, float]:
        """Return counts a round records about the labels given so far (detection: boxes); default none."""
        del labels
        return {}

    def item_losses(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        """Return the loss of each item, ``(batch,)``, in the mode the task's loss needs."""
        return self.output_losses(self.forward(model, inputs), targets)

    @abstractmethod
    def embed(self, model: nn.Module, inputs: Any) -> tuple[Any, torch.Tensor]:
        """Return ``(outputs, embeddings)``: the outputs and one feature vector per item ``(batch, d)``."""

    @abstractmethod
    def evaluate(self, model: nn.Module, dataset: Dataset[Any], batch_size: int = 512) -> Metric:
        """Return the model's :class:`Metric` on every item of ``dataset`` (in eval mode; the model is restored)."""

    def describe(self) -> dict[str, Any]:
        """Return what identifies this task in a run's records."""
        return {"name": self.name}


def check_task_support(strategy_name: str, supported: Sequence[str], task: Task, alternatives: Sequence[str]) -> None:
    """Raise a one-line error when a strategy is asked to work on a task it does not support.

    Raises:
        SaalError: naming the task, the tasks the strategy supports and the strategies that can.
    """
    from saal.errors import SaalError

    if "*" in supported or task.name in supported:
        return
    raise SaalError(
        f"strategy {strategy_name!r} does not support {task.name} (it supports {', '.join(supported)}); "
        f"for {task.name} use one of {', '.join(alternatives) or 'none'}"
    )
