"""Detection strategies: each picks k distinct unlabelled images from its scores, reproducibly; strategies and
models of the other task are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from saal.data import load_dataset
from saal.data.detection import DetectionBundle
from saal.errors import SaalError
from saal.models.detectors import build_detector, detections_with_class_scores
from saal.pool import Pool
from saal.strategies import build_strategy, strategies_for, strategy_options

DETECTION_STRATEGIES = [
    "random",
    "det-entropy",
    "det-least-confidence[aggregate=mean]",
    "det-margin[aggregate=sum]",
    "det-coreset",
    "det-loss",
    "det-saal[score_threshold=0.05]",
    "det-saal[score=diff,perturbation=sam,score_threshold=0.05]",
    "det-saal-reference[score_threshold=0.05]",
]


@pytest.fixture(scope="module")
def setup(voc_root: Path) -> tuple[DetectionBundle, nn.Module]:
    bundle = load_dataset(f"voc:{voc_root}")
    torch.manual_seed(0)
    return bundle, build_detector("fcos-lite0", 2, min_size=64, max_size=96).eval()


def fresh_pool(bundle: DetectionBundle) -> Pool:
    pool = Pool(bundle.train, task=bundle.task)
    pool.label([0, 1], bundle.train_targets[[0, 1]])
    return pool


@pytest.mark.parametrize("spec", DETECTION_STRATEGIES)
def test_each_strategy_picks_k_unlabelled_images_reproducibly(
    setup: tuple[DetectionBundle, nn.Module], spec: str
) -> None:
    bundle, model = setup
    first = build_strategy(spec).select(model, fresh_pool(bundle), 3, 5)
    second = build_strategy(spec).select(model, fresh_pool(bundle), 3, 5)
    assert len(set(first.indices.tolist())) == 3 and not {0, 1} & set(first.indices.tolist())
    assert np.array_equal(first.indices, second.indices) and np.array_equal(first.scores, second.scores)
    if len(first.scored_indices):
        assert len(first.scores) == len(first.scored_indices) == 10 and np.isfinite(first.scores).all()


def test_det_loss_is_saal_without_the_perturbation(setup: tuple[DetectionBundle, nn.Module]) -> None:
    bundle, model = setup
    saal = build_strategy("det-saal[score_threshold=0.05]")
    chosen = saal.select(model, fresh_pool(bundle), 2, 0)
    loss = build_strategy("det-loss[score_threshold=0.05]").select(model, fresh_pool(bundle), 2, 0)
    assert saal.last_terms is not None  # type: ignore[attr-defined]
    assert np.array_equal(loss.scores, saal.last_terms.loss)  # type: ignore[attr-defined]
    pseudo = saal.last_terms.pseudo_label  # type: ignore[attr-defined]
    assert len(pseudo) == 10 and all(set(p) == {"boxes", "labels"} for p in pseudo)  # each image's pseudo boxes
    assert np.all(chosen.scores > loss.scores)


def test_the_detection_variants_keep_their_options_defaults_and_repr() -> None:
    opts = strategy_options("det-saal-reference")
    assert (opts["selection"], opts["subset"], opts["batch_size"], opts["score_threshold"]) == (
        "kmeans++",
        2000,
        8,
        None,
    )
    assert repr(build_strategy("det-saal-reference[score_threshold=0.3]")) == (
        "DetectionSAALReference(rho=0.05, perturbation='asam', score='max', selection='kmeans++', "
        "score_threshold=0.3, batch_size=8, subset=2000)"
    )
    assert repr(build_strategy("det-loss")) == (
        "DetectionLoss(selection='top-k', score_threshold=None, batch_size=8, subset=None)"
    )
    with pytest.raises(SaalError, match="score must be one of max, diff"):
        build_strategy("det-saal[score=loss]")


def test_class_scores_come_with_the_detectors_own_detections(setup: tuple[DetectionBundle, nn.Module]) -> None:
    bundle, model = setup
    images = [bundle.train[i][0] for i in range(2)]
    with torch.no_grad():
        ours, theirs = detections_with_class_scores(model, images), [model([x])[0] for x in images]
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
        assert a["class_scores"].shape == (len(b["boxes"]), 3)
        picked = a["class_scores"].gather(1, a["labels"][:, None]).squeeze(1)
        assert bool((picked >= a["scores"] ** 2 - 1e-6).all())  # FCOS: score = sqrt(class score * centreness)


def test_the_other_tasks_strategies_and_detectors_are_refused(setup: tuple[DetectionBundle, nn.Module]) -> None:
    bundle, model = setup
    with pytest.raises(SaalError, match=r"'saal' does not support detection.*det-saal"):
        build_strategy("saal").select(model, fresh_pool(bundle), 2, 0)
    assert "det-saal" in strategies_for("detection") and "det-saal" not in strategies_for("classification")
    rcnn = build_detector("fasterrcnn-mobilenet-v3-320", 2, min_size=64, max_size=96).eval()
    with pytest.raises(SaalError, match="only FCOS and RetinaNet"):
        build_strategy("det-entropy").select(rcnn, fresh_pool(bundle), 2, 0)
    with pytest.raises(SaalError, match="aggregate must be one of max, mean, sum"):
        build_strategy("det-entropy[aggregate=median]")
