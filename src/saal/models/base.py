"""The shape every built-in model has, and how to get embeddings out of any model."""

from __future__ import annotations

import torch
from torch import nn

from saal.errors import SaalError


class Classifier(nn.Module):
    """A classifier split into a feature extractor and a last linear layer.

    ``forward(x) = head(embed(x))``. Strategies that need the penultimate features
    (core-set, BADGE, last-layer SAAL) use :meth:`embed` and :attr:`head`;
    ``feature_layers`` names the intermediate modules whose outputs a loss-prediction module
    (LL4AL) reads.
    """

    head: nn.Linear
    feature_layers: tuple[str, ...] = ()

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def last_linear(model: nn.Module) -> nn.Linear:
    """Return the model's classification layer: ``model.head`` for a :class:`Classifier`,
    else the last ``nn.Linear`` registered in the module tree.

    Raises:
        SaalError: if the model has no ``nn.Linear`` layer.
    """
    if isinstance(model, Classifier):
        return model.head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SaalError(
            f"{type(model).__name__} has no nn.Linear layer; embedding-based strategies need the model to end "
            "in an nn.Linear classifier (or subclass saal.models.Classifier)"
        )
    return linears[-1]


def logits_and_embedding(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(logits, penultimate features)`` for a batch, in one forward pass.

    For a :class:`Classifier` the features are ``embed(x)``; for any other module, the input
    of its last ``nn.Linear`` (captured by a forward hook).
    """
    if isinstance(model, Classifier):
        h = model.embed(x)
        return model.head(h), h
    captured: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, captured[-1].flatten(1)
