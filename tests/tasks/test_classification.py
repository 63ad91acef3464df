import numpy as np
import pytest
import torch
from torch import nn

from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.pool import Pool
from saal.strategies import build_strategy, strategies_for, strategy_names
from saal.tasks import Classification, Metric


class _Fixed(nn.Module):
    """Predicts class = the input's first feature."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, 0].long(), 3).float() * 5


def test_accuracy_and_per_class_accuracy() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [2.0], [1.0]])
    y = np.array([0, 1, 2, 1, 0])  # correct: items 0, 1, 2
    metric = Classification(3, ["a", "b", "c"]).evaluate(_Fixed(), ArrayDataset(x, y), batch_size=2)
    assert isinstance(metric, Metric) and metric.name == "accuracy"
    assert metric.value == pytest.approx(3 / 5)
    assert metric.per_class == pytest.approx({"a": 0.5, "b": 0.5, "c": 1.0})


def test_labels_are_class_indices() -> None:
    task = Classification(3)
    assert task.check_labels([2, 0], 2).tolist() == [2, 0]
    assert task.check_labels(np.array([1.0]), 1).dtype == np.int64
    for bad, message in (([3], "not a class"), ([-1], "not a class"), ([0.5], "integers"), ([1, 2], "one label")):
        with pytest.raises(SaalError, match=message):
            task.check_labels(bad, 1)


def test_losses_targets_and_embeddings_of_a_classifier() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(6, 4)
    task = Classification(3)
    logits = task.forward(model, x)
    y = task.pseudo_targets(logits)
    assert torch.equal(y, logits.argmax(1))
    torch.testing.assert_close(task.item_losses(model, x, y), nn.functional.cross_entropy(logits, y, reduction="none"))
    out, emb = task.embed(model, x)
    assert torch.equal(out, logits) and emb.shape == (6, 5)
    with pytest.raises(SaalError, match=r"\(batch, classes\)"):
        task.pseudo_targets(torch.zeros(6))


class _Boxes(Classification):
    """Stands in for a task no baseline supports (detection comes in a later issue)."""

    name = "detection"


def test_a_strategy_asked_for_a_task_it_does_not_support_names_those_that_can() -> None:
    pool = Pool(ArrayDataset(torch.zeros(5, 1), np.zeros(5)), task=_Boxes(2))
    assert strategies_for("detection")[0] == "random" and "entropy" not in strategies_for("detection")
    assert set(strategies_for("classification")) == {n for n in strategy_names() if not n.startswith("det-")}
    with pytest.raises(SaalError, match=r"'entropy' does not support detection .*use one of random") as err:
        build_strategy("entropy").select(nn.Linear(1, 2), pool, 1, 0)
    assert "\n" not in str(err.value)
    assert len(build_strategy("random").select(nn.Linear(1, 2), pool, 2, 0).indices) == 2
