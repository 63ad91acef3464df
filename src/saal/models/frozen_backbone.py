"""A trainable head on the frozen, offline ImageNet-pretrained backbone, with the backbone's features cached.

Practitioners fine-tune pretrained networks; the cheapest such model, and the one whose rounds cost least, is a
*frozen* backbone with a small trainable head. Because the backbone never changes, its features of a dataset are
computed once (:func:`feature_bundle`), stored on disk (:mod:`saal.data.feature_cache`, keyed by the weights'
content hash, a fingerprint of the data and the backbone's input size) and every round then trains and scores the
head alone, on those feature vectors.

Two registry models are built this way (``saal run --model pretrained-mlp --model-option image_size=96``):

* ``pretrained-linear``: dropout -> ``Linear(1280, classes)`` (a linear probe);
* ``pretrained-mlp``: ``Linear(1280, hidden)`` -> ReLU -> dropout -> ``Linear(hidden, classes)``.

Their options (``run.model_options``): ``image_size``, the side images are resized to before the backbone (default
96: on CIFAR-10 a logistic-regression probe trained on 2,000 train items reached 42.6 % on 2,000 test items at 32 px,
59.1 % at 64, 67.5 % at 96, for 1.4, 3.0 and 9.0 ms per image on one CPU thread, decoding included); ``dropout``
(default 0.25; BALD's MC dropout needs it above 0); and, for the MLP, ``hidden`` (default 256).

Every strategy works on the head as on any :class:`~saal.models.base.Classifier`: uncertainty from its logits,
core-set and BADGE from its embeddings, LL4AL from its ``body``, VAAL on the feature vectors. SAAL perturbs the
model's *trainable* parameters, i.e. the head's: the backbone is frozen, so its weights are constants of the
loss and no perturbation of them is considered. :class:`FrozenBackboneClassifier` is the same head run on images
(the backbone held outside the module tree, so its state dict is the head's), for predicting on new images; its
SAAL scores equal the head's on the cached features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from saal.core.progress import Progress
from saal.core.scan import batches
from saal.data.base import ArrayDataset, DatasetBundle
from saal.data.feature_cache import cached, dataset_fingerprint
from saal.errors import SaalError
from saal.models.base import Classifier
from saal.models.pretrained import BACKBONE_NAME, FEATURE_DIM, efficientnet_lite0, normalize, weights_fingerprint
from saal.tasks.classification import dataset_targets

BACKBONE_MODELS = ("pretrained-linear", "pretrained-mlp")
DEFAULT_IMAGE_SIZE = 96
DEFAULT_HIDDEN = 256
DEFAULT_DROPOUT = 0.25
_OPTIONS = {"pretrained-linear": ("image_size", "dropout"), "pretrained-mlp": ("image_size", "dropout", "hidden")}


@dataclass
class HeadOptions:
    """The checked options of a frozen-backbone model.

    Attributes:
        image_size: the side images are resized to before the backbone.
        hidden: the MLP's hidden width (None: a linear head).
        dropout: dropout before the last layer.
    """

    image_size: int = DEFAULT_IMAGE_SIZE
    hidden: int | None = None
    dropout: float = DEFAULT_DROPOUT


def head_options(name: str, options: Mapping[str, Any] | None = None) -> HeadOptions:
    """Return the checked options of the frozen-backbone model ``name``.

    Raises:
        SaalError: an unknown model or option, or a bad value (one line naming it).
    """
    if name not in _OPTIONS:
        raise SaalError(f"{name!r} is not a frozen-backbone model; choose one of {', '.join(BACKBONE_MODELS)}")
    given = dict(options or {})
    unknown = sorted(set(given) - set(_OPTIONS[name]))
    if unknown:
        raise SaalError(f"model {name!r} has no option {unknown[0]!r}; its options are {', '.join(_OPTIONS[name])}")
    size = given.get("image_size", DEFAULT_IMAGE_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 1024:
        raise SaalError(f"model {name!r}: image_size must be an integer in 16..1024, got {size!r}")
    dropout = given.get("dropout", DEFAULT_DROPOUT)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise SaalError(f"model {name!r}: dropout must be a number in [0, 1), got {dropout!r}")
    hidden: int | None = None
    if name == "pretrained-mlp":
        hidden = given.get("hidden", DEFAULT_HIDDEN)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise SaalError(f"model {name!r}: hidden must be a positive integer, got {hidden!r}")
    return HeadOptions(image_size=size, hidden=hidden, dropout=float(dropout))


class FeatureHead(Classifier):
    """The trainable head on backbone features: ``dropout -> Linear`` or ``Linear -> ReLU -> dropout -> Linear``.

    Args:
        in_features: the feature width (1280 for EfficientNet-Lite0).
        num_classes: output classes.
        hidden: the hidden width of an MLP head; None for a linear head.
        dropout: dropout before the last layer (MC dropout for BALD).
    """

    feature_layers = ("body",)

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.25) -> None:
        super().__init__()
        if hidden is None:
            self.body: nn.Module = nn.Dropout(dropout)
            width = in_features
        else:
            self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
            width = hidden
        self.head = nn.Linear(width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))


class BackboneFeatures(nn.Module):
    """The frozen backbone as a feature extractor for a dataset's normalised inputs.

    Undoes the dataset's normalisation (``mean``, ``std``) to get pixels in [0, 1], repeats a grey channel to
    RGB, resizes (bilinear) to ``image_size`` and returns the backbone's pooled 1280-d embedding. It has no
    trainable parameter and stays in eval mode.

    Args:
        image_size: the side the backbone sees.
        mean, std: the per-channel normalisation of the dataset's inputs (empty: inputs already in [0, 1]).
        weights: a weights file (default the packaged ImageNet weights).

    Raises:
        MissingExtra: ``saal[pretrained]`` is not installed.
        SaalError: a bad weights file.
    """

    def __init__(
        self,
        image_size: int = DEFAULT_IMAGE_SIZE,
        mean: tuple[float, ...] = (),
        std: tuple[float, ...] = (),
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.net = efficientnet_lite0(weights)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean or (0.0,), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std or (1.0,), dtype=torch.float32).view(1, -1, 1, 1))
        self.eval()

    def train(self, mode: bool = True) -> BackboneFeatures:
        """Stay in eval mode: the backbone is frozen (BatchNorm keeps its ImageNet statistics)."""
        del mode
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise SaalError(f"the pretrained backbone needs 1- or 3-channel images (N, C, H, W), got {tuple(x.shape)}")
        pixels = (x * self.get_buffer("std") + self.get_buffer("mean")).clamp(0.0, 1.0)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(
                pixels, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        net: Any = self.net  # timm's EfficientNet: forward_features, then the pooled pre-logits embedding
        with torch.no_grad():
            features: torch.Tensor = net.forward_head(net.forward_features(normalize(pixels)), pre_logits=True)
        return features


class FrozenBackboneClassifier(FeatureHead):
    """A :class:`FeatureHead` run on images through a frozen :class:`BackboneFeatures`.

    The backbone is held outside the module tree: ``state_dict()`` and ``parameters()`` are the head's
    alone (a head trained on cached features loads into it as it is), while ``.to(device)`` moves both.
    """

    def __init__(self, backbone: BackboneFeatures, num_classes: int, hidden: int | None = None, dropout: float = 0.25):
        super().__init__(FEATURE_DIM, num_classes, hidden, dropout)
        self.__dict__["backbone"] = backbone  # not a submodule: frozen, not saved, not perturbed

    @property
    def frozen(self) -> BackboneFeatures:
        """The frozen backbone."""
        backbone: BackboneFeatures = self.__dict__["backbone"]
        return backbone

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FrozenBackboneClassifier:
        self.frozen._apply(fn)
        super()._apply(fn, recurse)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return super().embed(self.frozen(x))


@dataclass
class FeatureBundle(DatasetBundle):
    """A dataset turned into backbone features: ``train`` and ``test`` are in-memory ``N x 1280`` tensors.

    Attributes:
        source: the name of the image dataset the features were computed from.
        backbone_image_size: the side the backbone saw.
        cache_file: where the features are cached.
        cache_hit: whether they were read from the cache (False: computed now).
    """

    source: str = ""
    backbone_image_size: int = 0
    cache_file: str = ""
    cache_hit: bool = False


def extract_features(
    extractor: nn.Module, dataset: Dataset[Any], batch_size: int = 256, desc: str = "features"
) -> torch.Tensor:
    """Return ``extractor``'s features of every item of ``dataset``, in order (float32, on the CPU).

    Items are read ``batch_size`` at a time (never the whole dataset at once), with progress named ``desc``
    (:mod:`saal.core.progress`).
    """
    n = len(dataset)  # type: ignore[arg-type]
    device = next(extractor.buffers()).device
    out: torch.Tensor | None = None
    with Progress(n, desc, "img") as bar:
        for batch in batches(dataset, np.arange(n), batch_size):
            with torch.inference_mode():
                f = extractor(torch.as_tensor(batch.inputs).to(device, torch.float32)).float().cpu()
            if out is None:
                out = torch.empty((n, f.shape[1]), dtype=torch.float32)
            out[batch.indices[0] : batch.indices[0] + len(batch)] = f
            bar.update(len(batch))
    return out if out is not None else torch.empty(0, FEATURE_DIM)


def feature_bundle(
    bundle: DatasetBundle,
    image_size: int = DEFAULT_IMAGE_SIZE,
    *,
    cache_dir: str | Path | None = None,
    weights: str | Path | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> FeatureBundle:
    """Return ``bundle`` with every image replaced by the frozen backbone's feature vector, from the disk cache.

    The features are computed once per (weights, data, ``image_size``) and stored in ``cache_dir`` (default
    ``$SAAL_FEATURE_CACHE``, else ``features/`` under the data folder); a stale cache file is computed again.

    Returns:
        A :class:`FeatureBundle` of ``ArrayDataset`` s of ``N x 1280`` float32 features (``input_shape`` is
        ``(1280,)``), the same targets and classes. A :class:`FeatureBundle` is returned as it is.

    Raises:
        SaalError: flat (non-image) inputs, a bad ``image_size``, a bad weights file or an unusable cache folder.
        MissingExtra: ``saal[pretrained]`` is not installed.
    """
    if isinstance(bundle, FeatureBundle):
        return bundle
    if bundle.image_size == 0 or bundle.channels not in (1, 3):
        raise SaalError(
            f"the pretrained backbone needs 1- or 3-channel images; {bundle.name} has inputs of shape "
            f"{bundle.input_shape}"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 16 <= image_size <= 1024:
        raise SaalError(f"image_size must be an integer in 16..1024, got {image_size!r}")
    key = {
        "backbone": BACKBONE_NAME,
        "weights": weights_fingerprint(weights),
        "image_size": image_size,
        "inputs": [bundle.channels, bundle.image_size, list(bundle.mean), list(bundle.std)],
        "train": dataset_fingerprint(bundle.train),
        "test": dataset_fingerprint(bundle.test),
    }

    def compute() -> dict[str, torch.Tensor]:
        extractor = BackboneFeatures(image_size, bundle.mean, bundle.std, weights).to(device)
        return {
            "train": extract_features(extractor, bundle.train, batch_size, "pretrained features (train)"),
            "test": extract_features(extractor, bundle.test, batch_size, "pretrained features (test)"),
        }

    tensors, path, hit = cached(key, compute, cache_dir, prefix=f"{BACKBONE_NAME}-{image_size}px")
    train_targets = np.asarray(bundle.train_targets, dtype=np.int64)
    test_targets = np.asarray(dataset_targets(bundle.test), dtype=np.int64)
    for split, t, n in (("train", tensors["train"], len(train_targets)), ("test", tensors["test"], len(test_targets))):
        if t.shape != (n, FEATURE_DIM):
            raise SaalError(f"feature cache {path} holds {tuple(t.shape)} {split} features for {n} items; delete it")
    return FeatureBundle(
        name=bundle.name,
        train=ArrayDataset(tensors["train"], train_targets),
        test=ArrayDataset(tensors["test"], test_targets),
        train_targets=train_targets,
        classes=list(bundle.classes),
        channels=FEATURE_DIM,
        image_size=0,
        source=bundle.name,
        backbone_image_size=image_size,
        cache_file=str(Path(path)),
        cache_hit=hit,
    )


def bundle_for_model(
    bundle: DatasetBundle,
    model: str | nn.Module,
    options: Mapping[str, Any] | None = None,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> DatasetBundle:
    """Return the data the model ``model`` is trained on: cached backbone features for a frozen-backbone model
    name, ``bundle`` itself for any other model.

    Raises:
        SaalError: bad model options (see :func:`head_options`), or inputs the backbone cannot take.
    """
    if not isinstance(model, str) or model not in BACKBONE_MODELS:
        return bundle
    opts = head_options(model, options)
    return feature_bundle(bundle, opts.image_size, cache_dir=cache_dir, device=device)


def build_head_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, options: Mapping[str, Any] | None = None
) -> nn.Module:
    """Return the frozen-backbone model ``name``: a :class:`FeatureHead` for feature inputs ``(D,)``, a
    :class:`FrozenBackboneClassifier` for images ``(C, H, W)`` (normalised with mean 0, std 1).

    Raises:
        SaalError: bad options or input shape.
        MissingExtra: images given and ``saal[pretrained]`` is not installed.
    """
    opts = head_options(name, options)
    if len(input_shape) == 1:
        return FeatureHead(int(input_shape[0]), num_classes, opts.hidden, opts.dropout)
    if len(input_shape) == 3 and input_shape[0] in (1, 3):
        return FrozenBackboneClassifier(BackboneFeatures(opts.image_size), num_classes, opts.hidden, opts.dropout)
    raise SaalError(f"model {name!r} needs feature vectors (D,) or 1- or 3-channel images, got shape {input_shape}")


__all__ = [
    "BACKBONE_MODELS",
    "BackboneFeatures",
    "FeatureBundle",
    "FeatureHead",
    "FrozenBackboneClassifier",
    "HeadOptions",
    "build_head_model",
    "bundle_for_model",
    "extract_features",
    "feature_bundle",
    "head_options",
]
