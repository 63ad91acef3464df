"""Core-set selection: greedy k-center on penultimate embeddings (Sener & Savarese, ICLR 2018)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from saal.batching import input_batches
from saal.core.model_state import model_device
from saal.models.base import logits_and_embedding
from saal.pool import Pool
from saal.strategies.base import Selection, Strategy

# Rows per block when comparing points with centres: a block is at most CHUNK x CHUNK floats.
CHUNK = 2048


def embedding_batches(
    model: nn.Module, dataset: Dataset, indices: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Yield ``(dataset indices, logits, penultimate embeddings)`` per batch, gradients off.

    The caller decides the model's mode (strategies run in eval mode).
    """
    device = model_device(model)
    with torch.no_grad():
        for idx, x in input_batches(dataset, indices, batch_size):
            logits, emb = logits_and_embedding(model, x.to(device))
            yield idx, logits, emb.flatten(1)


def embeddings(model: nn.Module, dataset: Dataset, indices: np.ndarray, batch_size: int) -> torch.Tensor:
    """Return the penultimate embeddings of ``dataset[indices]`` (``len(indices) x d``, float32, model's device).

    Memory is linear in ``len(indices)``; the pool is streamed ``batch_size`` items at a time.
    """
    out: torch.Tensor | None = None
    start = 0
    for _, _, emb in embedding_batches(model, dataset, indices, batch_size):
        if out is None:  # allocated once: no list of batches to concatenate (which would double the peak)
            out = torch.empty(len(indices), emb.shape[1], dtype=torch.float32, device=emb.device)
        out[start : start + len(emb)] = emb
        start += len(emb)
    return out if out is not None else torch.empty(0, 0)


def nearest_distances(points: torch.Tensor, centres: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Return the Euclidean distance of every row of ``points`` to its nearest row of ``centres``.

    Works block by block (never a ``len(points) x len(centres)`` matrix): memory is
    ``O(len(points) + chunk^2)``. Returns ``+inf`` everywhere when there are no centres.
    """
    best = torch.full((len(points),), float("inf"), dtype=points.dtype, device=points.device)
    for i in range(0, len(points), chunk):
        p = points[i : i + chunk]
        for j in range(0, len(centres), chunk):
            d = torch.cdist(p, centres[j : j + chunk]).min(1).values
            best[i : i + chunk] = torch.minimum(best[i : i + chunk], d)
    return best


def k_center_greedy(
    points: torch.Tensor, centres: torch.Tensor, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center: repeatedly take the point farthest from every centre, then make it a centre.

    Args:
        points: the candidates' embeddings, ``N x d``.
        centres: the embeddings of the existing centres (the labelled set), ``L x d``; may be empty,
            then the first pick is uniform at random (seeded by ``rng``).
        k: how many points to pick (``k <= N``).

    Returns:
        ``(picks, distances)``: the positions picked, in order, and an ``N``-vector: for a picked
        point its distance to the nearest centre at the moment it was picked (``inf`` for a first
        pick without centres), for every other point its distance to the nearest centre after all
        picks (labelled set and picks). Ties go to the smaller position.
    """
    n = len(points)
    min_d = nearest_distances(points, centres) if len(centres) else None
    picks = np.empty(k, dtype=np.int64)
    at_pick = np.empty(k, dtype=np.float64)
    for t in range(k):
        if min_d is None:
            pick = int(rng.integers(n))
            at_pick[t] = np.inf
            min_d = torch.full((n,), float("inf"), dtype=points.dtype, device=points.device)
        else:
            pick = int(torch.argmax(min_d))  # first maximum: ties go to the smaller position
            at_pick[t] = float(min_d[pick])
        picks[t] = pick
        min_d = torch.minimum(min_d, nearest_distances(points, points[pick : pick + 1]))
        min_d[pick] = -float("inf")  # never picked twice, even among duplicates
    final = min_d.double().cpu().numpy()
    final[picks] = at_pick
    return picks, final


class CoreSet(Strategy):
    """Core-set (Sener & Savarese 2018): greedy k-center on the model's penultimate embeddings.

    The labelled set's embeddings are the initial centres; each pick is the candidate farthest
    (Euclidean) from its nearest centre, which then becomes a centre. Distances are computed in
    blocks and a running min-distance vector is kept, so memory is linear in the pool size.
    With no labelled item at all, the first pick is uniform at random (seeded).

    Scores (for every candidate): a chosen candidate's distance to its nearest centre at the
    moment it was picked (non-increasing in pick order); every other candidate's distance to
    its nearest centre after all picks. So every chosen score is >= every unchosen one.

    Args:
        batch_size: pool items embedded at once.
        subset: score only a seeded random subset of the unlabelled pool.
    """

    name = "coreset"

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        points = embeddings(model, pool.dataset, candidates, self.batch_size)
        labelled = pool.labelled_indices()
        centres = embeddings(model, pool.dataset, labelled, self.batch_size) if len(labelled) else points[:0]
        picks, scores = k_center_greedy(points, centres, k, rng)
        return Selection(candidates[picks], candidates, scores)
