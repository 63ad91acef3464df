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

from saal.models.base import last_linear
from saal.pool import Pool
from saal.strategies.base import Selection, Strategy
from saal.strategies.coreset import embedding_batches


def gradient_factors(
    model: nn.Module, dataset: Dataset, indices: np.ndarray, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the two factors of the gradient embeddings of ``dataset[indices]``.

    Returns:
        ``(Q, H)``: ``Q[i] = softmax(z_i) - onehot(argmax z_i)`` (``N x C``) and ``H[i]`` the
        penultimate features, with a trailing 1 when the last linear layer has a bias
        (``N x (d + 1)``), both float32 on the model's device. The gradient embedding is
        ``g_i = outer(Q[i], H[i])``, exactly the gradient of ``CE(z_i, yhat_i)`` w.r.t. the last
        layer's weight (and bias), flattened row-major as ``[dW | db]`` per class.
    """
    bias = last_linear(model).bias is not None
    q_all: torch.Tensor | None = None
    h_all: torch.Tensor | None = None
    start = 0
    for _, logits, emb in embedding_batches(model, dataset, indices, batch_size):
        p = torch.softmax(logits.float(), dim=1)
        q = p - torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).to(p.dtype)
        if q_all is None or h_all is None:  # allocated once, filled batch by batch
            q_all = torch.empty(len(indices), q.shape[1], dtype=torch.float32, device=q.device)
            h_all = torch.ones(len(indices), emb.shape[1] + int(bias), dtype=torch.float32, device=q.device)
        q_all[start : start + len(q)] = q
        h_all[start : start + len(q), : emb.shape[1]] = emb  # the last column stays 1 for the bias
        start += len(q)
    if q_all is None or h_all is None:
        return torch.empty(0, 0), torch.empty(0, 0)
    return q_all, h_all


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
    (``rng`` draws). If every remaining squared distance is 0 (duplicates), the next centre is
    uniform among the points not yet chosen.

    Returns:
        ``(picks, d2)``: positions in pick order, and an ``N``-vector: for a picked point, its
        squared distance to the nearest earlier centre when it was picked (the first pick: its
        squared norm, its distance to the origin); for every other point, its squared distance to
        the nearest centre after all picks.
    """
    n = len(q)
    norms = squared_norms(q, h)
    picks = np.empty(k, dtype=np.int64)
    at_pick = np.empty(k, dtype=np.float64)
    taken = torch.zeros(n, dtype=torch.bool, device=q.device)
    min_d2 = torch.full((n,), float("inf"), dtype=torch.float64, device=q.device)
    for t in range(k):
        if t == 0:
            pick = int(torch.argmax(norms))
            at_pick[t] = float(norms[pick])
        else:
            weights = min_d2.cpu().numpy()
            total = weights.sum()
            if total > 0:
                cum = np.cumsum(weights)
                pick = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
                pick = min(pick, n - 1)
                while weights[pick] == 0:  # guard against a draw landing exactly on an edge
                    pick -= 1
            else:
                pick = int(rng.choice(np.flatnonzero(~taken.cpu().numpy())))
            at_pick[t] = float(weights[pick])
        picks[t] = pick
        taken[pick] = True
        min_d2 = torch.minimum(min_d2, squared_distances_to(q, h, pick, norms))
        min_d2[taken] = 0.0
    final = min_d2.cpu().numpy().copy()
    final[picks] = at_pick
    return picks, final


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
        q, h = gradient_factors(model, pool.dataset, candidates, self.batch_size)
        picks, scores = kmeans_pp(q, h, k, rng)
        return Selection(candidates[picks], candidates, scores)
