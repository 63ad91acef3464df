"""MaxHerding and Uncertainty Herding: greedy, optionally uncertainty-weighted, kernel coverage of the pool.

**MaxHerding** (Bae, Noh and Sutherland, "Generalized Coverage for More Robust Low-Budget Active Learning",
ECCV 2024, arXiv 2407.12212). With a kernel ``k`` on L2-normalised embeddings, the *coverage* of a labelled
set ``L`` is ``C(L) = mean_x max_{x' in L} k(x, x')``; ProbCover is the top-hat kernel, MaxHerding a Gaussian
``k(x, x') = exp(-||x - x'||^2 / (2 sigma^2))``, which is far less sensitive to its radius. Each pick is the
candidate with the largest gain ``C(L + picks + {c}) - C(L + picks)``, i.e.
``gain(c) = mean_x u(x) max(k(x, c) - m(x), 0)`` with ``m(x)`` the best kernel value ``x`` already has and
``u = 1``.

**Uncertainty Herding** (Bae, Oliveira and Sutherland, "Uncertainty Herding: One Active Learning Method for
All Label Budgets", ICLR 2025, arXiv 2412.20644) weighs every covered point by the model's calibrated
uncertainty: ``UC(L) = mean_x U(x) max_{x' in L} k(x, x')``, the same greedy with ``u = U``. Two parameter
rules make it move from coverage (few labels) to uncertainty (many): a temperature chosen for calibration and a
kernel radius that shrinks as the labelled set fills the space (see :class:`UncertaintyHerding`).

The mean over ``x`` runs over the candidates (the unlabelled items considered): a labelled item is covered by
itself (``m = k(x, x) = 1``) and adds nothing to any gain, so leaving it out changes no choice.

**Scale.** The exact greedy needs the kernel between every candidate and every point it may cover (``N x N``).
Up to ``exact_limit`` candidates (default 5,000: a 100 MB float32 matrix) that matrix is built and the greedy is
exact. Above it, the gains are estimated: a seeded uniform sample of ``candidate_sample`` candidates (default
5,000) competes, and a second, independent seeded sample of ``coverage_sample`` candidates (default 10,000)
stands in for the mean over ``x``; only those items are embedded (and, for Uncertainty Herding, scored by the
model), and only their ``coverage_sample x candidate_sample`` kernel is held (200 MB). Work and memory are then
independent of the pool size apart from ``O(N)`` index vectors; the choice is exactly the exact one whenever the
samples hold every candidate (tested). Kernels are computed in row blocks, never an ``N x N`` matrix.

After a pick, only the covered points whose ``m`` rises change the gains, so each greedy step updates the gains
from those rows alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from saal.core.model_state import model_device
from saal.core.scan import Batch, scan
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
from saal.strategies.saal import with_defaults

if TYPE_CHECKING:
    from saal.settings import TrainConfig

#: MaxHerding's default kernel radius: ``exp(-||x - x'||^2 / (2 * 0.5)) = exp(-||x - x'||^2)`` on unit vectors,
#: the authors' code default (``exp(-(d / delta)^2)`` with ``delta = 1``); scikit-activeml's ``gamma = 1``.
DEFAULT_BANDWIDTH = math.sqrt(0.5)
EXACT_LIMIT = 5_000
CANDIDATE_SAMPLE = 5_000
COVERAGE_SAMPLE = 10_000
#: Rows of a kernel block: a block is at most ``BLOCK x candidates`` floats.
BLOCK = 1024
#: The temperatures Uncertainty Herding's calibration tries (the authors' grid): 1.0, 1.1, ..., 19.9.
TEMPERATURES = tuple(round(1.0 + 0.1 * i, 1) for i in range(190))
ECE_BINS = 15
#: Share of the labelled items held out to choose the temperature (the authors' code).
CALIBRATION_SHARE = 0.3
UNCERTAINTIES = ("margin", "saal")
#: Distances below this count as duplicates when the adaptive radius looks for the smallest labelled distance.
DUPLICATE_DISTANCE = 1e-6


# ------------------------------------------------------------------------------------------------ the math


def check_bandwidth(value: Any, *, allow_auto: bool = False) -> float | str:
    """Return a kernel radius option: a finite number > 0 (or ``"auto"`` where allowed).

    Raises:
        SaalError: anything else, in one line.
    """
    if allow_auto and isinstance(value, str) and value.lower() == "auto":
        return "auto"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        also = " or auto" if allow_auto else ""
        raise SaalError(f"bandwidth must be a positive number{also} (the Gaussian kernel's sigma), got {value!r}")
    return float(value)


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Return ``exp(-||a_i - b_j||^2 / (2 bandwidth^2))`` for every row pair (``len(a) x len(b)``, ``a``'s dtype)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min_(0.0).mul_(-0.5 / bandwidth**2).exp_()


def max_kernel(points: torch.Tensor, centres: torch.Tensor, bandwidth: float, block: int = BLOCK) -> torch.Tensor:
    """Return every point's largest kernel value to any centre (zeros when there is no centre).

    Computed in ``block x block`` pieces: memory ``O(len(points) + block^2)``.
    """
    best = torch.zeros(len(points), dtype=points.dtype, device=points.device)
    for i in range(0, len(points), block):
        for j in range(0, len(centres), block):
            k = gaussian_kernel(points[i : i + block], centres[j : j + block], bandwidth)
            best[i : i + block] = torch.maximum(best[i : i + block], k.max(1).values)
    return best


def coverage(
    points: torch.Tensor,
    chosen: torch.Tensor,
    bandwidth: float,
    weights: torch.Tensor | None = None,
) -> float:
    """Return the (weighted) coverage ``mean_x u(x) max_{c in chosen} k(x, c)`` of ``points`` (0 with no ``chosen``)."""
    best = max_kernel(points, chosen, bandwidth).double()
    u = torch.ones_like(best) if weights is None else weights.to(best)
    return float((u * best).mean()) if len(points) else 0.0


def kernel_matrix(cover: torch.Tensor, cands: torch.Tensor, bandwidth: float, block: int = BLOCK) -> torch.Tensor:
    """Return the ``len(cover) x len(cands)`` kernel, filled ``block`` rows at a time (no larger temporary)."""
    out = torch.empty(len(cover), len(cands), dtype=cover.dtype, device=cover.device)
    for i in range(0, len(cover), block):
        out[i : i + block] = gaussian_kernel(cover[i : i + block], cands, bandwidth)
    return out


def _weighted_excess(K: torch.Tensor, rows: torch.Tensor, level: torch.Tensor, u: torch.Tensor) -> np.ndarray:
    """Return ``sum_{x in rows} u(x) max(K[x, c] - level(x), 0)`` for every column ``c`` (float64)."""
    kb = K[rows] - level[:, None]
    return (u[rows][None, :] @ kb.clamp_min_(0.0)).double().cpu().numpy().reshape(-1)


def greedy_coverage(
    kernel: torch.Tensor,
    k: int,
    *,
    weights: torch.Tensor | None = None,
    initial: torch.Tensor | None = None,
    block: int = BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy maximisation of (weighted) kernel coverage over a precomputed kernel.

    Args:
        kernel: ``kernel[x, c]``, the kernel between covered point ``x`` and candidate ``c`` (``S x C``).
        k: how many candidates to pick (``1 <= k <= C``).
        weights: ``u(x)`` per covered point (default 1: MaxHerding).
        initial: ``m(x)``, each covered point's best kernel value to the labelled set (default 0).

    Returns:
        ``(picks, scores)``: the candidate positions picked, in order (ties to the smaller position), and
        a ``C``-vector of gains ``mean_x u(x) max(k(x, c) - m(x), 0)``: for a pick, its gain when it was picked
        (non-increasing in pick order); for every other candidate, its gain after all picks.

    Raises:
        SaalError: ``k`` outside ``1 .. C``.
    """
    n_cover, n_cand = kernel.shape
    if not 1 <= k <= n_cand:
        raise SaalError(f"cannot pick {k} of {n_cand} candidates; choose k in 1..{n_cand}")
    m = torch.zeros(n_cover, dtype=kernel.dtype, device=kernel.device) if initial is None else initial.clone()
    u = torch.ones_like(m) if weights is None else weights.to(m)
    gains = np.zeros(n_cand, dtype=np.float64)
    for i in range(0, n_cover, block):
        rows = torch.arange(i, min(i + block, n_cover), device=kernel.device)
        gains += _weighted_excess(kernel, rows, m[rows], u)
    picks = np.empty(k, dtype=np.int64)
    at_pick = np.empty(k, dtype=np.float64)
    taken = np.zeros(n_cand, dtype=bool)
    for t in range(k):
        pick = int(np.argmax(np.where(taken, -np.inf, gains)))  # first maximum: ties to the smaller position
        picks[t], at_pick[t], taken[pick] = pick, gains[pick], True
        col = kernel[:, pick]
        risen = torch.nonzero(col > m).flatten()
        for i in range(0, len(risen), block):  # only the rows whose m rises change any gain
            rows = risen[i : i + block]
            gains -= _weighted_excess(kernel, rows, m[rows], u) - _weighted_excess(kernel, rows, col[rows], u)
        m = torch.maximum(m, col)
    scores = gains / max(n_cover, 1)
    scores[picks] = at_pick / max(n_cover, 1)
    return picks, scores


