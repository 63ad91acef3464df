"""Fitting a model on the labelled set, and measuring it on a test set, through the task seam."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from saal.core.model_state import model_device
from saal.core.scan import load_inputs, training_batches
from saal.sam import SAM
from saal.settings import TrainConfig
from saal.tasks import Classification, Task
from saal.tasks.classification import dataset_targets


class TrainingHook(Protocol):
    """Something a strategy trains beside the model (e.g. LL4AL's loss-prediction module).

    The training loop calls :meth:`start` before the first epoch (register forward hooks,
    return the extra parameters to optimise with the model's optimiser), :meth:`loss` on every
    batch (an extra loss term to add), and :meth:`end` after the last epoch.
    """

    def start(self, model: nn.Module, epochs: int) -> list[nn.Parameter]: ...

    def loss(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        logits: torch.Tensor,
        per_sample_loss: torch.Tensor,
        epoch: int,
    ) -> torch.Tensor | None: ...

    def end(self, model: nn.Module) -> None: ...


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """Return the optimiser ``config`` names over ``params``."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return SAM(
        params,
        torch.optim.SGD,
        rho=config.sam_rho,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def draw_augmentation(n: int, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Draw ``n`` images' crop offsets and flips from ``generator``: an ``n x 3`` int64 tensor on the CPU of
    (row offset, column offset, flip), drawn in the order :func:`augment_batch` always drew them."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.stack([dy, dx, flip.long()], dim=1)


def apply_augmentation(x: torch.Tensor, draws: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Crop (after zero-padding by ``pad``) and flip every image of ``x`` as ``draws`` (``n x 3``, on ``x``'s
    device) say, with one gather: no per-image loop."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx, flip = draws[:, 0], draws[:, 1], draws[:, 2].bool()
    rows = dy[:, None] + torch.arange(h, device=x.device)  # n x h
    across = torch.arange(w, device=x.device)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - across, across)  # n x w, reversed where flipped
    items = torch.arange(n, device=x.device)[:, None, None]
    return padded[items, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero-padding by ``pad`` and random horizontal flip, per image.

    The offsets and flips are drawn from ``generator`` (on the CPU) and applied to the whole batch with one
    gather on ``x``'s device.
    """
    return apply_augmentation(x, draw_augmentation(len(x), generator, pad).to(x.device), pad)


RESIDENT_BYTES = 1 << 30
"""The largest labelled set (bytes of its inputs) :func:`fit` loads once and keeps on the model's device."""


def _resident_inputs(dataset: Dataset, indices: np.ndarray, task: Task, device: torch.device) -> torch.Tensor | None:
    """Return the inputs of ``dataset[indices]`` as one tensor on ``device``, or None when they are not one
    tensor (e.g. detection images of many sizes) or would take more than :data:`RESIDENT_BYTES`."""
    if not isinstance(task, Classification) or len(indices) == 0:
        return None
    first = load_inputs(dataset, indices[:1], task.collate)
    if not isinstance(first, torch.Tensor) or first.element_size() * first.numel() * len(indices) > RESIDENT_BYTES:
        return None
    return load_inputs(dataset, indices, task.collate).to(device)


def _resident_batches(
    inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, generator: torch.Generator, augment: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield one epoch of shuffled (and, with ``augment``, cropped and flipped) batches of device-resident
    ``inputs`` and ``targets``.

    The batches are those :func:`saal.core.scan.training_batches` and :func:`augment_batch` give from the same
    ``generator`` (the same draws, in the same order), but every draw of the epoch is made up front and copied
    to the device once: no host-device copy, hence no synchronisation, per step.
    """
    n = len(targets)
    order = torch.randperm(n, generator=generator)
    starts = range(0, n, batch_size)
    draws = None
    if augment:
        draws = torch.cat([draw_augmentation(min(batch_size, n - s), generator) for s in starts]).to(inputs.device)
    order = order.to(inputs.device)
    for start in starts:
        pos = order[start : start + batch_size]
        x = inputs[pos]
        if draws is not None:
            x = apply_augmentation(x, draws[start : start + batch_size])
        yield x, targets[pos]


@dataclass
class FitResult:
    """What one call of :func:`fit` did: seconds spent, the last epoch's mean loss, and the
    optimiser's final state (to continue with when warm-starting; on zero labelled items, where nothing is
    trained, the state :func:`fit` was given, None if none)."""

    seconds: float
    final_loss: float
    optimizer_state: dict | None


def fit(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    generator: torch.Generator,
    hook: TrainingHook | None = None,
    optimizer_state: dict | None = None,
    task: Task | None = None,
    resident: bool | None = None,
) -> FitResult:
    """Train ``model`` on ``dataset[indices]`` with the given ``labels``.

    Args:
        generator: drives shuffling and augmentation (the same one gives the same training).
        hook: an extra trainable part (see :class:`TrainingHook`).
        optimizer_state: an optimiser state from an earlier :func:`fit` to continue from
            (warm start); a fresh optimiser otherwise.
        task: what a label and the loss are (default: classification, cross-entropy).
        resident: load the labelled inputs once and keep them on the model's device for every epoch
            (None: whenever they are one tensor of at most :data:`RESIDENT_BYTES`; False: read the dataset
            batch by batch every epoch). Either way the batches, and so the training, are the same; the loss
            is summed on the device and read back once, at the end.

    Zero labelled items (a run that starts from no labels) train nothing: the model is left as it is (in eval
    mode), the hook is not started, and the result has a nan loss and the ``optimizer_state`` given.

    Returns:
        A :class:`FitResult`.
    """
    start = time.perf_counter()
    if len(indices) == 0:
        model.eval()
        return FitResult(time.perf_counter() - start, float("nan"), optimizer_state)
    task = task if task is not None else Classification(1)  # cross-entropy needs no class count
    device = model_device(model)
    extra = hook.start(model, config.epochs) if hook is not None else []
    optimizer = make_optimizer([*model.parameters(), *extra], config)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    model.train()
    kept = None if resident is False else _resident_inputs(dataset, np.asarray(indices, dtype=np.int64), task, device)
    kept_targets = task.to_device(task.collate_targets(list(labels)), device) if kept is not None else None
    epoch_total: torch.Tensor | None = None
    count = 0
    for epoch in range(config.epochs):
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        if kept is not None and kept_targets is not None:
            batches: Iterator[tuple[Any, Any]] = _resident_batches(
                kept, kept_targets, config.batch_size, generator, config.augment
            )
        else:
            batches = training_batches(
                dataset,
                indices,
                labels,
                config.batch_size,
                generator,
                collate=task.collate,
                collate_targets=task.collate_targets,
            )
        for x, y in batches:
            if config.augment and kept is None:  # resident batches come augmented
                x = augment_batch(x, generator)
            x, y = task.to_device(x, device), task.to_device(y, device)
            loss = _train_step(model, optimizer, task, hook, x, y, epoch)
            total += loss.double() * len(y)  # on the device: no host synchronisation per step
            count += len(y)
        epoch_total = total
    epoch_loss = float(epoch_total) / max(count, 1) if epoch_total is not None else float("nan")
    if hook is not None:
        hook.end(model)
    model.eval()
    return FitResult(time.perf_counter() - start, epoch_loss, optimizer.state_dict())


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: Task,
    hook: TrainingHook | None,
    x: Any,
    y: Any,
    epoch: int,
) -> torch.Tensor:
    """Take one optimiser step on the batch ``(x, y)``: the mean per-item loss plus the hook's (SAM: its two
    passes).

    Returns:
        The step's loss (for SAM the unperturbed one), detached, on the device.
    """

    def closure() -> torch.Tensor:
        logits, per_sample = task.training_losses(model, x, y)
        loss = per_sample.mean()
        if hook is not None:
            extra_loss = hook.loss(model, x, y, logits, per_sample, epoch)
            if extra_loss is not None:
                loss = loss + extra_loss
        loss.backward()
        return loss

    optimizer.zero_grad()
    if isinstance(optimizer, SAM):
        loss = optimizer.step(closure)
    else:
        loss = closure()
        optimizer.step()
    return loss.detach()


EVALUATION_ELEMENTS = 2048 * 3 * 32 * 32
"""Input elements per evaluation batch on an accelerator: 2,048 CIFAR-sized images."""


def evaluation_batch_size(batch_size: int, device: torch.device, item_shape: tuple[int, ...], task: Task) -> int:
    """Return the batch size to evaluate a classifier with: ``batch_size`` on the CPU; on an accelerator as many
    items as :data:`EVALUATION_ELEMENTS` input elements (never fewer than ``batch_size``), so that a small test
    set is a few large batches instead of many launches. Other tasks keep ``batch_size``."""
    if device.type == "cpu" or not isinstance(task, Classification) or not item_shape:
        return batch_size
    return max(batch_size, EVALUATION_ELEMENTS // max(1, int(np.prod(item_shape))))


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512, task: Task | None = None) -> float:
    """Return the task's metric of ``model`` (eval mode; restored) on every item of ``dataset``.

    Without ``task``: classification accuracy, in [0, 1]. :meth:`saal.tasks.Task.evaluate` gives
    the metric's name and per-class values too.
    """
    if task is None:
        targets = dataset_targets(dataset)
        task = Classification(int(targets.max()) + 1 if len(targets) else 1)
    return task.evaluate(model, dataset, batch_size).value
