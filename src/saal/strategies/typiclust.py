"""TypiClust (TPC-RP; Hacohen, Dekel and Weinshall, ICML 2022): the most typical item of each uncovered cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from saal.core.model_state import model_device
from saal.core.seeding import derive_seed
from saal.errors import SaalError
from saal.pool import Pool
from saal.strategies.base import Selection, Strategy, check_count, check_optional_count
from saal.strategies.embedding_input import (
    check_embedding_option,
    describe_embedding,
    l2_normalise,
    pool_embeddings,
)
from saal.strategies.neighbours import block_squared, knn_distances, squared_norms

# KMeans up to this many clusters, MiniBatchKMeans above (as the official code).
KMEANS_UP_TO = 50
MINIBATCH_SIZE = 5000
# Added to the mean neighbour distance before inverting it (the official code's constant).
TYPICALITY_EPS = 1e-5


def cluster_labels(points: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """Return k-means cluster labels of ``points`` (KMeans up to :data:`KMEANS_UP_TO` clusters, else
    MiniBatchKMeans with batches of :data:`MINIBATCH_SIZE`), seeded, one k-means++ initialisation.

    MiniBatchKMeans starts from :func:`kmeans_plus_plus` on a seeded sample of :data:`MINIBATCH_SIZE` points
    (the same greedy k-means++ as scikit-learn's, computed in float32 torch): scikit-learn's own, on three
    batches in float64, took 13 of 20 s with 500 clusters of 1,280-d points on one CPU thread.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if clusters <= KMEANS_UP_TO:
        km: Any = KMeans(n_clusters=clusters, n_init=1, random_state=seed)
        return np.asarray(km.fit_predict(points), dtype=np.int64)
    rng = np.random.default_rng(seed)
    start = points
    if len(points) > MINIBATCH_SIZE:
        start = points[np.sort(rng.choice(len(points), size=MINIBATCH_SIZE, replace=False))]
    init = kmeans_plus_plus(start, clusters, rng)
    km = MiniBatchKMeans(
        n_clusters=clusters, init=init, batch_size=MINIBATCH_SIZE, n_init=1, random_state=int(rng.integers(2**31 - 1))
    )
    return np.asarray(km.fit_predict(points), dtype=np.int64)


def kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``k`` starting centres chosen by greedy k-means++ (Arthur and Vassilvitskii; scikit-learn's rule).

    The first centre is uniform; each next one is the best, by the resulting total squared distance, of
    ``2 + ln k`` candidates drawn with probability proportional to the squared distance to the nearest centre
    so far (uniform among the points when that is zero everywhere). Distances are float32, sums float64.

    Returns:
        A ``k x d`` float32 array of rows of ``points`` (``k <= len(points)``).
    """
    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    x_sq = squared_norms(x)
    trials = 2 + int(np.log(k))
    chosen = [int(rng.integers(len(x)))]
    closest = block_squared(x, x[chosen], x_sq, x_sq[chosen])[:, 0]
    for _ in range(1, k):
        weights = closest.double().numpy()
        total = weights.sum()
        p = weights / total if total > 0 else None
        cand = rng.choice(len(x), size=trials, replace=True, p=p)
        d2 = torch.minimum(block_squared(x, x[cand], x_sq, x_sq[cand]), closest[:, None])
        best = int(torch.argmin(d2.double().sum(0)))
        chosen.append(int(cand[best]))
        closest = d2[:, best].contiguous()
    return np.ascontiguousarray(points[np.asarray(chosen)], dtype=np.float32)


def cluster_order(labels: np.ndarray, labelled: int, clusters: int, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the visiting order of the clusters: ``(eligible, small)``.

    ``labels`` holds the cluster of the labelled items first (``labelled`` of them), then of the
    candidates. Eligible clusters have more than ``min_size`` items; both lists are sorted by fewest
    labelled items, then largest size, then smallest cluster id. Empty clusters are in neither.
    """
    sizes = np.bincount(labels, minlength=clusters)
    known = np.bincount(labels[:labelled], minlength=clusters)
    ids = np.arange(clusters)
    order = np.lexsort((ids, -sizes, known))
    order = order[sizes[order] > 0]
    return order[sizes[order] > min_size], order[sizes[order] <= min_size]


def typicality(points: torch.Tensor, members: np.ndarray, scored: np.ndarray, knn: int) -> np.ndarray:
    """Return ``1 / (mean distance to the knn nearest other members + 1e-5)`` of each of ``scored``.

    Args:
        points: the embeddings (rows indexed by ``members`` and ``scored``).
        members: the positions forming the cluster (sorted), among which neighbours are searched.
        scored: the positions (a sorted subset of ``members``) whose typicality is wanted.
        knn: neighbours per point (``1 <= knn < len(members)``).

    The cluster is centred on its float32 mean first (distances are unchanged but for rounding).
    """
    own = np.searchsorted(members, scored)
    cluster = points[torch.as_tensor(members, device=points.device)]
    cluster = cluster - cluster.mean(0)  # distances do not move; float32 products of small numbers round less
    dist = knn_distances(cluster[torch.as_tensor(own, device=points.device)], cluster, knn, own)
    mean = dist.mean(1).cpu().numpy()
    return np.asarray(1.0 / (mean + TYPICALITY_EPS), dtype=np.float64)


@dataclass
class _Clusters:
    """The clustered items: positions ``0 .. labelled-1`` are the labelled items, the rest the candidates."""

    labels: np.ndarray
    labelled: int
    eligible: np.ndarray
    small: np.ndarray

    def __post_init__(self) -> None:
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], np.arange(self.labels.max() + 2))
        self.members = [order[bounds[c] : bounds[c + 1]] for c in range(len(bounds) - 1)]
        self.remaining = np.arange(len(self.labels)) >= self.labelled
        self.pointers = [0, 0]

    def next_cluster(self) -> int:
        """Return the next cluster to visit (cyclically, eligible ones while any has a candidate left)."""
        for tier, order in enumerate((self.eligible, self.small)):
            for step in range(len(order)):
                at = (self.pointers[tier] + step) % len(order)
                if self.remaining[self.members[int(order[at])]].any():
                    self.pointers[tier] = at + 1
                    return int(order[at])
        raise RuntimeError("no candidate left in any cluster")  # k <= candidates: a bug, not input


