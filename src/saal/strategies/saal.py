"""SAAL: Sharpness-Aware Active Learning (Kim et al., ICML 2023), and the one SAAL strategy core every task's
SAAL shares (:class:`SAALCore`: option checks, the query, ``__repr__``, reference variants as default
overrides)."""

from __future__ import annotations

import functools
import inspect
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
from torch import nn

from saal.core.selection import d2_sample, top_k
from saal.errors import SaalError
from saal.pool import Pool
from saal.sharpness import (
    GRANULARITIES,
    PERTURBATIONS,
    SCOPES,
    PoolSharpness,
    check_option,
    check_rho,
    pool_sharpness,
)
from saal.strategies.base import Selection, Strategy

SCORES = ("max", "diff")
SELECTIONS = ("top-k", "kmeans++")
# Options whose attribute has another name (``score`` is a method name elsewhere: the attribute is ``score_kind``).
_ATTRIBUTES = {"score": "score_kind"}


class SAALCore(Strategy):
    """What every SAAL strategy shares, whatever the task: its common options, checked; the query (score the
    candidates by :meth:`sharpness`, rank them by :meth:`~saal.sharpness.engine.PoolSharpness.score` of
    ``score_kind``, pick the top ``k`` or D^2-sample them); ``__repr__`` from the options.

    A subclass implements :meth:`sharpness` for its task and lists its options in its ``__init__``. A variant
    that only changes defaults (the reference code's) sets :attr:`default_overrides` instead of an ``__init__``:
    its ``__init__`` is the parent's with those defaults, and its signature says so (what
    :func:`saal.strategies.strategy_options` reads).

    Args:
        rho: the perturbation radius.
        perturbation: ``"asam"`` or ``"sam"``.
        score: ``"max"`` or ``"diff"`` (:data:`SCORES`).
        selection: ``"top-k"`` or ``"kmeans++"`` (aliases ``topk``, ``kmeans``, ``kmeans-pp``, ``diversity``).
        batch_size, subset: as for :class:`~saal.strategies.base.Strategy`.

    Raises:
        SaalError: a bad option value, naming the option and the allowed values.
    """

    #: Keyword defaults that replace the parent class's (a variant with other defaults, no other change).
    default_overrides: ClassVar[Mapping[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "default_overrides" in vars(cls):
            parent_init = super(cls, cls).__init__  # the next class's __init__ in the method order
            init = with_defaults(parent_init, cls.default_overrides, cls.__qualname__)
            cls.__init__ = init  # type: ignore[method-assign]

    def __init__(
        self, *, rho: float, perturbation: str, score: str, selection: str, batch_size: int, subset: int | None
    ) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        self.rho = check_rho(rho)
        self.perturbation = check_option("perturbation", perturbation, PERTURBATIONS)
        self.score_kind = check_option("score", score, SCORES)
        self.selection = _check_selection(selection)
        self.last_terms: PoolSharpness | None = None

    @abstractmethod
    def sharpness(self, model: nn.Module, pool: Pool, candidates: np.ndarray) -> PoolSharpness:
        """Return the candidates' losses, perturbed losses, gradient norms and pseudo targets under the pool's task.

        Raises:
            SaalError: a pool or model this strategy cannot score.
        """

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        terms = self.sharpness(model, pool, candidates)
        self.last_terms = terms
        scores = terms.score(self.score_kind)
        picked = top_k(scores, k) if self.selection == "top-k" else kmeans_pp_1d(scores, k, rng)
        return Selection(candidates[picked], candidates, scores)

    def __repr__(self) -> str:
        options = inspect.signature(type(self).__init__).parameters
        shown = ", ".join(
            f"{name}={getattr(self, _ATTRIBUTES.get(name, name))!r}" for name in options if name != "self"
        )
        return f"{type(self).__name__}({shown})"


def with_defaults(init: Callable[..., None], overrides: Mapping[str, Any], owner: str) -> Callable[..., None]:
    """Return ``init`` (an ``__init__`` of keyword-only options) with the defaults of ``overrides`` in place of
    its own; its signature shows the new defaults. ``owner`` names the class it is for (its ``__qualname__``).

    Raises:
        TypeError: an override that names no keyword option of ``init`` (a mistake in the class, not input).
    """
    signature = inspect.signature(init)
    params = signature.parameters
    unknown = sorted(set(overrides) - {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY})
    if unknown:
        raise TypeError(f"{owner}.default_overrides names {unknown[0]!r}, not an option of {init.__qualname__}")

    @functools.wraps(init)
    def __init__(self: Any, **options: Any) -> None:
        init(self, **{**overrides, **options})

    __init__.__qualname__ = f"{owner}.__init__"
    new = [p.replace(default=overrides[n]) if n in overrides else p for n, p in params.items()]
    __init__.__signature__ = signature.replace(parameters=new)  # type: ignore[attr-defined]
    return __init__


class SAAL(SAALCore):
    """Choose the instances whose loss rises most under a worst-case weight perturbation.

    Each candidate ``x`` gets the pseudo label ``yhat = argmax f_w(x)`` and the perturbation
    ``eps(x)`` of one ascent step of radius ``rho`` on its own loss (see :mod:`saal.sharpness`).

    The engine speaks to the pool's task only through its forward pass, pseudo targets and
    per-item losses (:class:`saal.tasks.base.Task`), so ``scope="all"`` works for any task whose
    items do not interact in eval mode and whose batches and pseudo targets are tensors (or
    pytrees of tensors) with one row per item; ``scope="last-layer"`` is classification only.
    :attr:`tasks` declares classification, the task this strategy is tested on.

    Args:
        rho: the perturbation radius (default 0.05).
        perturbation: ``"asam"`` (``eps = rho T^2 g / ||T g||``, ``T = |w|``; the reference code)
            or ``"sam"`` (``eps = rho g / ||g||``).
        score: ``"max"`` (the perturbed loss, the paper's score) or ``"diff"`` (perturbed minus
            unperturbed loss: the sharpness alone).
        granularity: ``"per-instance"`` (each instance its own eps, the paper's definition) or
            ``"per-batch"`` (one eps from the mean loss of each pool batch of ``batch_size``:
            what the reference code computes with a pool batch larger than 1).
        scope: ``"all"`` parameters, or ``"last-layer"`` (closed form from the logits and the
            penultimate features; about the cost of entropy).
        selection: ``"top-k"`` (the largest scores) or ``"kmeans++"`` (the reference code's
            "diversity": D^2 sampling on the 1-D scores, first pick = the largest ``|score|``).
        batch_size: pool items scored at once.
        subset: score only a seeded random subset of this many unlabelled items.

    ``select`` returns the scores of every scored candidate (higher = picked first under top-k).

    Raises:
        SaalError: a bad option value, naming the option and the allowed values.
    """

    name = "saal"
    tasks: ClassVar[tuple[str, ...]] = ("classification",)

    def __init__(
        self,
        *,
        rho: float = 0.05,
        perturbation: str = "asam",
        score: str = "max",
        granularity: str = "per-instance",
        scope: str = "all",
        selection: str = "top-k",
        batch_size: int = 256,
        subset: int | None = None,
    ) -> None:
        super().__init__(
            rho=rho, perturbation=perturbation, score=score, selection=selection, batch_size=batch_size, subset=subset
        )
        self.granularity = check_option("granularity", granularity, GRANULARITIES)
        self.scope = check_option("scope", scope, SCOPES)

    def sharpness(self, model: nn.Module, pool: Pool, candidates: np.ndarray) -> PoolSharpness:
        """Return the per-candidate loss, perturbed loss, gradient norm and pseudo label, under the pool's task.

        Raises:
            SaalError: a model the engine cannot score, or ``scope="last-layer"`` on a task other
                than classification.
        """
        return pool_sharpness(
            model,
            pool.dataset,
            candidates,
            batch_size=self.batch_size,
            rho=self.rho,
            perturbation=self.perturbation,
            granularity=self.granularity,
            scope=self.scope,
            task=pool.task,
        )


class SAALReference(SAAL):
    """SAAL with exactly the reference implementation's defaults: ASAM, rho 0.05, per-instance
    perturbation, the Max score, k-means++ ("diversity") selection on the scores, and a random
    pool subset of 2,000 per round. Options as in :class:`SAAL`."""

    name = "saal-reference"
    default_overrides: ClassVar[Mapping[str, Any]] = {"selection": "kmeans++", "subset": 2000}


def _check_selection(value: object) -> str:
    text = value.lower().replace("_", "-") if isinstance(value, str) else value
    aliases = {"topk": "top-k", "kmeans": "kmeans++", "kmeans-pp": "kmeans++", "diversity": "kmeans++"}
    text = aliases.get(text, text) if isinstance(text, str) else text
    if text not in SELECTIONS:
        raise SaalError(f"selection must be one of {', '.join(SELECTIONS)}; got {value!r}")
    return text


def kmeans_pp_1d(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling, :func:`saal.core.selection.d2_sample`) on a 1-D score vector.

    The first pick is the largest ``|score|`` (ties to the smaller position); each next pick is
    drawn with probability proportional to its squared distance to the nearest pick so far. When
    every remaining distance is zero, the next pick is uniform among the unpicked.

    Returns:
        ``k`` distinct positions into ``scores``, in the order picked.

    Raises:
        SaalError: if ``k`` is not in ``0 .. len(scores)``.
    """
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0, posinf=np.finfo(np.float64).max / 4)
    n = len(s)
    if not 0 <= k <= n:
        raise SaalError(f"cannot pick {k} of {n} scores; choose k in 0..{n}")
    if k == 0:
        return np.empty(0, dtype=np.int64)
    picks, _ = d2_sample(n, k, int(np.argmax(np.abs(s))), lambda j: (s - s[j]) ** 2, rng)
    return picks
