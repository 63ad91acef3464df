"""Tuned training: k-fold cross-validation of the weight decay (and epochs) on the labelled items only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from saal.cli import main
from saal.experiment import ActiveLearningRun, RunConfig
from saal.models import build_model
from saal.settings import TrainConfig
from saal.tasks import Classification
from saal.tuning import candidate_configs, cross_validate, fold_splits, tune_training, tuned_details


def test_folds_are_stratified_when_every_class_can_be_and_cover_every_item_once() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    splits = fold_splits(labels, 3, seed=0)
    assert sorted(np.concatenate([va for _, va in splits]).tolist()) == list(range(9))
    for train, val in splits:
        assert sorted(labels[val].tolist()) == [0, 1, 2]  # one of each class per fold
        assert set(train.tolist()).isdisjoint(val.tolist())
    # one item of a class: stratification is impossible, plain k-fold still covers every item once
    lone = fold_splits(np.array([0, 0, 0, 1]), 3, seed=0)
    assert sorted(np.concatenate([va for _, va in lone]).tolist()) == [0, 1, 2, 3]
    assert [v.tolist() for _, v in fold_splits(labels, 3, seed=0)] == [v.tolist() for _, v in splits]


def test_the_grid_is_weight_decay_by_epochs_in_order() -> None:
    grid = candidate_configs(TrainConfig(tune="cv", tune_weight_decay=[0.0, 0.1], tune_epochs=[2, 5]))
    assert [(c.weight_decay, c.epochs) for c in grid] == [(0.0, 2), (0.0, 5), (0.1, 2), (0.1, 5)]
    assert [c.epochs for c in candidate_configs(TrainConfig(tune="cv", epochs=7))] == [7, 7, 7, 7]


def test_tuning_picks_the_setting_with_the_best_cross_validated_score(digits) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    indices = np.sort(rng.choice(len(digits.train), 60, replace=False))
    labels = digits.train_targets[indices]
    task = Classification(digits.num_classes)
    # one epoch against forty: on 40 training items the longer training is clearly better in every fold
    config = TrainConfig(tune="cv", tune_weight_decay=[0.0], tune_epochs=[1, 40], batch_size=16)
    before = torch.get_rng_state()
    tuned = tune_training(model, state, digits.train, indices, labels, config, seed=5, task=task)
    assert torch.equal(torch.get_rng_state(), before)  # the run's global generator is untouched
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model too
    assert list(tuned.scores) == ["weight_decay=0,epochs=1", "weight_decay=0,epochs=40"]
    best = max(tuned.scores, key=lambda k: tuned.scores[k])
    assert tuned.config.epochs == int(best.rsplit("=", 1)[1])
    assert tuned.scores["weight_decay=0,epochs=40"] > tuned.scores["weight_decay=0,epochs=1"]
    splits = fold_splits(labels, 3, seed=5)
    twin = build_model("mlp", digits.input_shape, digits.num_classes)
    again = cross_validate(twin, state, digits.train, indices, labels, tuned.config, splits, 5, task)
    assert again == pytest.approx(tuned.scores[best])  # the score is what it claims: same folds, same seeds
    assert tuned_details(tuned) == {"tuned_weight_decay": 0.0, "tuned_epochs": 40.0}
    assert tuned.reason.startswith("tuning: weight_decay=0,epochs=40 (3-fold")


def test_no_tuning_when_off_or_when_too_few_labels(digits) -> None:
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    state = model.state_dict()
    task = Classification(digits.num_classes)
    off = TrainConfig(epochs=3)
    assert (
        tune_training(model, state, digits.train, np.arange(10), digits.train_targets[:10], off, 0, task).config is off
    )
    few = TrainConfig(tune="cv", tune_folds=3)
    kept = tune_training(model, state, digits.train, np.arange(2), digits.train_targets[:2], few, 0, task)
    assert kept.config is few and kept.scores == {} and "2 labels < 3 folds" in kept.reason
    assert tuned_details(kept) == {}


def test_a_tuned_run_records_its_choice_and_is_reproducible(digits, tmp_path: Path) -> None:
    train = TrainConfig(epochs=5, batch_size=32, tune="cv", tune_weight_decay=[0.0, 0.01], tune_epochs=[2, 5])
    cfg = RunConfig(initial=20, query=10, rounds=1, subset=200, train=train)
    first = ActiveLearningRun(cfg, "margin", 1, tmp_path / "a", bundle=digits).run()
    second = ActiveLearningRun(cfg, "margin", 1, bundle=digits).run()
    assert [(r.accuracy, r.chosen) for r in first] == [(r.accuracy, r.chosen) for r in second]
    for r in first:
        assert r.details["tuned_weight_decay"] in (0.0, 0.01) and r.details["tuned_epochs"] in (2.0, 5.0)
    untuned = ActiveLearningRun(cfg.model_copy(update={"train": TrainConfig(epochs=5, batch_size=32)}), "margin", 1,
                                bundle=digits).run()  # fmt: skip
    assert "tuned_epochs" not in untuned[0].details


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("run.train.tune=grid", "tune: must be one of 'none' or 'cv'"),
        ("run.train.tune_folds=1", "tune_folds: must be >= 2"),
        ("run.train.tune_weight_decay=[-0.1]", "must be >= 0"),
    ],
)
def test_bad_tuning_settings_are_one_line(tmp_path: Path, capsys, setting: str, message: str) -> None:
    out = tmp_path / "out"
    assert main(["run", "--set", setting, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()
