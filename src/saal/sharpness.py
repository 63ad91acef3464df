"""Per-instance perturbed losses: the engine behind SAAL.

For each unlabelled instance ``x`` with pseudo label ``yhat = argmax f_w(x)`` (eval mode) and
instance gradient ``g = grad_w CE(f_w(x), yhat)``, one first-order ascent step gives

* SAM:  ``eps = rho * g / ||g||``
* ASAM: ``eps = rho * T^2 g / ||T g||`` with ``T = |w|`` (the norm over ALL parameters)

and the perturbed loss ``CE(f_{w + eps}(x), yhat)``. SAAL's "max" score is the perturbed loss,
its "diff" score the perturbed minus the unperturbed loss.

The per-instance engine never copies the model. One forward pass records each layer's input
``a``; one backward pass of the summed losses gives each layer's output gradient ``delta`` for
every instance at once (in eval mode instances do not interact). For a Linear layer an instance's
weight gradient is the rank-one ``delta a^T``, so ``||T g||^2`` and the perturbed layer
``W a' + b + c * delta * (W^2 (a * a') + b^2)`` (ASAM; ``a . a' + 1`` for SAM) need no
per-instance weight matrix. Conv2d's per-instance kernel gradients (``out x in*k*k``) are built
in chunks of instances, by ``unfold`` and batched matmul or, on large feature maps, by
convolution kernels grouped over the instances; for SAM on small feature maps only ``L x L``
Gram matrices of the output positions are needed. Eval-mode BatchNorm is elementwise per channel.
The second forward pass adds each layer's per-instance perturbation term through forward hooks.
Any other layer that holds parameters falls back to ``torch.func`` (``vmap`` over ``grad`` and
``functional_call``) for that layer only; a model whose structure the hooks cannot follow (a
layer called twice, keyword inputs, non-tensor outputs) is scored entirely with ``torch.func``.

:func:`naive_perturbed_losses` is the definition itself (copy the model per instance, perturb,
forward): slow, and the yardstick the tests and benchmarks compare against.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from saal.batching import input_batches
from saal.errors import SaalError
from saal.core.model_state import model_device, preserved
from saal.models.base import Classifier, last_linear, logits_and_embedding

PERTURBATIONS = ("asam", "sam")
GRANULARITIES = ("per-instance", "per-batch")
SCOPES = ("all", "last-layer")
ENGINES = ("auto", "functional")
NORM_EPS = 1e-12
# Floats of per-instance kernel gradients held at once per layer (chunks of instances beyond it),
# and the most a layer may keep between the two forward passes instead of recomputing them.
_CHUNK_FLOATS = 1 << 20
_CACHE_FLOATS = 1 << 24


@dataclass
class SharpnessTerms:
    """Per-instance results for one batch (1-D tensors of the batch's length).

    Attributes:
        loss: ``CE(f_w(x), yhat)``, the unperturbed loss under the pseudo label.
        perturbed_loss: ``CE(f_{w+eps}(x), yhat)``, SAAL's "max" score.
        grad_norm: ``||T g||`` (``||g||`` for SAM) over the perturbed parameters; for
            ``per-batch`` the norm of the batch-mean gradient, repeated.
        pseudo_label: ``yhat``, the eval-mode argmax.
    """

    loss: torch.Tensor
    perturbed_loss: torch.Tensor
    grad_norm: torch.Tensor
    pseudo_label: torch.Tensor


@dataclass
class PoolSharpness:
    """:class:`SharpnessTerms` over a pool's candidates, as float64 numpy arrays in ``indices`` order."""

    indices: np.ndarray
    loss: np.ndarray
    perturbed_loss: np.ndarray
    grad_norm: np.ndarray
    pseudo_label: np.ndarray

    def score(self, kind: str = "max") -> np.ndarray:
        """Return SAAL's ``"max"`` (perturbed loss) or ``"diff"`` (perturbed minus loss) score."""
        if kind == "max":
            return self.perturbed_loss.copy()
        if kind == "diff":
            return self.perturbed_loss - self.loss
        raise SaalError(f"score must be one of max, diff; got {kind!r}")


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
    inputs: torch.Tensor,
    *,
    rho: float = 0.05,
    perturbation: str = "asam",
    granularity: str = "per-instance",
    scope: str = "all",
    engine: str = "auto",
) -> SharpnessTerms:
    """Return the loss, perturbed loss, gradient norm and pseudo label of each instance of a batch.

    Args:
        model: any classifier returning ``(batch, classes)`` logits; it is used in eval mode and
            left exactly as it was found (weights, gradients, buffers, train/eval modes).
        inputs: one batch, on the model's device.
        rho: the perturbation radius.
        perturbation: ``"asam"`` (``T = |w|``) or ``"sam"`` (``T = 1``).
        granularity: ``"per-instance"`` (each instance its own eps, the paper's definition) or
            ``"per-batch"`` (one eps from the batch-mean loss, shared by the batch).
        scope: ``"all"`` parameters, or only the ``"last-layer"`` (closed form from the logits
            and the penultimate features).
        engine: ``"auto"`` (closed-form layer rules, ``torch.func`` for other layers) or
            ``"functional"`` (``torch.func`` over the whole model; exact but slower).

    Returns:
        A :class:`SharpnessTerms` of 1-D tensors.

    Raises:
        SaalError: a bad option value, or a model the engine cannot score.
    """
    opts = _Options.make(rho, perturbation, granularity, scope, engine)
    with preserved(model):
        return _terms(model, inputs, opts)