@dataclass
class SamplePlan:
    """Which candidate positions compete (``candidates``) and which stand for the coverage (``cover``).

    Both are sorted positions into the candidate list; ``exact`` when both are every candidate.
    """

    candidates: np.ndarray
    cover: np.ndarray
    exact: bool


def plan_samples(
    n: int,
    k: int,
    rng: np.random.Generator,
    *,
    exact_limit: int = EXACT_LIMIT,
    candidate_sample: int = CANDIDATE_SAMPLE,
    coverage_sample: int = COVERAGE_SAMPLE,
) -> SamplePlan:
    """Return the :class:`SamplePlan` for ``n`` candidates: all of them up to ``exact_limit``, else two
    independent seeded uniform samples (``candidate_sample`` and ``coverage_sample`` positions, at most ``n``).

    Raises:
        SaalError: ``k`` larger than the candidates that would compete.
    """
    everything = np.arange(n, dtype=np.int64)
    if n <= exact_limit:
        cands, cover = everything, everything
    else:
        cands = everything if candidate_sample >= n else np.sort(rng.choice(n, candidate_sample, replace=False))
        cover = everything if coverage_sample >= n else np.sort(rng.choice(n, coverage_sample, replace=False))
    if k > len(cands):
        raise SaalError(
            f"query size {k} is larger than the herding candidate sample {len(cands)}; raise candidate_sample"
        )
    return SamplePlan(cands, cover, len(cands) == n and len(cover) == n)


