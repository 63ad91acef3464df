"""BADGE: k-means++ seeding on last-layer gradient embeddings (Ash et al., ICLR 2020).

The gradient of ``CE(logits, yhat)`` w.r.t. the last linear layer ``z = W h + b`` is
``g = q ⊗ [h, 1]`` with ``q = softmax(z) - onehot(yhat)``: an outer product. So
``<g_i, g_j> = <q_i, q_j> * <h~_i, h~_j>`` (``h~ = [h, 1]``) and every distance BADGE needs comes
from the ``N x C`` matrix ``Q`` and the ``N x (d + 1)`` matrix ``H~``: memory stays linear in the
pool, and the ``N x (C * (d + 1))`` embedding matrix is never built.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from saal.core.model_state import model_device
from saal.core.scan import Batch, scan
from saal.core.selection import d2_sample
from saal.models.base import last_linear
from saal.pool import Pool
from saal.strategies.base import Selection, Strategy
from saal.tasks import Classification, Task


def gradient_factors(
    model: nn.Module, dataset: Dataset, indices: np.ndarray, batch_size: int, task: Task | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the two factors of the gradient embeddings of ``dataset[indices]``.

    Returns:
        ``(Q, H)``: ``Q[i] = softmax(z_i) - onehot(argmax z_i)`` (``N x C``) and ``H[i]`` the
        penultimate features, with a trailing 1 when the last linear layer has a bias
        (``N x (d + 1)``), both float32 on the model's device. The gradient embedding is
        ``g_i = outer(Q[i], H[i])``, exactly the gradient of ``CE(z_i, yhat_i)`` w.r.t. the last
        layer's weight (and bias), flattened row-major as ``[dW | db]`` per class.
    """
    task = task if task is not None else Classification(1)  # the factors do not depend on the class count
    bias = last_linear(model).bias is not None
    device = model_device(model)

    def batch_factors(batch: Batch) -> dict[str, torch.Tensor]:
        logits, emb = task.embed(model, task.to_device(batch.inputs, device))
        p = torch.softmax(logits.float(), dim=1)
        q = p - torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).to(p.dtype)
        h = torch.ones(len(q), emb.shape[1] + int(bias), dtype=torch.float32, device=q.device)
        h[:, : emb.shape[1]] = emb  # the last column stays 1 for the bias
        return {"q": q, "h": h}

    with torch.no_grad():
        out = scan(dataset, indices, batch_factors, batch_size=batch_size, collate=task.collate)
    if not out:
        return torch.empty(0, 0), torch.empty(0, 0)
    return out["q"], out["h"]


def squared_distances_to(q: torch.Tensor, h: torch.Tensor, i: int, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``||g_j - g_i||^2`` for every row ``j`` from the factors alone (float64, clamped at 0).

    ``||g_j - g_i||^2 = ||q_j||^2 ||h_j||^2 + ||q_i||^2 ||h_i||^2 - 2 <q_j, q_i> <h_j, h_i>``;
    ``norms`` (from :func:`squared_norms`) may be passed to save recomputing them.
    """
    norms = squared_norms(q, h) if norms is None else norms
    cross = (q @ q[i]).double() * (h @ h[i]).double()
    return (norms + norms[i] - 2.0 * cross).clamp_min(0.0)


def squared_norms(q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Return ``||g_j||^2 = ||q_j||^2 ||h_j||^2`` for every row (float64)."""
    return _row_squared_norms(q) * _row_squared_norms(h)


def _row_squared_norms(x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    # In float64, a block of rows at a time: a float64 copy of the whole matrix would double the memory.
    out = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for i in range(0, len(x), chunk):
        out[i : i + chunk] = x[i : i + chunk].double().pow(2).sum(1)
    return out


def kmeans_pp(q: torch.Tensor, h: torch.Tensor, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ seeding (D^2 sampling) on the factored gradient embeddings ``g_j = outer(q_j, h_j)``.

    The first centre is the largest-norm embedding (as BADGE's code does); each next centre is
    drawn with probability proportional to its squared distance to the nearest centre so far
    (``rng`` draws), by :func:`saal.core.selection.d2_sample`. If every remaining squared distance
    is 0 (duplicates), the next centre is uniform among the points not yet chosen.

    Returns:
        ``(picks, d2)``: positions in pick order, and an ``N``-vector: for a picked point, its
        squared distance to the nearest earlier centre when it was picked (the first pick: its
        squared norm, its distance to the origin); for every other point, its squared distance to
        the nearest centre after all picks.
    """
    norms = squared_norms(q, h)
    first = int(torch.argmax(norms))
    picks, d2 = d2_sample(len(q), k, first, lambda j: squared_distances_to(q, h, j, norms).cpu().numpy(), rng)
    d2[first] = float(norms[first])
    return picks, d2


class BADGE(Strategy):
    """BADGE (Ash et al. 2020): k-means++ seeding on gradient embeddings under the predicted label.

    Each candidate's embedding is the gradient of ``CE(logits, argmax logits)`` w.r.t. the last
    linear layer's weight and bias (the bias term is included when the layer has one: it is
    part of the exact last-layer gradient). Distances come from the factorisation
    ``<g_i, g_j> = <q_i, q_j> <h_i, h_j>``, so memory is ``O(N (C + d))``, never ``O(N C d)``.
    The first pick is the largest-norm embedding; later picks are D^2-sampled with ``rng``.

    Scores (for every candidate): a chosen candidate's squared distance to the nearest earlier
    pick when it was drawn (the first: its squared norm); every other candidate's squared
    distance to the nearest pick after all picks.

    Args:
        batch_size: pool items embedded at once.
        subset: score only a seeded random subset of the unlabelled pool.
    """

    name = "badge"

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        q, h = gradient_factors(model, pool.dataset, candidates, self.batch_size, pool.task)
        picks, scores = kmeans_pp(q, h, k, rng)
        return Selection(candidates[picks], candidates, scores)
