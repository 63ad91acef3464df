"""Closed-form per-instance rules for the layers whose parameters SAAL perturbs.

A rule belongs to one module. In the first forward pass it captures the module's input ``a``; the
backward pass gives its output gradient ``delta`` for every instance at once. From these it adds
its share of ``||T g||^2`` per instance (:meth:`Rule.sq_norm`) and, in the second forward pass,
adds its per-instance perturbation term to the module's output (:meth:`Rule.perturb`):

* nn.Linear on ``(B, in)`` inputs: the gradient is rank one (``delta a^T``), no per-instance matrix;
* nn.Linear on ``(B, ..., in)`` inputs and nn.Conv2d (zero padding): per-instance kernel gradients
  by ``unfold`` and batched matmul, by convolution kernels grouped over the instances on large
  feature maps, or (SAM, few output positions) through ``L x L`` Gram matrices only;
* eval-mode BatchNorm: elementwise per channel;
* any other module holding parameters: ``torch.func`` on that module alone (:class:`FunctionalRule`).

:func:`find_rules` picks the modules of a model and their rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.grad import conv2d_weight

from saal.errors import SaalError

# Floats of per-instance kernel gradients held at once per layer (chunks of instances beyond it),
# and the most a layer may keep between the two forward passes instead of recomputing them.
CHUNK_FLOATS = 1 << 20
CACHE_FLOATS = 1 << 24


def t2(p: torch.Tensor, asam: bool) -> torch.Tensor | float:
    """Return ``T^2`` for one parameter: ``w^2`` (ASAM, detached) or ``1.0`` (SAM)."""
    return p.detach() * p.detach() if asam else 1.0


def row_sums(t: torch.Tensor) -> torch.Tensor:
    """Return a ``(B, ...)`` tensor summed over everything but the first dimension: ``(B,)``."""
    return t.reshape(t.shape[0], -1).sum(1)


def tensor_sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Return ``sum(terms)`` (Python's, from 0) of a non-empty iterable of tensors."""
    return cast(torch.Tensor, sum(terms))


def bcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return the per-instance vector ``c`` reshaped to broadcast against a ``(B, ...)`` tensor."""
    return c.reshape(-1, *([1] * (like.dim() - 1)))


def rank_one_sq(
    a: torch.Tensor, d: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, use_w: bool, asam: bool
) -> torch.Tensor:
    """Return ``||T g||^2`` per row of a Linear layer whose gradients are ``d a^T`` (weight) and ``d`` (bias).

    ``b`` is the (detached) bias when it is perturbed, else None; ``use_w`` says whether the weight is.
    """
    d2 = d * d
    sq = torch.zeros(len(a), dtype=a.dtype, device=a.device)
    if use_w:
        sq = sq + ((d2 * ((a * a) @ (w * w).T)).sum(1) if asam else d2.sum(1) * (a * a).sum(1))
    if b is not None:
        sq = sq + (d2 @ (b * b) if asam else d2.sum(1))
    return sq


def rank_one_coef(
    a: torch.Tensor, a2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, use_w: bool, asam: bool
) -> torch.Tensor:
    """Return the factor ``W^2 (a * a') + b^2`` (ASAM) or ``a . a' + 1`` (SAM) of a Linear layer's
    perturbation term ``c * delta * factor``, per row (``a``: the first pass's input, ``a2``: the second's)."""
    coef: torch.Tensor | float = 0.0
    if use_w:
        coef = (a * a2) @ (w * w).T if asam else (a * a2).sum(1, keepdim=True)
    if b is not None:
        coef = coef + (b * b if asam else 1.0)
    return torch.as_tensor(coef, dtype=a.dtype, device=a.device)


class Unsupported(Exception):
    """Raised while capturing: the hooks cannot follow this model; score it with torch.func instead."""


class Rule:
    """One module whose parameters are perturbed: captures its input and output gradient in the
    first pass, adds its share of ||T g||^2, then its perturbation term in the second pass."""

    def __init__(self, module: nn.Module, asam: bool) -> None:
        self.module: Any = module  # the layer's own attributes (weight, stride, ...) are read by each rule
        self.asam = asam
        self.calls = 0
        self.busy = False  # set while the rule itself calls the module (torch.func fallback)
        self.input: torch.Tensor | None = None
        self.input_version = 0
        self.output: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None

    @property
    def captured_input(self) -> torch.Tensor:
        """The module's input in the first pass.

        Raises:
            RuntimeError: nothing was captured (a bug in the engine).
        """
        if self.input is None:
            raise RuntimeError(f"no input captured for {type(self.module).__name__}")
        return self.input

    @property
    def output_grad(self) -> torch.Tensor:
        """The gradient of the summed losses by the module's output in the first pass, per instance.

        Raises:
            RuntimeError: nothing was captured (a bug in the engine).
        """
        if self.delta is None:
            raise RuntimeError(f"no output gradient captured for {type(self.module).__name__}")
        return self.delta

    def capture(self, args: tuple, kwargs: dict, output: Any, clone_inputs: bool) -> torch.Tensor | None:
        """Record the module's input (a copy when ``clone_inputs``) and output in the first pass.

        Returns:
            A copy of the output for the rest of the model to use (None when the output needs no gradient).

        Raises:
            Unsupported: the module is called twice, with keyword or non-tensor inputs, or returns no tensor.
        """
        self.calls += 1
        if self.calls > 1 or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise Unsupported(f"{type(self.module).__name__} is called twice or with other than one tensor")
        if not isinstance(output, torch.Tensor):
            raise Unsupported(f"{type(self.module).__name__} returns {type(output).__name__}")
        a = args[0].detach()
        self.input = a.clone() if clone_inputs else a
        self.input_version = self.input._version
        if not output.requires_grad:
            return None
        self.output = output
        # Downstream in-place ops (ReLU(inplace=True), +=) must not touch the tensor we differentiate by.
        return output.clone()

    def sq_norm(self) -> torch.Tensor | None:
        """Return this module's share of ``||T g||^2`` per instance (None when it perturbs nothing)."""
        raise NotImplementedError

    def perturb(self, a2: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Return the module's second-pass output ``out`` (on input ``a2``) plus each instance's
        perturbation term, ``scale = rho / ||T g||`` per instance."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop what was captured."""
        self.input = self.output = self.delta = None


def _det(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


class MatrixRule(Rule):
    """Layers whose per-instance weight gradient is ``delta_mat @ U^T`` for an unfolded input ``U``
    (``B x J x L``) and output gradient ``delta_mat`` (``B x out x L``): Conv2d and Linear on
    inputs with extra dimensions. Per-instance gradients are built in chunks of instances and
    kept between the passes when they fit ``CACHE_FLOATS``, else rebuilt.

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
        u = self.unfold(self.captured_input[sl])  # (b, J, L)
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
        step = max(1, CHUNK_FLOATS // size)
        return [slice(s, s + step) for s in range(0, n, step)]

    def _scaled_grads(self, sl: slice, abs_w: torch.Tensor | None) -> torch.Tensor:
        g = self.weight_grads(sl)
        return g.mul_(abs_w) if abs_w is not None else g

    def _grams(self, sl: slice, a2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group: ``delta (b, g, out/g, L)`` and ``U^T U'`` (or ``U^T U`` without ``a2``): ``(b, g, L, L')``."""
        u = self.unfold(self.captured_input[sl])
        b, g = len(u), self.groups
        ug = u.reshape(b, g, u.shape[1] // g, u.shape[2])
        u2 = ug if a2 is None else self.unfold(a2).reshape(b, g, u.shape[1] // g, -1)
        d = self.delta_matrix()[sl]
        return d.reshape(b, g, d.shape[1] // g, d.shape[2]), torch.matmul(ug.transpose(2, 3), u2)

    def sq_norm(self) -> torch.Tensor | None:
        m = self.module
        n = len(self.captured_input)
        w = self._weight_matrix()
        sq = torch.zeros(n, dtype=w.dtype, device=w.device)
        if m.weight.requires_grad:
            if self._use_gram():
                for sl in self._chunks(n):
                    dg, uu = self._grams(sl, None)
                    sq[sl] += (torch.matmul(dg.transpose(2, 3), dg) * uu).sum((1, 2, 3))
            else:
                abs_w = w.abs() if self.asam else None
                keep = n * w.numel() <= CACHE_FLOATS
                cached: list[torch.Tensor] | None = [] if keep else None
                self.cached = cached
                for sl in self._chunks(n):
                    g = self._scaled_grads(sl, abs_w)
                    sq[sl] += torch.linalg.vector_norm(g, dim=(1, 2)).square()
                    if cached is not None:
                        cached.append(g)
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


class ConvRule(MatrixRule):
    """nn.Conv2d (zero padding) through ``unfold``, or through convolution kernels grouped over
    the instances when the output has many positions."""

    def unfold(self, a: torch.Tensor) -> torch.Tensor:
        m = self.module
        return F.unfold(a, m.kernel_size, dilation=m.dilation, padding=_conv_padding(m), stride=m.stride)

    def delta_matrix(self) -> torch.Tensor:
        return self.output_grad.flatten(2)

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
        a, d = self.captured_input[sl], self.output_grad[sl]
        b = len(a)
        w_shape = [b * m.out_channels, m.in_channels // self.groups, *m.kernel_size]
        g = conv2d_weight(
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


class LinearNdRule(MatrixRule):
    """nn.Linear on ``(B, ..., in)`` inputs: the gradient sums over the extra positions."""

    def unfold(self, a: torch.Tensor) -> torch.Tensor:
        return a.reshape(len(a), -1, a.shape[-1]).transpose(1, 2)

    def delta_matrix(self) -> torch.Tensor:
        d = self.output_grad
        return d.reshape(len(d), -1, d.shape[-1]).transpose(1, 2)

    def fold_output(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return y.transpose(1, 2).reshape(like.shape)


class LinearRule(LinearNdRule):
    """nn.Linear: on ``(B, in)`` inputs the gradients are rank one and no per-instance matrix is built."""

    def _flat(self) -> bool:
        return self.captured_input.dim() == 2

    def sq_norm(self) -> torch.Tensor | None:
        if not self._flat():
            return super().sq_norm()
        m = self.module
        bias = m.bias if m.bias is not None and m.bias.requires_grad else None
        return rank_one_sq(
            self.captured_input, self.output_grad, m.weight.detach(), _det(bias), m.weight.requires_grad, self.asam
        )

    def perturb(self, a2: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if not self._flat():
            return super().perturb(a2, out, scale)
        m = self.module
        bias = m.bias if m.bias is not None and m.bias.requires_grad else None
        coef = rank_one_coef(self.captured_input, a2, m.weight.detach(), _det(bias), m.weight.requires_grad, self.asam)
        return out + scale[:, None] * self.output_grad * coef


def _asymmetric_same(m: nn.Conv2d) -> bool:
    """padding='same' with an even effective kernel pads unevenly, which unfold cannot express."""
    return m.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(m.dilation, m.kernel_size, strict=True))


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size, strict=True))  # type: ignore[return-value]
    return m.padding  # type: ignore[return-value]


class BatchNormRule(Rule):
    """Eval-mode BatchNorm with running statistics: ``gamma * xhat + beta`` per channel."""

    def _xhat(self, a: torch.Tensor) -> torch.Tensor:
        m = self.module
        view = (1, -1) + (1,) * (a.dim() - 2)
        return (a - m.running_mean.reshape(view)) / torch.sqrt(m.running_var.reshape(view) + m.eps)

    def _grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.output_grad.flatten(2) if self.output_grad.dim() > 2 else self.output_grad.unsqueeze(2)
        xh = self._xhat(self.captured_input)
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


class FunctionalRule(Rule):
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
        step = max(1, CHUNK_FLOATS // max(1, self.size))
        return [slice(s, s + step) for s in range(0, n, step)]

    def _grads(self, sl: slice) -> dict[str, torch.Tensor]:
        def dot(p: dict[str, torch.Tensor], a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            return (self._call(p, a) * d).sum()

        self.busy = True
        try:
            return vmap(grad(dot), in_dims=(None, 0, 0))(self.params, self.captured_input[sl], self.output_grad[sl])
        finally:
            self.busy = False

    def sq_norm(self) -> torch.Tensor | None:
        if not self.params:
            return None
        n = len(self.captured_input)
        keep = n * self.size <= CACHE_FLOATS
        cached: list[dict[str, torch.Tensor]] | None = [] if keep else None
        self.cached = cached
        parts: list[torch.Tensor] = []
        for sl in self._chunks(n):
            g = self._grads(sl)
            parts.append(tensor_sum(row_sums((t2(self.params[k], self.asam) * g[k]) * g[k]) for k in self.params))
            if cached is not None:
                cached.append(g)
        return torch.cat(parts)

    def perturb(self, a2: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if not self.params:
            return out
        parts = []
        for i, sl in enumerate(self._chunks(len(a2))):
            g = self.cached[i] if self.cached is not None else self._grads(sl)
            c = scale[sl]
            moved = {k: self.params[k] + bcast(c, g[k]) * t2(self.params[k], self.asam) * g[k] for k in self.params}
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


def rule_for(module: nn.Module, asam: bool) -> Rule:
    """Return the closed-form rule for ``module``'s type, or a :class:`FunctionalRule`.

    Raises:
        SaalError: a BatchNorm without running statistics (its eval mode mixes the instances).
    """
    kind = type(module)
    if kind is nn.Linear:
        return LinearRule(module, asam)
    if (
        isinstance(module, nn.Conv2d)
        and kind is nn.Conv2d
        and module.padding_mode == "zeros"
        and not _asymmetric_same(module)
    ):
        return ConvRule(module, asam)
    if kind in _BATCH_NORMS:
        if module.running_mean is None or module.running_var is None:
            raise SaalError(
                f"{kind.__name__} without running statistics mixes the instances of a batch in eval mode; "
                "per-instance SAAL needs track_running_stats=True (or use granularity=per-batch)"
            )
        return BatchNormRule(module, asam)
    return FunctionalRule(module, asam)


def find_rules(module: nn.Module, asam: bool) -> list[Rule]:
    """Return the rules of the modules whose parameters are perturbed: known layers, or the outermost
    module that holds parameters of its own (with its whole subtree) when it has no closed-form rule.

    Raises:
        SaalError: as :func:`rule_for`.
    """
    if not any(True for _ in module.parameters()):
        return []
    known = type(module) in (nn.Linear, nn.Conv2d, *_BATCH_NORMS)
    if known or any(True for _ in module.parameters(recurse=False)):
        return [rule_for(module, asam)]
    return [r for child in module.children() for r in find_rules(child, asam)]
