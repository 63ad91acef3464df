"""`saal run --config`: a protocol file, --set overrides and command-line options on top, validated once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from saal.config import default_out_of

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

MINIMAL = """\
strategies: [random, entropy]
seeds: [1, 2]
run:
  dataset: digits
  query: 5
  train:
    lr: 0.01
    epochs: 2
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "extra", "needle"),
    [
        ("strategies: [random, oracle]\nseeds: [1]\n", [], "strategies[1]: unknown strategy 'oracle'"),
        ("strategies: [random, 'entropy[temperature=2]']\nseeds: [1]\n", [], "has no option 'temperature'"),
        (MINIMAL, ["--set", "run.train.lr=-1"], "run.train.lr: must be > 0"),
        (MINIMAL, ["--set", "run.bogus=1"], "unknown key 'run.bogus'"),
        (MINIMAL, ["--strategies", "random,oracle"], "unknown strategy 'oracle'"),
    ],
)
def test_cli_rejects_a_bad_config_before_writing_anything(
    saal: Callable, tmp_path: Path, text: str, extra: list[str], needle: str
) -> None:
    path = write(tmp_path, text)
    out = tmp_path / "out"
    proc = saal("run", "--config", str(path), "--out", str(out), "--quiet", *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saal: error:") and needle in lines[0], proc.stderr
    assert not out.exists()


def test_cli_runs_a_config_with_overrides_and_options_on_top(saal: Callable, tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    out = tmp_path / "out"
    proc = saal("run", "--config", str(path), "--set", "run.rounds=1", "--set", "seeds=[4]", "--epochs", "1",
                "--out", str(out), "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "entropy" / "seed-4" / "config.json").read_text())
    assert (config["rounds"], config["query"], config["train"]["epochs"], config["train"]["lr"]) == (1, 5, 1, 0.01)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["entropy", "random"]


def test_options_fill_in_what_a_config_leaves_out(saal: Callable, tmp_path: Path) -> None:
    """A file without strategies and seeds runs when the command line gives them; out defaults to runs/<stem>."""
    path = write(tmp_path, "run: {query: 5, rounds: 0, train: {epochs: 1}}\n")
    proc = saal("run", "--config", str(path), "--quiet", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "strategies: required" in proc.stderr and not (tmp_path / "o").exists()
    proc = saal("run", "--config", str(path), "--strategies", "random", "--seeds", "3,", "--quiet",
                "--out", str(tmp_path / "o"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "o" / "experiment.json").read_text())["seeds"] == [3]
    assert default_out_of(path) == str(Path("runs") / "p")


@pytest.mark.parametrize("variant", ["paper-cifar10", "paper-cifar10-sam"])
def test_paper_protocol_starts_and_runs_on_cpu(saal: Callable, variant: str, fmt: Any, tmp_path: Path) -> None:
    """The GPU protocol, shrunk only in rounds, epochs and pool subset, runs on CPU on torchvision's CIFAR-10 files."""
    fmt.write_cifar10(tmp_path / "data", per_batch=20)  # 100 train images (>= 2 per class), 20 test images
    out = tmp_path / "out"
    proc = saal("run", "--config", str(CONFIGS / f"{variant}.yaml"), "--data-dir", str(tmp_path / "data"),
                "--device", "cpu", "--set", "run.rounds=1", "--set", "run.train.epochs=1", "--set", "run.subset=20",
                "--strategies", "random,saal-reference", "--seeds", "123,", "--out", str(out), "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for strategy in ("random", "saal-reference"):
        folder = out / strategy / "seed-123"
        config = json.loads((folder / "config.json").read_text())
        train = config["train"]
        protocol = (config["dataset"], config["model"], config["initial"], config["query"])
        assert protocol == ("cifar10", "resnet18", 20, 10)
        assert (train["batch_size"], train["epochs"], config["device"]) == (10, 1, "cpu")
        assert (train["optimizer"], config["reinit"]) == (("sam", False) if variant.endswith("sam") else ("adam", True))
        rounds = json.loads((folder / "rounds.json").read_text())
        assert [r["labelled"] for r in rounds] == [20, 30] and config["subset"] == 20
        assert len(set(rounds[0]["chosen"])) == 10 and all(0 <= i < 100 for i in rounds[0]["chosen"])
        assert 0.0 <= rounds[-1]["accuracy"] <= 1.0 and (folder / "model.pt").is_file()
