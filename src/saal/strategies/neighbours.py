"""Blocked nearest-neighbour and radius-ball computations on embeddings, never an ``N x N`` matrix in memory.

Cold-start strategies (TypiClust's typicality, ProbCover's coverage graph and purity) need, for many points,
their nearest neighbours or the points within a radius. Here every such question is answered by comparing
blocks of at most :data:`CHUNK` rows with blocks of at most :data:`CHUNK` rows (memory ``O(CHUNK^2)`` beyond the
inputs and the per-row answers), on the inputs' device, with float32 matrix products.

Exact rules, the same whatever the block sizes:

* **Radius** (:func:`radius_counts`, :func:`radius_any`, :func:`radius_members`): ``y`` is within ``radius`` of
  ``x`` iff the squared Euclidean distance of the two float32 rows, computed in float64 as
  ``sum((x - y) ** 2)``, is *strictly* below ``radius ** 2`` (a Python float). The fast float32 distance
  ``|x|^2 + |y|^2 - 2 x.y`` decides only pairs farther from the boundary than its rounding error can reach (a
  margin of ``2 (d + 4) 2^-24 (max |x|^2 + max |y|^2)`` per block); the pairs inside that margin are decided in
  float64. So a ball holds the same points whether it is computed alone or in a block, and counts made in one
  pass agree with memberships recomputed later.
* **Nearest neighbours** (:func:`knn_distances`): the ``k`` smallest float32 squared distances
  ``|x|^2 + |y|^2 - 2 x.y`` (clamped at 0; absolute error at most the margin above), square-rooted in float64.
  Being a multiset of values, the answer does not depend on which of two equally near neighbours wins a tie.
* **Nearest point of another label** (:func:`nearest_other`): chosen by float32 distance, reported in float64.
"""

from __future__ import annotations

import numpy as np
import torch

# Rows per block on each side: a block of distances is at most CHUNK x CHUNK float32 values.
CHUNK = 2048
_UNIT = 2.0**-24  # float32 unit roundoff


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Return every row's squared Euclidean norm (float32, the rows' device)."""
    return (x.float() * x.float()).sum(1)


def exact_squared(a: torch.Tensor, b: torch.Tensor, pairs: int = 1024) -> torch.Tensor:
    """Return ``sum((a[i] - b[i]) ** 2)`` for each row pair, in float64 (``a`` and ``b`` have the same shape).

    Works ``pairs`` rows at a time (memory ``O(pairs x d)``); a row's value does not depend on ``pairs``.
    """
    out = torch.empty(len(a), dtype=torch.float64, device=a.device)
    for i in range(0, len(a), pairs):
        diff = a[i : i + pairs].double() - b[i : i + pairs].double()
        out[i : i + pairs] = (diff * diff).sum(1)
    return out


def block_squared(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Return the float32 squared distances of every row of ``a`` to every row of ``b`` (``len(a) x len(b)``).

    ``a_sq`` and ``b_sq`` are the rows' squared norms (:func:`squared_norms`); results are clamped at 0.
    """
    d2 = a @ b.T
    d2.mul_(-2.0).add_(a_sq[:, None]).add_(b_sq[None, :])
    return d2.clamp_(min=0.0)


def _margin(dim: int, a_sq: torch.Tensor, b_sq: torch.Tensor) -> float:
    """A bound on the float32 rounding error of :func:`block_squared` for these blocks."""
    top = (float(a_sq.max()) if len(a_sq) else 0.0) + (float(b_sq.max()) if len(b_sq) else 0.0)
    return 2.0 * (dim + 4) * _UNIT * top


