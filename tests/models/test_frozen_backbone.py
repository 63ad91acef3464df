"""Heads on the frozen pretrained backbone: cached features (keyed, checked, rebuilt), the head, runs on them."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saal.cli import main as saal_main
from saal.data import load_dataset
from saal.data.base import ArrayDataset, DatasetBundle
from saal.data.feature_cache import FeatureCacheWarning, dataset_fingerprint
from saal.errors import SaalError
from saal.experiment import ActiveLearningRun
from saal.models import build_model
from saal.models.frozen_backbone import (
    BackboneFeatures,
    FeatureBundle,
    FeatureHead,
    FrozenBackboneClassifier,
    feature_bundle,
    head_options,
)
from saal.models.pretrained import FEATURE_DIM
from saal.pool import Pool
from saal.settings import RunConfig, TrainConfig
from saal.strategies import build_strategy, strategies_for
from saal.strategies.saal import SAAL
from saal.training import fit

SIZE = 32  # the backbone's input side in these tests: the smallest that keeps them fast


def _write_folder(root: Path, per_class: int = 6, side: int = 8, seed: int = 0) -> Path:
    """Write ``root/{train,test}/{a,b,c}/*.png``: three classes of tiny RGB images with class-dependent colour."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", 2)):
        for c, name in enumerate("abc"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (side, side, 3), dtype=np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> DatasetBundle:
    return load_dataset(f"folder:{_write_folder(tmp_path_factory.mktemp('imgs'))}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def features(images: DatasetBundle, cache: Path) -> FeatureBundle:
    return feature_bundle(images, SIZE, cache_dir=cache)


def test_features_are_computed_once_then_read_back_equal(
    images: DatasetBundle, cache: Path, features: FeatureBundle
) -> None:
    assert not features.cache_hit and Path(features.cache_file).parent == cache
    assert features.input_shape == (FEATURE_DIM,) and len(features.train) == 18 and len(features.test) == 6  # type: ignore[arg-type]
    assert np.array_equal(features.train_targets, images.train_targets)
    again = feature_bundle(images, SIZE, cache_dir=cache)
    assert again.cache_hit and again.cache_file == features.cache_file
    assert torch.equal(again.train.inputs, features.train.inputs)  # type: ignore[attr-defined]
    assert feature_bundle(features, SIZE, cache_dir=cache) is features  # already features: returned as it is
    # the features are the backbone's embedding of the images
    backbone = BackboneFeatures(SIZE, images.mean, images.std)
    x = torch.stack([images.test[i][0] for i in range(len(images.test))])  # type: ignore[arg-type]
    torch.testing.assert_close(backbone(x), features.test.inputs, rtol=1e-4, atol=1e-5)  # type: ignore[attr-defined]


def test_cache_key_holds_the_image_size_and_the_data(images: DatasetBundle, cache: Path, tmp_path: Path) -> None:
    other_size = feature_bundle(images, SIZE + 8, cache_dir=cache)
    assert (
        not other_size.cache_hit and other_size.cache_file != feature_bundle(images, SIZE, cache_dir=cache).cache_file
    )
    root = _write_folder(tmp_path / "copy")
    before = dataset_fingerprint(load_dataset(f"folder:{root}").train)
    target = root / "train" / "a" / "0.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(target)
    os.utime(target, ns=(1, 1))
    assert dataset_fingerprint(load_dataset(f"folder:{root}").train) != before


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_a_damaged_cache_file_is_detected_and_rebuilt(images: DatasetBundle, tmp_path: Path, damage: str) -> None:
    first = feature_bundle(images, SIZE, cache_dir=tmp_path)
    path = Path(first.cache_file)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a cache at all")
    else:  # a flipped byte inside the stored tensors: only the checksum can tell
        record = torch.load(path, weights_only=True)
        record["tensors"]["train"][0, 0] += 1.0
        torch.save(record, path)
    with pytest.warns(FeatureCacheWarning, match="computing it again"):
        rebuilt = feature_bundle(images, SIZE, cache_dir=tmp_path)
    assert not rebuilt.cache_hit
    assert torch.equal(rebuilt.train.inputs, first.train.inputs)  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert feature_bundle(images, SIZE, cache_dir=tmp_path).cache_hit


def test_an_unusable_cache_folder_is_refused_in_one_line(images: DatasetBundle, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(SaalError, match="cannot use feature cache folder") as err:
        feature_bundle(images, SIZE, cache_dir=blocker / "sub")
    assert "\n" not in str(err.value)


def test_the_head_on_images_equals_the_head_on_cached_features(images: DatasetBundle, features: FeatureBundle) -> None:
    torch.manual_seed(0)
    on_features = build_model("pretrained-mlp", features.input_shape, 3, options={"image_size": SIZE})
    built = build_model("pretrained-mlp", images.input_shape, 3, options={"image_size": SIZE})
    assert isinstance(on_features, FeatureHead) and isinstance(built, FrozenBackboneClassifier)
    assert built.frozen.image_size == SIZE
    # inputs normalised with the dataset's statistics, as the image bundle gives them
    on_images = FrozenBackboneClassifier(BackboneFeatures(SIZE, images.mean, images.std), 3, hidden=256)
    # the backbone is outside the module tree: the state dicts match and only the head is trainable
    assert list(on_images.state_dict()) == list(on_features.state_dict())
    on_images.load_state_dict(on_features.state_dict())
    assert sum(p.numel() for p in on_images.parameters()) == sum(p.numel() for p in on_features.parameters())
    on_images.eval(), on_features.eval()
    x = torch.stack([images.train[i][0] for i in range(6)])
    with torch.no_grad():
        torch.testing.assert_close(on_images(x), on_features(features.train.inputs[:6]), rtol=1e-4, atol=1e-5)  # type: ignore[attr-defined]
    # SAAL perturbs the trainable parameters (the head's): the same scores on images and on features
    saal = SAAL(batch_size=4)
    a = saal.sharpness(on_images, Pool(images.train, 3), np.arange(8))
    b = saal.sharpness(on_features, Pool(features.train, 3), np.arange(8))
    torch.testing.assert_close(torch.as_tensor(a.score("max")), torch.as_tensor(b.score("max")), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("pretrained-linear", {"hidden": 8}, "has no option 'hidden'"),
        ("pretrained-mlp", {"image_size": 8}, "image_size must be an integer in 16..1024"),
        ("pretrained-mlp", {"dropout": 1.0}, "dropout must be a number in"),
        ("pretrained-mlp", {"hidden": 0}, "hidden must be a positive integer"),
        ("pretrained-linear", {"colour": 1}, "has no option 'colour'"),
    ],
)
def test_bad_head_options_are_refused(name: str, options: dict, message: str) -> None:
    with pytest.raises(SaalError, match=message):
        head_options(name, options)
    with pytest.raises(SaalError, match=message):
        build_model(name, (FEATURE_DIM,), 3, options=options)


def test_flat_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SaalError, match="needs 1- or 3-channel images"):
        flat = ArrayDataset(torch.zeros(4, 5), np.arange(4) % 2)
        vectors = DatasetBundle("vectors", flat, flat, flat.targets, ["x", "y"], channels=5, image_size=0)
        feature_bundle(vectors, SIZE, cache_dir=tmp_path)


def test_a_run_on_a_frozen_backbone_head_trains_only_the_head_on_cached_features(
    images: DatasetBundle, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAAL_FEATURE_CACHE", str(cache))
    config = RunConfig(
        dataset="digits",  # not read: the bundle is given
        model="pretrained-linear",
        model_options={"image_size": SIZE},
        initial=3,
        query=3,
        rounds=2,
        train=TrainConfig(epochs=30, batch_size=4, lr=1e-2),
    )
    run = ActiveLearningRun(config, "saal", seed=0, bundle=images)
    assert isinstance(run.bundle, FeatureBundle) and run.bundle.cache_hit
    assert isinstance(run.model, FeatureHead) and not isinstance(run.model, FrozenBackboneClassifier)
    results = run.run()
    assert [r.labelled for r in results] == [3, 6, 9]
    assert results[-1].value > 1 / 3  # the colour of a class is easy for ImageNet features
    assert head_options("pretrained-mlp").image_size == 96 and head_options("pretrained-mlp").hidden == 256


FAST = {"bald": "bald[samples=4]", "vaal": "vaal[steps=4,train_batch=8]"}


@pytest.mark.parametrize("name", strategies_for("classification"))
def test_every_classification_strategy_selects_on_the_head(name: str, features: FeatureBundle) -> None:
    strategy = build_strategy(FAST.get(name, name))
    torch.manual_seed(0)
    model = build_model("pretrained-mlp", features.input_shape, 3, options={"hidden": 16})
    pool = Pool(features.train, 3)
    start = np.array([0, 6, 12])
    pool.label(start, features.train_targets[start])
    fit(model, features.train, start, features.train_targets[start], TrainConfig(epochs=3, batch_size=3),
        torch.Generator().manual_seed(0), hook=strategy.training_hook())  # fmt: skip
    sel = strategy.select(model, pool, 4, np.random.default_rng(0))
    assert len(np.unique(sel.indices)) == 4 and not pool.is_labelled(sel.indices).any()


def test_the_command_line_runs_a_head_on_cached_features_and_refuses_bad_options(
    images: DatasetBundle,
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SAAL_FEATURE_CACHE", str(cache))
    source = images.name.split(":", 1)[1]
    common = ["run", "--dataset", f"folder:{source}", "--model", "pretrained-linear", "--strategies",
              "saal-diverse", "--seeds", "0,", "--initial", "3", "--query", "2", "--rounds", "1", "--epochs", "2",
              "--quiet"]  # fmt: skip
    bad = tmp_path / "bad"
    assert saal_main([*common, "--model-option", "hidden=8", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "has no option 'hidden'" in err and err.count("\n") == 1 and not bad.exists()
    out = tmp_path / "good"
    assert saal_main([*common, "--model-option", f"image_size={SIZE}", "--out", str(out)]) == 0
    rows = json.loads((out / "saal-diverse" / "seed-0" / "rounds.json").read_text())
    assert [r["labelled"] for r in rows] == [3, 5]
    config = json.loads((out / "saal-diverse" / "seed-0" / "config.json").read_text())
    assert config["model_options"] == {"image_size": SIZE}
