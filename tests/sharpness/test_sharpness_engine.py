"""The per-instance perturbed-loss engine against the definition (copy the model, perturb, forward):
dispatch, per-batch, functional and last-layer paths, the pool scan, options and errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sharpness_cases import RHO, assert_matches_naive, model_and_batch, randomise_norms
from torch import nn

from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.models import SmallCNN
from saal.sharpness import (
    PoolSharpness,
    ascent_step,
    naive_perturbed_losses,
    perturbed_losses,
    pool_sharpness,
    sharpness_terms,
)


@pytest.mark.parametrize("perturbation", ["asam", "sam"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18"])
def test_per_instance_equals_naive_definition(name: str, perturbation: str) -> None:
    model, x = model_and_batch(name)
    assert_matches_naive(model, x, perturbation)


@pytest.mark.parametrize("perturbation", ["asam", "sam"])
def test_float32_max_score_within_1e5_of_naive(perturbation: str) -> None:
    model, x = model_and_batch("cnn")
    _, ref = naive_perturbed_losses(model, x, rho=RHO, perturbation=perturbation)
    _, got = perturbed_losses(model, x, rho=RHO, perturbation=perturbation)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


def test_functional_engine_equals_naive() -> None:
    model, x = model_and_batch("cnn")
    assert_matches_naive(model, x, "asam", engine="functional")


@pytest.mark.parametrize("perturbation", ["asam", "sam"])
def test_last_layer_closed_form_equals_autograd_on_last_layer(perturbation: str) -> None:
    for model in (
        model_and_batch("cnn")[0],
        nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5)),
    ):
        torch.manual_seed(4)
        x = torch.randn(6, 1, 8, 8)
        loss_ref, pert_ref = naive_perturbed_losses(model, x, rho=RHO, perturbation=perturbation, scope="last-layer")
        t = sharpness_terms(model, x, rho=RHO, perturbation=perturbation, scope="last-layer")
        torch.testing.assert_close(t.loss, loss_ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(t.perturbed_loss, pert_ref, rtol=1e-5, atol=1e-7)


def test_last_layer_refuses_a_model_with_work_after_its_last_linear() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Tanh())
    with pytest.raises(SaalError, match="scope=all"):
        sharpness_terms(model, torch.randn(3, 1, 8, 8), scope="last-layer")


def _naive_per_batch(model: nn.Module, x: torch.Tensor, perturbation: str, scope: str) -> torch.Tensor:
    """The reference code with a pool batch: one eps from the batch-mean loss."""
    clone = copy.deepcopy(model).eval()
    params = list(clone.parameters()) if scope == "all" else list(clone.head.parameters())
    logits = clone(x)
    y = logits.argmax(1)
    grads = torch.autograd.grad(F.cross_entropy(logits, y), params)
    with torch.no_grad():
        t = [p.abs() if perturbation == "asam" else torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, g in zip(t, grads, strict=True)))
        for p, ti, g in zip(params, t, grads, strict=True):
            p.add_(RHO * ti * ti * g / (norm + 1e-12))
        return F.cross_entropy(clone(x), y, reduction="none")


@pytest.mark.parametrize("scope", ["all", "last-layer"])
@pytest.mark.parametrize("perturbation", ["asam", "sam"])
def test_per_batch_equals_shared_eps_definition(perturbation: str, scope: str) -> None:
    model, x = model_and_batch("cnn")
    model, x = model.double(), x.double()
    t = sharpness_terms(model, x, rho=RHO, perturbation=perturbation, granularity="per-batch", scope=scope)
    torch.testing.assert_close(t.perturbed_loss, _naive_per_batch(model, x, perturbation, scope), rtol=1e-10, atol=0)


@pytest.mark.parametrize("scope", ["all", "last-layer"])
def test_per_batch_of_one_equals_per_instance(scope: str) -> None:
    model, x = model_and_batch("cnn")
    data = ArrayDataset(x.double(), np.zeros(len(x)))
    model = model.double()
    idx = np.arange(len(x))
    one = pool_sharpness(model, data, idx, batch_size=1, granularity="per-batch", scope=scope)
    inst = pool_sharpness(model, data, idx, batch_size=4, granularity="per-instance", scope=scope)
    np.testing.assert_allclose(one.perturbed_loss, inst.perturbed_loss, rtol=1e-10)
    np.testing.assert_allclose(one.score("diff"), inst.score("diff"), rtol=1e-8)


def test_per_instance_scores_do_not_depend_on_pool_batch_size() -> None:
    torch.manual_seed(5)
    model = randomise_norms(nn.Sequential(SmallCNN(1, 10, 8))).double()
    data = ArrayDataset(torch.randn(23, 1, 8, 8, dtype=torch.float64), np.zeros(23))
    idx = np.array([20, 3, 7, 0, 11, 12, 13, 19, 5, 1, 2])
    runs = [pool_sharpness(model, data, idx, batch_size=b) for b in (1, 4, 64)]
    for other in runs[1:]:
        np.testing.assert_allclose(other.perturbed_loss, runs[0].perturbed_loss, rtol=1e-12)
        np.testing.assert_allclose(other.score("diff"), runs[0].score("diff"), rtol=1e-9)
        np.testing.assert_array_equal(other.pseudo_label, runs[0].pseudo_label)
    assert len(np.unique(runs[0].perturbed_loss)) == len(idx)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"perturbation": "sam"},
        {"engine": "functional"},
        {"granularity": "per-batch"},
        {"scope": "last-layer"},
    ],
)
def test_an_instance_with_zero_gradient_gets_a_finite_score(options: dict) -> None:
    head = nn.Linear(4, 3)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([200.0, 0.0, 0.0]))  # softmax saturates: p == onehot exactly
        head.weight.mul_(0.01)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), head)
    x = torch.randn(3, 4)
    t = sharpness_terms(model, x, **options)
    assert torch.all(t.grad_norm == 0)
    assert torch.all(torch.isfinite(t.perturbed_loss))
    assert torch.equal(t.perturbed_loss, t.loss)


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires": [p.requires_grad for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
    }


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"perturbation": "sam", "engine": "functional"},
        {"granularity": "per-batch"},
        {"scope": "last-layer"},
    ],
)
def test_scoring_leaves_the_model_as_it_was(options: dict) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(144, 3)
    )
    x = torch.randn(5, 1, 8, 8)
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1])).backward()  # grads present, BN stats moved
    model[0].bias.requires_grad_(False)
    model[1].eval()  # mixed modes
    before = _snapshot(model)
    sharpness_terms(model, x, **options)
    naive_perturbed_losses(model, x[:2])
    after = _snapshot(model)
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for g0, g1 in zip(before["grads"], after["grads"], strict=True):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    assert before["requires"] == after["requires"]
    assert before["modes"] == after["modes"]


def test_bad_options_name_the_option_and_allowed_values() -> None:
    model, x = model_and_batch("mlp")
    for kwargs, text in [
        ({"perturbation": "adam"}, "perturbation must be one of asam, sam"),
        ({"granularity": "batch"}, "granularity must be one of per-instance, per-batch"),
        ({"scope": "first"}, "scope must be one of all, last-layer"),
        ({"rho": -0.1}, "rho must be"),
        ({"engine": "fast"}, "engine must be one of auto, functional"),
    ]:
        with pytest.raises(SaalError, match=text):
            sharpness_terms(model, x, **kwargs)


def test_model_not_returning_logits_is_a_user_error() -> None:
    with pytest.raises(SaalError, match="logits"):
        sharpness_terms(nn.Linear(4, 1).float(), torch.randn(3, 2, 4))


def test_pool_sharpness_streams_in_dataset_index_order() -> None:
    model, x = model_and_batch("mlp")
    data = ArrayDataset(x, np.zeros(len(x)))
    idx = np.array([4, 1, 3])
    res = pool_sharpness(model, data, idx, batch_size=2)
    direct = sharpness_terms(model, x[idx])
    np.testing.assert_array_equal(res.indices, idx)
    np.testing.assert_allclose(res.perturbed_loss, direct.perturbed_loss.double().numpy(), rtol=1e-6)
    assert res.loss.dtype == np.float64 and res.pseudo_label.dtype == np.int64
    empty = pool_sharpness(model, data, np.array([], dtype=np.int64))
    assert empty.perturbed_loss.shape == (0,)


@pytest.mark.parametrize("asam", [True, False])
def test_the_one_ascent_step_per_item_is_the_step_of_each_item_alone(asam: bool) -> None:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    grads = [
        torch.randn(5, 3, 2, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    ]
    eps, norm = ascent_step(params, grads, RHO, asam, per_item=True)
    for i in range(5):
        one, one_norm = ascent_step(params, [gr[i] for gr in grads], RHO, asam)
        assert torch.equal(one_norm, norm[i]) and all(torch.equal(a, b[i]) for a, b in zip(one, eps, strict=True))
    t = [p.abs() if asam else torch.ones_like(p) for p in params]
    expected = torch.sqrt(sum(((ti * gr[0]) ** 2).sum() for ti, gr in zip(t, grads, strict=True)))
    torch.testing.assert_close(norm[0], expected)
    step_norm = torch.sqrt(sum(((e[0] / (ti * ti)) * ti).pow(2).sum() for e, ti in zip(eps, t, strict=True)))
    torch.testing.assert_close(step_norm, torch.tensor(RHO, dtype=torch.float64))  # ||T^-1 eps|| = rho


def test_the_one_score_offers_max_diff_and_loss() -> None:
    terms = PoolSharpness(np.arange(2), np.array([1.0, 2.0]), np.array([1.5, 2.25]), np.zeros(2), np.zeros(2))
    assert terms.score("max").tolist() == [1.5, 2.25] and terms.score("diff").tolist() == [0.5, 0.25]
    assert terms.score("loss").tolist() == [1.0, 2.0]
    with pytest.raises(SaalError, match="score must be one of max, diff, loss"):
        terms.score("mean")
