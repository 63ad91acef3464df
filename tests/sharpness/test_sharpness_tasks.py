"""The engine through the task seam: any task's forward pass, pseudo targets and per-item losses,
checked against the definition run with the same task."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sharpness_cases import RHO, randomise_norms
from torch import nn
from torch.utils.data import Dataset

from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.models import MLP, SmallCNN
from saal.sharpness import naive_perturbed_losses, pool_sharpness, sharpness_terms
from saal.tasks import Classification, Metric, Task


class SmoothedClassification(Classification):
    """Label-smoothed cross-entropy, each item weighted by its pseudo class."""

    def output_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight = 1.0 + 0.1 * targets.to(outputs.dtype)
        return weight * F.cross_entropy(outputs, targets, reduction="none", label_smoothing=0.1)


class SignRegression(Task):
    """A regression-like task: outputs are (batch, d) values, the pseudo target is their sign,
    the loss the squared error to it."""

    name = "sign-regression"

    def check_labels(self, labels: Any, count: int) -> Any:
        return labels

    def pseudo_targets(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.sign(outputs)

    def output_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((outputs - targets) ** 2).sum(1)

    def embed(self, model: nn.Module, inputs: Any) -> tuple[Any, torch.Tensor]:
        out = model(inputs)
        return out, out

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> Metric:
        return Metric("none", 0.0)


class DictInputs(Classification):
    """Classification whose batches are dicts ``{"image": tensor}``, collated by the task."""

    def collate(self, inputs: list[Any]) -> dict[str, torch.Tensor]:
        return {"image": torch.stack([torch.as_tensor(x) for x in inputs])}

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return {k: v.to(device) for k, v in batch.items()}

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        return model(inputs["image"])


class _Listed(Dataset):
    """A plain map-style dataset (not an ArrayDataset): read item by item, collated by the task."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], 0


class _Shared(nn.Module):
    """The same Linear applied twice: the hooks cannot follow it, so the whole model goes through torch.func."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)[:, :16]
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(h)))))


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "mlp": MLP((1, 4, 4), 5),
        "cnn": randomise_norms(SmallCNN(1, 5, 4)),
        "shared": _Shared(),
    }


TASKS: dict[str, Task] = {"smoothed": SmoothedClassification(5), "regression": SignRegression()}


@pytest.mark.parametrize("engine", ["auto", "functional"])
@pytest.mark.parametrize("perturbation", ["asam", "sam"])
@pytest.mark.parametrize("task_name", list(TASKS))
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "shared"])
def test_per_instance_through_a_custom_task_equals_its_definition(
    model_name: str, task_name: str, perturbation: str, engine: str
) -> None:
    model, task = _models()[model_name].double(), TASKS[task_name]
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss_ref, pert_ref = naive_perturbed_losses(model, x, rho=RHO, perturbation=perturbation, task=task)
    t = sharpness_terms(model, x, rho=RHO, perturbation=perturbation, engine=engine, task=task)
    torch.testing.assert_close(t.loss, loss_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t.perturbed_loss, pert_ref, rtol=1e-10, atol=1e-12)
    assert ((pert_ref - loss_ref).abs() > 1e-8).all()  # the perturbation does something
    # Not the classification scores: the task's loss is the one perturbed.
    _, plain = naive_perturbed_losses(model, x, rho=RHO, perturbation=perturbation)
    assert not torch.allclose(plain, pert_ref)


@pytest.mark.parametrize("task_name", list(TASKS))
def test_per_batch_of_one_through_a_custom_task_equals_its_definition(task_name: str) -> None:
    model, task = _models()["cnn"].double(), TASKS[task_name]
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = pool_sharpness(
        model, ArrayDataset(x, np.zeros(4)), np.arange(4), batch_size=1, granularity="per-batch", task=task
    )
    loss_ref, pert_ref = naive_perturbed_losses(model, x, rho=RHO, task=task)
    np.testing.assert_allclose(res.loss, loss_ref.numpy(), rtol=1e-10)
    np.testing.assert_allclose(res.perturbed_loss, pert_ref.numpy(), rtol=1e-10)
    with torch.no_grad():
        targets = task.pseudo_targets(model.eval()(x)).numpy()
    np.testing.assert_array_equal(res.pseudo_label, targets)


def test_pool_sharpness_collates_and_moves_batches_through_the_task() -> None:
    model = _models()["cnn"].double()
    x = torch.randn(7, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    idx = np.array([5, 0, 6, 2, 3])
    for engine in ("auto", "functional"):
        got = pool_sharpness(model, _Listed(x), idx, batch_size=2, engine=engine, task=DictInputs(5))
        ref = pool_sharpness(model, ArrayDataset(x, np.zeros(7)), idx, batch_size=3, engine=engine)
        np.testing.assert_allclose(got.perturbed_loss, ref.perturbed_loss, rtol=1e-12)
        np.testing.assert_allclose(got.grad_norm, ref.grad_norm, rtol=1e-12)
        np.testing.assert_array_equal(got.pseudo_label, ref.pseudo_label)


def test_last_layer_closed_form_refuses_tasks_other_than_plain_classification() -> None:
    model, x = _models()["mlp"], torch.randn(3, 1, 4, 4)
    for task, name in ((SignRegression(), "sign-regression"), (SmoothedClassification(5), "classification")):
        with pytest.raises(SaalError, match=f"scope=last-layer .* the {name} task"):
            sharpness_terms(model, x, scope="last-layer", task=task)
    with pytest.raises(SaalError, match="scope=last-layer"):
        pool_sharpness(
            model, ArrayDataset(x, np.zeros(3)), np.array([], dtype=np.int64), scope="last-layer", task=SignRegression()
        )
    sharpness_terms(model, x, scope="last-layer", task=Classification(5))  # plain classification: fine


def test_a_task_whose_losses_are_not_per_item_is_a_user_error() -> None:
    class MeanLoss(SignRegression):
        def output_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return super().output_losses(outputs, targets).mean()

    with pytest.raises(SaalError, match="sign-regression task's output_losses must return one loss per item"):
        sharpness_terms(_models()["mlp"], torch.randn(3, 1, 4, 4), task=MeanLoss())
