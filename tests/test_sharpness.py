"""The per-instance perturbed-loss engine against the definition (copy the model, perturb, forward)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.models import MLP, ResNet18, SmallCNN
from saal.sam import SAM
from saal.sharpness import (
    naive_perturbed_losses,
    perturbed_losses,
    pool_sharpness,
    sharpness_terms,
)
from saal.training import TrainConfig, fit

RHO = 0.05


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
    return model


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP((1, 8, 8), 10), torch.randn(6, 1, 8, 8)
    if name == "cnn":
        return SmallCNN(1, 10, 8), torch.randn(6, 1, 8, 8)
    return _randomise_norms(ResNet18(3, 10)), torch.randn(2, 3, 8, 8)


def _assert_matches_naive(model: nn.Module, x: torch.Tensor, perturbation: str, **kwargs: object) -> None:
    """max within 1e-5 relative, diff within 1e-5 relative of its largest value (float64)."""
    model, x = model.double(), x.double()
    loss_ref, pert_ref = naive_perturbed_losses(model, x, rho=RHO, perturbation=perturbation)
    t = sharpness_terms(model, x, rho=RHO, perturbation=perturbation, **kwargs)
    torch.testing.assert_close(t.loss, loss_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(t.perturbed_loss, pert_ref, rtol=1e-5, atol=0)
    diff, diff_ref = t.perturbed_loss - t.loss, pert_ref - loss_ref
    assert diff_ref.abs().min() > 1e-6  # the perturbation does something
    assert (diff - diff_ref).abs().max() <= 1e-5 * diff_ref.abs().max()


@pytest.mark.parametrize("perturbation", ["asam", "sam"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18"])
def test_per_instance_equals_naive_definition(name: str, perturbation: str) -> None:
    model, x = _model(name)
    _assert_matches_naive(model, x, perturbation)


@pytest.mark.parametrize("perturbation", ["asam", "sam"])
def test_float32_max_score_within_1e5_of_naive(perturbation: str) -> None:
    model, x = _model("cnn")
    _, ref = naive_perturbed_losses(model, x, rho=RHO, perturbation=perturbation)
    _, got = perturbed_losses(model, x, rho=RHO, perturbation=perturbation)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


def test_functional_engine_equals_naive() -> None:
    model, x = _model("cnn")
    _assert_matches_naive(model, x, "asam", engine="functional")


def test_sam_linear_matches_hand_computed_formula() -> None:
    """One Linear layer: g_W = (p - onehot) a^T, g_b = p - onehot, eps = rho g / ||g||."""
    torch.manual_seed(1)
    lin = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    _, got = perturbed_losses(lin, x, rho=0.3, perturbation="sam")
    assert not got.requires_grad
    for i in range(5):
        z = lin(x[i]).detach()
        y = int(z.argmax())
        d = torch.softmax(z, 0) - F.one_hot(torch.tensor(y), 4).double()
        gw, gb = torch.outer(d, x[i]), d
        norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
        w2 = lin.weight.detach() + 0.3 * gw / (norm + 1e-12)
        b2 = lin.bias.detach() + 0.3 * gb / (norm + 1e-12)
        expected = F.cross_entropy((w2 @ x[i] + b2)[None], torch.tensor([y]))
        assert abs(float(got[i]) - float(expected)) < 1e-12


class _Scale(nn.Module):
    """A layer with a parameter and no closed-form rule."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain + 0.1 * self.gain**2


class _Mixed(nn.Module):
    """Closed-form layers mixed with fallback layers: LayerNorm, a custom module, Conv1d,
    a Linear over a sequence, a parameter used directly by a sub-block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.seq = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.scale = _Scale(5)
        self.head = nn.Linear(5 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # (B, 6, 4)
        h = self.scale(self.norm(torch.relu(self.seq(h))))  # (B, 6, 5)
        return self.head(h.flatten(1))


class _Shared(nn.Module):
    """The same Linear applied twice (the hooks cannot follow it: scored with torch.func)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x))))) / self.temperature


