"""SAAL's per-image perturbed loss on a torchvision detector, and its naive reference.

For an image ``x`` the detector (eval mode) gives its detections; those scoring at least the threshold, with
width and height >= 1 px, are the pseudo targets ``yhat``. The loss ``l(x, yhat; w)`` is the detector's own
training loss (the sum of its loss dict) on that image alone, with every BatchNorm in eval mode and torch's
generator seeded to a constant (:func:`saal.tasks.detection.image_loss`). Then one ascent step over the
trainable parameters, from that image's gradient ``g``:

* SAM:  ``eps = rho * g / ||g||``
* ASAM: ``eps = rho * T^2 g / ||T g||`` with ``T = |w|`` (the norm over all trainable parameters)

and the perturbed loss ``l(x, yhat; w + eps)``. Weights are restored from a saved copy (bit-exact), never by
subtracting ``eps``.

An image with no confident detection has empty pseudo targets: its loss is the detector's loss for "nothing
here" (for FCOS and RetinaNet a background-only classification loss, large under a model that is unsure; for
SSD zero). No NaN arises: torchvision's losses divide by at least one foreground.

Every image is scored alone, so its score never depends on the others in a batch; a frozen backbone's
features come from the detector's own cache (:class:`saal.models.detectors.Lite0FPN`), which holds the exact
features. :func:`naive_detection_terms` is the definition with a deep copy of the model per image and no
cache; the tests show the two agree.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from saal.core.model_state import model_device, preserved
from saal.core.scan import Batch, scan
from saal.errors import SaalError
from saal.models.detectors import Lite0FPN
from saal.sharpness.engine import NORM_EPS, PERTURBATIONS, check_option, check_rho
from saal.tasks.detection import Detection, Target, confident, fixed_randomness, image_loss, loss_mode, sum_losses


@dataclass
class ImageTerms:
    """One image's SAAL terms: loss and perturbed loss under its pseudo targets, ``||T g||``, the targets."""

    loss: float
    perturbed_loss: float
    grad_norm: float
    pseudo: Target


@dataclass
class DetectionSharpness:
    """Per-image SAAL terms over a pool's candidates (float64 arrays in ``indices`` order) and pseudo targets."""

    indices: np.ndarray
    loss: np.ndarray
    perturbed_loss: np.ndarray
    grad_norm: np.ndarray
    pseudo: list[Target]

    def score(self, kind: str = "max") -> np.ndarray:
        """Return the ``"max"`` (perturbed loss), ``"diff"`` (perturbed minus loss) or ``"loss"`` score.

        Raises:
            SaalError: any other ``kind``.
        """
        if kind == "max":
            return self.perturbed_loss.copy()
        if kind == "diff":
            return self.perturbed_loss - self.loss
        if kind == "loss":
            return self.loss.copy()
        raise SaalError(f"score must be one of max, diff, loss; got {kind!r}")


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters that are trained (``requires_grad``): the ones SAAL perturbs."""
    return [p for p in model.parameters() if p.requires_grad]


def model_dtype(model: nn.Module) -> torch.dtype:
    """Return the dtype of the model's first floating-point parameter (float32 without any)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def pseudo_targets(model: nn.Module, image: torch.Tensor, threshold: float) -> Target:
    """Return one image's pseudo targets: its eval-mode detections scoring >= ``threshold`` with sides >= 1 px."""
    model.eval()
    with torch.no_grad():
        return confident(model([image])[0], threshold)