def herding_select(
    embeddings: np.ndarray | torch.Tensor,
    labelled: np.ndarray | torch.Tensor | None,
    k: int,
    rng: np.random.Generator,
    *,
    bandwidth: float = DEFAULT_BANDWIDTH,
    weights: np.ndarray | torch.Tensor | None = None,
    exact_limit: int = EXACT_LIMIT,
    candidate_sample: int = CANDIDATE_SAMPLE,
    coverage_sample: int = COVERAGE_SAMPLE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Uncertainty) herding on arrays: pick ``k`` of ``embeddings`` (rows used as given: normalise them first).

    Args:
        embeddings: the ``N`` candidates' embeddings (``N x d``).
        labelled: the labelled items' embeddings (``L x d``; None or empty: nothing labelled).
        weights: ``U(x)`` for every candidate (``N``; None: MaxHerding).
        exact_limit, candidate_sample, coverage_sample: see :func:`plan_samples`.

    Returns:
        ``(picks, scored, scores)``: the picked positions into ``embeddings`` in pick order, the positions that
        competed, and their gains (see :func:`greedy_coverage`). The samples are drawn from a generator seeded from
        ``rng``'s first draw, as :class:`MaxHerding` draws them: the same seed gives the strategy's choice.

    Raises:
        SaalError: a bad ``k`` or bandwidth.
    """
    bw = float(check_bandwidth(bandwidth))
    x = torch.as_tensor(embeddings)
    plan = plan_samples(  # a generator seeded from rng's first draw draws the samples, as in the strategies
        len(x),
        k,
        np.random.default_rng(derive_seed(rng)),
        exact_limit=exact_limit,
        candidate_sample=candidate_sample,
        coverage_sample=coverage_sample,
    )
    cover = x[torch.as_tensor(plan.cover)]
    lab = torch.empty(0, x.shape[1], dtype=x.dtype) if labelled is None else torch.as_tensor(labelled).to(x)
    u = None if weights is None else torch.as_tensor(weights).to(x)[torch.as_tensor(plan.cover)]
    kernel = kernel_matrix(cover, x[torch.as_tensor(plan.candidates)], bw)
    picks, scores = greedy_coverage(kernel, k, weights=u, initial=max_kernel(cover, lab, bw))
    return plan.candidates[picks], plan.candidates, scores


def adaptive_bandwidth(labelled: torch.Tensor, block: int = BLOCK) -> float | None:
    """Return Uncertainty Herding's radius: the smallest distance between two labelled embeddings, over sqrt(2).

    The authors' code uses ``exp(-(d / delta)^2)`` with ``delta`` that smallest distance (pairs closer than
    :data:`DUPLICATE_DISTANCE` are duplicates and skipped); ``sigma = delta / sqrt(2)`` is the same kernel here.
    Computed in float64, ``block`` rows at a time.

    Returns:
        The radius, or None with fewer than two distinct labelled embeddings.
    """
    x = labelled.double()
    best = math.inf
    for i in range(0, len(x), block):
        a = x[i : i + block]
        sq = (a * a).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2.0 * (a @ x.T)
        d = sq.clamp_min_(0.0).sqrt_()
        d[d < DUPLICATE_DISTANCE] = math.inf  # itself and duplicates
        best = min(best, float(d.min())) if d.numel() else best
    return None if not math.isfinite(best) else best / math.sqrt(2.0)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Return the expected calibration error of ``probs`` (``n x C``) against ``labels``.

    The top-class confidences fall into ``bins`` equal bins of [0, 1] (each ``[lo, hi)``, the last ``[lo, 1]``);
    ECE is the mean over items of ``|accuracy - confidence|`` of their bin. 0 for no item.
    """
    if len(labels) == 0:
        return 0.0
    conf = probs.max(1)
    right = (probs.argmax(1) == labels).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in np.unique(which):
        inside = which == b
        total += inside.sum() * abs(right[inside].mean() - conf[inside].mean())
    return float(total / len(labels))


