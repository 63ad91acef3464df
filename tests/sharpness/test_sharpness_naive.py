"""The definition itself (saal.sharpness.naive): checked against a hand computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from saal.sharpness import naive_perturbed_losses


def test_naive_asam_linear_matches_hand_computed_formula() -> None:
    """One Linear layer: g = ((p - onehot) a^T, p - onehot), eps = rho T^2 g / ||T g||, T = |w|."""
    torch.manual_seed(11)
    lin = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    loss, got = naive_perturbed_losses(lin, x, rho=0.3, perturbation="asam")
    w, b = lin.weight.detach(), lin.bias.detach()
    for i in range(5):
        z = w @ x[i] + b
        y = torch.tensor([int(z.argmax())])
        d = torch.softmax(z, 0) - F.one_hot(y[0], 4).double()
        gw, gb = torch.outer(d, x[i]), d
        norm = torch.sqrt(((w.abs() * gw) ** 2).sum() + ((b.abs() * gb) ** 2).sum())
        w2 = w + 0.3 * w * w * gw / (norm + 1e-12)
        b2 = b + 0.3 * b * b * gb / (norm + 1e-12)
        assert abs(float(loss[i]) - float(F.cross_entropy(z[None], y))) < 1e-13
        assert abs(float(got[i]) - float(F.cross_entropy((w2 @ x[i] + b2)[None], y))) < 1e-13


def test_naive_on_an_empty_batch_returns_empty_tensors() -> None:
    loss, perturbed = naive_perturbed_losses(nn.Linear(3, 2), torch.empty(0, 3))
    assert loss.shape == perturbed.shape == (0,)
