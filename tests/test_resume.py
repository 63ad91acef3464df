"""Resume: a run killed at any moment and started again gives the results of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import saal.experiment as experiment
import saal.experiment.storage as storage
from saal.experiment import ActiveLearningRun, ExperimentSpec, RunConfig, run_folder, run_grid
from saal.strategies import strategies_for
from saal.training import TrainConfig

# Entropy on an MLP with dropout, trained with SAM and warm-started: training randomness (shuffling,
# dropout), the optimiser state (momentum) and the model state all carry over from round to round.
KILL_CONFIG = """\
strategies: [entropy, random]
seeds: [5]
run:
  dataset: digits
  model: mlp
  initial: 20
  query: 10
  rounds: 6
  reinit: false
  subset: 300
  train: {optimizer: sam, lr: 0.02, momentum: 0.9, sam_rho: 0.05, epochs: 6, batch_size: 10}
"""


def saal_run(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "saal", "run", "--config", str(config), "--out", str(out), "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rounds_done(folder: Path) -> int:
    try:
        return len(json.loads((folder / "rounds.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def kill_after(proc: subprocess.Popen, folder: Path, rounds: int, timeout: float = 240.0) -> None:
    """SIGKILL ``proc`` as soon as ``folder/rounds.json`` has ``rounds`` rounds (mid-way through the next)."""
    deadline = time.monotonic() + timeout
    while rounds_done(folder) < rounds:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def outcome(out: Path, strategy: str, seed: int) -> tuple[list, dict[str, torch.Tensor]]:
    folder = run_folder(out, strategy, seed)
    rows = [
        (r["round"], r["labelled"], r["accuracy"], r["chosen"], r["kappa"])
        for r in json.loads((folder / "rounds.json").read_text())
    ]
    return rows, torch.load(folder / "model.pt", weights_only=True)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The config file and the output of one uninterrupted ``saal run`` of it."""
    root = tmp_path_factory.mktemp("resume")
    config = root / "kill.yaml"
    config.write_text(KILL_CONFIG)
    out = root / "uninterrupted"
    proc = saal_run(config, out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return config, out


@pytest.mark.slow
def test_killed_twice_then_resumed_equals_uninterrupted(uninterrupted: tuple[Path, Path], tmp_path: Path) -> None:
    config, reference = uninterrupted
    out = tmp_path / "killed"
    entropy = run_folder(out, "entropy", 5)
    kill_after(saal_run(config, out), entropy, 2)
    assert not (entropy / "model.pt").exists()
    kill_after(saal_run(config, out), entropy, 4)
    assert not (entropy / "model.pt").exists()
    checkpoint = torch.load(entropy / "checkpoint.pt", weights_only=False)
    assert 3 <= len(checkpoint["results"]) < 7  # rounds.json is written just before the checkpoint
    assert checkpoint["optimizer"]["state"], "warm start with SAM must carry the momentum buffers"
    proc = saal_run(config, out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    for strategy in ("entropy", "random"):
        rows, weights = outcome(out, strategy, 5)
        ref_rows, ref_weights = outcome(reference, strategy, 5)
        assert len(rows) == 7
        assert rows == ref_rows, strategy
        assert same_weights(weights, ref_weights)
    assert json.loads((out / "results.json").read_text())[-1]["chosen"] == []


@pytest.mark.slow
def test_finished_runs_are_skipped(uninterrupted: tuple[Path, Path]) -> None:
    config, out = uninterrupted
    before = snapshot(out / "entropy")
    proc = saal_run(config, out)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "entropy" in stdout
    assert snapshot(out / "entropy") == before  # no file rewritten, not even touched


@pytest.mark.slow
def test_out_folder_with_different_settings_is_refused_untouched(uninterrupted: tuple[Path, Path]) -> None:
    config, out = uninterrupted
    before = snapshot(out)
    for extra in (["--lr", "0.01"], ["--set", "run.train.sam_rho=0.1"], ["--strategies", "margin", "--rounds", "3"]):
        proc = saal_run(config, out, *extra)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "holds a different run" in lines[0], err
        assert snapshot(out) == before


# -- in-process checks of the commit point and of every strategy's state --------------------------
def tiny(**changes: object) -> RunConfig:
    base = dict(initial=20, query=10, rounds=3, reinit=False, subset=300, train=TrainConfig(epochs=3, batch_size=16))
    base.update(changes)
    return RunConfig(**base)


class Interrupt(Exception):
    pass


def interrupted_after(round_index: int):
    def progress(result: experiment.RoundResult) -> None:
        if result.round == round_index:
            raise Interrupt

    return progress


def rows_of(results: list[experiment.RoundResult]) -> list[tuple]:
    return [(r.round, r.labelled, r.accuracy, r.chosen, r.kappa) for r in results]


def test_kill_between_rounds_file_and_checkpoint(digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny()
    reference = ActiveLearningRun(cfg, "entropy", 1, tmp_path / "ref", bundle=digits).run()
    saves = {"n": 0}
    real_save = storage.atomic_torch_save

    def dies_at_the_third_checkpoint(obj: object, path: Path) -> None:
        if path.name == "checkpoint.pt":
            saves["n"] += 1
            if saves["n"] == 3:
                raise Interrupt  # rounds.json already holds round 2; the checkpoint still round 1
        real_save(obj, path)

    monkeypatch.setattr(storage, "atomic_torch_save", dies_at_the_third_checkpoint)
    folder = tmp_path / "run"
    with pytest.raises(Interrupt):
        ActiveLearningRun(cfg, "entropy", 1, folder, bundle=digits).run()
    monkeypatch.undo()
    assert rounds_done(folder) == 3
    assert len(torch.load(folder / "checkpoint.pt", weights_only=False)["results"]) == 2
    torch.manual_seed(12345)  # a fresh process's global generators are in another state
    resumed = ActiveLearningRun(cfg, "entropy", 1, folder, bundle=digits)
    assert len(resumed.results) == 0  # loaded lazily, when run() starts
    assert rows_of(resumed.run()) == rows_of(reference)
    assert same_weights(torch.load(folder / "model.pt"), torch.load(tmp_path / "ref" / "model.pt"))


def test_resume_may_change_device_and_data_dir_but_nothing_else(digits, tmp_path: Path) -> None:
    cfg = tiny()
    folder = tmp_path / "run"
    with pytest.raises(Interrupt):
        ActiveLearningRun(cfg, "random", 2, folder, bundle=digits).run(progress=interrupted_after(0))
    moved = tiny(data_dir="/somewhere/else")
    assert len(ActiveLearningRun(moved, "random", 2, folder, bundle=digits).run()) == 4
    with pytest.raises(experiment.SaalError, match=r"holds a different run \(train.epochs: 3 there, 4 now\)"):
        ActiveLearningRun(tiny(train=TrainConfig(epochs=4, batch_size=16)), "random", 2, folder, bundle=digits).run()


def test_a_grid_resumed_in_process_equals_one_run_straight(digits, tmp_path: Path) -> None:
    spec = ExperimentSpec(run=tiny(rounds=2), strategies=["entropy", "margin"], seeds=[0, 1], out=str(tmp_path / "a"))
    straight = run_grid(spec, digits)
    spec_b = ExperimentSpec(**{**spec.to_dict(), "run": tiny(rounds=2), "out": str(tmp_path / "b")})
    calls = {"n": 0}

    def stop_in_the_third_run(strategy: str, seed: int, r: experiment.RoundResult) -> None:
        calls["n"] += 1
        if calls["n"] == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_grid(spec_b, digits, on_round=stop_in_the_third_run)
    resumed = run_grid(spec_b, digits)
    drop = ("train_seconds", "acquire_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in straight
    ]


# VAAL's adversarial training is cut short: the test is about its state, not its quality (still slow).
STRATEGIES = [
    *(
        pytest.param("vaal[steps=10]", marks=pytest.mark.slow) if s == "vaal" else s
        for s in strategies_for("classification")
    ),
    "saal[score=diff]",
    "saal[scope=last-layer]",
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_resumes_exactly(digits, tmp_path: Path, strategy: str) -> None:
    """The strategy's own state (e.g. a loss-prediction module or a VAE) survives the checkpoint."""
    cfg = tiny(train=TrainConfig(epochs=2, batch_size=16))
    reference = ActiveLearningRun(cfg, strategy, 3, bundle=digits).run()
    folder = tmp_path / "run"
    with pytest.raises(Interrupt):
        ActiveLearningRun(cfg, strategy, 3, folder, bundle=digits).run(progress=interrupted_after(1))
    torch.manual_seed(777)
    resumed = ActiveLearningRun(cfg, strategy, 3, folder, bundle=digits).run()
    assert rows_of(resumed) == rows_of(reference)


@pytest.mark.slow
def test_two_commands_side_by_side_split_the_grid(uninterrupted: tuple[Path, Path], tmp_path: Path) -> None:
    config, reference = uninterrupted
    out = tmp_path / "shared"
    procs = [saal_run(config, out), saal_run(config, out)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    for strategy in ("entropy", "random"):
        rows, weights = outcome(out, strategy, 5)
        ref_rows, ref_weights = outcome(reference, strategy, 5)
        assert rows == ref_rows and same_weights(weights, ref_weights)
    assert len(json.loads((out / "results.json").read_text())) == 2 * 7


def test_a_run_held_by_another_process_is_skipped_by_a_grid(digits, tmp_path: Path) -> None:
    from saal.errors import RunInProgress
    from saal.experiment.folder_lock import folder_lock

    cfg = RunConfig(initial=20, query=10, rounds=1, train=TrainConfig(epochs=2, batch_size=32))
    spec = ExperimentSpec(run=cfg, strategies=["random", "entropy"], seeds=[0], out=str(tmp_path))
    busy: list[tuple[str, int]] = []
    held = run_folder(tmp_path, "entropy", 0)
    with folder_lock(held):
        rows = run_grid(spec, digits, on_busy=lambda s, seed: busy.append((s, seed)))
        assert busy == [("entropy", 0)] and {r["strategy"] for r in rows} == {"random"}
        assert not (held / "config.json").exists()
        with pytest.raises(RunInProgress, match="being run by another process"):
            ActiveLearningRun(cfg, "entropy", 0, held, bundle=digits).run()
        assert not (held / "config.json").exists()
    rows = run_grid(spec, digits)  # once released, the next command runs it
    assert {r["strategy"] for r in rows} == {"random", "entropy"}
    assert len(json.loads((tmp_path / "results.json").read_text())) == 2 * 2
