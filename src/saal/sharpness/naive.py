"""The definition of SAAL's perturbed loss, one instance at a time: copy the model, take that
instance's gradient under its pseudo target, perturb the copy, forward.

Slow, and the yardstick the tests and benchmarks compare the engine against.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from saal.core.model_state import preserved
from saal.models.base import last_linear
from saal.sharpness.engine import (
    NORM_EPS,
    PERTURBATIONS,
    SCOPES,
    batch_len,
    check_option,
    check_rho,
    resolve_task,
    take,
    task_losses,
    task_outputs,
    task_pseudo_targets,
)
from saal.sharpness.layer_rules import tensor_sum
from saal.tasks.base import Task


def naive_perturbed_losses(
    model: nn.Module,
    inputs: Any,
    *,
    rho: float = 0.05,
    perturbation: str = "asam",
    scope: str = "all",
    task: Task | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, one instance at a time: copy the model, take that instance's gradient,
    perturb the copy, forward. What the reference code does with a pool batch of 1.

    Args:
        model: the model (left as it was found).
        inputs: one collated batch, on the model's device.
        rho, perturbation, scope: as in :func:`saal.sharpness.sharpness_terms`.
        task: the forward pass, pseudo target and per-item loss (default: classification,
            cross-entropy under the argmax).

    Returns:
        ``(loss, perturbed_loss)`` per instance (1-D tensors; empty ones for an empty batch).

    Raises:
        SaalError: a bad option value, or outputs or losses the task does not accept.
    """
    perturbation = check_option("perturbation", perturbation, PERTURBATIONS)
    scope = check_option("scope", scope, SCOPES)
    rho = check_rho(rho)
    task = resolve_task(task)
    losses, perturbed = [], []
    with preserved(model), torch.enable_grad():
        for i in range(batch_len(inputs)):
            x = take(inputs, slice(i, i + 1))
            clone = copy.deepcopy(model).eval()
            params = [p for p in _scoped_parameters(clone, scope) if p.requires_grad]
            outputs = task_outputs(task, clone, x, 1)
            target = task_pseudo_targets(task, outputs)
            loss = task_losses(task, outputs, target, 1).sum()
            raw = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw, strict=True)]
            with torch.no_grad():
                scaled = [(p.abs() * g if perturbation == "asam" else g) for p, g in zip(params, grads, strict=True)]
                norm = torch.sqrt(tensor_sum((s * s).sum() for s in scaled))
                for p, g in zip(params, grads, strict=True):
                    t2 = p * p if perturbation == "asam" else 1.0
                    p.add_(rho * t2 * g / (norm + NORM_EPS))
                losses.append(loss.detach())
                perturbed.append(task_losses(task, task.forward(clone, x), target, 1).sum())
    if not losses:
        empty = torch.empty(0)
        return empty, empty
    return torch.stack(losses), torch.stack(perturbed)


def _scoped_parameters(model: nn.Module, scope: str) -> list[nn.Parameter]:
    """The parameters perturbed under ``scope``: all, or those of the model's last ``nn.Linear``."""
    if scope == "last-layer":
        return list(last_linear(model).parameters())
    return list(model.parameters())
