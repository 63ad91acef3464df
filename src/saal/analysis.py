"""What SAAL's score is made of: loss, gradient norm and sharpness, per instance.

The paper's second-order expansion of the Max score (SAM form) is

    score_max(x) <~ l(x) + rho * ||g(x)|| + 0.5 * rho^2 * lambda_1(H(x))

with ``g`` and ``H`` the gradient and Hessian of the instance's loss under its pseudo label. This
module computes each term per instance (``lambda_1`` by power iteration on Hessian-vector
products), the Pearson correlation of each with the score, and a scatter plot. With the ASAM
perturbation the terms become ``rho * ||T g||`` and ``0.5 * rho^2 * lambda_1(T H T)`` (``T = |w|``),
the same expansion in ASAM's rescaled coordinates.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import grad, vjp, vmap
from torch.utils.data import Dataset

from saal.core.model_state import model_device, preserved
from saal.core.scan import Batch, scan
from saal.core.seeding import as_generator, derive_seed
from saal.errors import SaalError
from saal.sharpness import PERTURBATIONS, PoolSharpness, check_option, check_rho, sharpness_terms
from saal.sharpness.engine import as_batch_of_one, batch_len, functional_forward, resolve_task, take
from saal.sharpness.layer_rules import tensor_sum
from saal.tasks.base import Task

TERMS = ("loss", "grad_term", "sharpness_term")
_VECTOR_FLOATS = 1 << 22  # floats of power-iteration vectors held at once (chunks of instances beyond it)


@dataclass
class SharpnessAnalysis:
    """Per-instance terms of the second-order expansion, in ``indices`` order (float64 arrays).

    Attributes:
        indices: the dataset indices analysed.
        pseudo_label: the pseudo targets (for classification the eval-mode argmax).
        loss: the unperturbed loss under the pseudo target.
        grad_norm: ``||g||`` (SAM) or ``||T g||`` (ASAM).
        lambda_max: the largest eigenvalue of ``H`` (SAM) or ``T H T`` (ASAM), by power iteration.
        score: SAAL's score (``max`` or ``diff``) with the same ``rho`` and perturbation.
        settings: rho, perturbation, score kind, power iterations.
    """

    indices: np.ndarray
    pseudo_label: np.ndarray
    loss: np.ndarray
    grad_norm: np.ndarray
    lambda_max: np.ndarray
    score: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def grad_term(self) -> np.ndarray:
        """``rho * ||g||``."""
        return self.settings["rho"] * self.grad_norm

    @property
    def sharpness_term(self) -> np.ndarray:
        """``0.5 * rho^2 * lambda_1``."""
        return 0.5 * self.settings["rho"] ** 2 * self.lambda_max

    @property
    def second_order(self) -> np.ndarray:
        """``loss + rho ||g|| + 0.5 rho^2 lambda_1``: the expansion's estimate of the Max score."""
        return self.loss + self.grad_term + self.sharpness_term

    def correlations(self) -> dict[str, float]:
        """Return the Pearson correlation of the score with each term (NaN where a term is constant)."""
        terms = {"loss": self.loss, "grad_term": self.grad_term, "sharpness_term": self.sharpness_term}
        terms["second_order"] = self.second_order
        return {name: pearson(values, self.score) for name, values in terms.items()}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Return the Pearson correlation of two equally long vectors (NaN if either is constant or too short)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def top_hessian_eigenvalues(
    model: nn.Module,
    inputs: Any,
    labels: Any,
    *,
    perturbation: str = "sam",
    iters: int = 20,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    task: Task | None = None,
) -> torch.Tensor:
    """Return the top (largest) Hessian eigenvalue of each instance's loss ``l(f_w(x_i), labels_i)``.

    The loss is the task's per-item loss (default: classification, ``CE``); ``labels`` are its
    targets for the batch (a tensor, or a pytree of tensors, with one row per item).

    Power iteration on Hessian-vector products (``torch.func``, reverse over reverse), every
    instance its own vector, at most ``iters`` steps (fewer once every Rayleigh quotient of a
    chunk moved by less than ``tol`` relative). Where the dominant eigenvalue is negative, a
    second power iteration on the shifted matrix finds the largest one. For
    ``perturbation="asam"`` the matrix is ``T H T`` with ``T = |w|``. The model is used in eval
    mode and left as it was found. Convergence goes like ``(|lambda_2| / lambda_1)^iters``: slow
    where another eigenvalue (of either sign) is close in magnitude to the top one.

    Returns:
        A 1-D tensor: the largest eigenvalue per instance.

    Raises:
        SaalError: a bad ``perturbation`` or ``iters``.
    """
    asam = check_option("perturbation", perturbation, PERTURBATIONS) == "asam"
    if iters < 1:
        raise SaalError(f"power iterations must be at least 1, got {iters}")
    task = resolve_task(task)
    count = batch_len(inputs)
    with preserved(model):
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if not params or count == 0:
            return torch.zeros(count)
        scale = {n: p.abs() for n, p in params.items()} if asam else None
        batched = _batched_hvp(task, model)

        def power(xc: Any, yc: Any, shift: torch.Tensor | None) -> torch.Tensor:
            return _power_iteration(batched, params, scale, xc, yc, shift, iters=iters, tol=tol, generator=generator)

        size = sum(p.numel() for p in params.values())
        chunk = max(1, _VECTOR_FLOATS // size)
        out = []
        for s in range(0, count, chunk):
            xc, yc = take(inputs, slice(s, s + chunk)), take(labels, slice(s, s + chunk))
            lam = power(xc, yc, None)
            negative = lam < 0
            if negative.any():
                # The dominant eigenvalue is negative: the top one is lam + the dominant of (M - lam I) >= 0.
                shift = lam[negative]
                lam = lam.clone()
                lam[negative] = shift + power(take(xc, negative), take(yc, negative), shift)
            out.append(lam)
        return torch.cat(out)


def _batched_hvp(task: Task, model: nn.Module) -> Callable[..., Any]:
    """Return ``f(params, xs, ys, vs)``: for every item ``i`` of a batch, ``H_i v_i``, the Hessian of its loss
    (the task's, under target ``ys[i]``) at ``params`` times its own vector ``v_i`` (``torch.func``)."""
    call = functional_forward(task, model)

    def loss_fn(p: dict[str, torch.Tensor], xi: Any, yi: Any) -> torch.Tensor:
        return task.output_losses(call(p, as_batch_of_one(xi)), as_batch_of_one(yi)).sum()

    def hvp(p: dict[str, torch.Tensor], xi: Any, yi: Any, v: dict[str, torch.Tensor]) -> Any:
        # H v as the vector-Jacobian product of the gradient (H is symmetric): reverse over reverse.
        pullback = vjp(lambda q: grad(loss_fn)(q, xi, yi), p)[1]
        return pullback(v)[0]

    return vmap(hvp, in_dims=(None, 0, 0, 0))


def _power_iteration(
    batched: Callable[..., Any],
    params: dict[str, torch.Tensor],
    scale: dict[str, torch.Tensor] | None,
    xc: Any,
    yc: Any,
    shift: torch.Tensor | None,
    *,
    iters: int,
    tol: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Return the dominant eigenvalue of ``M - shift I`` per item of ``xc`` (``M = H``, or ``T H T`` with
    ``T = scale``), by at most ``iters`` power-iteration steps from seeded random vectors (fewer once every
    Rayleigh quotient moved by less than ``tol`` relative); ``batched`` is :func:`_batched_hvp`'s product."""
    m = batch_len(xc)
    v = _normalised(
        {n: torch.randn((m, *p.shape), generator=generator, dtype=p.dtype).to(p.device) for n, p in params.items()}
    )
    lam = torch.zeros(m, dtype=next(iter(params.values())).dtype)
    for step in range(iters):
        w = {n: v[n] * scale[n] for n in v} if scale is not None else v
        hv = batched(params, xc, yc, w)
        if scale is not None:
            hv = {n: hv[n] * scale[n] for n in hv}
        if shift is not None:
            hv = {n: hv[n] - _column(shift, hv[n]) * v[n] for n in hv}
        new = tensor_sum(_rows(v[n] * hv[n]) for n in v)
        v = _normalised(hv)
        done = step > 0 and bool(((new - lam).abs() <= tol * new.abs() + 1e-12).all())
        lam = new.detach()
        if done:
            break
    return lam


def _column(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, *([1] * (like.dim() - 1)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def _normalised(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    norm = torch.sqrt(tensor_sum(_rows(t * t) for t in v.values()))
    # A zero Hessian-vector product (a zero Hessian) stays zero: its Rayleigh quotient is 0.
    return {n: t / (_column(norm, t) + 1e-30) for n, t in v.items()}


def analyze(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    *,
    rho: float = 0.05,
    perturbation: str = "sam",
    score: str = "max",
    power_iters: int = 20,
    batch_size: int = 64,
    generator: np.random.Generator | int | None = 0,
    task: Task | None = None,
) -> SharpnessAnalysis:
    """Compute loss, gradient norm, top Hessian eigenvalue and SAAL score for ``dataset[indices]``.

    One pass over the items (:func:`saal.core.scan.scan`, the task's ``collate``): each batch is
    scored by :func:`saal.sharpness.sharpness_terms`, then its eigenvalues are found under the
    same pseudo targets.

    Args:
        rho, perturbation, score: as in the ``saal`` strategy (the default here is the SAM form,
            for which the expansion ``l + rho ||g|| + 0.5 rho^2 lambda_1`` is stated).
        power_iters: power-iteration steps per instance.
        batch_size: pool items handled at once.
        generator: seeds the power iterations' starting vectors.
        task: the forward pass, pseudo target and per-item loss (default: classification).

    Returns:
        A :class:`SharpnessAnalysis`. The model is left as it was found.

    Raises:
        SaalError: a bad option value, or a task whose pseudo targets are not one tensor row per item.
    """
    rho = check_rho(rho)
    score = check_option("score", score, ("max", "diff"))
    perturbation = check_option("perturbation", perturbation, PERTURBATIONS)
    task = resolve_task(task)
    indices = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    torch_gen = torch.Generator().manual_seed(derive_seed(as_generator(generator)))
    device = model_device(model)

    def analyse_batch(batch: Batch) -> dict[str, torch.Tensor]:
        x = task.to_device(batch.inputs, device)
        t = sharpness_terms(model, x, rho=rho, perturbation=perturbation, task=task)
        if not isinstance(t.pseudo_label, torch.Tensor) or len(t.pseudo_label) != len(batch):
            raise SaalError(
                f"the analysis needs pseudo targets with one tensor row per item; "
                f"the {task.name} task's are {type(t.pseudo_label).__name__}"
            )
        lam = top_hessian_eigenvalues(
            model, x, t.pseudo_label, perturbation=perturbation, iters=power_iters, generator=torch_gen, task=task
        )
        return {
            "pseudo_label": t.pseudo_label,
            "loss": t.loss,
            "perturbed_loss": t.perturbed_loss,
            "grad_norm": t.grad_norm,
            "lambda_max": lam.to(t.loss.device),
        }

    with preserved(model):
        found = scan(dataset, indices, analyse_batch, batch_size=batch_size, collate=task.collate)

    def column(name: str) -> np.ndarray:
        return found[name].double().cpu().numpy() if found else np.empty(0, dtype=np.float64)

    labels = found["pseudo_label"].cpu().numpy() if found else np.empty(0, dtype=np.int64)
    terms = PoolSharpness(indices, column("loss"), column("perturbed_loss"), column("grad_norm"), labels)
    return SharpnessAnalysis(
        indices=indices,
        pseudo_label=labels,
        loss=terms.loss,
        grad_norm=terms.grad_norm,
        lambda_max=column("lambda_max"),
        score=terms.score(score),
        settings={"rho": rho, "perturbation": perturbation, "score": score, "power_iters": power_iters},
    )


CSV_FIELDS = (
    "dataset_index",
    "pseudo_label",
    "loss",
    "grad_norm",
    "lambda_max",
    "grad_term",
    "sharpness_term",
    "second_order",
    "score",
)


def write_analysis(result: SharpnessAnalysis, out: str | os.PathLike, meta: dict[str, Any] | None = None) -> dict:
    """Write ``terms.csv`` (one row per instance), ``correlations.json`` and ``scatter.png`` under ``out``.

    Returns:
        ``{"csv": path, "json": path, "png": path}``.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    columns = {
        "dataset_index": result.indices,
        "pseudo_label": result.pseudo_label,
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "lambda_max": result.lambda_max,
        "grad_term": result.grad_term,
        "sharpness_term": result.sharpness_term,
        "second_order": result.second_order,
        "score": result.score,
    }
    csv_path = folder / "terms.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_FIELDS)
        for i in range(len(result.indices)):
            writer.writerow([_cell(columns[f][i]) for f in CSV_FIELDS])
    json_path = folder / "correlations.json"
    summary = {
        "correlation_with_score": {k: _json_float(v) for k, v in result.correlations().items()},
        "instances": len(result.indices),
        "mean": {k: _json_float(float(np.mean(columns[k]))) if len(result.indices) else None for k in CSV_FIELDS[2:]},
        "settings": result.settings,
        **(meta or {}),
    }
    json_path.write_text(json.dumps(summary, indent=2))
    png_path = folder / "scatter.png"
    plot_analysis(result, png_path)
    return {"csv": csv_path, "json": json_path, "png": png_path}


def _cell(v: Any) -> str:
    if isinstance(v, (np.integer, int)):
        return str(int(v))
    return f"{float(v):.9g}"


def _json_float(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 6)


def plot_analysis(result: SharpnessAnalysis, path: str | os.PathLike) -> Path:
    """Save a scatter plot of the score against each term (one panel each, Pearson r in the title)."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, Agg canvas

    corr = result.correlations()
    rho_sym = "T g" if result.settings.get("perturbation") == "asam" else "g"
    labels = {
        "loss": "loss  l(x, ŷ)",
        "grad_term": f"ρ ||{rho_sym}||",
        "sharpness_term": "½ ρ² λ₁",
    }
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for ax, name in zip(axes, TERMS, strict=True):
        ax.scatter(getattr(result, name), result.score, s=6, alpha=0.6)
        ax.set_xlabel(labels[name])
        ax.set_title(f"r = {corr[name]:.3f}")
    axes[0].set_ylabel(f"SAAL score ({result.settings.get('score')})")
    fig.suptitle(
        f"SAAL score vs its second-order terms ({len(result.indices)} instances, "
        f"ρ = {result.settings.get('rho')}, {result.settings.get('perturbation')})"
    )
    fig.savefig(path, dpi=110)
    return Path(path)
