"""BALD with Monte-Carlo dropout (Houlsby et al. 2011; Gal, Islam & Ghahramani 2017)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from saal.core.model_state import model_device
from saal.core.scan import Batch, scan
from saal.core.seeding import derive_seed
from saal.errors import SaalError
from saal.pool import Pool
from saal.strategies.base import ScoreStrategy


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """Return BALD's score from Monte-Carlo class probabilities.

    Args:
        probs: ``T x N x C``: ``T`` stochastic predictive distributions for ``N`` items.

    Returns:
        The ``N``-vector ``H[mean_t p_t] - mean_t H[p_t]`` (nats, ``0 log 0 = 0``), the mutual
        information between the label and the model parameters; clamped at 0 against round-off.
    """
    mean = probs.mean(0)
    entropy_of_mean = -torch.special.xlogy(mean, mean).sum(-1)
    mean_entropy = -torch.special.xlogy(probs, probs).sum(-1).mean(0)
    return (entropy_of_mean - mean_entropy).clamp_min(0.0)


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """Return every dropout module of ``model`` (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ...)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


class PrefixCache:
    """Reuses, across Monte-Carlo passes over one batch, what the model computes before any dropout.

    The first pass runs the model normally while forward hooks note every module that finished
    before the first dropout module started (its output cannot depend on a dropout mask). In the
    later passes each outermost such module returns (a copy of) its first-pass output instead of
    recomputing it, so for a model whose dropout sits near the output (the built-in MLP and CNN)
    a pass costs only the layers after the dropout. Modules called more than once in a forward
    are never reused. This assumes dropout is the forward's only randomness; the dropout masks,
    and so the scores, are exactly those of plain passes.
    """

    def __init__(self, model: nn.Module, dropouts: list[nn.Module]) -> None:
        self.model = model
        self.dropout_ids = {id(m) for m in dropouts}
        self.parent = {id(c): m for m in model.modules() for c in m.children()}
        self.reusable: list[tuple[nn.Module, torch.Tensor]] = []

    def first_pass(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model on ``x`` and remember the reusable outputs; return its output."""
        finished: dict[int, tuple[nn.Module, torch.Tensor]] = {}
        calls: dict[int, int] = {}
        dropout_started = False

        def pre(m: nn.Module, _args: object) -> None:
            nonlocal dropout_started
            calls[id(m)] = calls.get(id(m), 0) + 1
            dropout_started = dropout_started or id(m) in self.dropout_ids

        def post(m: nn.Module, _args: object, out: object) -> None:
            if not dropout_started and isinstance(out, torch.Tensor):
                finished[id(m)] = (m, out.clone())  # a copy: a later in-place op must not change it
                for c in m.children():  # only the outermost finished modules are worth keeping
                    finished.pop(id(c), None)

        modules = [m for m in self.model.modules() if m is not self.model]
        handles = [m.register_forward_pre_hook(pre) for m in modules]
        handles += [m.register_forward_hook(post) for m in modules]
        try:
            out = self.model(x)
        finally:
            for h in handles:
                h.remove()
        once = {k for k in finished if calls.get(k) == 1}
        self.reusable = [finished[k] for k in once if id(self.parent.get(k)) not in once]
        return out

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Within the block, the reusable modules return their first-pass outputs."""
        saved = []
        try:
            for m, out in self.reusable:
                saved.append((m, m.__dict__.get("forward")))
                m.forward = functools.partial(_replay, out)
            yield
        finally:
            for m, previous in saved:
                if previous is None:
                    del m.__dict__["forward"]
                else:
                    m.forward = previous


def _replay(out: torch.Tensor, *_args: object, **_kwargs: object) -> torch.Tensor:
    return out.clone()


@contextlib.contextmanager
def forked_torch_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run a block with torch's global generators (CPU and ``device``) seeded with ``seed``, then put
    them back as they were, so that nothing outside the block sees a different random stream."""
    devices = [] if device.type == "cpu" else [device.index if device.index is not None else 0]
    device_type = "cuda" if device.type == "cpu" else device.type
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.manual_seed(seed)
        yield


class BALD(ScoreStrategy):
    """BALD: the mutual information between the prediction and the weights, by MC dropout.

    Each batch of candidates goes through the model ``samples`` times with every dropout
    module in train mode and everything else in eval mode (BatchNorm keeps its running
    statistics). The score is :func:`mutual_information` of the ``samples x batch x C``
    probabilities; the largest are chosen. Dropout masks come from torch's generator seeded
    by ``rng``, one stream per batch keyed by the batch's place in the scan (the global torch stream
    is left untouched), so the same generator gives the same choice, in one process or sharded over
    several. Which masks fall on which item depends on ``batch_size`` too: a different batch size
    gives a different (equally valid) Monte-Carlo estimate. Memory: ``samples x batch_size x C``.

    With ``reuse_prefix`` (the default), the layers that run before the first dropout are
    computed once per batch instead of ``samples`` times (see :class:`PrefixCache`); the scores
    are the same either way.

    Args:
        samples: stochastic forward passes per item (``T``), at least 2.
        reuse_prefix: compute the part of the forward before the first dropout once per batch.
        batch_size: pool items per forward pass.
        subset: score only a seeded random subset of the unlabelled pool.

    Raises:
        SaalError: (at selection) if the model has no dropout module.
    """

    name = "bald"

    def __init__(
        self, *, samples: int = 20, reuse_prefix: bool = True, batch_size: int = 256, subset: int | None = None
    ) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        if samples < 2:
            raise SaalError(f"bald needs samples >= 2 stochastic passes, got {samples}")
        self.samples = int(samples)
        self.reuse_prefix = bool(reuse_prefix)

    def score(self, model: nn.Module, pool: Pool, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        dropouts = dropout_modules(model)
        if not dropouts:
            raise SaalError(
                f"bald needs MC dropout but {type(model).__name__} has no dropout layer; add an nn.Dropout "
                "(e.g. before the last linear layer) or use the built-in mlp / cnn models"
            )
        for m in dropouts:
            m.train()  # the base class puts everything back afterwards
        device = model_device(model)
        seed = derive_seed(rng)

        def batch_scores(batch: Batch) -> dict[str, torch.Tensor]:
            # Each batch's masks come from its own stream, seeded by the batch's place in the scan: the
            # same scores whether one process scans every batch or several ranks share them.
            torch.manual_seed((seed * 1_000_003 + batch.position) % (2**63 - 1))
            x = batch.inputs.to(device)
            if self.reuse_prefix:
                cache = PrefixCache(model, dropouts)
                logits = [cache.first_pass(x)]
                with cache.replaying():
                    logits += [model(x) for _ in range(self.samples - 1)]
            else:
                logits = [model(x) for _ in range(self.samples)]
            probs = torch.stack([torch.softmax(z.double(), dim=1) for z in logits])
            return {"score": mutual_information(probs)}

        with forked_torch_rng(device, seed), torch.no_grad():
            out = scan(pool.dataset, candidates, batch_scores, batch_size=self.batch_size, collate=pool.task.collate)
        return out["score"].cpu().numpy()

    def __repr__(self) -> str:
        return (
            f"BALD(samples={self.samples}, reuse_prefix={self.reuse_prefix}, batch_size={self.batch_size}, "
            f"subset={self.subset})"
        )
