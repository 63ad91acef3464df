"""Fitting a model on the labelled set, and measuring it on a test set, through the task seam."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from saal.core.model_state import model_device
from saal.core.scan import training_batches
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


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero-padding by ``pad`` and random horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@dataclass
class FitResult:
    """What one call of :func:`fit` did: seconds spent, the last epoch's mean loss, and the
    optimiser's final state (to continue with when warm-starting)."""

    seconds: float
    final_loss: float
    optimizer_state: dict


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
) -> FitResult:
    """Train ``model`` on ``dataset[indices]`` with the given ``labels``.

    Args:
        generator: drives shuffling and augmentation (the same one gives the same training).
        hook: an extra trainable part (see :class:`TrainingHook`).
        optimizer_state: an optimiser state from an earlier :func:`fit` to continue from
            (warm start); a fresh optimiser otherwise.
        task: what a label and the loss are (default: classification, cross-entropy).

    Returns:
        A :class:`FitResult`.
    """
    start = time.perf_counter()
    task = task if task is not None else Classification(1)  # cross-entropy needs no class count
    device = model_device(model)
    extra = hook.start(model, config.epochs) if hook is not None else []
    optimizer = make_optimizer([*model.parameters(), *extra], config)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    model.train()
    epoch_loss = float("nan")
    for epoch in range(config.epochs):
        total, count = 0.0, 0
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
            if config.augment:
                x = augment_batch(x, generator)
            x, y = task.to_device(x, device), task.to_device(y, device)

            def closure(x: torch.Tensor = x, y: torch.Tensor = y, epoch: int = epoch) -> torch.Tensor:
                logits = task.forward(model, x)
                per_sample = task.output_losses(logits, y)
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
            total += float(loss.detach()) * len(y)
            count += len(y)
        epoch_loss = total / max(count, 1)
    if hook is not None:
        hook.end(model)
    model.eval()
    return FitResult(time.perf_counter() - start, epoch_loss, optimizer.state_dict())


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512, task: Task | None = None) -> float:
    """Return the task's metric of ``model`` (eval mode; restored) on every item of ``dataset``.

    Without ``task``: classification accuracy, in [0, 1]. :meth:`saal.tasks.Task.evaluate` gives
    the metric's name and per-class values too.
    """
    if task is None:
        targets = dataset_targets(dataset)
        task = Classification(int(targets.max()) + 1 if len(targets) else 1)
    return task.evaluate(model, dataset, batch_size).value
