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
from saal.core.row_store import MemoryRows, RowStore
from saal.core.scan import Batch, scan, scan_rows
from saal.core.selection import d2_sample
from saal.errors import SaalError
from saal.models.base import last_linear
from saal.pool import Pool
from saal.strategies.base import Selection, Strategy
from saal.strategies.coreset import take_rows
from saal.tasks import Classification, Task

# Rows per block when a pass reads the factors.
BLOCK = 16384


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
        return _factors(logits, emb, bias)

    with torch.no_grad():
        out = scan(dataset, indices, batch_factors, batch_size=batch_size, collate=task.collate)
    if not out:
        return torch.empty(0, 0), torch.empty(0, 0)
    return out["q"], out["h"]


def gradient_factor_rows(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    batch_size: int,
    task: Task | None = None,
    *,
    on_disk: bool | None = None,
) -> tuple[RowStore, RowStore]:
    """As :func:`gradient_factors`, kept in :class:`~saal.core.row_store.RowStore` s (temporary files when large).

    Returns:
        ``(Q, H)`` stores of ``len(indices)`` rows (empty in-memory stores when there is no item).
    """
    task = task if task is not None else Classification(1)
    bias = last_linear(model).bias is not None
    device = model_device(model)

    def batch_factors(batch: Batch) -> dict[str, torch.Tensor]:
        logits, emb = task.embed(model, task.to_device(batch.inputs, device))
        return _factors(logits, emb, bias)

    with torch.no_grad():
        out = scan_rows(dataset, indices, batch_factors, batch_size=batch_size, collate=task.collate, on_disk=on_disk)
    if not out:
        return MemoryRows(torch.empty(0, 0)), MemoryRows(torch.empty(0, 0))
    return out["q"], out["h"]


def _factors(logits: torch.Tensor, emb: torch.Tensor, bias: bool) -> dict[str, torch.Tensor]:
    p = torch.softmax(logits.float(), dim=1)
    q = p - torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).to(p.dtype)
    h = torch.ones(len(q), emb.shape[1] + int(bias), dtype=torch.float32, device=q.device)
    h[:, : emb.shape[1]] = emb  # the last column stays 1 for the bias
    return {"q": q, "h": h}