def within(
    a: torch.Tensor, b: torch.Tensor, radius: float, a_sq: torch.Tensor | None = None, b_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Return the ``len(a) x len(b)`` boolean matrix of "``b[j]`` within ``radius`` of ``a[i]``" (module rules).

    Meant for blocks (the matrix is materialised): use :func:`radius_counts` and friends for whole sets.
    """
    a_sq = squared_norms(a) if a_sq is None else a_sq
    b_sq = squared_norms(b) if b_sq is None else b_sq
    r2 = float(radius) * float(radius)
    d2 = block_squared(a, b, a_sq, b_sq)
    tol = _margin(a.shape[1], a_sq, b_sq)
    inside = d2 < r2 - tol
    unsure = (d2 - r2).abs_() <= tol
    if bool(unsure.any()):
        i, j = unsure.nonzero(as_tuple=True)
        inside[i, j] = exact_squared(a[i], b[j]) < r2
    return inside


def radius_counts(
    rows: torch.Tensor,
    cols: torch.Tensor,
    radius: float,
    col_mask: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Return, for every row, how many columns (where ``col_mask`` is True, all when None) lie within ``radius``.

    A row compared with itself (the same vector among the columns) counts itself: distance 0 < radius.

    Returns:
        An int64 vector of ``len(rows)`` counts on the rows' device.
    """
    counts = torch.zeros(len(rows), dtype=torch.int64, device=rows.device)
    if len(cols) == 0 or len(rows) == 0:
        return counts
    keep = None if col_mask is None else col_mask.to(rows.device)
    cols_sq = squared_norms(cols)
    for j in range(0, len(cols), chunk):
        c, c_sq = cols[j : j + chunk], cols_sq[j : j + chunk]
        m = None if keep is None else keep[j : j + chunk]
        if m is not None and not bool(m.any()):
            continue
        for i in range(0, len(rows), chunk):
            inside = within(rows[i : i + chunk], c, radius, None, c_sq)
            if m is not None:
                inside &= m[None, :]
            counts[i : i + chunk] += inside.sum(1)
    return counts


def radius_any(rows: torch.Tensor, cols: torch.Tensor, radius: float, chunk: int = CHUNK) -> torch.Tensor:
    """Return, for every column, whether some row lies within ``radius`` of it (a boolean ``len(cols)`` vector)."""
    hit = torch.zeros(len(cols), dtype=torch.bool, device=cols.device)
    if len(rows) == 0:
        return hit
    rows_sq = squared_norms(rows)
    for j in range(0, len(cols), chunk):
        c = cols[j : j + chunk]
        c_sq = squared_norms(c)
        for i in range(0, len(rows), chunk):
            hit[j : j + chunk] |= within(rows[i : i + chunk], c, radius, rows_sq[i : i + chunk], c_sq).any(0)
    return hit


def radius_members(point: torch.Tensor, cols: torch.Tensor, radius: float, chunk: int = CHUNK) -> torch.Tensor:
    """Return the positions (ascending, int64) of the columns within ``radius`` of the single vector ``point``."""
    p = point.reshape(1, -1)
    p_sq = squared_norms(p)
    found = [
        within(p, cols[j : j + chunk], radius, p_sq).nonzero(as_tuple=True)[1] + j for j in range(0, len(cols), chunk)
    ]
    return torch.cat(found) if found else torch.empty(0, dtype=torch.int64, device=cols.device)


def knn_distances(
    queries: torch.Tensor,
    points: torch.Tensor,
    k: int,
    query_positions: np.ndarray | torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Return each query's distances to its ``k`` nearest points, ascending (``len(queries) x k``, float64).

    The distances are the float32 ones of :func:`block_squared` (module docstring), square-rooted in float64.

    Args:
        queries: ``q x d`` rows.
        points: ``n x d`` rows to search.
        k: neighbours per query (``1 <= k``; at most ``n``, or ``n - 1`` when queries are excluded from
            themselves).
        query_positions: each query's own position among ``points`` (so that a point is not its own neighbour;
            a duplicate of it elsewhere still is, at distance 0); None when the queries are not among the points.

    Raises:
        ValueError: ``k`` out of range.
    """
    own = None if query_positions is None else torch.as_tensor(query_positions, device=points.device).long()
    available = len(points) - (0 if own is None else 1)
    if not 1 <= k <= available:
        raise ValueError(f"k must be in 1..{available}, got {k}")
    points_sq = squared_norms(points)
    out = torch.empty((len(queries), k), dtype=torch.float64, device=queries.device)
    for i in range(0, len(queries), chunk):
        q = queries[i : i + chunk]
        q_sq = squared_norms(q)
        best = torch.full((len(q), k), float("inf"), device=q.device)
        for j in range(0, len(points), chunk):
            d2 = block_squared(q, points[j : j + chunk], q_sq, points_sq[j : j + chunk])
            if own is not None:
                mine = own[i : i + chunk] - j
                rows = ((mine >= 0) & (mine < d2.shape[1])).nonzero(as_tuple=True)[0]
                d2[rows, mine[rows]] = float("inf")
            best = torch.topk(torch.cat([best, d2], 1), k, dim=1, largest=False, sorted=False).values
        out[i : i + len(q)] = best.double().sqrt().sort(1).values
    return out


def nearest_other(
    rows: torch.Tensor,
    row_labels: torch.Tensor,
    cols: torch.Tensor,
    col_labels: torch.Tensor,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Return each row's distance to the nearest column of another label (float64; ``inf`` when there is none).

    The nearest is chosen by float32 distance; its distance is recomputed in float64.
    """
    best_d = torch.full((len(rows),), float("inf"), device=rows.device)
    best_i = torch.full((len(rows),), -1, dtype=torch.int64, device=rows.device)
    cols_sq = squared_norms(cols)
    row_labels, col_labels = row_labels.to(rows.device), col_labels.to(rows.device)
    for i in range(0, len(rows), chunk):
        r, lab = rows[i : i + chunk], row_labels[i : i + chunk]
        r_sq = squared_norms(r)
        for j in range(0, len(cols), chunk):
            d2 = block_squared(r, cols[j : j + chunk], r_sq, cols_sq[j : j + chunk])
            d2.masked_fill_(lab[:, None] == col_labels[None, j : j + chunk], float("inf"))
            low, at = d2.min(1)
            better = low < best_d[i : i + len(r)]
            best_d[i : i + len(r)] = torch.where(better, low, best_d[i : i + len(r)])
            best_i[i : i + len(r)] = torch.where(better, at + j, best_i[i : i + len(r)])
    out = torch.full((len(rows),), float("inf"), dtype=torch.float64, device=rows.device)
    found = (best_i >= 0).nonzero(as_tuple=True)[0]
    if len(found):
        out[found] = exact_squared(rows[found], cols[best_i[found]]).sqrt()
    return out


__all__ = [
    "CHUNK",
    "block_squared",
    "exact_squared",
    "knn_distances",
    "nearest_other",
    "radius_any",
    "radius_counts",
    "radius_members",
    "squared_norms",
    "within",
]