def perturbed_losses(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    rho: float = 0.05,
    perturbation: str = "asam",
    granularity: str = "per-instance",
    scope: str = "all",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(loss, perturbed_loss)`` per instance of one batch; see :func:`sharpness_terms`."""
    t = sharpness_terms(model, inputs, rho=rho, perturbation=perturbation, granularity=granularity, scope=scope)
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
) -> PoolSharpness:
    """Score ``dataset[indices]`` in batches of ``batch_size`` (memory does not grow with the pool).

    Per-instance scores do not depend on ``batch_size``; per-batch scores do (the batch is the
    group that shares one eps). Options as in :func:`sharpness_terms`.

    Returns:
        A :class:`PoolSharpness` in the order of ``indices``.

    Raises:
        SaalError: a bad option value, or a model the engine cannot score.
    """
    opts = _Options.make(rho, perturbation, granularity, scope, engine)
    indices = np.asarray(indices, dtype=np.int64)
    out = {k: np.empty(len(indices), dtype=np.float64) for k in ("loss", "perturbed_loss", "grad_norm")}
    labels = np.empty(len(indices), dtype=np.int64)
    device = model_device(model)
    start = 0
    with preserved(model):
        for _, x in input_batches(dataset, indices, batch_size):
            t = _terms(model, x.to(device), opts)
            stop = start + len(x)
            out["loss"][start:stop] = t.loss.double().cpu().numpy()
            out["perturbed_loss"][start:stop] = t.perturbed_loss.double().cpu().numpy()
            out["grad_norm"][start:stop] = t.grad_norm.double().cpu().numpy()
            labels[start:stop] = t.pseudo_label.cpu().numpy()
            start = stop
    return PoolSharpness(indices, out["loss"], out["perturbed_loss"], out["grad_norm"], labels)


def naive_perturbed_losses(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    rho: float = 0.05,
    perturbation: str = "asam",
    scope: str = "all",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, one instance at a time: copy the model, take that instance's gradient,
    perturb the copy, forward. What the reference code does with a pool batch of 1.

    Returns:
        ``(loss, perturbed_loss)`` per instance. The model is left as it was found.
    """
    perturbation = check_option("perturbation", perturbation, PERTURBATIONS)
    scope = check_option("scope", scope, SCOPES)
    rho = check_rho(rho)
    losses, perturbed = [], []
    with preserved(model), torch.enable_grad():
        for x in inputs:
            clone = copy.deepcopy(model).eval()
            params = [p for p in _scoped_parameters(clone, scope) if p.requires_grad]
            logits = clone(x.unsqueeze(0))
            label = logits.argmax(1)
            loss = F.cross_entropy(logits, label)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
            with torch.no_grad():
                scaled = [(p.abs() * g if perturbation == "asam" else g) for p, g in zip(params, grads, strict=True)]
                norm = torch.sqrt(sum((s * s).sum() for s in scaled))
                for p, g in zip(params, grads, strict=True):
                    t2 = p * p if perturbation == "asam" else 1.0
                    p.add_(rho * t2 * g / (norm + NORM_EPS))
                losses.append(loss.detach())
                perturbed.append(F.cross_entropy(clone(x.unsqueeze(0)), label))
    if not losses:
        empty = torch.empty(0)
        return empty, empty
    return torch.stack(losses), torch.stack(perturbed)


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Options:
    rho: float
    asam: bool
    per_batch: bool
    last_layer: bool
    functional: bool

    @classmethod
    def make(cls, rho: Any, perturbation: Any, granularity: Any, scope: Any, engine: Any) -> _Options:
        return cls(
            rho=check_rho(rho),
            asam=check_option("perturbation", perturbation, PERTURBATIONS) == "asam",
            per_batch=check_option("granularity", granularity, GRANULARITIES) == "per-batch",
            last_layer=check_option("scope", scope, SCOPES) == "last-layer",
            functional=check_option("engine", engine, ENGINES) == "functional",
        )


def _terms(model: nn.Module, x: torch.Tensor, opts: _Options) -> SharpnessTerms:
    """Dispatch; the model is already in eval mode and will be restored by the caller."""
    if len(x) == 0:
        empty = torch.empty(0, dtype=x.dtype if x.is_floating_point() else torch.float32)
        return SharpnessTerms(empty, empty, empty, torch.empty(0, dtype=torch.long))
    if opts.last_layer:
        return _last_layer_terms(model, x, opts)
    if opts.per_batch:
        return _per_batch_terms(model, x, opts)
    if opts.functional:
        return _functional_terms(model, x, opts)
    return _closed_form_terms(model, x, opts)


def _scoped_parameters(model: nn.Module, scope: str) -> list[nn.Parameter]:
    if scope == "last-layer":
        return list(last_linear(model).parameters())
    return list(model.parameters())


def _check_logits(logits: Any, n: int) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SaalError(f"the model must return (batch, classes) logits for SAAL, got {shape}")
    return logits


def _t2(p: torch.Tensor, asam: bool) -> torch.Tensor | float:
    """T^2 for one parameter: w^2 (ASAM) or 1 (SAM)."""
    return p.detach() * p.detach() if asam else 1.0


def _scale(sq: torch.Tensor, rho: float) -> torch.Tensor:
    return rho / (torch.sqrt(sq) + NORM_EPS)


# -- last layer ---------------------------------------------------------------------------------
def _last_layer_terms(model: nn.Module, x: torch.Tensor, opts: _Options) -> SharpnessTerms:
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
            sq = torch.zeros((), dtype=logits.dtype, device=logits.device)
            if use_w:
                sq = sq + ((_t2(w, opts.asam) * gw) * gw).sum()
            if use_b:
                sq = sq + ((_t2(b, opts.asam) * gb) * gb).sum()
            c = _scale(sq, opts.rho)
            w2 = w + c * _t2(w, opts.asam) * gw if use_w else w
            b2 = (b + c * _t2(b, opts.asam) * gb if use_b else b) if b is not None else None
            perturbed_logits = F.linear(h, w2, b2)
            norm = torch.sqrt(sq).expand(len(x))
        else:
            sq = _rank_one_sq(h, delta, w, b if use_b else None, use_w, opts.asam)
            c = _scale(sq, opts.rho)
            coef = _rank_one_coef(h, h, w, b if use_b else None, use_w, opts.asam)
            perturbed_logits = z + c[:, None] * delta * coef
            norm = torch.sqrt(sq)
        perturbed = F.cross_entropy(perturbed_logits, label, reduction="none")
    return SharpnessTerms(loss, perturbed, norm, label)


def _rank_one_sq(
    a: torch.Tensor, d: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, use_w: bool, asam: bool
) -> torch.Tensor:
    """||T g||^2 of a Linear layer for gradients ``d a^T`` (weight) and ``d`` (bias), per row."""
    d2 = d * d
    sq = torch.zeros(len(a), dtype=a.dtype, device=a.device)
    if use_w:
        sq = sq + ((d2 * ((a * a) @ (w * w).T)).sum(1) if asam else d2.sum(1) * (a * a).sum(1))
    if b is not None:
        sq = sq + (d2 @ (b * b) if asam else d2.sum(1))
    return sq


def _rank_one_coef(
    a: torch.Tensor, a2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, use_w: bool, asam: bool
) -> torch.Tensor:
    """The factor ``W^2 (a * a') + b^2`` (ASAM) or ``a . a' + 1`` (SAM) of the perturbation term."""
    coef: torch.Tensor | float = 0.0
    if use_w:
        coef = (a * a2) @ (w * w).T if asam else (a * a2).sum(1, keepdim=True)
    if b is not None:
        coef = coef + (b * b if asam else 1.0)
    return torch.as_tensor(coef, dtype=a.dtype, device=a.device)


# -- per batch ----------------------------------------------------------------------------------
def _per_batch_terms(model: nn.Module, x: torch.Tensor, opts: _Options) -> SharpnessTerms:
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.enable_grad():
        logits = _check_logits(model(x), len(x))
        label = logits.argmax(1)
        losses = F.cross_entropy(logits, label, reduction="none")
        grads = torch.autograd.grad(losses.mean(), list(named.values()), allow_unused=True) if named else ()
    with torch.no_grad():
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(named.values(), grads, strict=True)]
        sq = sum(((_t2(p, opts.asam) * g) * g).sum() for p, g in zip(named.values(), grads, strict=True))
        sq = torch.as_tensor(sq, dtype=logits.dtype, device=logits.device)
        c = _scale(sq, opts.rho)
        moved = {n: p.detach() + c * _t2(p, opts.asam) * g for (n, p), g in zip(named.items(), grads, strict=True)}
        perturbed = F.cross_entropy(functional_call(model, moved, (x,)), label, reduction="none")
    return SharpnessTerms(losses.detach(), perturbed, torch.sqrt(sq).expand(len(x)), label)


