"""The detection task: labels checked, mAP from torchmetrics (difficult boxes ignored), training through fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from saal.data import load_dataset
from saal.errors import SaalError
from saal.models import build_model
from saal.pool import Pool
from saal.settings import TrainConfig
from saal.tasks.detection import Detection, map_metric
from saal.training import fit


def test_map_is_one_for_the_truth_and_ignores_difficult_boxes() -> None:
    truth = {
        "boxes": torch.tensor([[10.0, 10, 40, 40], [50, 50, 90, 80], [0, 0, 5, 5]]),
        "labels": torch.tensor([1, 2, 1]),
        "difficult": torch.tensor([False, False, True]),
    }
    found = {"boxes": truth["boxes"][:2], "labels": truth["labels"][:2], "scores": torch.tensor([0.9, 0.8])}
    perfect = map_metric([found], [truth], ["a", "b"])
    assert perfect.name == "map50" and perfect.value == pytest.approx(1.0)
    assert perfect.per_class == pytest.approx({"a": 1.0, "b": 1.0}) and perfect.details["map"] == pytest.approx(1.0)
    shifted = {**found, "boxes": torch.tensor([[10.0, 10, 40, 40], [50, 10, 90, 40]])}  # class b's box now misses
    worse = map_metric([shifted], [truth], ["a", "b"])
    assert worse.per_class["b"] == 0.0 and worse.value < 1.0
    nothing = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    empty = map_metric([nothing], [truth], ["a", "b"])  # a model that finds nothing scores 0, never NaN
    assert empty.value == 0.0 and empty.details["map"] == 0.0


def test_labels_are_checked() -> None:
    task = Detection(["a", "b"])
    good = task.check_labels([{"boxes": [[1, 2, 3, 4]], "labels": [2]}, {"boxes": np.zeros((0, 4)), "labels": []}], 2)
    assert good[0]["boxes"].dtype == torch.float32 and len(good[1]["boxes"]) == 0
    with pytest.raises(SaalError, match="label 3 is not a class"):
        task.check_labels([{"boxes": [[1, 2, 3, 4]], "labels": [3]}], 1)
    with pytest.raises(SaalError, match="x2 > x1"):
        task.check_labels([{"boxes": [[5, 2, 3, 4]], "labels": [1]}], 1)
    with pytest.raises(SaalError, match="one target per index"):
        task.check_labels([], 1)
    assert task.label_summary(good) == {"boxes_labelled": 1.0}


def test_a_detector_trains_through_fit_and_is_scored_by_map(voc_root: Path) -> None:
    bundle = load_dataset(f"voc:{voc_root}")
    task = bundle.task
    torch.manual_seed(0)
    model = build_model(
        "fcos-lite0", bundle.input_shape, bundle.num_classes, task="detection", options={"min_size": 64}
    )
    pool = Pool(bundle.train, task=task)
    labelled = np.arange(12)
    pool.label(labelled, bundle.train_targets[labelled])
    before = task.item_losses(model, [bundle.train[0][0]], [bundle.train_targets[0]])
    result = fit(
        model,
        bundle.train,
        labelled,
        pool.labels_of(labelled),
        TrainConfig(epochs=3, batch_size=4),
        torch.Generator().manual_seed(0),
        task=task,
    )
    after = task.item_losses(model, [bundle.train[0][0]], [bundle.train_targets[0]])
    assert np.isfinite(result.final_loss) and float(after) < float(before)
    metric = task.evaluate(model, bundle.test)
    assert 0.0 <= metric.value <= 1.0 and set(metric.per_class) <= {"bar", "square"}


def test_models_refuse_the_other_task(voc_root: Path) -> None:
    with pytest.raises(SaalError, match="is a classifier; a detection dataset needs a detector"):
        build_model("cnn", (3,), 2, task="detection")
    with pytest.raises(SaalError, match="is a detector; use it with a detection dataset"):
        build_model("fcos-lite0", (1, 8, 8), 10)
    with pytest.raises(SaalError, match="has no option 'colour'"):
        build_model("fcos-lite0", (3,), 2, task="detection", options={"colour": 1})
    with pytest.raises(SaalError, match="not in its cache"):
        build_model("ssdlite320", (3,), 2, task="detection", options={"weights": "torchvision"})
