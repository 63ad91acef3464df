"""Models by name; every place that takes a name also takes your own ``nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from saal.errors import SaalError
from saal.models.base import Classifier, last_linear, logits_and_embedding
from saal.models.cnn import SmallCNN
from saal.models.detectors import DETECTOR_NAMES
from saal.models.mlp import MLP
from saal.models.resnet import ResNet18

MODEL_NAMES = ("mlp", "cnn", "resnet18", "pretrained-linear", "pretrained-mlp")
CLASSIFIER_NAMES: tuple[str, ...] = MODEL_NAMES
MODEL_NAMES = (*CLASSIFIER_NAMES, *DETECTOR_NAMES)  # type: ignore[assignment]


def build_model(
    name: str | nn.Module,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    task: str = "classification",
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Return a freshly initialised model for inputs of ``input_shape`` (C, H, W) or (D,).

    A given ``nn.Module`` is returned as it is. For ``task="detection"`` the name must be a detector
    (:data:`saal.models.detectors.DETECTOR_NAMES`; ``options`` go to
    :func:`saal.models.detectors.build_detector`), and ``num_classes`` counts object classes.
    ``pretrained-linear`` and ``pretrained-mlp`` are heads on the frozen pretrained backbone
    (:mod:`saal.models.frozen_backbone`; ``options``: ``image_size``, ``dropout``, ``hidden``): the head alone on
    feature vectors ``(D,)``, the head behind the backbone on images.

    Raises:
        SaalError: unknown name, a classifier for detection or a detector for classification, model options
            a model does not take, or an input shape the model cannot take.
    """
    if isinstance(name, nn.Module):
        return name
    if name in DETECTOR_NAMES or task == "detection":
        return _build_detector(name, num_classes, task, dict(options or {}))
    if name in ("pretrained-linear", "pretrained-mlp"):  # heads on the frozen pretrained backbone
        from saal.models.frozen_backbone import build_head_model  # pulls in timm only when asked for

        return build_head_model(name, input_shape, num_classes, options)
    if options:
        raise SaalError(f"model {name!r} takes no model options (got {', '.join(options)}); they are for detectors")
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


def _build_detector(name: str, num_classes: int, task: str, options: dict[str, Any]) -> nn.Module:
    """Return ``build_detector(name, num_classes, **options)``, refusing a task or option that does not fit.

    Raises:
        SaalError: ``name`` is not a detector, ``task`` is not detection, or an unknown option.
    """
    import inspect

    from saal.models.detectors import build_detector

    if name not in DETECTOR_NAMES:
        raise SaalError(
            f"model {name!r} is a classifier; a detection dataset needs a detector: one of {', '.join(DETECTOR_NAMES)}"
        )
    if task != "detection":
        raise SaalError(
            f"model {name!r} is a detector; use it with a detection dataset (voc:PATH or coco:PATH), or choose one "
            f"of {', '.join(CLASSIFIER_NAMES)}"
        )
    known = [p for p in inspect.signature(build_detector).parameters if p not in ("name", "num_classes")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SaalError(f"detector {name!r} has no option {unknown[0]!r}; its options are {', '.join(known)}")
    return build_detector(name, num_classes, **options)


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
