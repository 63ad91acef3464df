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


@pytest.mark.slow
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


def test_cli_starts_from_zero_labels_with_a_chosen_first_picker(saal: Callable, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = saal("run", "--initial", "0", "--initial-strategy", "random", "--strategies", "margin", "--seeds", "1",
                "--query", "5", "--rounds", "2", "--epochs", "1", "--out", str(out), "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    folder = out / "margin" / "seed-0"
    config = json.loads((folder / "config.json").read_text())
    assert (config["initial"], config["initial_strategy"]) == (0, "random")
    lines = (folder / "rounds.csv").read_text().splitlines()
    assert lines[0] == "round,labelled,accuracy,train_seconds,acquire_seconds,chosen,acquired_by,reason,kappa"
    rounds = json.loads((folder / "rounds.json").read_text())
    assert [(r["labelled"], r["acquired_by"]) for r in rounds] == [(0, "random"), (5, "margin"), (10, "")]
    assert rounds[0]["reason"] == "initial_strategy: the first pick, from zero labels"
    assert "acquired_by" in (out / "results.csv").read_text().splitlines()[0]


def test_a_config_file_names_the_initial_strategy(saal: Callable, tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("  query: 5\n", "  query: 5\n  initial: 10\n  initial_strategy: random\n"))
    out = tmp_path / "out"
    proc = saal("run", "--config", str(path), "--set", "run.rounds=1", "--set", "seeds=[0]", "--strategies", "random",
                "--out", str(out), "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rounds = json.loads((out / "random" / "seed-0" / "rounds.json").read_text())
    assert rounds[0]["labelled"] == 10 and rounds[0]["start"]["by"] == "random"  # 10 labels, no class balance


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--initial", "0", "--initial-strategy", "margin"],
         "--initial-strategy: 'margin' cannot choose from zero labels (it needs a trained model)"),
        (["--initial-strategy", "oracle"], "--initial-strategy: unknown strategy 'oracle'"),
        (["--initial-strategy", "random[bogus=1]"], "has no option 'bogus'"),
        (["--initial", "-1"], "--initial: must be >= 0"),
        (["--set", "run.initial_strategy=entropy"], "run.initial_strategy: 'entropy' cannot choose from zero labels"),
        (["--initial", "20", "--initial-strategy", "random", "--subset", "10"], "larger than the pool subset 10"),
    ],
)  # fmt: skip
def test_bad_cold_start_settings_are_one_line_and_write_nothing(
    saal: Callable, tmp_path: Path, extra: list[str], needle: str
) -> None:
    out = tmp_path / "out"
    proc = saal("run", "--strategies", "random", "--seeds", "1", "--rounds", "1", "--epochs", "1", "--out",
                str(out), "--quiet", *extra)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saal: error:") and needle in lines[0], proc.stderr
    assert not out.exists()
    path = write(tmp_path, "strategies: [random]\nseeds: [1]\nrun: {initial: 0, initial_strategy: margin}\n", "b.yaml")
    proc = saal("run", "--config", str(path), "--out", str(out), "--quiet")
    assert proc.returncode == 2 and "run.initial_strategy: 'margin' cannot choose" in proc.stderr
    assert not out.exists()