class TypiClust(Strategy):
    """TypiClust (TPC-RP): cluster, then take the most typical unlabelled item of each uncovered cluster.

    Exactly as the paper and its official code (``deep-al/pycls/al/typiclust.py``): the labelled items and the
    candidates are embedded (``embedding``, L2-normalised when ``normalise``) and clustered into
    ``K = min(|labelled| + k, max_clusters)`` clusters (KMeans when ``K <= 50``, else MiniBatchKMeans with
    batches of 5,000; one k-means++ start, seeded from the generator). Clusters of at most ``min_cluster_size``
    items are dropped; the rest are visited in order of fewest labelled items, then largest (then smallest
    cluster id), cyclically when ``k`` exceeds their number (MiniBatchKMeans starts from k-means++ on 5,000 of
    the points, see :func:`cluster_labels`). From each visited cluster the candidate of highest
    typicality is taken, ``1 / (mean L2 distance to its nearest neighbours + 1e-5)``, the neighbours being the
    cluster's other not-yet-chosen candidates, ``min(knn, m // 2)`` of them for ``m`` such candidates (the
    official rule for small clusters; the labelled members are not neighbours); ties go to the smaller dataset
    index. Needs no label and no trained model (``cold_start``): the model is read only for
    ``embedding="model"``.

    Where the official code would fail, this goes on: a cluster with no candidate left is skipped; when every
    large cluster is exhausted the dropped small clusters are visited in the same order; a candidate alone in
    its cluster is taken with typicality 0. The official code measures squared distances (faiss's ``IndexFlatL2``);
    this uses L2 distances, as the paper defines typicality.

    Large pools (an approximation, off below the thresholds): with more than ``sample`` candidates, the method
    runs on the labelled items and a seeded uniform sample of ``sample`` candidates (only they are embedded:
    time and memory follow ``sample``, not the pool); in a cluster with more than ``candidates`` candidates,
    typicality is computed for a seeded sample of ``candidates`` of them (their neighbours are still searched
    among all of the cluster's candidates). With both at least the number of candidates, the result is the exact
    one.

    Scores (every candidate, in candidate order): the typicality of each candidate of a visited cluster, as
    computed at the last visit of its cluster (for a chosen one: the visit that chose it); 0 for a candidate
    whose typicality was not computed (its cluster was not visited, it was outside the samples, or it was alone).

    Args:
        embedding: ``"auto"``, ``"input"``, ``"model"``, ``"pretrained"`` or an array (see
            :mod:`saal.strategies.embedding_input`).
        normalise: L2-normalise the embeddings first.
        max_clusters: the cap on ``K`` (500 in the paper).
        min_cluster_size: clusters of at most this many items are dropped (5).
        knn: neighbours in the typicality (20).
        sample: candidates the method runs on at most (None: all).
        candidates: candidates per cluster whose typicality is computed at most (None: all).
        batch_size: items embedded at once.
        subset: score only a seeded random subset of the unlabelled pool.

    Raises:
        SaalError: ``knn < 1``, ``min_cluster_size < 0``, ``max_clusters < 1``, ``sample`` or ``candidates`` < 1,
            a bad ``embedding``; at selection, ``sample`` smaller than the query size, or more clusters than items.
    """

    name = "typiclust"
    cold_start = True

    def __init__(
        self,
        *,
        embedding: str | np.ndarray = "auto",
        normalise: bool = True,
        max_clusters: int = 500,
        min_cluster_size: int = 5,
        knn: int = 20,
        sample: int | None = 10_000,
        candidates: int | None = 2_000,
        batch_size: int = 256,
        subset: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        self.embedding = check_embedding_option(embedding)
        self.normalise = bool(normalise)
        self.max_clusters = check_count("typiclust max_clusters", max_clusters, 1)
        self.min_cluster_size = check_count("typiclust min_cluster_size", min_cluster_size, 0)
        self.knn = check_count("typiclust knn", knn, 1)
        self.sample = check_optional_count("typiclust sample", sample)
        self.typicality_candidates = check_optional_count("typiclust candidates", candidates)

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        if self.sample is not None and self.sample < k:
            raise SaalError(f"typiclust sample {self.sample} is smaller than the query size {k}; raise it")
        sampled = candidates
        if self.sample is not None and len(candidates) > self.sample:
            sampled = np.sort(rng.choice(candidates, size=self.sample, replace=False))
        labelled = pool.labelled_indices()
        items = np.concatenate([labelled, sampled])
        clusters = min(len(labelled) + k, self.max_clusters)
        if clusters > len(items):
            raise SaalError(f"typiclust needs {clusters} clusters but has only {len(items)} items; query fewer")
        emb = pool_embeddings(self.embedding, model, pool, items, self.batch_size)
        if self.normalise:
            emb = l2_normalise(emb)
        labels = cluster_labels(emb, clusters, derive_seed(rng))
        eligible, small = cluster_order(labels, len(labelled), clusters, self.min_cluster_size)
        state = _Clusters(labels, len(labelled), eligible, small)
        points = torch.from_numpy(emb).to(model_device(model))
        picks, typ = self._pick(state, points, k, rng)
        scores = np.zeros(len(candidates), dtype=np.float64)
        where = np.searchsorted(candidates, items[len(labelled) :])
        scores[where] = typ[len(labelled) :]
        reason = (
            f"{clusters} clusters, {len(eligible)} of more than {self.min_cluster_size} items; "
            f"typicality over up to {self.knn} neighbours in {describe_embedding(self.embedding)} embeddings"
        )
        return Selection(items[picks], candidates, scores, reason)

    def _pick(
        self, state: _Clusters, points: torch.Tensor, k: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the chosen positions (in order) and every position's last computed typicality (0 if none)."""
        typ = np.zeros(len(state.labels), dtype=np.float64)
        picks = np.empty(k, dtype=np.int64)
        cap = self.typicality_candidates
        for t in range(k):
            cluster = state.next_cluster()
            members = state.members[cluster][state.remaining[state.members[cluster]]]
            if len(members) == 1:
                best = int(members[0])
                typ[best] = 0.0
            else:
                scored = members
                if cap is not None and len(members) > cap:
                    scored = np.sort(rng.choice(members, size=cap, replace=False))
                values = typicality(points, members, scored, min(self.knn, len(members) // 2))
                typ[scored] = values
                best = int(scored[int(np.argmax(values))])  # first maximum: the smaller dataset index
            picks[t] = best
            state.remaining[best] = False
        return picks, typ

    def __repr__(self) -> str:
        return (
            f"TypiClust(embedding={describe_embedding(self.embedding)}, normalise={self.normalise}, "
            f"max_clusters={self.max_clusters}, min_cluster_size={self.min_cluster_size}, knn={self.knn}, "
            f"sample={self.sample}, candidates={self.typicality_candidates}, batch_size={self.batch_size}, "
            f"subset={self.subset})"
        )
