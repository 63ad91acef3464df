"""Integration tests of whole runs on digits, and of the CLI's handling of bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from saal.cli import main
from saal.experiment import ActiveLearningRun, ExperimentSpec, RunConfig, run_grid
from saal.training import TrainConfig

TINY = dict(initial=20, query=10, rounds=2, train=TrainConfig(epochs=5, batch_size=32))


def test_two_round_run_on_digits(digits, tmp_path: Path) -> None:
    run = ActiveLearningRun(RunConfig(**TINY), "entropy", seed=3, folder=tmp_path / "r", bundle=digits)
    results = run.run()
    assert [r.round for r in results] == [0, 1, 2]
    assert [r.labelled for r in results] == [20, 30, 40]
    assert [len(r.chosen) for r in results] == [10, 10, 0]
    chosen = results[0].chosen + results[1].chosen
    assert len(set(chosen)) == 20
    assert all(0.0 <= r.accuracy <= 1.0 for r in results)
    assert run.pool.round_labelled(results[1].chosen).tolist() == [2] * 10
    for name in ("config.json", "rounds.csv", "rounds.json", "checkpoint.pt", "model.pt"):
        assert (tmp_path / "r" / name).is_file()
    header = (tmp_path / "r" / "rounds.csv").read_text().splitlines()[0]
    assert header == "round,labelled,accuracy,train_seconds,acquire_seconds,chosen,acquired_by,reason,kappa"
    assert results[0].kappa is None and all(r.kappa is not None and -1 <= r.kappa <= 1 for r in results[1:])
    assert [r.acquired_by for r in results] == ["entropy", "entropy", ""]
    labelled = run.pool.labelled_indices()
    start = labelled[run.pool.round_labelled(labelled) == 0].tolist()
    assert results[0].start == {"by": "ground truth, class-balanced", "reason": "drawn with the true labels",
                                "chosen": start}  # fmt: skip


def test_same_seed_same_indices_and_accuracies(digits) -> None:
    def once(seed: int) -> list[tuple[float, list[int]]]:
        run = ActiveLearningRun(RunConfig(**TINY), "entropy", seed=seed, bundle=digits)
        return [(r.accuracy, r.chosen) for r in run.run()]

    assert once(5) == once(5)
    assert once(5) != once(6)


def test_strategies_with_the_same_seed_share_initial_set_and_weights(digits) -> None:
    a = ActiveLearningRun(RunConfig(**TINY), "random", seed=1, bundle=digits)
    b = ActiveLearningRun(RunConfig(**TINY), "entropy", seed=1, bundle=digits)
    ra, rb = a.run(), b.run()
    assert ra[0].accuracy == rb[0].accuracy
    assert np.array_equal(a.pool.round_labelled(a.pool.labelled_indices()) == 0,
                          b.pool.round_labelled(a.pool.labelled_indices()) == 0)  # fmt: skip


@pytest.mark.slow
def test_accuracy_rises_with_labels(digits, tmp_path: Path) -> None:
    spec = ExperimentSpec(
        run=RunConfig(initial=20, query=40, rounds=3, train=TrainConfig(epochs=30, batch_size=16)),
        strategies=["random"],
        seeds=[0, 1],
        out=str(tmp_path),
    )
    rows = run_grid(spec, digits)
    first = np.mean([r["accuracy"] for r in rows if r["round"] == 0])
    last = np.mean([r["accuracy"] for r in rows if r["round"] == 3])
    assert last > first + 0.05
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "experiment.json").is_file()


def test_commands_filling_one_folder_keep_every_run_in_its_summary(digits, tmp_path: Path) -> None:
    run = RunConfig(initial=20, query=10, rounds=1, train=TrainConfig(epochs=2, batch_size=32))
    first = run_grid(ExperimentSpec(run=run, strategies=["random"], seeds=[0, 1], out=str(tmp_path)), digits)
    second = run_grid(ExperimentSpec(run=run, strategies=["entropy", "random"], seeds=[2], out=str(tmp_path)), digits)
    assert {(r["strategy"], r["seed"]) for r in second} == {("entropy", 2), ("random", 2)}  # this command's runs
    listed = json.loads((tmp_path / "experiment.json").read_text())
    assert (listed["strategies"], listed["seeds"]) == (["entropy", "random"], [0, 1, 2])
    everything = json.loads((tmp_path / "results.json").read_text())
    assert all(row in everything for row in json.loads(json.dumps(first)))  # the first command's rows, unchanged
    assert sorted({(r["strategy"], r["seed"]) for r in everything}) == [
        ("entropy", 2), ("random", 0), ("random", 1), ("random", 2)]  # fmt: skip
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + len(everything) == 1 + 4 * 2
    # a command naming every strategy and seed records them in its own order
    run_grid(ExperimentSpec(run=run, strategies=["entropy", "random"], seeds=[2, 1, 0], out=str(tmp_path)), digits)
    listed = json.loads((tmp_path / "experiment.json").read_text())
    assert (listed["strategies"], listed["seeds"]) == (["entropy", "random"], [2, 1, 0])


def test_cli_run_writes_results_and_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["run", "--strategies", "random,entropy", "--seeds", "2", "--rounds", "1", "--epochs", "2", "--query",
            "5", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "random" in text and "entropy" in text and "results:" in text
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 * 2 * 2
    final = [100 * r["accuracy"] for r in rows if r["strategy"] == "random" and r["round"] == 1]
    line = next(line for line in text.splitlines() if line.startswith("random "))
    assert line.endswith(f"{np.mean(final):.1f} +- {np.std(final, ddof=1):4.1f}")  # the same sample std as reports
    # the same command again finds finished runs and changes nothing
    before = (out / "random" / "seed-0" / "rounds.json").read_text()
    assert main(args) == 0
    assert (out / "random" / "seed-0" / "rounds.json").read_text() == before


BAD_INPUTS = [
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--model", "vgg"], "unknown model"),
    (["--strategies", "random,oracle"], "unknown strategy"),
    (["--strategies", "random[", "--seeds", "2"], "cannot read strategy"),
    (["--seeds", "0"], "at least 1"),
    (["--strategies", "entropy[temperature=2]"], "has no option"),
    (["--query", "5000"], "larger than the unlabelled pool"),
    (["--initial", "25"], "multiple"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/saal-data"], "mnist"),
    (["--dataset", "npz:/nonexistent/file.npz"], "npz"),
    (["--optimizer", "sam", "--lr", "0"], "lr"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path: Path, capsys, extra: list[str], needle: str) -> None:
    out = tmp_path / "out"
    args = ["run", "--strategies", "random", "--rounds", "1", "--epochs", "1", "--quiet", "--out", str(out)]
    code = main([*args, *extra])
    proc = SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saal") and "error:" in lines[0], proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_out_folder_with_a_different_run_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    base = ["run", "--strategies", "random", "--seeds", "1", "--rounds", "1", "--epochs", "1", "--quiet"]
    assert main([*base, "--out", str(out)]) == 0
    before = (out / "random" / "seed-0" / "rounds.json").read_text()
    capsys.readouterr()
    proc = SimpleNamespace(returncode=main([*base, "--epochs", "2", "--out", str(out)]), stderr=capsys.readouterr().err)
    assert proc.returncode == 2
    assert "holds a different run" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (out / "random" / "seed-0" / "rounds.json").read_text() == before


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("--dataset", "--strategies", "--seeds", "--query", "--rounds", "--epochs", "--warm-start"):
        assert option in text


def test_dataset_options_reach_the_loader(tmp_path: Path, capsys) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    base = ["run", "--dataset", f"folder:{tmp_path / 'imgs'}", "--model", "cnn", "--strategies", "random",
            "--seeds", "1", "--initial", "4", "--query", "2", "--rounds", "1", "--epochs", "1", "--quiet"]  # fmt: skip
    proc = SimpleNamespace(returncode=main([*base, "--out", str(tmp_path / "a")]), stderr=capsys.readouterr().err)
    assert proc.returncode == 2 and "image_size" in proc.stderr
    assert main([*base, "--dataset-option", "image_size=8", "--out", str(tmp_path / "b")]) == 0
    stored = json.loads((tmp_path / "b" / "random" / "seed-0" / "config.json").read_text())
    assert stored["dataset_options"] == {"image_size": 8}
