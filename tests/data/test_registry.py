"""The dataset registry: names, options, real MNIST, and errors as the CLI shows them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from saal.cli import main
from saal.data import dataset_names, default_data_dir, load_dataset
from saal.errors import SaalError


def test_names_cover_the_benchmarks() -> None:
    assert set(dataset_names()) >= {"digits", "mnist", "fashion-mnist", "kmnist", "svhn", "cifar10", "cifar100"}


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(SaalError, match=r"unknown dataset 'mnsit'; choose one of .*mnist.*folder:PATH or npz:PATH"):
        load_dataset("mnsit")


def test_options_reach_the_loader_and_unknown_ones_are_named(tmp_path: Path) -> None:
    with pytest.raises(SaalError, match="takes no option image_size; it takes: download"):
        load_dataset("mnist", tmp_path, image_size=32)
    with pytest.raises(SaalError, match=re.escape("folder:PATH needs a path")):
        load_dataset("folder:")
    with pytest.raises(SaalError, match="download=False"):
        load_dataset("cifar10", tmp_path, download=False)


def test_data_dir_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAAL_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(SaalError, match=re.escape(str(tmp_path / "svhn"))):
        load_dataset("svhn", download=False)


def test_real_mnist(shared_data: Path) -> None:
    if not (shared_data / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip("MNIST files are absent")
    b = load_dataset("mnist", data_dir=shared_data)
    assert (len(b.train), len(b.test), b.input_shape, b.num_classes) == (60000, 10000, (1, 28, 28), 10)
    assert b.train_targets[:5].tolist() == [5, 0, 4, 1, 9] and b.test.targets[:3].tolist() == [7, 2, 1]
    assert np.bincount(b.train_targets).tolist()[:2] == [5923, 6742]
    x = b.train.inputs
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-3
    assert float(x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert b.train[0][1] == 5 and b.train[0][0].shape == (1, 28, 28)


def test_cli_missing_data_gives_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"  # a data dir below a file: the download fails at once, network or not
    blocker.write_text("")
    code = main(["run", "--dataset", "mnist", "--data-dir", str(blocker / "data"), "--quiet", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("saal: error: mnist: missing train-images-idx3-ubyte") and err.count("\n") == 1
