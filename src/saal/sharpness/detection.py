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

Nothing of this is detection's own but the fused two-pass path for FCOS and RetinaNet: an image is scored by the
engine's per-item path through the task seam (:func:`saal.sharpness.engine.item_terms`: the task's pseudo
targets and per-image loss), the step is the engine's :func:`~saal.sharpness.engine.ascent_step`, the pool is
scored by :func:`~saal.sharpness.engine.pool_terms` into a :class:`~saal.sharpness.engine.PoolSharpness`, whose
``score`` is the one every SAAL strategy ranks by.

An image with no confident detection has empty pseudo targets: its loss is the detector's loss for "nothing
here" (for FCOS and RetinaNet a background-only classification loss, large under a model that is unsure; for
SSD zero). No NaN arises: torchvision's losses divide by at least one foreground.

Every image is scored alone, so its score never depends on the others in a batch; a frozen backbone's
features come from the feature cache's in-process tier (:data:`saal.data.feature_cache.MEMORY_CACHE`, through
:class:`saal.models.detectors.Lite0FPN`), which holds the exact features. :func:`naive_detection_terms` is the
definition with a deep copy of the model per image and no cache; the tests show the two agree.
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
from saal.errors import SaalError
from saal.models.detectors import Lite0FPN
from saal.sharpness.engine import (
    NORM_EPS,
    PERTURBATIONS,
    PoolSharpness,
    SharpnessTerms,
    ascent_step,
    check_option,
    check_rho,
    filled,
    item_terms,
    perturbed_in_place,
    pool_terms,
    trainable,
)
from saal.tasks.detection import Detection, Target, confident, fixed_randomness, image_loss, loss_mode, sum_losses


@dataclass
class ImageTerms:
    """One image's SAAL terms: loss and perturbed loss under its pseudo targets, ``||T g||``, the targets."""

    loss: float
    perturbed_loss: float
    grad_norm: float
    pseudo: Target


def model_dtype(model: nn.Module) -> torch.dtype:
    """Return the dtype of the model's first floating-point parameter (float32 without any)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def with_threshold(task: Detection | None, threshold: float) -> Detection:
    """Return a detection task whose pseudo targets are the detections at least ``threshold`` confident: a copy
    of ``task`` with that threshold, or a one-class task when none is given (pseudo targets and losses never
    read the class names)."""
    found = copy.copy(task) if task is not None else Detection(["object"])
    found.score_threshold = threshold
    return found


def image_terms(
    model: nn.Module, image: torch.Tensor, *, rho: float, asam: bool, task: Detection, perturb: bool = True
) -> ImageTerms:
    """Return one image's SAAL terms through the task seam (:func:`saal.sharpness.engine.item_terms`: the
    task's pseudo targets and per-image loss, the engine's ascent step); ``perturb=False`` gives the
    unperturbed loss alone (no gradient).

    The model's weights are restored bit-exactly; its modes are left in loss mode (the caller restores them).
    """
    t = item_terms(model, [image], task, rho=rho, asam=asam, perturb=perturb)
    return ImageTerms(float(t.loss[0]), float(t.perturbed_loss[0]), float(t.grad_norm[0]), t.pseudo_label[0])


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
    with torch.no_grad():
        eps, norm = ascent_step(params, filled(params, raw), rho, asam)

    def perturbed_loss() -> float:
        with fixed_randomness():
            _, head, anchors, levels = _dense_pass(det, image)
            return float(sum_losses(_dense_loss(det, targets, head, anchors, levels)))

    perturbed = perturbed_in_place(params, eps, perturbed_loss)
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
    task: Detection | None = None,
) -> list[ImageTerms]:
    """Return each image's SAAL terms (the model left exactly as found: weights, modes, gradients, buffers).

    Args:
        score_threshold: the pseudo targets' threshold (it replaces ``task``'s).
        perturb: False gives the unperturbed pseudo-label loss alone (no gradient).
        fused: score FCOS and RetinaNet detectors with :func:`fused_image_terms` (None: whenever they are one
            and there are trainable parameters; the values are the same).
        task: the detection task whose pseudo targets and per-image loss score the other images (None: a
            one-class task; neither depends on the class names).

    Returns:
        One :class:`ImageTerms` per image, in order.

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
        seam = with_threshold(task, threshold)
        return [image_terms(model, x.to(device, dtype), rho=rho, asam=asam, task=seam, perturb=perturb) for x in images]


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
) -> PoolSharpness:
    """Score ``dataset[indices]`` image by image (read ``batch_size`` at a time; scores do not depend on it),
    through the engine's pool scoring (:func:`saal.sharpness.engine.pool_terms`).

    Args:
        score_threshold: the pseudo targets' threshold (default: the task's).
        perturb: False gives the unperturbed pseudo-label loss alone (SAAL without the perturbation).

    Returns:
        A :class:`~saal.sharpness.engine.PoolSharpness` in the order of ``indices``; its ``pseudo_label`` is an
        object array of each image's pseudo boxes (dicts of ``boxes`` and ``labels``, on the CPU).

    Raises:
        SaalError: a bad option value, or a model that is not a detector.
    """
    threshold = task.score_threshold if score_threshold is None else score_threshold

    def batch_terms(images: list[torch.Tensor]) -> SharpnessTerms:
        terms = detection_terms(
            model,
            images,
            rho=rho,
            perturbation=perturbation,
            score_threshold=threshold,
            perturb=perturb,
            task=task,
        )
        return SharpnessTerms(
            torch.tensor([t.loss for t in terms], dtype=torch.float64),
            torch.tensor([t.perturbed_loss for t in terms], dtype=torch.float64),
            torch.tensor([t.grad_norm for t in terms], dtype=torch.float64),
            [{k: v.cpu() for k, v in t.pseudo.items()} for t in terms],
        )

    return pool_terms(dataset, indices, batch_terms, batch_size=batch_size, collate=task.collate)


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
