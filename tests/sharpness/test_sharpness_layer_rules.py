"""The closed-form layer rules (Linear, Conv2d, BatchNorm, the torch.func fallback) against the definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sharpness_cases import assert_matches_naive, randomise_norms
from torch import nn

from saal.sharpness import layer_rules, perturbed_losses


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
        randomise_norms(self)
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
    assert_matches_naive(_Convs(side), torch.randn(5, 2, side, side), perturbation)


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
    assert_matches_naive(model, torch.randn(4, 3, 2, 2), perturbation)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("perturbation", ["asam", "sam"])
def test_tiny_memory_budgets_chunk_and_recompute_exactly(perturbation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One instance per chunk and nothing kept between the passes: the same scores."""
    monkeypatch.setattr(layer_rules, "CHUNK_FLOATS", 1)
    monkeypatch.setattr(layer_rules, "CACHE_FLOATS", 0)
    torch.manual_seed(10)
    assert_matches_naive(_Convs(24), torch.randn(3, 2, 24, 24), perturbation)
    assert_matches_naive(_Mixed(), torch.randn(3, 2, 6), perturbation)


@pytest.mark.parametrize("perturbation", ["asam", "sam"])
def test_fallback_layers_equal_naive(perturbation: str) -> None:
    torch.manual_seed(2)
    assert_matches_naive(_Mixed(), torch.randn(5, 2, 6), perturbation)


@pytest.mark.parametrize("factory", [_Shared, _InPlace])
def test_models_the_hooks_cannot_follow_equal_naive(factory: type[nn.Module]) -> None:
    torch.manual_seed(3)
    assert_matches_naive(factory(), torch.randn(5, 4), "asam")
