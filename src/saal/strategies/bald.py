"""BALD with Monte-Carlo dropout (Houlsby et al. 2011; Gal, Islam & Ghahramani 2017)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from saal.batching import input_batches
from saal.errors import SaalError
from saal.inference import model_device
from saal.pool import Pool
from saal.seeding import derive_seed
from saal.strategies.base import ScoreStrategy


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """Return BALD's score from Monte-Carlo class probabilities.

    Args:
        probs: ``T x N x C``: ``T`` stochastic predictive distributions for ``N`` items.

    Returns:
        The ``N``-vector ``H[mean_t p_t] - mean_t H[p_t]`` (nats, ``0 log 0 = 0``), the mutual
        information between the label and the model parameters; clamped at 0 against round-off.
    """
    mean = probs.mean(0)
    entropy_of_mean = -torch.special.xlogy(mean, mean).sum(-1)
    mean_entropy = -torch.special.xlogy(probs, probs).sum(-1).mean(0)
    return (entropy_of_mean - mean_entropy).clamp_min(0.0)


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """Return every dropout module of ``model`` (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ...)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


@contextlib.contextmanager
def forked_torch_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run a block with torch's global generators (CPU and ``device``) seeded with ``seed``, then put
    them back as they were, so that nothing outside the block sees a different random stream."""
    devices = [] if device.type == "cpu" else [device.index if device.index is not None else 0]
    device_type = "cuda" if device.type == "cpu" else device.type
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.manual_seed(seed)
        yield


class BALD(ScoreStrategy):
    """BALD: the mutual information between the prediction and the weights, by MC dropout.

    Each batch of candidates goes through the model ``samples`` times with every dropout
    module in train mode and everything else in eval mode (BatchNorm keeps its running
    statistics). The score is :func:`mutual_information` of the ``samples x batch x C``
    probabilities; the largest are chosen. Dropout masks come from torch's generator seeded
    by ``rng`` (the global torch stream is left untouched), so the same generator gives the same
    choice. Which masks fall on which item depends on ``batch_size`` too: a different batch size
    gives a different (equally valid) Monte-Carlo estimate. Memory: ``samples x batch_size x C``.

    Args:
        samples: stochastic forward passes per item (``T``), at least 2.
        batch_size: pool items per forward pass.
        subset: score only a seeded random subset of the unlabelled pool.

    Raises:
        SaalError: (at selection) if the model has no dropout module.
    """

    name = "bald"

    def __init__(self, *, samples: int = 20, batch_size: int = 256, subset: int | None = None) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        if samples < 2:
            raise SaalError(f"bald needs samples >= 2 stochastic passes, got {samples}")
        self.samples = int(samples)

    def score(self, model: nn.Module, pool: Pool, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        dropouts = dropout_modules(model)
        if not dropouts:
            raise SaalError(
                f"bald needs MC dropout but {type(model).__name__} has no dropout layer; add an nn.Dropout "
                "(e.g. before the last linear layer) or use the built-in mlp / cnn models"
            )
        for m in dropouts:
            m.train()  # the base class puts everything back afterwards
        device = model_device(model)
        out = np.empty(len(candidates), dtype=np.float64)
        start = 0
        with forked_torch_rng(device, derive_seed(rng)), torch.no_grad():
            for _, x in input_batches(pool.dataset, candidates, self.batch_size):
                x = x.to(device)
                probs = torch.stack([torch.softmax(model(x).double(), dim=1) for _ in range(self.samples)])
                out[start : start + len(x)] = mutual_information(probs).cpu().numpy()
                start += len(x)
        return out

    def __repr__(self) -> str:
        return f"BALD(samples={self.samples}, batch_size={self.batch_size}, subset={self.subset})"
