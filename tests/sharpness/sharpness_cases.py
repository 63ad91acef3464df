"""Models, batches and the comparison with the definition shared by the sharpness engine's tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from saal.models import MLP, ResNet18, SmallCNN
from saal.sharpness import naive_perturbed_losses, sharpness_terms

RHO = 0.05


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm2d non-trivial running statistics and affine parameters; return the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
    return model


def model_and_batch(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Return a seeded model (``mlp``, ``cnn`` or ``resnet18``) and a batch of inputs for it."""
    torch.manual_seed(0)
    if name == "mlp":
        return MLP((1, 8, 8), 10), torch.randn(6, 1, 8, 8)
    if name == "cnn":
        return SmallCNN(1, 10, 8), torch.randn(6, 1, 8, 8)
    return randomise_norms(ResNet18(3, 10)), torch.randn(2, 3, 8, 8)


def assert_matches_naive(model: nn.Module, x: torch.Tensor, perturbation: str, **kwargs: Any) -> None:
    """max within 1e-5 relative, diff within 1e-5 relative of its largest value (float64)."""
    model, x = model.double(), x.double()
    loss_ref, pert_ref = naive_perturbed_losses(model, x, rho=RHO, perturbation=perturbation)
    t = sharpness_terms(model, x, rho=RHO, perturbation=perturbation, **kwargs)
    torch.testing.assert_close(t.loss, loss_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(t.perturbed_loss, pert_ref, rtol=1e-5, atol=0)
    diff, diff_ref = t.perturbed_loss - t.loss, pert_ref - loss_ref
    assert diff_ref.abs().min() > 1e-6  # the perturbation does something
    assert (diff - diff_ref).abs().max() <= 1e-5 * diff_ref.abs().max()
