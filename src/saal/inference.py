"""Running a model over a pool without changing it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from saal.batching import input_batches


def model_device(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, and on exit restore every module's train/eval mode, every
    parameter's ``requires_grad`` and ``.grad``, and every buffer (BatchNorm statistics)."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for p, r, g in zip(params, requires, grads, strict=True):
                p.requires_grad_(r)
                p.grad = g
            for b, saved in buffers:
                b.copy_(saved)


def predict_batches(
    model: nn.Module, dataset: Dataset, indices: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(dataset indices, logits)`` per batch, with gradients off.

    The caller decides the mode (use :func:`preserved` for eval mode).
    """
    device = model_device(model)
    with torch.no_grad():
        for idx, x in input_batches(dataset, indices, batch_size):
            yield idx, model(x.to(device))


def predict_probabilities(model: nn.Module, dataset: Dataset, indices: np.ndarray, batch_size: int) -> torch.Tensor:
    """Return softmax probabilities (``len(indices) x C``, on CPU) in eval mode."""
    with preserved(model):
        out = [torch.softmax(logits, 1).cpu() for _, logits in predict_batches(model, dataset, indices, batch_size)]
    return torch.cat(out) if out else torch.empty(0)
