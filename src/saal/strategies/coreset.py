"""Core-set selection: greedy k-center on penultimate embeddings (Sener & Savarese, ICLR 2018)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from saal.core.model_state import model_device
from saal.core.progress import Progress
from saal.core.row_store import MemoryRows, RowStore
from saal.core.scan import Batch, scan, scan_rows
from saal.core.selection import top_k
from saal.errors import SaalError
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


def embedding_rows(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    batch_size: int,
    task: Task | None = None,
    *,
    on_disk: bool | None = None,
) -> RowStore:
    """As :func:`embeddings`, kept in a :class:`~saal.core.row_store.RowStore`: a temporary file when large.

    Args:
        on_disk: True: always a file; False: always memory; None: a file above
            :data:`saal.core.row_store.IN_MEMORY_BYTES`.

    Returns:
        ``len(indices)`` rows of float32 embeddings (an empty in-memory store when there is no item).
    """
    task = task if task is not None else Classification(1)
    device = model_device(model)

    def batch_embeddings(batch: Batch) -> dict[str, torch.Tensor]:
        _, emb = task.embed(model, task.to_device(batch.inputs, device))
        return {"emb": emb.float()}

    with torch.no_grad():
        out = scan_rows(
            dataset, indices, batch_embeddings, batch_size=batch_size, collate=task.collate, on_disk=on_disk
        )
    return out["emb"] if out else MemoryRows(torch.empty(0, 0))


def nearest_distances(points: torch.Tensor, centres: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Return the Euclidean distance of every row of ``points`` to its nearest row of ``centres``.

    Works block by block (never a ``len(points) x len(centres)`` matrix): memory is
    ``O(len(points) + chunk^2)``. Returns ``+inf`` everywhere when there are no centres.
    """
    return nearest_distances_rows(MemoryRows(points), MemoryRows(centres), points.device, chunk)


def nearest_distances_rows(
    points: RowStore, centres: RowStore, device: torch.device, chunk: int = CHUNK
) -> torch.Tensor:
    """:func:`nearest_distances` over stores: blocks of ``chunk`` rows of each are moved to ``device`` in turn.

    Returns:
        A ``len(points)``-vector (the points' dtype) on ``device``; ``+inf`` everywhere when there are no centres.
    """
    best = torch.full((len(points),), float("inf"), dtype=points.dtype, device=device)
    centre_blocks = [c.to(device) for _, c in centres.blocks(chunk)] if len(centres) <= 4 * chunk else None
    for i, p in points.blocks(chunk):
        p = p.to(device)
        blocks = centre_blocks if centre_blocks is not None else (c.to(device) for _, c in centres.blocks(chunk))
        for c in blocks:
            d = torch.cdist(p, c).min(1).values
            best[i : i + len(p)] = torch.minimum(best[i : i + len(p)], d)
    return best


def take_rows(store: RowStore, positions: np.ndarray, chunk: int = 65536) -> torch.Tensor:
    """Return the rows at sorted ``positions`` of ``store`` as one tensor (read block by block)."""
    parts = []
    for start, block in store.blocks(chunk):
        lo, hi = np.searchsorted(positions, [start, start + len(block)])
        if hi > lo:
            parts.append(block[torch.as_tensor(positions[lo:hi] - start)].clone())
    return torch.cat(parts) if parts else torch.empty((0, *store.shape), dtype=store.dtype)


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
    return k_center_greedy_rows(MemoryRows(points), MemoryRows(centres), k, rng, points.device)


