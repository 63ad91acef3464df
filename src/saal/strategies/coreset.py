"""Core-set selection: greedy k-center on penultimate embeddings (Sener & Savarese, ICLR 2018)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from saal.core.model_state import model_device
from saal.core.scan import Batch, scan
from saal.pool import Pool
from saal.strategies.base import Selection, Strategy
from saal.tasks import Classification, Task

# Rows per block when comparing points with centres: a block is at most CHUNK x CHUNK floats.
CHUNK = 2048


def embeddings(
    model: nn.Module, dataset: Dataset, indices: np.ndarray, batch_size: int, task: Task | None = None
) -> torch.Tensor:
    """Return the task's embeddings of ``dataset[indices]`` (``len(indices) x d``, float32, model's device).

    ``task`` defaults to classification (the input of the model's last ``nn.Linear``). Memory is
    linear in ``len(indices)``; the pool is streamed ``batch_size`` items at a time.
    """
    task = task if task is not None else Classification(1)  # the embedding does not depend on the class count
    device = model_device(model)

    def batch_embeddings(batch: Batch) -> dict[str, torch.Tensor]:
        _, emb = task.embed(model, task.to_device(batch.inputs, device))
        return {"emb": emb.float()}

    with torch.no_grad():
        out = scan(dataset, indices, batch_embeddings, batch_size=batch_size, collate=task.collate)
    return out["emb"] if out else torch.empty(0, 0)


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
    assert min_d is not None  # k >= 1 picks made it a tensor
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
        points = embeddings(model, pool.dataset, candidates, self.batch_size, pool.task)
        labelled = pool.labelled_indices()
        centres = embeddings(model, pool.dataset, labelled, self.batch_size, pool.task) if len(labelled) else points[:0]
        picks, scores = k_center_greedy(points, centres, k, rng)
        return Selection(candidates[picks], candidates, scores)
