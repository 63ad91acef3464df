"""Sharpness-Aware Minimisation (Foret et al. 2021) around any base optimiser."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class SAM(torch.optim.Optimizer):
    """SAM: step to ``w + rho * g / ||g||``, take the gradient there, step the base optimiser from ``w``.

    Use :meth:`step` with a closure that zeroes nothing, computes the loss, calls
    ``backward()`` and returns the loss; it is called twice per step. With ``rho = 0`` this is
    exactly the base optimiser.

    Args:
        params: the parameters to optimise.
        base_optimizer: the class of the base optimiser, e.g. ``torch.optim.SGD``.
        rho: the neighbourhood radius.
        base_kwargs: the base optimiser's options (``lr``, ``momentum``, ...).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self) -> None:
        """Move every parameter to ``w + e(w)`` and remember ``e(w)``."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([gr.norm(2) for gr in grads]), 2) if grads else torch.tensor(0.0)
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
                self.state[p]["e_w"] = e_w

    @torch.no_grad()
    def second_step(self) -> None:
        """Move back to ``w`` and step the base optimiser with the gradient taken at ``w + e(w)``."""
        for group in self.param_groups:
            for p in group["params"]:
                if "e_w" in self.state[p]:
                    p.sub_(self.state[p].pop("e_w"))
        self.base_optimizer.step()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("SAM.step needs a closure that computes the loss and calls backward()")
        loss = closure()
        self.first_step()
        self.zero_grad()
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Return the base optimiser's state (momentum buffers live there, not in SAM's own state)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (into the base optimiser, which SAM shares groups with)."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
