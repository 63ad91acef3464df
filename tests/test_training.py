import copy

import numpy as np
import pytest
import torch
from torch import nn

from saal.errors import SaalError
from saal.models import build_model
from saal.training import TrainConfig, augment_batch, evaluate, fit


def test_fit_learns_digits_and_is_reproducible(digits) -> None:
    idx = np.arange(300)
    labels = digits.train_targets[idx]
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("mlp", digits.input_shape, 10)
        before = evaluate(model, digits.test)
        fit(model, digits.train, idx, labels, TrainConfig(epochs=15, batch_size=32), torch.Generator().manual_seed(1))
        results.append((before, evaluate(model, digits.test), copy.deepcopy(model.state_dict())))
    (before, after, w1), (_, after2, w2) = results
    assert after > 0.85 > before
    assert after == after2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "sam"])
def test_every_optimizer_reduces_loss(digits, optimizer: str) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, 10)
    idx = np.arange(200)
    cfg = TrainConfig(optimizer=optimizer, lr=0.05 if optimizer != "adam" else 1e-3, epochs=1, batch_size=20)
    first = fit(model, digits.train, idx, digits.train_targets[idx], cfg, torch.Generator().manual_seed(0))
    cfg.epochs = 10
    later = fit(model, digits.train, idx, digits.train_targets[idx], cfg, torch.Generator().manual_seed(0))
    assert later.final_loss < first.final_loss
    assert not model.training


def test_warm_start_continues_optimizer_state(digits) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, 10)
    idx = np.arange(50)
    res = fit(model, digits.train, idx, digits.train_targets[idx], TrainConfig(epochs=1), torch.Generator())
    assert res.optimizer_state["state"], "Adam should have moment estimates after a step"
    fit(model, digits.train, idx, digits.train_targets[idx], TrainConfig(epochs=1), torch.Generator(),
        optimizer_state=res.optimizer_state)  # fmt: skip


def test_augment_batch_crops_and_flips_per_image() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    again = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    many = torch.stack([augment_batch(x[:1], torch.Generator().manual_seed(s))[0] for s in range(20)])
    assert len({tuple(m.flatten().tolist()) for m in many}) > 5


@pytest.mark.parametrize(
    "bad", [dict(optimizer="rmsprop"), dict(epochs=0), dict(batch_size=0), dict(lr=0.0), dict(weight_decay=-1.0)]
)
def test_bad_train_config(bad: dict) -> None:
    with pytest.raises(SaalError):
        TrainConfig(**bad)


def test_sam_with_zero_rho_is_plain_sgd() -> None:
    from saal.sam import SAM

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    b = copy.deepcopy(a)
    c = copy.deepcopy(a)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    sgd = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    sam0 = SAM(b.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    sam = SAM(c.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(5):
        sgd.zero_grad()
        loss_fn(a(x), y).backward()
        sgd.step()
        for model, opt in ((b, sam0), (c, sam)):
            opt.zero_grad()
            opt.step(lambda model=model: _backward(loss_fn(model(x), y)))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-7)
    assert any(not torch.allclose(pa, pc, atol=1e-4) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss
