"""The per-instance perturbed-loss engine: options, dispatch, the two-pass hook machinery, the
per-batch and ``torch.func`` paths and the last-layer closed form.

For each unlabelled instance ``x`` with pseudo target ``yhat`` (the task's own prediction in eval
mode: the argmax for classification) and instance gradient ``g = grad_w l(f_w(x), yhat)``, one
first-order ascent step gives

* SAM:  ``eps = rho * g / ||g||``
* ASAM: ``eps = rho * T^2 g / ||T g||`` with ``T = |w|`` (the norm over ALL parameters)

and the perturbed loss ``l(f_{w + eps}(x), yhat)``. SAAL's "max" score is the perturbed loss,
its "diff" score the perturbed minus the unperturbed loss (:meth:`PoolSharpness.score`, the one
score of every task). The step is :func:`ascent_step` wherever whole parameters move (per batch,
``torch.func``, detectors); the closed-form layer rules apply the same step layer by layer.

The loss ``l``, the pseudo target and the forward pass come from a :class:`~saal.tasks.base.Task`
(``forward``, ``pseudo_targets``, ``output_losses``); by default cross-entropy under the argmax
(:class:`~saal.tasks.classification.Classification`). Only the last-layer closed form
(``softmax - onehot``) is classification math. A task whose losses need the inputs rather than the
outputs (a detector's) is scored one item at a time by :func:`item_terms`, through
``Task.item_losses``; :func:`pool_terms` gathers any of them over a pool.

The per-instance engine never copies the model. One forward pass records each layer's input;
one backward pass of the summed losses gives each layer's output gradient for every instance at
once (in eval mode instances do not interact). The closed-form rules of
:mod:`saal.sharpness.layer_rules` turn these into each instance's ``||T g||^2`` and, through
forward hooks in a second forward pass, each layer's per-instance perturbation term. A model whose
structure the hooks cannot follow (a layer called twice, keyword inputs, non-tensor outputs) is
scored entirely with ``torch.func``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import Dataset

import saal.sharpness.layer_rules as layer_rules  # read at call time: tests shrink its budgets
from saal.core.model_state import model_device, preserved
from saal.core.scan import Batch, scan
from saal.errors import SaalError
from saal.models.base import Classifier, last_linear, logits_and_embedding
from saal.sharpness.layer_rules import (
    Rule,
    Unsupported,
    bcast,
    find_rules,
    rank_one_coef,
    rank_one_sq,
    row_sums,
    t2,
    tensor_sum,
)
from saal.tasks.base import Task
from saal.tasks.classification import Classification

PERTURBATIONS = ("asam", "sam")
GRANULARITIES = ("per-instance", "per-batch")
SCOPES = ("all", "last-layer")
ENGINES = ("auto", "functional")
SCORE_KINDS = ("max", "diff", "loss")
NORM_EPS = 1e-12

# The task used when none is given. The engine reads only its forward, pseudo targets (argmax) and
# per-item losses (cross-entropy), none of which depends on the class count.
DEFAULT_TASK: Task = Classification(1)


@dataclass
class SharpnessTerms:
    """Per-instance results for one batch (1-D tensors of the batch's length).

    Attributes:
        loss: ``l(f_w(x), yhat)``, the unperturbed loss under the pseudo target.
        perturbed_loss: ``l(f_{w+eps}(x), yhat)``, SAAL's "max" score.
        grad_norm: ``||T g||`` (``||g||`` for SAM) over the perturbed parameters; for
            ``per-batch`` the norm of the batch-mean gradient, repeated.
        pseudo_label: ``yhat``, the task's pseudo targets for the batch (detached): for
            classification the eval-mode argmax, a 1-D int64 tensor.
    """

    loss: torch.Tensor
    perturbed_loss: torch.Tensor
    grad_norm: torch.Tensor
    pseudo_label: Any


@dataclass
class PoolSharpness:
    """:class:`SharpnessTerms` over a pool's candidates, as float64 numpy arrays in ``indices`` order.

    ``pseudo_label`` holds the pseudo targets: for classification the int64 class indices; for a
    task whose pseudo targets are a tensor with one row per item, those rows; otherwise an object
    array of the per-item targets (for detection each image's pseudo boxes, a dict of ``boxes`` and
    ``labels``; ``None`` where the task's batch of targets is not a sequence).
    """

    indices: np.ndarray
    loss: np.ndarray
    perturbed_loss: np.ndarray
    grad_norm: np.ndarray
    pseudo_label: np.ndarray

    def score(self, kind: str = "max") -> np.ndarray:
        """Return SAAL's score of each candidate, a new float64 array: ``"max"`` (the perturbed loss, the
        paper's score), ``"diff"`` (perturbed minus unperturbed loss: the sharpness alone) or ``"loss"``
        (the unperturbed loss under the pseudo targets: SAAL without the perturbation).

        Raises:
            SaalError: any other ``kind``.
        """
        if kind == "max":
            return self.perturbed_loss.copy()
        if kind == "diff":
            return self.perturbed_loss - self.loss
        if kind == "loss":
            return self.loss.copy()
        raise SaalError(f"score must be one of {', '.join(SCORE_KINDS)}; got {kind!r}")


def check_option(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Return ``value`` normalised (``_`` read as ``-``), if it is one of ``allowed``.

    Raises:
        SaalError: naming the option and the allowed values.
    """
    text = value.replace("_", "-").lower() if isinstance(value, str) else value
    if text not in allowed:
        raise SaalError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return text


def check_rho(rho: Any) -> float:
    """Return ``rho`` as a float if it is a finite number >= 0.

    Raises:
        SaalError: otherwise.
    """
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho) or rho < 0:
        raise SaalError(f"rho must be a finite number >= 0 (e.g. 0.05); got {rho!r}")
    return float(rho)


def sharpness_terms(
    model: nn.Module,
    inputs: Any,
    *,
    rho: float = 0.05,
    perturbation: str = "asam",
    granularity: str = "per-instance",
    scope: str = "all",
    engine: str = "auto",
    task: Task | None = None,
) -> SharpnessTerms:
    """Return the loss, perturbed loss, gradient norm and pseudo target of each instance of a batch.

    Args:
        model: any model the task can run (for classification: returning ``(batch, classes)``
            logits); it is used in eval mode and left exactly as it was found (weights,
            gradients, buffers, train/eval modes).
        inputs: one collated batch, on the model's device.
        rho: the perturbation radius.
        perturbation: ``"asam"`` (``T = |w|``) or ``"sam"`` (``T = 1``).
        granularity: ``"per-instance"`` (each instance its own eps, the paper's definition) or
            ``"per-batch"`` (one eps from the batch-mean loss, shared by the batch).
        scope: ``"all"`` parameters, or only the ``"last-layer"`` (closed form from the logits
            and the penultimate features; classification only).
        engine: ``"auto"`` (closed-form layer rules, ``torch.func`` for other layers) or
            ``"functional"`` (``torch.func`` over the whole model; exact but slower).
        task: what the model predicts and its per-item loss (default: classification by
            cross-entropy under the argmax).

    Returns:
        A :class:`SharpnessTerms` of 1-D tensors.

    Raises:
        SaalError: a bad option value, ``scope="last-layer"`` for a task other than plain
            classification, or a model the engine cannot score.
    """
    opts = Options.make(rho, perturbation, granularity, scope, engine)
    task = resolve_task(task, opts)
    with preserved(model):
        return _terms(model, inputs, opts, task)


def perturbed_losses(
    model: nn.Module,
    inputs: Any,
    *,
    rho: float = 0.05,
    perturbation: str = "asam",
    granularity: str = "per-instance",
    scope: str = "all",
    task: Task | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(loss, perturbed_loss)`` per instance of one batch; see :func:`sharpness_terms`.

    Raises:
        SaalError: as :func:`sharpness_terms`.
    """
    t = sharpness_terms(
        model, inputs, rho=rho, perturbation=perturbation, granularity=granularity, scope=scope, task=task
    )
    return t.loss, t.perturbed_loss


def pool_sharpness(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    *,
    batch_size: int = 256,
    rho: float = 0.05,
    perturbation: str = "asam",
    granularity: str = "per-instance",
    scope: str = "all",
    engine: str = "auto",
    task: Task | None = None,
) -> PoolSharpness:
    """Score ``dataset[indices]`` in batches of ``batch_size`` (memory does not grow with the pool).

    The pool is streamed by :func:`saal.core.scan.scan` with the task's ``collate``. Per-instance
    scores do not depend on ``batch_size``; per-batch scores do (the batch is the group that
    shares one eps). Options as in :func:`sharpness_terms`.

    Returns:
        A :class:`PoolSharpness` in the order of ``indices``.

    Raises:
        SaalError: a bad option value, or a model the engine cannot score.
    """
    opts = Options.make(rho, perturbation, granularity, scope, engine)
    task = resolve_task(task, opts)
    device = model_device(model)

    def batch_terms(inputs: Any) -> SharpnessTerms:
        return _terms(model, task.to_device(inputs, device), opts, task)

    with preserved(model):
        return pool_terms(dataset, indices, batch_terms, batch_size=batch_size, collate=task.collate)


def pool_terms(
    dataset: Dataset,
    indices: np.ndarray,
    batch_terms: Callable[[Any], SharpnessTerms],
    *,
    batch_size: int,
    collate: Callable[[list[Any]], Any],
) -> PoolSharpness:
    """Stream ``dataset[indices]`` through :func:`saal.core.scan.scan` (``collate`` makes each batch of up to
    ``batch_size`` items) and gather ``batch_terms(batch inputs)`` of every batch: the one pool scoring of
    every task's engine.

    Pseudo targets that are a tensor with one row per item are gathered as rows; a sequence of one
    target per item (e.g. detection's dicts of boxes) as an object array; anything else as ``None``.

    Returns:
        A :class:`PoolSharpness` in the order of ``indices`` (float64 losses and norms).
    """
    indices = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    # Pseudo targets that are not one tensor row per item (e.g. a list of per-item structures).
    other_targets = np.full(len(indices), None, dtype=object)
    done = 0

    def score_batch(batch: Batch) -> dict[str, torch.Tensor]:
        nonlocal done
        t = batch_terms(batch.inputs)
        out = {"loss": t.loss, "perturbed_loss": t.perturbed_loss, "grad_norm": t.grad_norm}
        targets = t.pseudo_label
        if isinstance(targets, torch.Tensor) and targets.dim() >= 1 and len(targets) == len(batch):
            out["pseudo_label"] = targets
        elif isinstance(targets, Sequence) and len(targets) == len(batch):
            for i, value in enumerate(targets):
                other_targets[done + i] = value
        done += len(batch)
        return out

    found = scan(dataset, indices, score_batch, batch_size=batch_size, collate=collate)
    if not found:
        empty = np.empty(0, dtype=np.float64)
        return PoolSharpness(indices, empty, empty.copy(), empty.copy(), np.empty(0, dtype=np.int64))
    labels = found["pseudo_label"].cpu().numpy() if "pseudo_label" in found else other_targets
    return PoolSharpness(
        indices,
        found["loss"].double().cpu().numpy(),
        found["perturbed_loss"].double().cpu().numpy(),
        found["grad_norm"].double().cpu().numpy(),
        labels,
    )


# -- the task seam ------------------------------------------------------------------------------
def resolve_task(task: Task | None, opts: Options | None = None) -> Task:
    """Return ``task``, or :data:`DEFAULT_TASK` (classification) when it is None.

    Raises:
        SaalError: ``opts`` asks for the last-layer closed form and the task is not plain
            classification (cross-entropy under the argmax of the model's logits).
    """
    task = DEFAULT_TASK if task is None else task
    if opts is not None and opts.last_layer and not _plain_classification(task):
        raise SaalError(
            f"scope=last-layer is the closed form of cross-entropy under the argmax (softmax - onehot) and "
            f"does not apply to the {task.name} task ({type(task).__name__}); use scope=all"
        )
    return task


def _plain_classification(task: Task) -> bool:
    """Whether ``task`` is classification with its own forward, argmax and cross-entropy."""
    kind = type(task)
    return isinstance(task, Classification) and all(
        getattr(kind, name) is getattr(Classification, name) for name in ("forward", "pseudo_targets", "output_losses")
    )


def batch_len(inputs: Any) -> int:
    """Return the number of items of a collated batch (a tensor, or a pytree of tensors with one row per item).

    Raises:
        SaalError: a batch with no tensor in it.
    """
    if isinstance(inputs, torch.Tensor):
        return len(inputs)
    leaves = [leaf for leaf in tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]
    if not leaves:
        raise SaalError(f"the engine needs batches of tensors, got {type(inputs).__name__}")
    return int(leaves[0].shape[0])


def take(batch: Any, rows: slice | torch.Tensor) -> Any:
    """Return the rows ``rows`` (a slice or a boolean mask) of every tensor of a batch."""
    if isinstance(batch, torch.Tensor):
        return batch[rows]
    return tree_map(lambda t: t[rows] if isinstance(t, torch.Tensor) else t, batch)


def as_batch_of_one(item: Any) -> Any:
    """One item (without its batch dimension) as a batch of one."""
    if isinstance(item, torch.Tensor):
        return item.unsqueeze(0)
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, item)


def _detach(targets: Any) -> Any:
    if isinstance(targets, torch.Tensor):
        return targets.detach()
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, targets)


def _check_logits(logits: Any, n: int) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SaalError(f"the model must return (batch, classes) logits for SAAL, got {shape}")
    return logits


def task_outputs(task: Task, model: nn.Module, inputs: Any, n: int) -> Any:
    """Return ``task.forward(model, inputs)`` for a batch of ``n`` items.

    Raises:
        SaalError: a classification model that does not return ``(n, classes)`` logits.
    """
    outputs = task.forward(model, inputs)
    if isinstance(task, Classification):
        _check_logits(outputs, n)
    return outputs


def task_pseudo_targets(task: Task, outputs: Any) -> Any:
    """Return the task's pseudo targets for ``outputs``, detached (SAAL's loss is measured against constants)."""
    return _detach(task.pseudo_targets(outputs))


def task_losses(task: Task, outputs: Any, targets: Any, n: int) -> torch.Tensor:
    """Return ``task.output_losses(outputs, targets)``, checked to be one loss per item.

    Raises:
        SaalError: the task's losses are not a tensor of shape ``(n,)``.
    """
    losses = task.output_losses(outputs, targets)
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise SaalError(f"the {task.name} task's output_losses must return one loss per item, ({n},); got {shape}")
    return losses


class _TaskForward(nn.Module):
    """``task.forward(model, inputs)`` as a module, so that ``functional_call`` can swap the model's parameters."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, inputs: Any) -> Any:
        return self.task.forward(self.model, inputs)


def functional_forward(task: Task, model: nn.Module) -> Callable[[dict[str, torch.Tensor], Any], Any]:
    """Return ``f(params, inputs)``: the task's forward pass of ``model`` with ``params`` (named as in
    ``model.named_parameters()``) in place of the model's own, for ``torch.func`` transforms."""
    wrapper = _TaskForward(task, model)

    def call(params: dict[str, torch.Tensor], inputs: Any) -> Any:
        return functional_call(wrapper, {f"model.{name}": p for name, p in params.items()}, (inputs,))

    return call


# -- options and dispatch -----------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """Checked engine options."""

    rho: float
    asam: bool
    per_batch: bool
    last_layer: bool
    functional: bool

    @classmethod
    def make(cls, rho: Any, perturbation: Any, granularity: Any, scope: Any, engine: Any) -> Options:
        """Return the options after checking each value.

        Raises:
            SaalError: a bad value, naming the option and the allowed values.
        """
        return cls(
            rho=check_rho(rho),
            asam=check_option("perturbation", perturbation, PERTURBATIONS) == "asam",
            per_batch=check_option("granularity", granularity, GRANULARITIES) == "per-batch",
            last_layer=check_option("scope", scope, SCOPES) == "last-layer",
            functional=check_option("engine", engine, ENGINES) == "functional",
        )


def _terms(model: nn.Module, x: Any, opts: Options, task: Task) -> SharpnessTerms:
    """Dispatch; the model is already in eval mode and will be restored by the caller."""
    if batch_len(x) == 0:
        floating = x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else torch.float32
        empty = torch.empty(0, dtype=floating)
        return SharpnessTerms(empty, empty, empty, torch.empty(0, dtype=torch.long))
    if opts.last_layer:
        return _last_layer_terms(model, x, opts)
    if opts.per_batch:
        return _per_batch_terms(model, x, opts, task)
    if opts.functional:
        return _functional_terms(model, x, opts, task)
    return _closed_form_terms(model, x, opts, task)


def _scale(sq: torch.Tensor, rho: float) -> torch.Tensor:
    return rho / (torch.sqrt(sq) + NORM_EPS)


# -- the ascent step ----------------------------------------------------------------------------
def ascent_step(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float, asam: bool, *, per_item: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Return SAAL's one first-order ascent step from the gradients ``grads`` of ``params`` (same order, at
    least one): ``eps = rho T^2 g / ||T g||`` per parameter (ASAM: ``T = |w|``, over all of ``params``; SAM:
    ``T = 1``), and ``||T g||``.

    With ``per_item``, every gradient has a leading item dimension (one gradient per item): each item gets
    its own step and norm (``(items,)``). Every engine path that perturbs whole parameters (per batch,
    ``torch.func``, the last layer per batch, detectors) takes this step.
    """
    pairs = list(zip(params, grads, strict=True))
    reduce = row_sums if per_item else torch.sum
    sq = tensor_sum(reduce((t2(p, asam) * g) * g) for p, g in pairs)
    c = _scale(sq, rho)
    return [(bcast(c, g) if per_item else c) * t2(p, asam) * g for p, g in pairs], torch.sqrt(sq)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters that are trained (``requires_grad``): the ones SAAL perturbs."""
    return [p for p in model.parameters() if p.requires_grad]


def filled(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Return ``grads`` with zeros for the parameters the loss does not reach (``None`` from autograd)."""
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def perturbed_in_place(params: Sequence[torch.Tensor], eps: Sequence[torch.Tensor], loss: Callable[[], Any]) -> Any:
    """Return ``loss()`` taken with ``eps`` added to ``params`` in place; the parameters are then restored
    bit-exactly from a saved copy (never by subtracting ``eps``), also when ``loss`` raises."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        try:
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
            return loss()
        finally:
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def item_terms(
    model: nn.Module, inputs: Any, task: Task, *, rho: float, asam: bool, perturb: bool = True
) -> SharpnessTerms:
    """Return the terms of one item (``inputs``: a collated batch of one) through the task seam alone, for a
    task whose losses need the inputs (:meth:`~saal.tasks.base.Task.item_losses`: a detector's).

    The pseudo targets are ``task.pseudo_targets`` of the eval-mode ``task.forward``; the loss is
    ``task.item_losses`` under them; the weights take the :func:`ascent_step` in place and are restored
    bit-exactly. ``perturb=False`` gives the unperturbed loss alone (no gradient, a zero norm). The model is
    left in the mode ``item_losses`` put it in: the caller restores it (:func:`preserved`).

    Returns:
        A :class:`SharpnessTerms` of one-element tensors, the task's pseudo targets as ``pseudo_label``.
    """
    model.eval()
    with torch.no_grad():
        targets = task_pseudo_targets(task, task.forward(model, inputs))
    params = trainable(model)
    if not perturb or not params:
        with torch.no_grad():
            loss = task.item_losses(model, inputs, targets).sum().reshape(1)
        return SharpnessTerms(loss, loss, torch.zeros_like(loss), targets)
    with torch.enable_grad():
        loss = task.item_losses(model, inputs, targets).sum()
        raw = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        eps, norm = ascent_step(params, filled(params, raw), rho, asam)
    perturbed = perturbed_in_place(params, eps, lambda: task.item_losses(model, inputs, targets).sum())
    return SharpnessTerms(loss.detach().reshape(1), perturbed.reshape(1), norm.reshape(1), targets)


# -- last layer (classification only) -----------------------------------------------------------
def _last_layer_terms(model: nn.Module, x: torch.Tensor, opts: Options) -> SharpnessTerms:
    head = last_linear(model)
    with torch.no_grad():
        logits, h = logits_and_embedding(model, x)
        logits = _check_logits(logits, len(x))
        z = head(h)
        # For a model that does something after its last Linear, the closed form would be wrong.
        if not isinstance(model, Classifier) and not torch.allclose(z, logits, rtol=1e-4, atol=1e-5):
            raise SaalError(
                f"{type(model).__name__}'s output is not its last nn.Linear applied to its input; "
                "use scope=all for this model"
            )
        label = logits.argmax(1)
        loss = F.cross_entropy(logits, label, reduction="none")
        delta = torch.softmax(logits, 1) - F.one_hot(label, logits.shape[1]).to(logits.dtype)
        w, b = head.weight, head.bias
        use_w, use_b = w.requires_grad, b is not None and b.requires_grad
        if opts.per_batch:
            gw, gb = delta.T @ h / len(x), delta.mean(0)
            used = [(p, g) for p, g, use in ((w, gw, use_w), (b, gb, use_b)) if use and p is not None]
            eps, sq_norm = (
                ascent_step([p for p, _ in used], [g for _, g in used], opts.rho, opts.asam)
                if used
                else ([], logits.new_zeros(()))
            )
            steps = iter(eps)
            w2 = w + next(steps) if use_w else w
            b2 = (b + next(steps) if use_b else b) if b is not None else None
            perturbed_logits = F.linear(h, w2, b2)
            norm = sq_norm.expand(len(x))
        else:
            sq = rank_one_sq(h, delta, w, b if use_b else None, use_w, opts.asam)
            c = _scale(sq, opts.rho)
            coef = rank_one_coef(h, h, w, b if use_b else None, use_w, opts.asam)
            perturbed_logits = z + c[:, None] * delta * coef
            norm = torch.sqrt(sq)
        perturbed = F.cross_entropy(perturbed_logits, label, reduction="none")
    return SharpnessTerms(loss, perturbed, norm, label)


# -- per batch ----------------------------------------------------------------------------------
def _per_batch_terms(model: nn.Module, x: Any, opts: Options, task: Task) -> SharpnessTerms:
    n = batch_len(x)
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with torch.enable_grad():
        outputs = task_outputs(task, model, x, n)
        label = task_pseudo_targets(task, outputs)
        losses = task_losses(task, outputs, label, n)
        raw = torch.autograd.grad(losses.mean(), list(named.values()), allow_unused=True) if named else ()
    with torch.no_grad():
        params = list(named.values())
        eps, norm = (
            ascent_step(params, filled(params, raw), opts.rho, opts.asam) if named else ([], losses.new_zeros(()))
        )
        moved = {name: p.detach() + e for (name, p), e in zip(named.items(), eps, strict=True)}
        perturbed = task_losses(task, functional_forward(task, model)(moved, x), label, n)
    return SharpnessTerms(losses.detach(), perturbed, norm.expand(n), label)


# -- torch.func over the whole model ------------------------------------------------------------
def _functional_terms(model: nn.Module, x: Any, opts: Options, task: Task) -> SharpnessTerms:
    n = batch_len(x)
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        outputs = task_outputs(task, model, x, n)
        label = task_pseudo_targets(task, outputs)
        loss = task_losses(task, outputs, label, n)
    if not params:
        return SharpnessTerms(loss, loss.clone(), torch.zeros_like(loss), label)
    call = functional_forward(task, model)

    def instance_loss(p: dict[str, torch.Tensor], xi: Any, yi: Any) -> torch.Tensor:
        return task.output_losses(call(p, as_batch_of_one(xi)), as_batch_of_one(yi)).sum()

    size = sum(p.numel() for p in params.values())
    chunk = max(1, layer_rules.CHUNK_FLOATS // size)
    perturbed, norms = [], []
    for s in range(0, n, chunk):
        xc, yc = take(x, slice(s, s + chunk)), take(label, slice(s, s + chunk))
        g = vmap(grad(instance_loss), in_dims=(None, 0, 0))(params, xc, yc)
        with torch.no_grad():
            eps, norm = ascent_step(list(params.values()), [g[k] for k in params], opts.rho, opts.asam, per_item=True)
            moved = {k: params[k] + e for k, e in zip(params, eps, strict=True)}
            perturbed.append(vmap(instance_loss, in_dims=(0, 0, 0))(moved, xc, yc))
            norms.append(norm)
    return SharpnessTerms(loss, torch.cat(perturbed), torch.cat(norms), label)


# -- closed form per instance: two forward passes with hooks ------------------------------------
def _closed_form_terms(model: nn.Module, x: Any, opts: Options, task: Task) -> SharpnessTerms:
    rules = find_rules(model, opts.asam)
    for clone_inputs in (False, True):
        try:
            return _two_pass(model, x, opts, task, rules, clone_inputs)
        except Unsupported:
            return _functional_terms(model, x, opts, task)
        except _InputChanged:
            continue
        finally:
            for r in rules:
                r.release()
                r.calls = 0
    raise RuntimeError("layer inputs changed in place even when copied")  # pragma: no cover


class _InputChanged(Exception):
    """A layer's input was modified in place after the layer read it; retry with copies."""


def _two_pass(
    model: nn.Module, x: Any, opts: Options, task: Task, rules: list[Rule], clone_inputs: bool
) -> SharpnessTerms:
    n = batch_len(x)
    handles = []
    try:
        for r in rules:
            handles.append(r.module.register_forward_hook(_capture_hook(r, clone_inputs), with_kwargs=True))
        with torch.enable_grad():
            outputs = task_outputs(task, model, x, n)
            label = task_pseudo_targets(task, outputs)
            losses = task_losses(task, outputs, label, n)
            live = [(r, r.output) for r in rules if r.output is not None]
            if live:
                deltas = torch.autograd.grad(losses.sum(), [out for _, out in live], allow_unused=True)
                for (r, _), d in zip(live, deltas, strict=True):
                    r.delta = d
        for h in handles:
            h.remove()
        handles.clear()
        if any(r.input is not None and r.input._version != r.input_version for r in rules):
            raise _InputChanged
        losses = losses.detach()
        active = [r for r in rules if r.delta is not None]
        with torch.no_grad():
            sq = torch.zeros_like(losses)
            for r in active:
                s = r.sq_norm()
                if s is not None:
                    sq += s
            scale = _scale(sq, opts.rho)
            for r in active:
                handles.append(r.module.register_forward_hook(_perturb_hook(r, scale)))
            perturbed = task_losses(task, task.forward(model, x), label, n)
        return SharpnessTerms(losses, perturbed, torch.sqrt(sq), label)
    finally:
        for h in handles:
            h.remove()


def _capture_hook(rule: Rule, clone_inputs: bool) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if rule.busy:
            return None
        return rule.capture(args, kwargs, output, clone_inputs)

    return hook


def _perturb_hook(rule: Rule, scale: torch.Tensor) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if rule.busy:
            return None
        return rule.perturb(args[0], output, scale)

    return hook
