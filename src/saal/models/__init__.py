"""Models by name; every place that takes a name also takes your own ``nn.Module``."""

from __future__ import annotations

from torch import nn

from saal.errors import SaalError
from saal.models.base import Classifier, last_linear, logits_and_embedding
from saal.models.cnn import SmallCNN
from saal.models.mlp import MLP
from saal.models.resnet import ResNet18

MODEL_NAMES = ("mlp", "cnn", "resnet18")


def build_model(name: str | nn.Module, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Return a freshly initialised model for inputs of ``input_shape`` (C, H, W) or (D,).

    A given ``nn.Module`` is returned as it is.

    Raises:
        SaalError: unknown name, or an input shape the model cannot take.
    """
    if isinstance(name, nn.Module):
        return name
    if name == "mlp":
        return MLP(input_shape, num_classes)
    if name in ("cnn", "resnet18"):
        if len(input_shape) != 3:
            raise SaalError(f"model {name!r} needs image inputs (C, H, W), got shape {input_shape}; use 'mlp'")
        c, h, w = input_shape
        if h != w or h < 4:
            raise SaalError(f"model {name!r} needs square images of side >= 4, got {h}x{w}")
        return SmallCNN(c, num_classes, h) if name == "cnn" else ResNet18(c, num_classes)
    raise SaalError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} or pass an nn.Module")


__all__ = [
    "MLP",
    "MODEL_NAMES",
    "Classifier",
    "ResNet18",
    "SmallCNN",
    "build_model",
    "last_linear",
    "logits_and_embedding",
]
