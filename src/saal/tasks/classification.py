"""Classification: a label is a class index, the model returns ``(batch, classes)`` logits."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from saal.core.model_state import model_device, preserved
from saal.core.scan import batches
from saal.errors import SaalError
from saal.tasks.base import Metric, Task


class Classification(Task):
    """Single-label classification into ``num_classes`` classes, scored by accuracy.

    The loss is cross-entropy; the pseudo target is the argmax; the embedding is the input of the
    model's last ``nn.Linear`` (see :func:`saal.models.base.logits_and_embedding`).

    Args:
        num_classes: labels are ``0 .. num_classes - 1``.
        class_names: names for per-class metrics (default ``"0"``, ``"1"``, ...).

    Raises:
        SaalError: ``num_classes < 1``.
    """

    name: ClassVar[str] = "classification"
    metric_name: ClassVar[str] = "accuracy"

    def __init__(self, num_classes: int, class_names: list[str] | None = None) -> None:
        if num_classes < 1:
            raise SaalError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]

    def check_labels(self, labels: Any, count: int) -> np.ndarray:
        lab = np.asarray(labels)
        if lab.size and not (np.issubdtype(lab.dtype, np.integer) or np.all(lab == np.round(lab))):
            raise SaalError(f"labels must be class indices (integers), got {lab.reshape(-1)[:3].tolist()}")
        lab = lab.astype(np.int64).reshape(-1)
        if lab.size != count:
            raise SaalError(f"label() got {count} indices but {lab.size} labels; give one label per index")
        bad = lab[(lab < 0) | (lab >= self.num_classes)]
        if bad.size:
            raise SaalError(f"label {int(bad[0])} is not a class; labels must lie in 0..{self.num_classes - 1}")
        return lab

    def stack_labels(self, values: list[Any]) -> np.ndarray:
        return np.asarray(values, dtype=np.int64).reshape(-1)

    def collate_targets(self, targets: list[Any]) -> torch.Tensor:
        return torch.as_tensor(np.asarray(targets, dtype=np.int64))

    def pseudo_targets(self, outputs: torch.Tensor) -> torch.Tensor:
        return check_logits(outputs).argmax(1)

    def output_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def embed(self, model: nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from saal.models.base import logits_and_embedding

        logits, emb = logits_and_embedding(model, inputs)
        return logits, emb.flatten(1)

    def evaluate(self, model: nn.Module, dataset: Dataset[Any], batch_size: int = 512) -> Metric:
        """Return the accuracy (and per-class accuracy) of ``model`` on every item of ``dataset``."""
        targets = dataset_targets(dataset)
        device = model_device(model)
        correct = np.zeros(self.num_classes, dtype=np.int64)
        seen = np.zeros(self.num_classes, dtype=np.int64)
        with preserved(model), torch.no_grad():
            for batch in batches(dataset, np.arange(len(targets)), batch_size):
                pred = model(batch.inputs.to(device)).argmax(1).cpu().numpy()
                truth = targets[batch.indices]
                np.add.at(seen, truth, 1)
                np.add.at(correct, truth[pred == truth], 1)
        per_class = {self.class_names[c]: float(correct[c] / seen[c]) for c in range(self.num_classes) if seen[c]}
        return Metric(self.metric_name, float(correct.sum() / max(len(targets), 1)), per_class)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes}


def check_logits(outputs: Any, n: int | None = None) -> torch.Tensor:
    """Return ``outputs`` if it is a ``(batch, classes)`` tensor (of ``n`` rows when given).

    Raises:
        SaalError: any other output.
    """
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2 or (n is not None and outputs.shape[0] != n):
        shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise SaalError(f"a classifier must return (batch, classes) logits, got {shape}")
    return outputs


def dataset_targets(dataset: Dataset[Any]) -> np.ndarray:
    """Return the true class of every item: ``dataset.targets`` when it has them, else read item by item."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]
    return np.asarray(targets, dtype=np.int64)
