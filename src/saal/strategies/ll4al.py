"""Learning Loss for Active Learning (Yoo & Kweon, CVPR 2019).

A small loss-prediction module reads intermediate features of the target model and is trained
beside it (through the training loop's :class:`~saal.training.TrainingHook`) to rank the
per-sample losses; the candidates with the largest predicted loss are chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from saal.core.model_state import model_device
from saal.core.scan import Batch, scan
from saal.errors import SaalError
from saal.pool import Pool
from saal.strategies.base import ScoreStrategy


class LossPredictionModule(nn.Module):
    """Per feature map: global average pooling -> Linear(hidden) -> ReLU; concatenated -> Linear -> 1.

    Feature maps may be ``N x C x ...`` (pooled over everything after the channel axis) or
    ``N x C``. The per-feature linear layers are lazy: their input sizes are fixed by the first
    batch they see.
    """

    def __init__(self, num_features: int, hidden: int = 128) -> None:
        super().__init__()
        if num_features < 1:
            raise SaalError("the loss-prediction module needs at least one feature layer")
        self.branches = nn.ModuleList(nn.Sequential(nn.LazyLinear(hidden), nn.ReLU()) for _ in range(num_features))
        self.out = nn.Linear(hidden * num_features, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return the predicted loss of each item (an ``N``-vector)."""
        pooled = [f.flatten(2).mean(2) if f.dim() > 2 else f.flatten(1) for f in features]
        return self.out(torch.cat([b(p) for b, p in zip(self.branches, pooled, strict=True)], dim=1)).squeeze(1)

    @property
    def materialised(self) -> bool:
        """Whether the lazy layers know their input sizes (the module has seen a batch)."""
        return not any(isinstance(p, nn.parameter.UninitializedParameter) for p in self.parameters())


