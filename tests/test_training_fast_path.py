"""The device-friendly training path: batched augmentation and device-resident labelled sets train exactly as
the per-image, batch-by-batch path did."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saal.data import DatasetBundle
from saal.models import build_model
from saal.tasks import Classification
from saal.training import TrainConfig, augment_batch, evaluation_batch_size, fit


def _augment_per_image(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The former per-image loop: the definition the batched gather must equal."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@pytest.mark.parametrize("shape", [(16, 3, 8, 8), (5, 1, 6, 10)])
def test_batched_augmentation_equals_the_per_image_loop(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    got = augment_batch(x, torch.Generator().manual_seed(7))
    want = _augment_per_image(x, torch.Generator().manual_seed(7))
    assert torch.equal(got, want) and got.is_contiguous()
    g_new, g_old = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    augment_batch(x, g_new), _augment_per_image(x, g_old)
    assert torch.equal(g_new.get_state(), g_old.get_state())  # the same draws: later training is unchanged


@pytest.mark.parametrize("augment", [False, True])
def test_resident_training_equals_batch_by_batch_training(digits: DatasetBundle, augment: bool) -> None:
    idx = np.arange(0, 300, 3)
    labels = digits.train_targets[idx]
    cfg = TrainConfig(epochs=3, batch_size=10, augment=augment)
    results = []
    for resident in (True, False):
        torch.manual_seed(0)
        model = build_model("cnn", digits.input_shape, digits.num_classes)
        torch.manual_seed(1)  # dropout draws from the global generator
        out = fit(model, digits.train, idx, labels, cfg, torch.Generator().manual_seed(2), resident=resident)
        results.append((model.state_dict(), out.final_loss))
    (a, loss_a), (b, loss_b) = results
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loss_a == loss_b and np.isfinite(loss_a)


def test_evaluation_batches_grow_on_an_accelerator_only() -> None:
    task = Classification(10)
    assert evaluation_batch_size(256, torch.device("cpu"), (3, 32, 32), task) == 256
    assert evaluation_batch_size(256, torch.device("cuda"), (3, 32, 32), task) == 2048
    assert evaluation_batch_size(256, torch.device("cuda"), (3, 224, 224), task) == 256  # large images: as given
    assert evaluation_batch_size(256, torch.device("cuda"), (1280,), task) == 2048 * 3 * 32 * 32 // 1280