def ascent_step(
    params: list[nn.Parameter], grads: list[torch.Tensor], rho: float, asam: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Return one ascent step ``eps`` per parameter and ``||T g||`` (ASAM: ``T = |w|``; SAM: ``T = 1``)."""
    total = torch.zeros((), dtype=grads[0].dtype if grads else torch.float64, device=grads[0].device if grads else None)
    for p, g in zip(params, grads, strict=True):
        total = total + (((p * p) if asam else 1.0) * g * g).sum()
    norm = torch.sqrt(total)
    scale = rho / (norm + NORM_EPS)
    return [scale * ((p * p) if asam else 1.0) * g for p, g in zip(params, grads, strict=True)], norm


def image_terms(
    model: nn.Module, image: torch.Tensor, *, rho: float, asam: bool, threshold: float, perturb: bool = True
) -> ImageTerms:
    """Return one image's SAAL terms; ``perturb=False`` gives the unperturbed loss alone (no gradient).

    The model's weights are restored bit-exactly; its modes are left in loss mode (the caller restores them).
    """
    pseudo = pseudo_targets(model, image, threshold)
    loss_mode(model)
    params = trainable(model)
    if not perturb or not params:
        with torch.no_grad():
            loss = float(image_loss(model, image, pseudo))
        return ImageTerms(loss, loss, 0.0, pseudo)
    with torch.enable_grad():
        loss_t = image_loss(model, image, pseudo)
        raw = torch.autograd.grad(loss_t, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw, strict=True)]
    with torch.no_grad():
        eps, norm = ascent_step(params, grads, rho, asam)
        saved = [p.detach().clone() for p in params]
        try:
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
            perturbed = float(image_loss(model, image, pseudo))
        finally:
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    return ImageTerms(float(loss_t.detach()), perturbed, float(norm), pseudo)


def _dense_pass(det: Any, image: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor], list[torch.Tensor], list[int]]:
    """Return one image's ``(resized batch, head outputs, anchors, locations per level)`` through an FCOS or
    RetinaNet detector's own modules."""
    batch, _ = det.transform([image])
    feats = det.backbone(batch.tensors)
    feats = list(feats.values()) if isinstance(feats, dict) else [feats]
    head = det.head(feats)
    return batch, head, det.anchor_generator(batch, feats), [f.size(2) * f.size(3) for f in feats]


def _dense_loss(det: Any, targets: list[Target], head: dict[str, torch.Tensor], anchors: Any, levels: list[int]) -> Any:
    from torchvision.models.detection import FCOS

    if isinstance(det, FCOS):
        return det.compute_loss(targets, head, anchors, levels)
    return det.compute_loss(targets, head, anchors)


def fused_image_terms(model: nn.Module, image: torch.Tensor, *, rho: float, asam: bool, threshold: float) -> ImageTerms:
    """:func:`image_terms` for FCOS and RetinaNet detectors in two passes instead of three: the pseudo targets
    are the detections of the same head outputs that the loss at ``w`` is taken from (the head computes the
    same outputs in eval and train mode once BatchNorm is in eval mode), so the eval forward is not repeated.
    The same values as :func:`image_terms`; the weights are restored bit-exactly."""
    from torchvision.models.detection.transform import resize_boxes

    det: Any = model
    loss_mode(model)
    params = trainable(model)
    original = (int(image.shape[-2]), int(image.shape[-1]))
    with torch.enable_grad(), fixed_randomness():
        batch, head, anchors, levels = _dense_pass(det, image)
        with torch.no_grad():
            per = head["cls_logits"].size(1) // sum(levels)
            counts = [n * per for n in levels]
            split = {k: list(v.detach().split(counts, dim=1)) for k, v in head.items()}
            found = det.postprocess_detections(split, [list(a.split(counts)) for a in anchors], batch.image_sizes)
            det.transform.eval()  # in train mode it would leave the boxes in the resized image's coordinates
            found = det.transform.postprocess(found, batch.image_sizes, [original])
            det.transform.train()
            pseudo = confident(found[0], threshold)
        targets = [{"boxes": resize_boxes(pseudo["boxes"], original, batch.image_sizes[0]), "labels": pseudo["labels"]}]
        loss_t = sum_losses(_dense_loss(det, targets, head, anchors, levels))
        raw = torch.autograd.grad(loss_t, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw, strict=True)]
    with torch.no_grad():
        eps, norm = ascent_step(params, grads, rho, asam)
        saved = [p.detach().clone() for p in params]
        try:
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
            with fixed_randomness():
                batch, head, anchors, levels = _dense_pass(det, image)
                perturbed = float(sum_losses(_dense_loss(det, targets, head, anchors, levels)))
        finally:
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    return ImageTerms(float(loss_t.detach()), perturbed, float(norm), pseudo)


def detection_terms(
    model: nn.Module,
    images: list[torch.Tensor],
    *,
    rho: float = 0.05,
    perturbation: str = "asam",
    score_threshold: float = 0.5,
    perturb: bool = True,
    fused: bool | None = None,
) -> list[ImageTerms]:
    """Return each image's SAAL terms (the model left exactly as found: weights, modes, gradients, buffers).

    Args:
        fused: score FCOS and RetinaNet detectors with :func:`fused_image_terms` (None: whenever they are one
            and there are trainable parameters; the values are the same).

    Raises:
        SaalError: a bad option value.
    """
    from saal.models.detectors import has_dense_head

    rho = check_rho(rho)
    asam = check_option("perturbation", perturbation, PERTURBATIONS) == "asam"
    threshold = check_threshold(score_threshold)
    device, dtype = model_device(model), model_dtype(model)
    if fused is None:
        fused = has_dense_head(model) and bool(trainable(model))
    with preserved(model):
        if fused and perturb:
            return [
                fused_image_terms(model, x.to(device, dtype), rho=rho, asam=asam, threshold=threshold) for x in images
            ]
        return [
            image_terms(model, x.to(device, dtype), rho=rho, asam=asam, threshold=threshold, perturb=perturb)
            for x in images
        ]