def loss_prediction_loss(predicted: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The paper's margin ranking loss over pairs of a batch.

    The batch (its first ``2 * floor(n / 2)`` items: an odd last item is dropped) is paired as
    ``(i, m - 1 - i)`` for ``i < m / 2`` (``m`` the even length), as the authors' code does, and
    each pair ``(i, j)`` costs ``max(0, -sign(l_i - l_j) (lhat_i - lhat_j) + margin)``, with
    ``sign(0) = -1`` (again as that code does). The target losses are detached.

    Returns:
        The mean over pairs (a 0-d tensor; 0 with no pair).
    """
    m = len(predicted) // 2 * 2
    if m == 0:
        return predicted.sum() * 0.0
    half = m // 2
    dp = (predicted[:m] - predicted[:m].flip(0))[:half]
    dt = (target[:m] - target[:m].flip(0)).detach()[:half]
    sign = torch.where(dt > 0, 1.0, -1.0).to(dp.dtype)
    return torch.clamp(margin - sign * dp, min=0.0).mean()


class _FeatureTap:
    """Forward hooks that keep the latest output of named modules."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in self.names:
            module = _submodule(model, name)
            self.handles.append(module.register_forward_hook(self._keep(name)))

    def _keep(self, name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def features(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise SaalError(f"ll4al feature layer {missing[0]!r} was not run by the model's forward; name another")
        return [self.outputs[n] for n in self.names]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.outputs = {}


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise SaalError(
            f"ll4al: {type(model).__name__} has no module {name!r}; name modules from: {', '.join(names[:12])}"
        ) from None


class LL4ALHook:
    """Trains the strategy's loss-prediction module jointly with the model (see :class:`LL4AL`)."""

    def __init__(self, strategy: LL4AL) -> None:
        self.strategy = strategy
        self.tap: _FeatureTap | None = None
        self.epochs = 1

    def start(self, model: nn.Module, epochs: int) -> list[nn.Parameter]:
        names = self.strategy.layer_names(model)
        module = self.strategy.prepare_module(len(names), model_device(model))
        if self.tap is not None:
            self.tap.remove()
        self.tap = _FeatureTap(model, names)
        self.epochs = epochs
        return list(module.parameters())

    def loss(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        logits: torch.Tensor,
        per_sample_loss: torch.Tensor,
        epoch: int,
    ) -> torch.Tensor | None:
        assert self.tap is not None and self.strategy.module is not None
        features = self.tap.features()
        if epoch >= self.strategy.detach_fraction * self.epochs:
            # Past this point the loss module no longer shapes the target model's features.
            features = [f.detach() for f in features]
        predicted = self.strategy.module(features)
        self.strategy.trained = True
        return self.strategy.weight * loss_prediction_loss(predicted, per_sample_loss, self.strategy.margin)

    def end(self, model: nn.Module) -> None:
        if self.tap is not None:
            self.tap.remove()
            self.tap = None


class LL4AL(ScoreStrategy):
    """Learning Loss (Yoo & Kweon 2019): choose the candidates with the largest predicted loss.

    The loss-prediction module (:class:`LossPredictionModule`) reads the outputs of the model's
    ``feature_layers`` (the built-in models name them) or of the modules named by ``layers``,
    and is trained with the model through :meth:`training_hook`: the total loss is
    ``CE + weight * loss_prediction_loss(...)``, optimised by the model's own optimiser. From
    epoch ``detach_fraction * epochs`` of each round on, the features are detached so the module
    no longer changes the model (the paper: epoch 120 of 200). The module belongs to the
    strategy: it persists across rounds and is saved by :meth:`state_dict` for resuming.

    Scores: the predicted loss of each candidate (the largest are chosen).

    Args:
        layers: module names (``model.get_submodule`` paths) whose outputs feed the module,
            separated by ``+`` (e.g. ``"layer1+layer2"``) or as a list; None uses the model's
            ``feature_layers``.
        hidden: width of each feature's linear layer (the paper: 128).
        margin: the ranking loss's margin (the paper: 1.0).
        weight: the ranking loss's weight ``lambda`` (the paper: 1.0).
        detach_fraction: the fraction of each round's epochs after which features are detached.
        batch_size: pool items scored at once.
        subset: score only a seeded random subset of the unlabelled pool.

    Raises:
        SaalError: (at selection) if the module was never trained, e.g. ``select`` was called on a
            model trained without ``fit(..., hook=strategy.training_hook())``.
    """

    name = "ll4al"

    def __init__(
        self,
        *,
        layers: str | Sequence[str] | None = None,
        hidden: int = 128,
        margin: float = 1.0,
        weight: float = 1.0,
        detach_fraction: float = 0.6,
        batch_size: int = 256,
        subset: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        if hidden < 1:
            raise SaalError(f"ll4al hidden must be at least 1, got {hidden}")
        if not 0.0 <= detach_fraction <= 1.0:
            raise SaalError(f"ll4al detach_fraction must lie in [0, 1], got {detach_fraction}")
        if margin < 0 or weight < 0:
            raise SaalError(f"ll4al margin and weight must be >= 0, got {margin} and {weight}")
        if isinstance(layers, str):
            layers = [s.strip() for s in layers.split("+") if s.strip()]
        self.layers = None if layers is None else tuple(layers)
        self.hidden = int(hidden)
        self.margin = float(margin)
        self.weight = float(weight)
        self.detach_fraction = float(detach_fraction)
        self.module: LossPredictionModule | None = None
        self.trained = False

    def layer_names(self, model: nn.Module) -> tuple[str, ...]:
        """Return the module names whose outputs feed the loss-prediction module.

        Raises:
            SaalError: if none are given and the model names none.
        """
        names = self.layers or tuple(getattr(model, "feature_layers", ()))
        if not names:
            raise SaalError(
                f"ll4al needs intermediate features but {type(model).__name__} names no feature_layers; "
                "pass the module names, e.g. ll4al[layers=layer1+layer2]"
            )
        return tuple(names)

    def prepare_module(self, num_features: int, device: torch.device) -> LossPredictionModule:
        """Return the loss-prediction module (built on first use), on ``device``.

        Raises:
            SaalError: if it was built for a different number of feature layers.
        """
        if self.module is None:
            self.module = LossPredictionModule(num_features, self.hidden)
        elif len(self.module.branches) != num_features:
            raise SaalError(
                f"ll4al's loss module reads {len(self.module.branches)} feature layers, the model now gives "
                f"{num_features}; use a new strategy for a different model"
            )
        return self.module.to(device)

    def training_hook(self) -> LL4ALHook:
        return LL4ALHook(self)

    def score(self, model: nn.Module, pool: Pool, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        names = self.layer_names(model)
        if self.module is None or not self.trained or not self.module.materialised:
            raise SaalError(
                "ll4al's loss-prediction module is untrained; train the model with "
                "saal.training.fit(..., hook=strategy.training_hook()) (saal run does this) before selecting"
            )
        device = model_device(model)
        module = self.prepare_module(len(names), device)
        tap = _FeatureTap(model, names)

        def batch_scores(batch: Batch) -> dict[str, torch.Tensor]:
            model(batch.inputs.to(device))
            return {"score": module(tap.features()).double()}

        try:
            with torch.no_grad():
                out = scan(
                    pool.dataset, candidates, batch_scores, batch_size=self.batch_size, collate=pool.task.collate
                )
        finally:
            tap.remove()
        return out["score"].cpu().numpy()

    def state_dict(self) -> dict:
        """Return the loss-prediction module's weights (empty before the module exists)."""
        if self.module is None:
            return {}
        return {
            "num_features": len(self.module.branches),
            "trained": self.trained,
            "module": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the module saved by :meth:`state_dict` (an empty state forgets it)."""
        if not state:
            self.module, self.trained = None, False
            return
        device = next(iter(self.module.out.parameters())).device if self.module is not None else None
        self.module = LossPredictionModule(int(state["num_features"]), self.hidden)
        self.module.load_state_dict(state["module"])
        if device is not None:
            self.module.to(device)
        self.trained = bool(state["trained"])

    def __repr__(self) -> str:
        return (
            f"LL4AL(layers={self.layers}, hidden={self.hidden}, margin={self.margin}, weight={self.weight}, "
            f"detach_fraction={self.detach_fraction}, batch_size={self.batch_size}, subset={self.subset})"
        )