def k_center_greedy_rows(
    points: RowStore,
    centres: RowStore,
    k: int,
    rng: np.random.Generator,
    device: torch.device,
    *,
    initial: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`k_center_greedy` over stores (points may lie in a file): memory ``O(N + chunk x d)``.

    Args:
        initial: every point's distance to its nearest centre, when already known (then ``centres``
            is not read).

    Returns:
        As :func:`k_center_greedy`.
    """
    n = len(points)
    min_d = initial.clone() if initial is not None else None
    if min_d is None and len(centres):
        min_d = nearest_distances_rows(points, centres, device)
    picks = np.empty(k, dtype=np.int64)
    at_pick = np.empty(k, dtype=np.float64)
    with Progress(k, "k-center greedy", "pick") as progress:
        for t in range(k):
            if min_d is None:
                pick = int(rng.integers(n))
                at_pick[t] = np.inf
                min_d = torch.full((n,), float("inf"), dtype=points.dtype, device=device)
            else:
                pick = int(torch.argmax(min_d))  # first maximum: ties go to the smaller position
                at_pick[t] = float(min_d[pick])
            picks[t] = pick
            centre = MemoryRows(points.read(pick, pick + 1).to(device).clone())  # an aligned copy, from any store
            min_d = torch.minimum(min_d, nearest_distances_rows(points, centre, device))
            min_d[pick] = -float("inf")  # never picked twice, even among duplicates
            progress.update(1)
    assert min_d is not None  # k >= 1 picks made it a tensor
    final = min_d.double().cpu().numpy()
    final[picks] = at_pick
    return picks, final


def prefiltered_k_center(
    points: RowStore,
    centres: RowStore,
    k: int,
    keep: int,
    rng: np.random.Generator,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center restricted to ``keep`` candidates: half the farthest from the labelled set, half a seeded
    uniform sample of the rest (an approximation).

    One pass gives every candidate's distance to its nearest labelled centre. The farthest
    candidates are those the exact greedy takes first; the uniform half keeps the pool's spread, so
    the picks still cover it (keeping only the farthest left the covering radius 2.5x the exact one
    on the benchmark's clustered embeddings, see ``benchmarks/scale_selection.py``). The kept rows
    are loaded into memory and the exact greedy runs on them alone; one last pass (the picks as
    centres) gives every other candidate its distance to the nearest centre after all picks.
    Without labelled centres the whole sample is uniform. Cost: two passes over the pool plus ``k``
    passes over ``keep`` rows, instead of ``k`` passes over the pool.

    Returns:
        As :func:`k_center_greedy`, over all of ``points`` (exactly its result when ``keep`` covers
        every point).
    """
    n = len(points)
    if keep >= n:
        return k_center_greedy_rows(points, centres, k, rng, device)
    if len(centres):
        initial = nearest_distances_rows(points, centres, device)
        far = top_k(initial.double().cpu().numpy(), keep // 2)
    else:
        initial = torch.full((n,), float("inf"), dtype=points.dtype, device=device)
        far = np.empty(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), far, assume_unique=True)
    kept = np.sort(np.concatenate([far, rng.choice(rest, size=keep - len(far), replace=False)]))
    sub = MemoryRows(take_rows(points, kept).to(device))
    where = torch.as_tensor(kept, device=device)
    picks_sub, scores_sub = k_center_greedy_rows(sub, centres, k, rng, device, initial=initial[where])
    picks = kept[picks_sub]
    after = torch.minimum(initial, nearest_distances_rows(points, MemoryRows(sub.read(0, len(sub))[picks_sub]), device))
    final = after.double().cpu().numpy()
    final[kept] = scores_sub
    return picks, final


class CoreSet(Strategy):
    """Core-set (Sener & Savarese 2018): greedy k-center on the model's penultimate embeddings.

    The labelled set's embeddings are the initial centres; each pick is the candidate farthest
    (Euclidean) from its nearest centre, which then becomes a centre. Distances are computed in
    blocks and a running min-distance vector is kept, so memory is linear in the pool size; a
    large pool's embeddings go to a temporary file (``$SAAL_TMPDIR`` or the system's temp folder)
    and are read back block by block, never held whole in memory or on the GPU.
    With no labelled item at all, the first pick is uniform at random (seeded).

    Scores (for every candidate): a chosen candidate's distance to its nearest centre at the
    moment it was picked (non-increasing in pick order); every other candidate's distance to
    its nearest centre after all picks. So every chosen score is >= every unchosen one.

    Args:
        prefilter: approximate for speed: run the greedy only on this many candidates, half the
            farthest from the labelled set and half a seeded uniform sample (see
            :func:`prefiltered_k_center`); None (default) is exact.
        batch_size: pool items embedded at once.
        subset: score only a seeded random subset of the unlabelled pool.

    Raises:
        SaalError: ``prefilter < 1``; (at selection) ``prefilter`` smaller than the query size.
    """

    name = "coreset"

    def __init__(self, *, prefilter: int | None = None, batch_size: int = 256, subset: int | None = None) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        if prefilter is not None and (isinstance(prefilter, bool) or int(prefilter) < 1):
            raise SaalError(f"coreset prefilter must be a positive number of candidates or None, got {prefilter!r}")
        self.prefilter = None if prefilter is None else int(prefilter)

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        if self.prefilter is not None and self.prefilter < k:
            raise SaalError(f"coreset prefilter {self.prefilter} is smaller than the query size {k}; raise it")
        device = model_device(model)
        points = embedding_rows(model, pool.dataset, candidates, self.batch_size, pool.task)
        labelled = pool.labelled_indices()
        centres = (
            embedding_rows(model, pool.dataset, labelled, self.batch_size, pool.task)
            if len(labelled)
            else MemoryRows(torch.empty(0, *points.shape))
        )
        try:
            if self.prefilter is not None and self.prefilter < len(points):
                picks, scores = prefiltered_k_center(points, centres, k, self.prefilter, rng, device)
            else:
                picks, scores = k_center_greedy_rows(points, centres, k, rng, device)
        finally:
            points.close()
            centres.close()
        return Selection(candidates[picks], candidates, scores)

    def __repr__(self) -> str:
        return f"CoreSet(prefilter={self.prefilter}, batch_size={self.batch_size}, subset={self.subset})"