def select_temperature(
    logits: np.ndarray, labels: np.ndarray, temperatures: tuple[float, ...] = TEMPERATURES, bins: int = ECE_BINS
) -> float:
    """Return the temperature of ``temperatures`` whose ``softmax(logits / T)`` has the smallest ECE on ``labels``
    (ties: the first), as Uncertainty Herding's calibration chooses it."""
    z = np.asarray(logits, dtype=np.float64)
    best_t, best_e = float(temperatures[0]), math.inf
    for t in temperatures:
        s = z / t
        p = np.exp(s - s.max(1, keepdims=True))
        e = expected_calibration_error(p / p.sum(1, keepdims=True), np.asarray(labels), bins)
        if e < best_e:
            best_t, best_e = float(t), e
    return best_t


def margin_uncertainty(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Return ``1 - (p_(1) - p_(2))`` of ``softmax(logits / temperature)``: Uncertainty Herding's margin weight."""
    top2 = torch.softmax(logits.double() / temperature, dim=1).topk(2, dim=1).values
    return 1.0 - (top2[:, 0] - top2[:, 1])


# ------------------------------------------------------------------------------------------------ the model


def pool_logits(model: nn.Module, pool: Pool, indices: np.ndarray, batch_size: int) -> torch.Tensor:
    """Return the eval-mode logits of ``pool.dataset[indices]`` (float64, CPU), batch by batch."""
    device = model_device(model)

    def batch_logits(batch: Batch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"z": pool.task.forward(model, pool.task.to_device(batch.inputs, device)).double()}

    model.eval()
    out = scan(pool.dataset, indices, batch_logits, batch_size=batch_size, collate=pool.task.collate)
    return out["z"].cpu() if out else torch.empty(0, 0, dtype=torch.float64)


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """Return a copy of ``model`` whose trainable layers are re-initialised (seeded); frozen layers are kept.

    A module is re-initialised (``reset_parameters()``) when it has one and all its own parameters are trainable.
    The global torch generators are left as they were.
    """
    twin = copy.deepcopy(model)
    with seeded_torch(model, seed):
        for module in twin.modules():
            own = list(module.parameters(recurse=False))
            reset = getattr(module, "reset_parameters", None)
            if own and all(p.requires_grad for p in own) and callable(reset):
                reset()
    return twin


@contextmanager
def seeded_torch(model: nn.Module, seed: int) -> Iterator[None]:
    """Run the block with torch's global generators (CPU, and the model's GPU) seeded; restore them after."""
    device = model_device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def calibrated_temperature(
    model: nn.Module, pool: Pool, config: TrainConfig, rng: np.random.Generator, batch_size: int = 256
) -> float:
    """Return Uncertainty Herding's temperature, chosen as the authors' code chooses it.

    A copy of ``model`` with its trainable layers re-initialised is trained (``config``) on a seeded 70 % of the
    labelled items; the temperature of :data:`TEMPERATURES` with the smallest ECE on the other 30 % is returned.
    Everything is seeded from ``rng`` (split, initialisation, shuffling, dropout). 1.0 when fewer than one item
    would be held out or trained on (fewer than 4 labelled items).
    """
    from saal.training import fit

    labelled = pool.labelled_indices()
    held = int(len(labelled) * CALIBRATION_SHARE)
    if held < 1 or len(labelled) - held < 1:
        return 1.0
    order = rng.permutation(labelled)
    val, train = np.sort(order[:held]), np.sort(order[held:])
    seed = derive_seed(rng)
    twin = reinitialised(model, seed)
    with seeded_torch(model, seed):  # dropout and the like draw from the global generator
        fit(
            twin,
            pool.dataset,
            train,
            pool.labels_of(train),
            config,
            torch.Generator().manual_seed(seed),
            task=pool.task,
        )
    logits = pool_logits(twin, pool, val, batch_size).numpy()
    return select_temperature(logits, np.asarray(pool.labels_of(val)))


# ------------------------------------------------------------------------------------------------ strategies


class MaxHerding(Strategy):
    """MaxHerding: greedy Gaussian-kernel coverage of the pool in an embedding space (module docstring).

    Each pick maximises ``mean_x max(k(x, c) - m(x), 0)``, the gain in coverage ``C`` given the labelled set and
    the earlier picks, with ``k(x, x') = exp(-||x - x'||^2 / (2 bandwidth^2))`` on L2-normalised embeddings.
    Needs no label and no trained model (``cold_start``): with nothing labelled the first pick is the point of
    largest kernel density.

    Args:
        bandwidth: the kernel's ``sigma`` (default ``sqrt(0.5) = 0.707``: ``exp(-||x - x'||^2)``, the
            authors' code default; unit vectors are at most 2 apart).
        embedding: ``"auto"``, ``"input"``, ``"model"``, ``"pretrained"`` or an array
            (:mod:`saal.strategies.embedding_input`).
        exact_limit: up to this many candidates the greedy is exact (an ``N x N`` kernel).
        candidate_sample, coverage_sample: above it, the seeded sample sizes of competing candidates and of the
            points whose coverage is estimated (module docstring).
        batch_size: items embedded at once.
        subset: consider only a seeded random subset of the unlabelled pool.

    ``select`` scores the competing candidates: a pick's gain when it was picked, every other candidate's gain
    after all picks (mean over the covered points).

    Raises:
        SaalError: a bandwidth that is not a positive number, a bad embedding or sample size; (at selection) a
            query larger than the candidate sample.
    """

    name = "herding"
    cold_start: ClassVar[bool] = True

    def __init__(
        self,
        *,
        bandwidth: float = DEFAULT_BANDWIDTH,
        embedding: str | np.ndarray = "auto",
        exact_limit: int = EXACT_LIMIT,
        candidate_sample: int = CANDIDATE_SAMPLE,
        coverage_sample: int = COVERAGE_SAMPLE,
        batch_size: int = 256,
        subset: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        self.bandwidth: float | str = check_bandwidth(bandwidth)
        self.embedding = check_embedding_option(embedding)
        self.exact_limit = check_count("exact_limit", exact_limit, 0)
        self.candidate_sample = check_count("candidate_sample", candidate_sample)
        self.coverage_sample = check_count("coverage_sample", coverage_sample)
        self.last_bandwidth: float | None = None

    def weights(
        self, model: nn.Module, pool: Pool, cover: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor | None, str]:
        """Return ``u(x)`` for the covered dataset indices ``cover`` (None: all 1) and a note for the reason."""
        del model, pool, cover, rng
        return None, ""

    def radius(self, labelled: torch.Tensor) -> float:
        """Return the kernel radius to use given the labelled embeddings."""
        del labelled
        return float(self.bandwidth)

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        # Two independent streams, so the model's draws (calibration) do not depend on the sampling. Seeds are drawn
        # from rng rather than spawned: a spawn counter is not part of a generator's state, so it would not resume.
        sample_rng, model_rng = (np.random.default_rng(derive_seed(rng)) for _ in range(2))
        plan = plan_samples(
            len(candidates), k, sample_rng, exact_limit=self.exact_limit,
            candidate_sample=self.candidate_sample, coverage_sample=self.coverage_sample,
        )  # fmt: skip
        union = np.union1d(plan.candidates, plan.cover)
        rows = torch.as_tensor(l2_normalise(self._embed(model, pool, candidates[union])))
        labelled_idx = pool.labelled_indices()
        labelled = (
            torch.as_tensor(l2_normalise(self._embed(model, pool, labelled_idx)))
            if len(labelled_idx)
            else torch.empty(0, rows.shape[1])
        )
        cover = rows[torch.as_tensor(np.searchsorted(union, plan.cover))]
        cands = rows[torch.as_tensor(np.searchsorted(union, plan.candidates))]
        bw = self.radius(labelled)
        self.last_bandwidth = bw
        u, note = self.weights(model, pool, candidates[plan.cover], model_rng)
        kernel = kernel_matrix(cover, cands, bw)
        picks, scores = greedy_coverage(kernel, k, weights=u, initial=max_kernel(cover, labelled.to(rows), bw))
        mode = "exact" if plan.exact else f"sampled {len(plan.candidates)} candidates x {len(plan.cover)} covered"
        reason = f"bandwidth {bw:.4g}, {mode}{note}"
        return Selection(candidates[plan.candidates[picks]], candidates[plan.candidates], scores, reason)

    def _embed(self, model: nn.Module, pool: Pool, indices: np.ndarray) -> np.ndarray:
        return pool_embeddings(self.embedding, model, pool, indices, self.batch_size)

    def _common_repr(self) -> str:
        return (
            f"embedding={describe_embedding(self.embedding)}, exact_limit={self.exact_limit}, "
            f"candidate_sample={self.candidate_sample}, coverage_sample={self.coverage_sample}, "
            f"batch_size={self.batch_size}, subset={self.subset}"
        )

    def __repr__(self) -> str:
        return f"MaxHerding(bandwidth={self.bandwidth}, {self._common_repr()})"


class UncertaintyHerding(MaxHerding):
    """Uncertainty Herding (Bae, Oliveira and Sutherland, ICLR 2025): coverage weighted by calibrated uncertainty.

    Each pick maximises ``mean_x U(x) max(k(x, c) - m(x), 0)`` (module docstring), ``U`` the model's uncertainty
    of the covered point ``x``. What is implemented, against the paper and its official code:

    * ``uncertainty="margin"`` (default, the paper's): ``U = 1 - (p_(1) - p_(2))`` of ``softmax(logits / T)``.
      ``uncertainty="saal"``: ``U`` = SAAL's score, the loss under the model's own predicted label after the
      worst-case weight perturbation of radius ``rho`` (:mod:`saal.sharpness`; per instance, ``perturbation``,
      ``scope`` as in :class:`~saal.strategies.saal.SAAL`). This is *not* in the paper: it is this package's
      SAAL hybrid (registered as ``saal-herding``); no temperature is applied to it.
    * ``temperature="auto"``: the paper's calibration, as its code does it: a copy of the model with its
      trainable layers re-initialised is trained with the run's training settings (``saal run`` hands them over;
      else the package defaults, 50 epochs) on 70 % of the labelled items, and ``T`` is the value of 1.0, 1.1,
      ..., 19.9 with the smallest 15-bin ECE on the other 30 %. Deviations: the held-out 30 % is a seeded random
      split (the code holds out the most recently labelled 30 %); the copy restarts from a fresh seeded
      initialisation, not from the run's own initial weights (which a strategy does not see); frozen layers
      (a pretrained backbone) are kept. A number fixes ``T`` (1.0: no scaling). Costs a training run per
      selection: pass a number where that is too slow.
    * ``bandwidth="auto"``: the paper's shrinking radius: ``sigma = d_min / sqrt(2)``, ``d_min`` the smallest
      distance between two labelled embeddings (the code's ``exp(-(d / d_min)^2)``); with fewer than two distinct
      labelled embeddings, MaxHerding's default. A number fixes it.
    * Nothing labelled: no model has learned anything, so ``U = 1`` and this is exactly :class:`MaxHerding` (with
      its default bandwidth under ``"auto"``), as the authors' code does; hence ``cold_start``.
    * Uncertainties are computed for the covered points only (all candidates up to ``exact_limit``, else the
      coverage sample), so the approximation also saves the model's forward passes.

    Args:
        uncertainty: ``"margin"`` or ``"saal"``.
        temperature: ``"auto"`` or a positive number (``margin`` only).
        calibration_epochs: epochs of the calibration copy's training (None: the run's).
        bandwidth: ``"auto"`` or a positive number.
        rho, perturbation, scope: SAAL's options, for ``uncertainty="saal"``.
        embedding, exact_limit, candidate_sample, coverage_sample, batch_size, subset: as :class:`MaxHerding`.

    Raises:
        SaalError: a bad option value, in one line.
    """

    name = "uherding"
    cold_start: ClassVar[bool] = True

    def __init__(
        self,
        *,
        uncertainty: str = "margin",
        temperature: float | str = "auto",
        calibration_epochs: int | None = None,
        bandwidth: float | str = "auto",
        rho: float = 0.05,
        perturbation: str = "asam",
        scope: str = "all",
        embedding: str | np.ndarray = "auto",
        exact_limit: int = EXACT_LIMIT,
        candidate_sample: int = CANDIDATE_SAMPLE,
        coverage_sample: int = COVERAGE_SAMPLE,
        batch_size: int = 256,
        subset: int | None = None,
    ) -> None:
        from saal.sharpness import PERTURBATIONS, SCOPES, check_option, check_rho

        super().__init__(
            embedding=embedding, exact_limit=exact_limit, candidate_sample=candidate_sample,
            coverage_sample=coverage_sample, batch_size=batch_size, subset=subset,
        )  # fmt: skip
        self.bandwidth = check_bandwidth(bandwidth, allow_auto=True)
        self.uncertainty = check_option("uncertainty", uncertainty, UNCERTAINTIES)
        self.temperature = _check_temperature(temperature)
        self.calibration_epochs = check_optional_count("calibration_epochs", calibration_epochs)
        self.rho = check_rho(rho)
        self.perturbation = check_option("perturbation", perturbation, PERTURBATIONS)
        self.scope = check_option("scope", scope, SCOPES)
        self.train_config: TrainConfig | None = None
        self.last_temperature: float | None = None

    def use_training(self, config: TrainConfig) -> None:
        """Keep the run's training settings for the temperature calibration."""
        self.train_config = config

    def radius(self, labelled: torch.Tensor) -> float:
        if self.bandwidth != "auto":
            return float(self.bandwidth)
        found = adaptive_bandwidth(labelled) if len(labelled) > 1 else None
        return DEFAULT_BANDWIDTH if found is None else found

    def weights(
        self, model: nn.Module, pool: Pool, cover: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor | None, str]:
        self.last_temperature = None
        if len(pool.labelled_indices()) == 0:
            return None, ", nothing labelled: MaxHerding (U = 1)"
        if self.uncertainty == "saal":
            from saal.sharpness import pool_sharpness

            terms = pool_sharpness(
                model, pool.dataset, cover, batch_size=self.batch_size, rho=self.rho,
                perturbation=self.perturbation, granularity="per-instance", scope=self.scope, task=pool.task,
            )  # fmt: skip
            return torch.as_tensor(terms.perturbed_loss), ", U = SAAL perturbed loss"
        t = self.temperature if isinstance(self.temperature, float) else self._calibrate(model, pool, rng)
        self.last_temperature = t
        u = margin_uncertainty(pool_logits(model, pool, cover, self.batch_size), t)
        if not bool((u > 0).any()):  # a model certain of everything: its uncertainty says nothing
            return None, f", U = margin at temperature {t:g} is 0 everywhere: MaxHerding (U = 1)"
        return u, f", U = margin at temperature {t:g}"

    def _calibrate(self, model: nn.Module, pool: Pool, rng: np.random.Generator) -> float:
        from saal.settings import TrainConfig

        config = self.train_config if self.train_config is not None else TrainConfig()
        if self.calibration_epochs is not None:
            config = config.model_copy(update={"epochs": self.calibration_epochs})
        return calibrated_temperature(model, pool, config, rng, self.batch_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(uncertainty={self.uncertainty!r}, temperature={self.temperature!r}, "
            f"calibration_epochs={self.calibration_epochs}, bandwidth={self.bandwidth!r}, rho={self.rho}, "
            f"perturbation={self.perturbation!r}, scope={self.scope!r}, {self._common_repr()})"
        )


class SAALHerding(UncertaintyHerding):
    """SAAL-weighted Uncertainty Herding (``saal-herding``): this package's hybrid of SAAL and Uncertainty Herding.

    :class:`UncertaintyHerding` with ``uncertainty="saal"`` by default: coverage weighted by SAAL's per-instance
    perturbed loss under the model's own predicted label, instead of the calibrated margin. Neither paper
    proposes it; it exists to compare SAAL's sharpness against the margin (``uherding``) as the uncertainty
    that Uncertainty Herding spreads over the pool. Options as :class:`UncertaintyHerding`.
    """

    name = "saal-herding"
    cold_start: ClassVar[bool] = True


# the same options as UncertaintyHerding, the uncertainty defaulting to SAAL's (its signature says so)
SAALHerding.__init__ = with_defaults(  # type: ignore[method-assign]
    UncertaintyHerding.__init__, {"uncertainty": "saal"}, SAALHerding.__qualname__
)


def _check_temperature(value: Any) -> float | str:
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise SaalError(f"temperature must be auto or a positive number, got {value!r}")
    return float(value)


__all__ = [
    "CANDIDATE_SAMPLE",
    "COVERAGE_SAMPLE",
    "DEFAULT_BANDWIDTH",
    "EXACT_LIMIT",
    "TEMPERATURES",
    "MaxHerding",
    "SAALHerding",
    "SamplePlan",
    "UncertaintyHerding",
    "adaptive_bandwidth",
    "calibrated_temperature",
    "coverage",
    "expected_calibration_error",
    "gaussian_kernel",
    "greedy_coverage",
    "herding_select",
    "kernel_matrix",
    "margin_uncertainty",
    "max_kernel",
    "plan_samples",
    "pool_logits",
    "reinitialised",
    "select_temperature",
]
