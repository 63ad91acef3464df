"""Sharpness analysis: Hessian eigenvalues, the expansion's terms, correlations and the files written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from saal.analysis import analyze, pearson, top_hessian_eigenvalues, write_analysis
from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.sharpness import naive_perturbed_losses
from saal.tasks import Classification


class _SmoothedClassification(Classification):
    """Label-smoothed cross-entropy: a task whose loss is not the default one."""

    def output_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=0.2)


def _tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()
    with torch.no_grad():
        model[1].running_var.fill_(0.7)
        model[1].bias.fill_(0.2)
    return model.eval(), torch.randn(4, 1, 6, 6, dtype=torch.float64)


def _dense_top_eigenvalue(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, asam: bool, smoothing: float = 0.0
) -> float:
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    flat = torch.cat([params[n].flatten() for n in names])
    sizes = [params[n].numel() for n in names]

    def loss(v: torch.Tensor) -> torch.Tensor:
        parts = torch.split(v, sizes)
        p = {n: t.reshape(params[n].shape) for n, t in zip(names, parts, strict=True)}
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None], label_smoothing=smoothing)

    h = torch.autograd.functional.hessian(loss, flat)
    if asam:
        h = flat.abs()[:, None] * h * flat.abs()[None, :]
    return float(torch.linalg.eigvalsh(h)[-1])


@pytest.mark.slow
@pytest.mark.parametrize("perturbation", ["sam", "asam"])
def test_power_iteration_finds_the_largest_hessian_eigenvalue(perturbation: str) -> None:
    model, x = _tiny()
    y = model(x).argmax(1)
    lam = top_hessian_eigenvalues(
        model, x, y, perturbation=perturbation, iters=300, tol=1e-12, generator=torch.Generator().manual_seed(0)
    )
    expected = [_dense_top_eigenvalue(model, x[i], y[i], perturbation == "asam") for i in range(len(x))]
    # Power iteration converges like (|lambda_2| / lambda_1)^k, slowly here (0.98 for one instance).
    np.testing.assert_allclose(lam.numpy(), expected, rtol=1e-3)


def test_analysis_terms_match_their_definitions_and_leave_the_model_alone() -> None:
    model, x = _tiny()
    data = ArrayDataset(x, np.zeros(len(x)))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = analyze(model, data, np.arange(len(x)), rho=0.02, perturbation="sam", power_iters=50, batch_size=3)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    loss, pert = naive_perturbed_losses(model, x, rho=0.02, perturbation="sam")
    np.testing.assert_allclose(res.score, pert.numpy(), rtol=1e-8)
    np.testing.assert_allclose(res.loss, loss.numpy(), rtol=1e-8)
    model.eval()
    for i in range(len(x)):
        y = model(x[i : i + 1]).argmax(1)
        g = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y), list(model.parameters()))
        norm = float(torch.sqrt(sum((t * t).sum() for t in g)))
        assert res.grad_term[i] == pytest.approx(0.02 * norm, rel=1e-8)
    # With a small radius the expansion l + rho||g|| + rho^2/2 * g^T H g / ||g||^2 is close to the
    # perturbed loss, and lambda_1 bounds the curvature term from above: second_order >= score - O(rho^3).
    assert np.all(res.second_order >= res.score - 1e-5)
    assert np.all(res.score >= res.loss)
    assert res.correlations()["second_order"] > 0.9


def test_same_generator_same_eigenvalues() -> None:
    model, x = _tiny()
    data = ArrayDataset(x, np.zeros(len(x)))
    a = analyze(model, data, np.arange(4), power_iters=3, generator=5)
    b = analyze(model, data, np.arange(4), power_iters=3, generator=5)
    np.testing.assert_array_equal(a.lambda_max, b.lambda_max)


def test_pearson() -> None:
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.5])) > 0.99
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert np.isnan(pearson(np.ones(3), np.array([1.0, 2.0, 3.0])))
    assert np.isnan(pearson(np.ones(1), np.ones(1)))


def test_write_analysis_files(tmp_path: Path) -> None:
    model, x = _tiny()
    data = ArrayDataset(x, np.zeros(len(x)))
    res = analyze(model, data, np.array([3, 1, 2]), perturbation="asam", power_iters=5)
    paths = write_analysis(res, tmp_path / "out", {"note": "test"})
    with open(paths["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["dataset_index"]) for r in rows] == [3, 1, 2]
    assert float(rows[0]["score"]) == pytest.approx(res.score[0], rel=1e-7)
    summary = json.loads(paths["json"].read_text())
    assert set(summary["correlation_with_score"]) == {"loss", "grad_term", "sharpness_term", "second_order"}
    assert summary["settings"]["perturbation"] == "asam" and summary["note"] == "test"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_are_user_errors() -> None:
    model, x = _tiny()
    with pytest.raises(SaalError, match="perturbation must be one of"):
        top_hessian_eigenvalues(model, x, torch.zeros(4, dtype=torch.long), perturbation="adam")
    with pytest.raises(SaalError, match="power iterations"):
        top_hessian_eigenvalues(model, x, torch.zeros(4, dtype=torch.long), iters=0)


def test_analysis_runs_through_the_task_seam() -> None:
    model, x = _tiny()
    task = _SmoothedClassification(3)
    data = ArrayDataset(x, np.zeros(len(x)))
    res = analyze(model, data, np.array([2, 0, 3]), rho=0.02, power_iters=300, batch_size=2, task=task)
    loss, pert = naive_perturbed_losses(model, x[[2, 0, 3]], rho=0.02, perturbation="sam", task=task)
    np.testing.assert_allclose(res.score, pert.numpy(), rtol=1e-10)
    np.testing.assert_allclose(res.loss, loss.numpy(), rtol=1e-10)
    _, plain = naive_perturbed_losses(model, x[[2, 0, 3]], rho=0.02, perturbation="sam")
    assert not np.allclose(res.score, plain.numpy())
    y = model(x).argmax(1)
    expected = [_dense_top_eigenvalue(model, x[i], y[i], False, smoothing=0.2) for i in (2, 0, 3)]
    np.testing.assert_allclose(res.lambda_max, expected, rtol=1e-3)
    empty = analyze(model, data, np.array([], dtype=np.int64), task=task)
    assert empty.lambda_max.shape == empty.score.shape == (0,)
