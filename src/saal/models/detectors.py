"""Detectors by name: torchvision's detection models, and an offline default that learns on a CPU.

* ``fcos-lite0`` (the default): torchvision's FCOS head on a feature pyramid over the ImageNet-pretrained
  EfficientNet-Lite0 (:mod:`saal.models.pretrained`, no download). The backbone is frozen by default
  (``frozen=False`` fine-tunes it); while frozen its features are computed one image at a time and kept in the
  feature cache's in-process tier (:data:`saal.data.feature_cache.MEMORY_CACHE`), keyed by the weights and the
  exact content of the resized image, so a cached feature is the feature.
* torchvision's detectors: ``fcos-resnet50``, ``retinanet-resnet50``, ``retinanet-resnet50-v2``,
  ``fasterrcnn-resnet50``, ``fasterrcnn-resnet50-v2``, ``fasterrcnn-mobilenet-v3``,
  ``fasterrcnn-mobilenet-v3-320``, ``ssdlite320``, ``ssd300``; built without weights, or with ``weights``: a
  local state-dict file, or ``torchvision`` (the COCO weights in torchvision's cache, when the user has them;
  never downloaded). Every tensor whose name and shape fit is loaded (a different class count leaves the
  class layers new).

Detectors take a list of ``(3, H, W)`` images in [0, 1] and resize and normalise inside (``min_size`` /
``max_size``; SSD models use their fixed size).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saal.data.feature_cache import MEMORY_CACHE, content_digest, key_digest
from saal.errors import SaalError
from saal.extras import import_extra

DEFAULT_DETECTOR = "fcos-lite0"
MIN_SIZE = 320
MAX_SIZE = 640
FPN_CHANNELS = 64
# Convolutions in each branch of the default detector's FCOS head (torchvision's own default is 4). On BCCD, 20
# training images, 8 epochs, one CPU thread: 1 conv reached mAP@0.5 0.635 in 6.8 s, 2 convs 0.623 in 15.8 s,
# 4 convs 0.580 in 15.2 s (a loaded machine): on a CPU budget the lighter head learns faster.
HEAD_CONVS = 1
SCORE_THRESH = 0.05  # the default detector keeps detections from this score (mAP counts low-scoring boxes too)

# name -> (torchvision builder, COCO weights enum name)
_TORCHVISION: dict[str, tuple[str, str]] = {
    "fcos-resnet50": ("fcos_resnet50_fpn", "FCOS_ResNet50_FPN_Weights"),
    "retinanet-resnet50": ("retinanet_resnet50_fpn", "RetinaNet_ResNet50_FPN_Weights"),
    "retinanet-resnet50-v2": ("retinanet_resnet50_fpn_v2", "RetinaNet_ResNet50_FPN_V2_Weights"),
    "fasterrcnn-resnet50": ("fasterrcnn_resnet50_fpn", "FasterRCNN_ResNet50_FPN_Weights"),
    "fasterrcnn-resnet50-v2": ("fasterrcnn_resnet50_fpn_v2", "FasterRCNN_ResNet50_FPN_V2_Weights"),
    "fasterrcnn-mobilenet-v3": ("fasterrcnn_mobilenet_v3_large_fpn", "FasterRCNN_MobileNet_V3_Large_FPN_Weights"),
    "fasterrcnn-mobilenet-v3-320": (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights",
    ),
    "ssdlite320": ("ssdlite320_mobilenet_v3_large", "SSDLite320_MobileNet_V3_Large_Weights"),
    "ssd300": ("ssd300_vgg16", "SSD300_VGG16_Weights"),
}
DETECTOR_NAMES = (DEFAULT_DETECTOR, *_TORCHVISION)
_FEATURE = "object detection"


def is_detector_name(name: object) -> bool:
    """Return whether ``name`` is a registered detector."""
    return isinstance(name, str) and name in DETECTOR_NAMES


class Lite0FPN(nn.Module):
    """EfficientNet-Lite0 (strides 8, 16, 32) under a feature pyramid with two extra levels (P6, P7).

    A torchvision detection backbone: ``forward(images) -> OrderedDict`` of ``out_channels``-channel maps.
    The pretrained body runs one image at a time (so an image's features never depend on the others in its
    batch); while ``frozen`` it stays in eval mode, has no gradients and its features are cached by weights and
    image content in :data:`~saal.data.feature_cache.MEMORY_CACHE` (``use_cache``; shared by every frozen backbone
    with the same weights in this process, so the runs of a grid compute each image's features once).

    Args:
        weights: EfficientNet-Lite0 weights file (default: the packaged ImageNet weights).
        frozen: keep the pretrained body fixed.
        out_channels: channels of the pyramid.

    Raises:
        MissingExtra: timm or the weights package is not installed.
        SaalError: an unreadable weights file.
    """

    def __init__(
        self, weights: str | Path | None = None, frozen: bool = True, out_channels: int = FPN_CHANNELS
    ) -> None:
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

        from saal.models.pretrained import efficientnet_lite0_features, weights_fingerprint

        super().__init__()
        self.body = efficientnet_lite0_features(weights, out_indices=(2, 3, 4))
        info: Any = self.body.feature_info
        channels = list(info.channels())
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels))
        self.out_channels = out_channels
        self.frozen = bool(frozen)
        self.use_cache = True
        self.fingerprint = weights_fingerprint(weights)
        self.cache_key = key_digest({"backbone": "efficientnet_lite0 features (2, 3, 4)", "weights": self.fingerprint})
        if self.frozen:
            self.body.requires_grad_(False)
            self.body.eval()

    def train(self, mode: bool = True) -> Lite0FPN:
        """Set the train mode; a frozen body stays in eval mode. Returns the module."""
        super().train(mode)
        if self.frozen:
            self.body.eval()
        return self

    def body_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Return the body's three maps for one ``(1, 3, H, W)`` normalised image (cached while frozen)."""
        if not (self.frozen and self.use_cache):
            return list(self.body(image))

        def compute() -> list[torch.Tensor]:
            with torch.no_grad():
                return [f.detach() for f in self.body(image)]

        return MEMORY_CACHE.get_or_compute((self.cache_key, content_digest(image)), compute)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        per_image = [self.body_features(x[i : i + 1]) for i in range(len(x))]
        levels = [torch.cat([feats[j] for feats in per_image]) for j in range(len(per_image[0]))]
        result: OrderedDict[str, torch.Tensor] = self.fpn(OrderedDict((str(j), f) for j, f in enumerate(levels)))
        return result


def _fcos_lite0(
    num_classes: int, weights: str | None, frozen: bool, min_size: int, max_size: int, head_convs: int
) -> nn.Module:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.fcos import FCOSHead

    from saal.models.pretrained import MEAN, STD

    backbone = Lite0FPN(weights, frozen=frozen)
    head = FCOSHead(backbone.out_channels, 1, num_classes + 1, num_convs=head_convs)
    return FCOS(
        backbone,
        num_classes=num_classes + 1,
        head=head,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(MEAN),
        image_std=list(STD),
        score_thresh=SCORE_THRESH,
    )


def _torchvision_detector(name: str, num_classes: int, min_size: int, max_size: int) -> nn.Module:
    from torchvision.models import detection

    builder: Callable[..., nn.Module] = getattr(detection, _TORCHVISION[name][0])
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": num_classes + 1}
    if not name.startswith("ssd"):
        kwargs.update(min_size=min_size, max_size=max_size)
    return builder(**kwargs)


def torchvision_cache_file(name: str) -> Path:
    """Return where torchvision's cache keeps the COCO weights of detector ``name`` (the file may be absent)."""
    from torchvision.models import detection

    enum = getattr(detection, _TORCHVISION[name][1])
    url = enum.DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def load_matching(model: nn.Module, path: Path) -> tuple[int, int]:
    """Load every tensor of the state dict in ``path`` whose name and shape fit ``model``.

    Returns:
        ``(loaded, skipped)`` tensor counts.

    Raises:
        SaalError: the file is missing, unreadable, not a state dict, or fits no tensor of the model.
    """
    if not path.is_file():
        raise SaalError(f"weights file {path} does not exist; give the path of a detector's .pth state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign files raise pickle, zip or torch errors
        raise SaalError(
            f"cannot read weights file {path} ({type(error).__name__}); give a PyTorch state dict"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise SaalError(f"weights file {path} is not a state dict; give a detector's .pth state dict")
    own = model.state_dict()
    fit = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k in own and own[k].shape == v.shape}
    if not fit:
        raise SaalError(f"weights file {path} fits no tensor of this detector; give weights of the same architecture")
    model.load_state_dict(fit, strict=False)
    return len(fit), len(own) - len(fit)


def build_detector(
    name: str,
    num_classes: int,
    *,
    weights: str | None = None,
    frozen: bool = True,
    min_size: int = MIN_SIZE,
    max_size: int = MAX_SIZE,
    head_convs: int = HEAD_CONVS,
) -> nn.Module:
    """Return a detector of ``num_classes`` object classes (labels ``1 .. num_classes``; 0 is background).

    Args:
        name: one of :data:`DETECTOR_NAMES`.
        weights: for ``fcos-lite0`` an EfficientNet-Lite0 weights file (default: the packaged ImageNet
            weights); for torchvision's detectors a detector state-dict file, or ``torchvision`` for the COCO
            weights in torchvision's cache (default: no weights).
        frozen: ``fcos-lite0`` only: keep the pretrained backbone fixed (its features cached).
        min_size, max_size: the size images are resized to inside (not for SSD models).
        head_convs: ``fcos-lite0`` only: convolutions in each branch of its FCOS head (default 1).

    Returns:
        The detector, in eval mode.

    Raises:
        MissingExtra: ``fcos-lite0`` without timm or the weights package.
        SaalError: an unknown name, bad sizes, or weights that are missing, unreadable or do not fit.
    """
    if name not in DETECTOR_NAMES:
        raise SaalError(f"unknown detector {name!r}; choose one of {', '.join(DETECTOR_NAMES)}")
    if num_classes < 1:
        raise SaalError(f"a detector needs at least one object class, got {num_classes}")
    if not (isinstance(min_size, int) and isinstance(max_size, int) and 32 <= min_size <= max_size):
        raise SaalError(
            f"min_size and max_size must be integers with 32 <= min_size <= max_size, got {min_size}, {max_size}"
        )
    import_extra("torchvision.models.detection", "detection", _FEATURE)
    if name == DEFAULT_DETECTOR:
        if not (isinstance(head_convs, int) and head_convs >= 0):
            raise SaalError(f"head_convs must be an integer >= 0, got {head_convs!r}")
        return _fcos_lite0(num_classes, weights, frozen, min_size, max_size, head_convs).eval()
    model = _torchvision_detector(name, num_classes, min_size, max_size)
    if weights is not None:
        path = torchvision_cache_file(name) if weights == "torchvision" else Path(weights).expanduser()
        if weights == "torchvision" and not path.is_file():
            raise SaalError(
                f"torchvision's COCO weights for {name} are not in its cache ({path}); saal never downloads: "
                "put the file there or give --weights FILE"
            )
        load_matching(model, path)
    return model.eval()


# -- what strategies read from a detector -------------------------------------------------------
def check_detector(model: nn.Module) -> nn.Module:
    """Return ``model`` if it is a torchvision-style detector (``transform``, ``backbone``).

    Raises:
        SaalError: any other model.
    """
    if not (hasattr(model, "transform") and hasattr(model, "backbone")):
        raise SaalError(
            f"{type(model).__name__} is not a torchvision detector (no transform and backbone); "
            f"use one of {', '.join(DETECTOR_NAMES)}"
        )
    return model


def pooled_features(model: nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
    """Return each image's backbone (pyramid) maps, average-pooled and concatenated: ``(len(images), d)``.

    Images go through the backbone one at a time, so a feature never depends on the batch.

    Raises:
        SaalError: ``model`` is not a torchvision detector.
    """
    det: Any = check_detector(model)
    rows = []
    for image in images:
        batch, _ = det.transform([image])
        maps = det.backbone(batch.tensors)
        maps = maps.values() if isinstance(maps, dict) else [maps]
        rows.append(torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1))
    return torch.cat(rows)


def has_dense_head(model: nn.Module) -> bool:
    """Return whether ``model`` is an FCOS or RetinaNet detector (dense sigmoid class scores per location)."""
    from torchvision.models.detection import FCOS, RetinaNet

    return isinstance(model, (FCOS, RetinaNet))


def detections_with_class_scores(model: nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Return the eval-mode detections of an FCOS or RetinaNet detector, each with its class scores.

    The same boxes, scores and labels as ``model(images)`` in eval mode, plus ``class_scores``: for each box,
    the sigmoid score of every class at the location that produced it (``(N, num_classes)``, background
    column included and zero). Images run one at a time.

    Raises:
        SaalError: ``model`` is not an FCOS or RetinaNet detector.
    """
    from torchvision.models.detection import FCOS
    from torchvision.ops import boxes as box_ops

    if not has_dense_head(model):
        raise SaalError(
            f"per-box class scores need an FCOS or RetinaNet detector, not {type(model).__name__}; "
            "use fcos-lite0, fcos-resnet50 or retinanet-resnet50"
        )
    det: Any = model
    out = []
    for image in images:
        original = [(int(image.shape[-2]), int(image.shape[-1]))]
        batch, _ = det.transform([image])
        feats = det.backbone(batch.tensors)
        feats = list(feats.values()) if isinstance(feats, dict) else [feats]
        head = det.head(feats)
        anchors = det.anchor_generator(batch, feats)[0]
        per_level = [f.size(2) * f.size(3) for f in feats]
        hw = sum(per_level)
        counts = [n * (anchors.shape[0] // hw) for n in per_level]
        logits = head["cls_logits"][0].split(counts)
        regression = head["bbox_regression"][0].split(counts)
        ctr = head["bbox_ctrness"][0].split(counts) if isinstance(det, FCOS) else [None] * len(counts)
        level_anchors = anchors.split(counts)
        boxes_all, scores_all, labels_all, probs_all = [], [], [], []
        for lg, rg, ct, an in zip(logits, regression, ctr, level_anchors, strict=True):
            num_classes = lg.shape[-1]
            probs = torch.sigmoid(lg)
            scores = torch.sqrt(probs * torch.sigmoid(ct)).flatten() if ct is not None else probs.flatten()
            keep = scores > det.score_thresh
            scores = scores[keep]
            idxs = torch.where(keep)[0]
            scores, order = scores.topk(min(int(idxs.numel()), det.topk_candidates))
            idxs = idxs[order]
            anchor_idx = torch.div(idxs, num_classes, rounding_mode="floor")
            labels = idxs % num_classes
            if isinstance(det, FCOS):
                boxes = det.box_coder.decode(rg[anchor_idx], an[anchor_idx])
            else:
                boxes = det.box_coder.decode_single(rg[anchor_idx], an[anchor_idx])
            boxes = box_ops.clip_boxes_to_image(boxes, batch.image_sizes[0])
            boxes_all.append(boxes)
            scores_all.append(scores)
            labels_all.append(labels)
            probs_all.append(probs[anchor_idx])
        boxes, scores = torch.cat(boxes_all), torch.cat(scores_all)
        labels, probs = torch.cat(labels_all), torch.cat(probs_all)
        keep = box_ops.batched_nms(boxes, scores, labels, det.nms_thresh)[: det.detections_per_img]
        found = [{"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}]
        found = det.transform.postprocess(found, batch.image_sizes, original)
        found[0]["class_scores"] = probs[keep]
        out.append(found[0])
    return out
