"""SAAL on detectors: the engine equals the naive definition in float64, scores depend on nothing but the image
(not the batch, not luck), weights come back bit-exactly, and an image with no detection scores a finite loss."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from saal.data import load_dataset
from saal.data.feature_cache import MEMORY_CACHE
from saal.models.detectors import build_detector
from saal.sharpness.detection import detection_terms, naive_detection_terms, pool_detection_sharpness


def small_detector(name: str = "fcos-lite0", **options: object) -> nn.Module:
    torch.manual_seed(0)
    return build_detector(name, 2, min_size=64, max_size=96, **options).double().eval()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def images(voc_root: Path) -> list[torch.Tensor]:
    bundle = load_dataset(f"voc:{voc_root}")
    return [bundle.train[i][0] for i in range(4)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("perturbation", ["asam", "sam"])
def test_the_engine_equals_the_naive_definition_in_float64(images: list[torch.Tensor], perturbation: str) -> None:
    model = small_detector()
    MEMORY_CACHE.clear()
    terms = detection_terms(model, images, perturbation=perturbation, score_threshold=0.05)
    naive = naive_detection_terms(model, images, perturbation=perturbation, score_threshold=0.05)
    assert [len(t.pseudo["boxes"]) > 0 for t in terms] == [True] * len(images)  # real pseudo boxes were scored
    three = detection_terms(model, images, perturbation=perturbation, score_threshold=0.05, fused=False)
    for t, u, (loss, perturbed) in zip(terms, three, naive, strict=True):
        assert abs(t.loss - loss) <= 1e-9 and abs(t.perturbed_loss - perturbed) <= 1e-9
        assert (t.loss, t.perturbed_loss) == (u.loss, u.perturbed_loss)  # two passes give what three give
        assert t.perturbed_loss > t.loss  # an ascent step raises the loss
    assert MEMORY_CACHE.hits > 0  # the engine used cached backbone features; the naive copies did not


@pytest.mark.slow
def test_an_unfrozen_backbone_is_perturbed_too_and_still_equals_the_definition(images: list[torch.Tensor]) -> None:
    model = small_detector(frozen=False)
    terms = detection_terms(model, images[:1], score_threshold=0.05)
    naive = naive_detection_terms(model, images[:1], score_threshold=0.05)
    assert abs(terms[0].perturbed_loss - naive[0][1]) <= 1e-9
    frozen = detection_terms(small_detector(), images[:1], score_threshold=0.05)
    assert terms[0].grad_norm > frozen[0].grad_norm  # more parameters: a larger ||T g||


def test_scores_depend_on_the_image_alone_and_the_model_comes_back_bit_exact(voc_root: Path) -> None:
    bundle = load_dataset(f"voc:{voc_root}")
    model = small_detector()
    model.train()
    before, modes = snapshot(model), [m.training for m in model.modules()]
    task = bundle.task
    together = pool_detection_sharpness(model, bundle.train, np.arange(5), task, score_threshold=0.05, batch_size=5)
    alone = pool_detection_sharpness(model, bundle.train, np.array([4]), task, score_threshold=0.05, batch_size=1)
    again = pool_detection_sharpness(model, bundle.train, np.arange(5), task, score_threshold=0.05, batch_size=2)
    assert together.perturbed_loss[4] == alone.perturbed_loss[0]
    assert np.array_equal(together.perturbed_loss, again.perturbed_loss) and np.array_equal(together.loss, again.loss)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes


def test_an_image_with_no_confident_detection_scores_a_finite_loss(images: list[torch.Tensor]) -> None:
    model = small_detector()
    terms = detection_terms(model, images[:2], score_threshold=1.0)
    for t in terms:
        assert len(t.pseudo["boxes"]) == 0
        assert np.isfinite(t.loss) and np.isfinite(t.perturbed_loss) and t.perturbed_loss >= t.loss


@pytest.mark.slow
def test_faster_rcnn_scores_never_depend_on_luck_and_equal_the_definition(images: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = build_detector("fasterrcnn-mobilenet-v3-320", 2, min_size=64, max_size=96).eval()  # float32: speed
    first = detection_terms(model, images[:1], score_threshold=0.0)
    torch.manual_seed(12345)  # whatever the global generator holds, the samplers draw the same
    second = detection_terms(model, images[:1], score_threshold=0.0)
    naive = naive_detection_terms(copy.deepcopy(model), images[:1], score_threshold=0.0)
    assert first[0].perturbed_loss == second[0].perturbed_loss and first[0].loss == second[0].loss
    assert first[0].perturbed_loss == pytest.approx(naive[0][1], rel=1e-5)