# -- torch.func over the whole model ------------------------------------------------------------
def _functional_terms(model: nn.Module, x: torch.Tensor, opts: _Options) -> SharpnessTerms:
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        logits = _check_logits(model(x), len(x))
    label = logits.argmax(1)
    loss = F.cross_entropy(logits, label, reduction="none")
    if not params:
        return SharpnessTerms(loss, loss.clone(), torch.zeros_like(loss), label)

    def instance_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    size = sum(p.numel() for p in params.values())
    chunk = max(1, _CHUNK_FLOATS // size)
    perturbed, norms = [], []
    for s in range(0, len(x), chunk):
        xc, yc = x[s : s + chunk], label[s : s + chunk]
        g = vmap(grad(instance_loss), in_dims=(None, 0, 0))(params, xc, yc)
        with torch.no_grad():
            sq = sum(_row_sums((_t2(params[n], opts.asam) * g[n]) * g[n]) for n in params)
            c = _scale(sq, opts.rho)
            moved = {n: params[n] + _bcast(c, g[n]) * _t2(params[n], opts.asam) * g[n] for n in params}
            perturbed.append(vmap(instance_loss, in_dims=(0, 0, 0))(moved, xc, yc))
            norms.append(torch.sqrt(sq))
    return SharpnessTerms(loss, torch.cat(perturbed), torch.cat(norms), label)


def _row_sums(t: torch.Tensor) -> torch.Tensor:
    """Sum a ``(B, ...)`` tensor over everything but the first dimension."""
    return t.reshape(t.shape[0], -1).sum(1)


def _bcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-instance vector to broadcast against a ``(B, ...)`` tensor."""
    return c.reshape(-1, *([1] * (like.dim() - 1)))


# -- closed-form per instance -------------------------------------------------------------------
class _Unsupported(Exception):
    """The hooks cannot follow this model; score it with torch.func instead."""


class _Rule:
    """One module whose parameters are perturbed: captures its input and output gradient in the
    first pass, adds its share of ||T g||^2, then its perturbation term in the second pass."""

    def __init__(self, module: nn.Module, asam: bool) -> None:
        self.module = module
        self.asam = asam
        self.calls = 0
        self.busy = False  # set while the rule itself calls the module (torch.func fallback)
        self.input: torch.Tensor | None = None
        self.input_version = 0
        self.output: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None

    def capture(self, args: tuple, kwargs: dict, output: Any, clone_inputs: bool) -> torch.Tensor | None:
        self.calls += 1
        if self.calls > 1 or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise _Unsupported(f"{type(self.module).__name__} is called twice or with other than one tensor")
        if not isinstance(output, torch.Tensor):
            raise _Unsupported(f"{type(self.module).__name__} returns {type(output).__name__}")
        a = args[0].detach()
        self.input = a.clone() if clone_inputs else a
        self.input_version = self.input._version
        if not output.requires_grad:
            return None
        self.output = output
        # Downstream in-place ops (ReLU(inplace=True), +=) must not touch the tensor we differentiate by.
        return output.clone()

    def sq_norm(self) -> torch.Tensor | None:
        raise NotImplementedError

    def perturb(self, a2: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def release(self) -> None:
        self.input = self.output = self.delta = None


def _det(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


class _MatrixRule(_Rule):
    """Layers whose per-instance weight gradient is ``delta_mat @ U^T`` for an unfolded input ``U``
    (``B x J x L``) and output gradient ``delta_mat`` (``B x out x L``): Conv2d and Linear on
    inputs with extra dimensions. Per-instance gradients are built in chunks of instances and
    kept between the passes when they fit ``_CACHE_FLOATS``, else rebuilt.

    For ASAM a chunk's gradients are scaled in place (``T * G``; its norm is the layer's share),
    and again before use (``T^2 * G``); the per-instance factor ``rho / ||T g||`` is applied to the
    layer's (much smaller) output instead of to the gradients. For SAM on layers with few output
    positions, ``||G||^2 = <delta^T delta, U^T U>`` and ``G U' = delta (U^T U')`` need only
    ``L x L`` Gram matrices, never the per-instance gradients.
    """

    def __init__(self, module: nn.Module, asam: bool) -> None:
        super().__init__(module, asam)
        self.cached: list[torch.Tensor] | None = None
        self.groups = getattr(module, "groups", 1)

    def unfold(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_matrix(self) -> torch.Tensor:
        raise NotImplementedError

    def fold_output(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_grads(self, sl: slice) -> torch.Tensor:
        """Per-instance weight gradients ``(b, out, J/groups)`` for the instances in ``sl``."""
        u = self.unfold(self.input[sl])  # (b, J, L)
        d = self.delta_matrix()[sl]  # (b, out, L)
        b, g = len(u), self.groups
        ug = u.reshape(b, g, u.shape[1] // g, u.shape[2])
        dg = d.reshape(b, g, d.shape[1] // g, d.shape[2])
        return torch.matmul(dg, ug.transpose(2, 3)).reshape(b, d.shape[1], u.shape[1] // g)

    def apply_kernels(self, e: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
        """The layer with per-instance weights ``e`` (``b, out, J/groups``) on ``a2``, as ``(b, out, L)``."""
        u2 = self.unfold(a2)
        b, g = len(u2), self.groups
        eg = e.reshape(b, g, e.shape[1] // g, e.shape[2])
        ug = u2.reshape(b, g, u2.shape[1] // g, u2.shape[2])
        return torch.matmul(eg, ug).reshape(b, e.shape[1], u2.shape[2])

    def _weight_matrix(self) -> torch.Tensor:
        w = self.module.weight.detach()
        return w.reshape(w.shape[0], -1)

    def _positions(self) -> int:
        return self.delta_matrix().shape[-1]

    def _use_gram(self) -> bool:
        out, j = self._weight_matrix().shape
        return not self.asam and self._positions() * (j + out // self.groups) < out * j // self.groups

    def _unfolds(self) -> bool:
        """Whether per-instance kernels go through a materialised ``unfold`` of the input."""
        return True

    def _chunks(self, n: int) -> list[slice]:
        w = self._weight_matrix()
        lpos = max(1, self._positions())
        size = self.groups * lpos * lpos if self._use_gram() else w.numel()
        if self._unfolds() or self._use_gram():
            size += w.shape[1] * self.groups * lpos
        step = max(1, _CHUNK_FLOATS // size)
        return [slice(s, s + step) for s in range(0, n, step)]

    def _scaled_grads(self, sl: slice, abs_w: torch.Tensor | None) -> torch.Tensor:
        g = self.weight_grads(sl)
        return g.mul_(abs_w) if abs_w is not None else g

    def _grams(self, sl: slice, a2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group: ``delta (b, g, out/g, L)`` and ``U^T U'`` (or ``U^T U`` without ``a2``): ``(b, g, L, L')``."""
        u = self.unfold(self.input[sl])
        b, g = len(u), self.groups
        ug = u.reshape(b, g, u.shape[1] // g, u.shape[2])
        u2 = ug if a2 is None else self.unfold(a2).reshape(b, g, u.shape[1] // g, -1)
        d = self.delta_matrix()[sl]
        return d.reshape(b, g, d.shape[1] // g, d.shape[2]), torch.matmul(ug.transpose(2, 3), u2)

    def sq_norm(self) -> torch.Tensor | None:
        m = self.module
        n = len(self.input)
        w = self._weight_matrix()
        sq = torch.zeros(n, dtype=w.dtype, device=w.device)
        if m.weight.requires_grad:
            if self._use_gram():
                for sl in self._chunks(n):
                    dg, uu = self._grams(sl, None)
                    sq[sl] += (torch.matmul(dg.transpose(2, 3), dg) * uu).sum((1, 2, 3))
            else:
                abs_w = w.abs() if self.asam else None
                keep = n * w.numel() <= _CACHE_FLOATS
                self.cached = [] if keep else None
                for sl in self._chunks(n):
                    g = self._scaled_grads(sl, abs_w)
                    sq[sl] += torch.linalg.vector_norm(g, dim=(1, 2)).square()
                    if keep:
                        self.cached.append(g)
        if m.bias is not None and m.bias.requires_grad:
            gb = self.delta_matrix().sum(-1)
            gb2 = gb * gb
            sq += gb2 @ (m.bias.detach() ** 2) if self.asam else gb2.sum(1)
        return sq

    def perturb(self, a2: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        m = self.module
        n = len(a2)
        train_w = m.weight.requires_grad
        train_b = m.bias is not None and m.bias.requires_grad
        if not (train_w or train_b):
            return out
        extra = torch.zeros(n, m.weight.shape[0], self._positions(), dtype=out.dtype, device=out.device)
        if train_w:
            abs_w = self._weight_matrix().abs() if self.asam else None
            for i, sl in enumerate(self._chunks(n)):
                if self._use_gram():
                    dg, uu = self._grams(sl, a2[sl])
                    y = torch.matmul(dg, uu)
                    y = y.reshape(y.shape[0], -1, y.shape[-1])
                else:
                    g = self.cached[i] if self.cached is not None else self._scaled_grads(sl, abs_w)
                    if abs_w is not None:
                        g = g.mul_(abs_w)  # T^2 * G; the gradients are not needed after this pass
                    y = self.apply_kernels(g, a2[sl])
                torch.mul(y, scale[sl, None, None], out=extra[sl])
        if train_b:
            gb = self.delta_matrix().sum(-1)
            eb = scale[:, None] * (gb * m.bias.detach() ** 2 if self.asam else gb)
            extra += eb[:, :, None]
        # The module's fresh output, in a pass without gradients: safe to add to in place.
        return out.add_(self.fold_output(extra, out))

    def release(self) -> None:
        super().release()
        self.cached = None


# Output positions from which oneDNN's convolution kernels (grouped over the instances) beat
# unfold + batched matmul for per-instance kernels (measured on CPU).
_CONV_KERNEL_POSITIONS = 128


class _ConvRule(_MatrixRule):
    """nn.Conv2d (zero padding) through ``unfold``, or through convolution kernels grouped over
    the instances when the output has many positions."""

    def unfold(self, a: torch.Tensor) -> torch.Tensor:
        m = self.module
        return F.unfold(a, m.kernel_size, dilation=m.dilation, padding=_conv_padding(m), stride=m.stride)

    def delta_matrix(self) -> torch.Tensor:
        return self.delta.flatten(2)

    def fold_output(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return y.reshape(like.shape)

    def _by_conv(self) -> bool:
        return self._positions() >= _CONV_KERNEL_POSITIONS

    def _unfolds(self) -> bool:
        return not self._by_conv()

    def weight_grads(self, sl: slice) -> torch.Tensor:
        if not self._by_conv():
            return super().weight_grads(sl)
        m = self.module
        a, d = self.input[sl], self.delta[sl]
        b = len(a)
        w_shape = [b * m.out_channels, m.in_channels // self.groups, *m.kernel_size]
        g = torch.nn.grad.conv2d_weight(
            a.reshape(1, -1, *a.shape[2:]),
            w_shape,
            d.reshape(1, -1, *d.shape[2:]),
            stride=m.stride,
            padding=_conv_padding(m),
            dilation=m.dilation,
            groups=b * self.groups,
        )
        return g.reshape(b, m.out_channels, -1)

    def apply_kernels(self, e: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
        if not self._by_conv():
            return super().apply_kernels(e, a2)
        m = self.module
        b = len(a2)
        y = F.conv2d(
            a2.reshape(1, -1, *a2.shape[2:]),
            e.reshape(b * m.out_channels, m.in_channels // self.groups, *m.kernel_size),
            stride=m.stride,
            padding=_conv_padding(m),
            dilation=m.dilation,
            groups=b * self.groups,
        )
        return y.reshape(b, m.out_channels, -1)


class _LinearNdRule(_MatrixRule):
    """nn.Linear on ``(B, ..., in)`` inputs: the gradient sums over the extra positions."""

    def unfold(self, a: torch.Tensor) -> torch.Tensor:
        return a.reshape(len(a), -1, a.shape[-1]).transpose(1, 2)

    def delta_matrix(self) -> torch.Tensor:
        d = self.delta
        return d.reshape(len(d), -1, d.shape[-1]).transpose(1, 2)

    def fold_output(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return y.transpose(1, 2).reshape(like.shape)


class _LinearRule(_LinearNdRule):
    """nn.Linear: on ``(B, in)`` inputs the gradients are rank one and no per-instance matrix is built."""

    def _flat(self) -> bool:
        return self.input.dim() == 2

    def sq_norm(self) -> torch.Tensor | None:
        if not self._flat():
            return super().sq_norm()
        m = self.module
        bias = m.bias if m.bias is not None and m.bias.requires_grad else None
        return _rank_one_sq(self.input, self.delta, m.weight.detach(), _det(bias), m.weight.requires_grad, self.asam)

    def perturb(self, a2: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if not self._flat():
            return super().perturb(a2, out, scale)
        m = self.module
        bias = m.bias if m.bias is not None and m.bias.requires_grad else None
        coef = _rank_one_coef(self.input, a2, m.weight.detach(), _det(bias), m.weight.requires_grad, self.asam)
        return out + scale[:, None] * self.delta * coef


def _asymmetric_same(m: nn.Conv2d) -> bool:
    """padding='same' with an even effective kernel pads unevenly, which unfold cannot express."""
    return m.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(m.dilation, m.kernel_size, strict=True))


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size, strict=True))  # type: ignore[return-value]
    return m.padding  # type: ignore[return-value]


class _BatchNormRule(_Rule):
    """Eval-mode BatchNorm with running statistics: ``gamma * xhat + beta`` per channel."""

    def _xhat(self, a: torch.Tensor) -> torch.Tensor:
        m = self.module
        view = (1, -1) + (1,) * (a.dim() - 2)
        return (a - m.running_mean.reshape(view)) / torch.sqrt(m.running_var.reshape(view) + m.eps)

    def _grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.delta.flatten(2) if self.delta.dim() > 2 else self.delta.unsqueeze(2)
        xh = self._xhat(self.input)
        xh = xh.flatten(2) if xh.dim() > 2 else xh.unsqueeze(2)
        return (d * xh).sum(2), d.sum(2)

    def sq_norm(self) -> torch.Tensor | None:
        m = self.module
        gg, gb = self._grads()
        sq = torch.zeros(len(gg), dtype=gg.dtype, device=gg.device)
        for p, g in ((m.weight, gg), (m.bias, gb)):
            if p is not None and p.requires_grad:
                sq += (g * g) @ (p.detach() ** 2) if self.asam else (g * g).sum(1)
        return sq

    def perturb(self, a2: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        m = self.module
        gg, gb = self._grads()
        view = (len(a2), -1) + (1,) * (a2.dim() - 2)
        if m.weight.requires_grad:
            e = scale[:, None] * (gg * m.weight.detach() ** 2 if self.asam else gg)
            out = out + e.reshape(view) * self._xhat(a2)
        if m.bias.requires_grad:
            e = scale[:, None] * (gb * m.bias.detach() ** 2 if self.asam else gb)
            out = out + e.reshape(view)
        return out


class _FunctionalRule(_Rule):
    """Any other module holding parameters (with its whole subtree): per-instance gradients and the
    perturbed output by ``torch.func`` on that module alone, each instance as a batch of one.
    Gradients are built in chunks of instances, kept between the passes when they fit."""

    def __init__(self, module: nn.Module, asam: bool) -> None:
        super().__init__(module, asam)
        self.params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
        self.size = sum(p.numel() for p in self.params.values())
        self.cached: list[dict[str, torch.Tensor]] | None = None

    def _call(self, params: dict[str, torch.Tensor], a: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, params, (a.unsqueeze(0),)).squeeze(0)

    def _chunks(self, n: int) -> list[slice]:
        step = max(1, _CHUNK_FLOATS // max(1, self.size))
        return [slice(s, s + step) for s in range(0, n, step)]

    def _grads(self, sl: slice) -> dict[str, torch.Tensor]:
        def dot(p: dict[str, torch.Tensor], a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            return (self._call(p, a) * d).sum()

        self.busy = True
        try:
            return vmap(grad(dot), in_dims=(None, 0, 0))(self.params, self.input[sl], self.delta[sl])
        finally:
            self.busy = False

    def sq_norm(self) -> torch.Tensor | None:
        if not self.params:
            return None
        n = len(self.input)
        keep = n * self.size <= _CACHE_FLOATS
        self.cached = [] if keep else None
        parts = []
        for sl in self._chunks(n):
            g = self._grads(sl)
            parts.append(sum(_row_sums((_t2(self.params[k], self.asam) * g[k]) * g[k]) for k in self.params))
            if keep:
                self.cached.append(g)
        return torch.cat(parts)

    def perturb(self, a2: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if not self.params:
            return out
        parts = []
        for i, sl in enumerate(self._chunks(len(a2))):
            g = self.cached[i] if self.cached is not None else self._grads(sl)
            c = scale[sl]
            moved = {k: self.params[k] + _bcast(c, g[k]) * _t2(self.params[k], self.asam) * g[k] for k in self.params}
            self.busy = True
            try:
                parts.append(vmap(self._call, in_dims=(0, 0))(moved, a2[sl]))
            finally:
                self.busy = False
        return torch.cat(parts)

    def release(self) -> None:
        super().release()
        self.cached = None


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _rule_for(module: nn.Module, asam: bool) -> _Rule:
    kind = type(module)
    if kind is nn.Linear:
        return _LinearRule(module, asam)
    if kind is nn.Conv2d and module.padding_mode == "zeros" and not _asymmetric_same(module):
        return _ConvRule(module, asam)
    if kind in _BATCH_NORMS:
        if module.running_mean is None or module.running_var is None:
            raise SaalError(
                f"{kind.__name__} without running statistics mixes the instances of a batch in eval mode; "
                "per-instance SAAL needs track_running_stats=True (or use granularity=per-batch)"
            )
        return _BatchNormRule(module, asam)
    return _FunctionalRule(module, asam)


def _find_rules(module: nn.Module, asam: bool) -> list[_Rule]:
    """The modules whose parameters are perturbed: known layers, or the outermost module that holds
    parameters of its own (with its whole subtree) when it has no closed-form rule."""
    if not any(True for _ in module.parameters()):
        return []
    known = type(module) in (nn.Linear, nn.Conv2d, *_BATCH_NORMS)
    if known or any(True for _ in module.parameters(recurse=False)):
        return [_rule_for(module, asam)]
    return [r for child in module.children() for r in _find_rules(child, asam)]


def _closed_form_terms(model: nn.Module, x: torch.Tensor, opts: _Options) -> SharpnessTerms:
    rules = _find_rules(model, opts.asam)
    for clone_inputs in (False, True):
        try:
            return _two_pass(model, x, opts, rules, clone_inputs)
        except _Unsupported:
            return _functional_terms(model, x, opts)
        except _InputChanged:
            continue
        finally:
            for r in rules:
                r.release()
                r.calls = 0
    raise RuntimeError("layer inputs changed in place even when copied")  # pragma: no cover


class _InputChanged(Exception):
    """A layer's input was modified in place after the layer read it; retry with copies."""


def _two_pass(model: nn.Module, x: torch.Tensor, opts: _Options, rules: list[_Rule], clone_inputs: bool) -> Any:
    handles = []
    try:
        for r in rules:
            handles.append(r.module.register_forward_hook(_capture_hook(r, clone_inputs), with_kwargs=True))
        with torch.enable_grad():
            logits = _check_logits(model(x), len(x))
            label = logits.argmax(1)
            losses = F.cross_entropy(logits, label, reduction="none")
            live = [r for r in rules if r.output is not None]
            if live:
                deltas = torch.autograd.grad(losses.sum(), [r.output for r in live], allow_unused=True)
                for r, d in zip(live, deltas, strict=True):
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
            perturbed = F.cross_entropy(model(x), label, reduction="none")
        return SharpnessTerms(losses, perturbed, torch.sqrt(sq), label)
    finally:
        for h in handles:
            h.remove()


def _capture_hook(rule: _Rule, clone_inputs: bool) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if rule.busy:
            return None
        return rule.capture(args, kwargs, output, clone_inputs)

    return hook


def _perturb_hook(rule: _Rule, scale: torch.Tensor) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if rule.busy:
            return None
        return rule.perturb(args[0], output, scale)

    return hook