class _InPlace(nn.Module):
    """A layer's input is changed in place after the layer read it (its weight is frozen, so
    autograd allows it); the engine must notice and score with copies."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.lin.weight.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu_(x * 1.0)  # already at version 1 when the layer reads it
        h = self.lin(a)
        a.mul_(2.0)
        return self.head(torch.cat([torch.tanh(h), a], 1))


class _Convs(nn.Module):
    """Conv2d variants: dilation, 'same', stride, groups, no bias (closed form); even-kernel 'same'
    and reflect padding (fallback); BatchNorm1d on features."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding="same", dilation=2, bias=False)
        self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.c = nn.Conv2d(6, 4, 2, padding="same")
        self.d = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(4 * (side // 2) ** 2, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        _randomise_norms(self)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.bias.uniform_(-0.3, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))))))
        return self.head(torch.tanh(self.bn(self.fc(h.flatten(1)))))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("side", [8, 24])  # 24: many output positions, per-instance kernels by grouped convolution
@pytest.mark.parametrize("perturbation", ["asam", "sam"])
def test_conv_variants_equal_naive(perturbation: str, side: int) -> None:
    torch.manual_seed(9)
    _assert_matches_naive(_Convs(side), torch.randn(5, 2, side, side), perturbation)


@pytest.mark.parametrize("perturbation", ["asam", "sam"])
def test_grouped_conv_on_a_small_map_equals_naive(perturbation: str) -> None:
    """SAM takes the Gram-matrix route here (4 positions, 16 x 144 kernels per group)."""
    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(32, 32, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(32 * 4, 5),
    )
    _assert_matches_naive(model, torch.randn(4, 3, 2, 2), perturbation)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("perturbation", ["asam", "sam"])
def test_tiny_memory_budgets_chunk_and_recompute_exactly(perturbation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One instance per chunk and nothing kept between the passes: the same scores."""
    import saal.sharpness as engine

    monkeypatch.setattr(engine, "_CHUNK_FLOATS", 1)
    monkeypatch.setattr(engine, "_CACHE_FLOATS", 0)
    torch.manual_seed(10)
    _assert_matches_naive(_Convs(24), torch.randn(3, 2, 24, 24), perturbation)
    _assert_matches_naive(_Mixed(), torch.randn(3, 2, 6), perturbation)


@pytest.mark.parametrize("perturbation", ["asam", "sam"])
def test_fallback_layers_equal_naive(perturbation: str) -> None:
    torch.manual_seed(2)
    _assert_matches_naive(_Mixed(), torch.randn(5, 2, 6), perturbation)


@pytest.mark.parametrize("factory", [_Shared, _InPlace])
def test_models_the_hooks_cannot_follow_equal_naive(factory: type[nn.Module]) -> None:
    torch.manual_seed(3)
    _assert_matches_naive(factory(), torch.randn(5, 4), "asam")


@pytest.mark.parametrize("perturbation", ["asam", "sam"])
def test_last_layer_closed_form_equals_autograd_on_last_layer(perturbation: str) -> None:
    for model in (_model("cnn")[0], nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))):
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
    model, x = _model("cnn")
    model, x = model.double(), x.double()
    t = sharpness_terms(model, x, rho=RHO, perturbation=perturbation, granularity="per-batch", scope=scope)
    torch.testing.assert_close(t.perturbed_loss, _naive_per_batch(model, x, perturbation, scope), rtol=1e-10, atol=0)


@pytest.mark.parametrize("scope", ["all", "last-layer"])
def test_per_batch_of_one_equals_per_instance(scope: str) -> None:
    model, x = _model("cnn")
    data = ArrayDataset(x.double(), np.zeros(len(x)))
    model = model.double()
    idx = np.arange(len(x))
    one = pool_sharpness(model, data, idx, batch_size=1, granularity="per-batch", scope=scope)
    inst = pool_sharpness(model, data, idx, batch_size=4, granularity="per-instance", scope=scope)
    np.testing.assert_allclose(one.perturbed_loss, inst.perturbed_loss, rtol=1e-10)
    np.testing.assert_allclose(one.score("diff"), inst.score("diff"), rtol=1e-8)


def test_per_instance_scores_do_not_depend_on_pool_batch_size() -> None:
    torch.manual_seed(5)
    model = _randomise_norms(nn.Sequential(SmallCNN(1, 10, 8))).double()
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
    model, x = _model("mlp")
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
    model, x = _model("mlp")
    data = ArrayDataset(x, np.zeros(len(x)))
    idx = np.array([4, 1, 3])
    res = pool_sharpness(model, data, idx, batch_size=2)
    direct = sharpness_terms(model, x[idx])
    np.testing.assert_array_equal(res.indices, idx)
    np.testing.assert_allclose(res.perturbed_loss, direct.perturbed_loss.double().numpy(), rtol=1e-6)
    assert res.loss.dtype == np.float64 and res.pseudo_label.dtype == np.int64
    empty = pool_sharpness(model, data, np.array([], dtype=np.int64))
    assert empty.perturbed_loss.shape == (0,)


# -- SAM training (saal.sam) ---------------------------------------------------------------------
def _train(optimizer: str, rho: float) -> list[torch.Tensor]:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    data = ArrayDataset(torch.randn(40, 1, 4, 4), np.arange(40) % 3)
    config = TrainConfig(optimizer=optimizer, lr=0.05, momentum=0.9, epochs=3, batch_size=8, sam_rho=rho)
    fit(model, data, np.arange(40), data.targets, config, torch.Generator().manual_seed(0))
    return [p.detach().clone() for p in model.parameters()]


def test_sam_with_rho_zero_is_exactly_sgd_with_momentum() -> None:
    sgd, sam0, sam = _train("sgd", 0.0), _train("sam", 0.0), _train("sam", 0.05)
    assert all(torch.equal(a, b) for a, b in zip(sgd, sam0, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(sgd, sam, strict=True))
    assert all(torch.isfinite(p).all() for p in sam)


def test_sam_step_moves_to_the_perturbed_point_and_back() -> None:
    torch.manual_seed(8)
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = SAM([w], torch.optim.SGD, rho=0.5, lr=0.1)
    seen = []

    def closure() -> torch.Tensor:
        seen.append(w.detach().clone())
        loss = (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    g = 2 * torch.tensor([1.0, -2.0])
    torch.testing.assert_close(seen[1], seen[0] + 0.5 * g / g.norm())
    torch.testing.assert_close(w.detach(), seen[0] - 0.1 * 2 * seen[1])
