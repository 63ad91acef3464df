"""Where a model lives, and running it without leaving a trace."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


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