def squared_distances_to(q: torch.Tensor, h: torch.Tensor, i: int, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``||g_j - g_i||^2`` for every row ``j`` from the factors alone (float64, clamped at 0).

    ``||g_j - g_i||^2 = ||q_j||^2 ||h_j||^2 + ||q_i||^2 ||h_i||^2 - 2 <q_j, q_i> <h_j, h_i>``;
    ``norms`` (from :func:`squared_norms`) may be passed to save recomputing them.
    """
    norms = squared_norms(q, h) if norms is None else norms
    return squared_distances_rows(MemoryRows(q), MemoryRows(h), i, norms, q.device)


def squared_distances_rows(
    q: RowStore, h: RowStore, i: int, norms: torch.Tensor, device: torch.device, chunk: int = BLOCK
) -> torch.Tensor:
    """:func:`squared_distances_to` over stores, ``chunk`` rows at a time on ``device`` (float64 ``N``-vector)."""
    qi, hi = q.read(i, i + 1)[0].to(device).clone(), h.read(i, i + 1)[0].to(device).clone()  # aligned copies
    cross = torch.empty(len(q), dtype=torch.float64, device=device)
    for (start, qb), (_, hb) in zip(q.blocks(chunk), h.blocks(chunk), strict=True):
        cross[start : start + len(qb)] = (qb.to(device) @ qi).double() * (hb.to(device) @ hi).double()
    return (norms + norms[i] - 2.0 * cross).clamp_min(0.0)


def squared_norms(q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Return ``||g_j||^2 = ||q_j||^2 ||h_j||^2`` for every row (float64)."""
    return squared_norms_rows(MemoryRows(q), MemoryRows(h), q.device)


def squared_norms_rows(q: RowStore, h: RowStore, device: torch.device, chunk: int = BLOCK) -> torch.Tensor:
    """:func:`squared_norms` over stores (float64 on ``device``), a block of rows at a time."""
    out = torch.empty(len(q), dtype=torch.float64, device=device)
    for (start, qb), (_, hb) in zip(q.blocks(chunk), h.blocks(chunk), strict=True):
        qb, hb = qb.to(device), hb.to(device)
        out[start : start + len(qb)] = qb.double().pow(2).sum(1) * hb.double().pow(2).sum(1)
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
    return kmeans_pp_rows(MemoryRows(q), MemoryRows(h), k, rng, q.device)


def kmeans_pp_rows(
    q: RowStore, h: RowStore, k: int, rng: np.random.Generator, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`kmeans_pp` over stores (the factors may lie in files): memory ``O(N + block x (C + d))``."""
    norms = squared_norms_rows(q, h, device)
    first = int(torch.argmax(norms))
    picks, d2 = d2_sample(len(q), k, first, lambda j: squared_distances_rows(q, h, j, norms, device).cpu().numpy(), rng)
    d2[first] = float(norms[first])
    return picks, d2


def prefiltered_kmeans_pp(
    q: RowStore, h: RowStore, k: int, keep: int, rng: np.random.Generator, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ seeding among a seeded uniform sample of ``keep`` candidates (an approximation).

    The sample (drawn with ``rng``) always holds the largest gradient embedding, the exact seeding's
    first pick; the exact seeding then runs on those rows alone, held in memory, and one last pass
    (a matrix product per block) gives every other candidate its squared distance to the nearest
    pick. A uniform sample keeps the pool's spread, which D^2 sampling needs: on the benchmark's
    embeddings its k-means++ potential stays within the spread of the exact seeding over seeds,
    while keeping only the largest gradients doubled it (``benchmarks/scale_selection.py``).
    Cost: two passes over the pool plus ``k`` passes over ``keep`` rows, instead of ``k`` passes
    over the pool.

    Returns:
        As :func:`kmeans_pp`, over all rows (exactly its result when ``keep`` covers every row).
    """
    if keep >= len(q):
        return kmeans_pp_rows(q, h, k, rng, device)
    norms = squared_norms_rows(q, h, device)
    first = int(torch.argmax(norms))
    kept = np.union1d(rng.choice(len(q), size=keep - 1, replace=False), [first]).astype(np.int64)
    sub_q, sub_h = MemoryRows(take_rows(q, kept).to(device)), MemoryRows(take_rows(h, kept).to(device))
    picks_sub, d2_sub = kmeans_pp_rows(sub_q, sub_h, k, rng, device)
    pq, ph = sub_q.tensor[picks_sub], sub_h.tensor[picks_sub]
    pn = norms[torch.as_tensor(kept[picks_sub], device=device)]
    final = torch.empty(len(q), dtype=torch.float64, device=device)
    for (start, qb), (_, hb) in zip(q.blocks(BLOCK), h.blocks(BLOCK), strict=True):
        cross = (qb.to(device) @ pq.T).double() * (hb.to(device) @ ph.T).double()
        d2 = norms[start : start + len(qb), None] + pn[None, :] - 2.0 * cross
        final[start : start + len(qb)] = d2.clamp_min(0.0).min(1).values
    out = final.cpu().numpy()
    out[kept] = d2_sub
    return kept[picks_sub], out


class BADGE(Strategy):
    """BADGE (Ash et al. 2020): k-means++ seeding on gradient embeddings under the predicted label.

    Each candidate's embedding is the gradient of ``CE(logits, argmax logits)`` w.r.t. the last
    linear layer's weight and bias (the bias term is included when the layer has one: it is
    part of the exact last-layer gradient). Distances come from the factorisation
    ``<g_i, g_j> = <q_i, q_j> <h_i, h_j>``, so memory is ``O(N (C + d))``, never ``O(N C d)``;
    for a large pool the factors go to temporary files (``$SAAL_TMPDIR`` or the system's temp
    folder) and are read back a block at a time, so memory holds ``O(N)`` numbers only.
    The first pick is the largest-norm embedding; later picks are D^2-sampled with ``rng``.

    Scores (for every candidate): a chosen candidate's squared distance to the nearest earlier
    pick when it was drawn (the first: its squared norm); every other candidate's squared
    distance to the nearest pick after all picks.

    Args:
        prefilter: approximate for speed: seed only among a seeded uniform sample of this many
            candidates (see :func:`prefiltered_kmeans_pp`); None (default) is exact.
        batch_size: pool items embedded at once.
        subset: score only a seeded random subset of the unlabelled pool.

    Raises:
        SaalError: ``prefilter < 1``; (at selection) ``prefilter`` smaller than the query size.
    """

    name = "badge"

    def __init__(self, *, prefilter: int | None = None, batch_size: int = 256, subset: int | None = None) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        if prefilter is not None and (isinstance(prefilter, bool) or int(prefilter) < 1):
            raise SaalError(f"badge prefilter must be a positive number of candidates or None, got {prefilter!r}")
        self.prefilter = None if prefilter is None else int(prefilter)

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        if self.prefilter is not None and self.prefilter < k:
            raise SaalError(f"badge prefilter {self.prefilter} is smaller than the query size {k}; raise it")
        device = model_device(model)
        q, h = gradient_factor_rows(model, pool.dataset, candidates, self.batch_size, pool.task)
        try:
            if self.prefilter is not None and self.prefilter < len(q):
                picks, scores = prefiltered_kmeans_pp(q, h, k, self.prefilter, rng, device)
            else:
                picks, scores = kmeans_pp_rows(q, h, k, rng, device)
        finally:
            q.close()
            h.close()
        return Selection(candidates[picks], candidates, scores)

    def __repr__(self) -> str:
        return f"BADGE(prefilter={self.prefilter}, batch_size={self.batch_size}, subset={self.subset})"
