"""SAM training (saal.sam): the training-side use of the same ascent step."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from saal.data.base import ArrayDataset
from saal.sam import SAM
from saal.training import TrainConfig, fit


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