def check_threshold(value: Any) -> float:
    """Return ``value`` as a float if it lies in [0, 1].

    Raises:
        SaalError: otherwise.
    """
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not 0.0 <= threshold <= 1.0:
        raise SaalError(f"score_threshold must be a number in [0, 1] (e.g. 0.5), got {value!r}")
    return threshold


def pool_detection_sharpness(
    model: nn.Module,
    dataset: Dataset[Any],
    indices: np.ndarray,
    task: Detection,
    *,
    rho: float = 0.05,
    perturbation: str = "asam",
    score_threshold: float | None = None,
    perturb: bool = True,
    batch_size: int = 8,
) -> DetectionSharpness:
    """Score ``dataset[indices]`` image by image (read ``batch_size`` at a time; scores do not depend on it).

    Args:
        score_threshold: the pseudo targets' threshold (default: the task's).
        perturb: False gives the unperturbed pseudo-label loss alone (SAAL without the perturbation).

    Returns:
        A :class:`DetectionSharpness` in the order of ``indices``.

    Raises:
        SaalError: a bad option value, or a model that is not a detector.
    """
    threshold = task.score_threshold if score_threshold is None else score_threshold
    idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    pseudo: list[Target] = []

    def score_batch(batch: Batch) -> dict[str, torch.Tensor]:
        terms = detection_terms(
            model, batch.inputs, rho=rho, perturbation=perturbation, score_threshold=threshold, perturb=perturb
        )
        pseudo.extend({k: v.cpu() for k, v in t.pseudo.items()} for t in terms)
        return {
            "loss": torch.tensor([t.loss for t in terms], dtype=torch.float64),
            "perturbed_loss": torch.tensor([t.perturbed_loss for t in terms], dtype=torch.float64),
            "grad_norm": torch.tensor([t.grad_norm for t in terms], dtype=torch.float64),
        }

    found = scan(dataset, idx, score_batch, batch_size=batch_size, collate=task.collate)
    if not found:
        empty = np.empty(0, dtype=np.float64)
        return DetectionSharpness(idx, empty, empty.copy(), empty.copy(), [])
    return DetectionSharpness(
        idx,
        found["loss"].numpy(),
        found["perturbed_loss"].numpy(),
        found["grad_norm"].numpy(),
        pseudo,
    )


def naive_detection_terms(
    model: nn.Module,
    images: list[torch.Tensor],
    *,
    rho: float = 0.05,
    perturbation: str = "asam",
    score_threshold: float = 0.5,
) -> list[tuple[float, float]]:
    """The definition, image by image: copy the model (with no feature cache), take the image's pseudo targets
    and gradient, perturb the copy, take the loss again.

    Returns:
        ``(loss, perturbed_loss)`` per image.

    Raises:
        SaalError: a bad option value.
    """
    rho = check_rho(rho)
    asam = check_option("perturbation", perturbation, PERTURBATIONS) == "asam"
    threshold = check_threshold(score_threshold)
    device, dtype = model_device(model), model_dtype(model)
    out = []
    for image in images:
        x = image.to(device, dtype)
        clone = copy.deepcopy(model)
        for m in clone.modules():
            if isinstance(m, Lite0FPN):
                m.use_cache = False
        clone.eval()
        with torch.no_grad():
            target = confident(clone([x])[0], threshold)
        loss_mode(clone)
        params = trainable(clone)
        with torch.enable_grad():
            loss = image_loss(clone, x, target)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            sq = sum(
                (((p.abs() * g) if asam else g) ** 2).sum() for p, g in zip(params, grads, strict=True) if g is not None
            )
            norm = torch.sqrt(torch.as_tensor(sq, dtype=dtype))
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.add_(rho * ((p * p) if asam else 1.0) * g / (norm + NORM_EPS))
            perturbed = image_loss(clone, x, target)
        out.append((float(loss.detach()), float(perturbed)))
    return out
