"""Resume keeps working when saal changes: settings added later, new strategy options, new record fields; only a
real difference of settings refuses a folder, and a grid writes nothing before every check has passed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saal.errors import SaalError
from saal.experiment import ActiveLearningRun, ExperimentSpec, RoundResult, RunConfig, check_grid, run_grid
from saal.training import TrainConfig


class Interrupt(Exception):
    pass


def stop_after_round_0(result: RoundResult) -> None:
    if result.round == 0:
        raise Interrupt


def tiny(**changes: object) -> RunConfig:
    base: dict[str, object] = dict(
        initial=20, query=10, rounds=2, subset=300, train=TrainConfig(epochs=2, batch_size=16)
    )
    base.update(changes)
    return RunConfig(**base)


def rows_of(results: list[RoundResult]) -> list[tuple]:
    return [(r.round, r.labelled, r.accuracy, r.chosen) for r in results]


def interrupted(digits, folder: Path, strategy: str = "saal[scope=last-layer]", cfg: RunConfig | None = None) -> dict:
    """Run one round into ``folder``, stop, and return its config.json."""
    with pytest.raises(Interrupt):
        ActiveLearningRun(cfg or tiny(), strategy, 4, folder, bundle=digits).run(progress=stop_after_round_0)
    return json.loads((folder / "config.json").read_text())


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def test_a_folder_without_settings_added_later_and_new_fields_resumes_exactly(digits, tmp_path: Path) -> None:
    reference = ActiveLearningRun(tiny(), "saal[scope=last-layer]", 4, bundle=digits).run()
    folder = tmp_path / "run"
    written = interrupted(digits, folder)
    assert written["metric"] == "accuracy" and written["strategy_options"]["scope"] == "last-layer"

    def as_an_older_saal_wrote_it(config: dict) -> None:
        del config["dataset_options"], config["train"]["sam_rho"]  # settings that did not exist yet
        for key in ("metric", "task", "saal_version", "strategy_options"):  # nor did these fields
            del config[key]
        # the strategy has since gained an option with a default: its repr changes, its spec does not
        config["strategy_repr"] = config["strategy_repr"].replace(")", ", a_new_option=1)")

    edit_config(folder, as_an_older_saal_wrote_it)
    resumed = ActiveLearningRun(tiny(), "saal[scope=last-layer]", 4, folder, bundle=digits)
    assert rows_of(resumed.run()) == rows_of(reference)
    assert "metric" not in json.loads((folder / "config.json").read_text())  # the folder's record is kept


def test_a_setting_missing_there_counts_as_its_default(digits, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    interrupted(digits, folder, "random")
    edit_config(folder, lambda c: c["train"].pop("sam_rho"))
    cfg = tiny(train=TrainConfig(epochs=2, batch_size=16, sam_rho=0.1))
    with pytest.raises(SaalError, match=r"holds a different run \(train.sam_rho: 0.05 there, 0.1 now\)") as info:
        ActiveLearningRun(cfg, "random", 4, folder, bundle=digits).run()
    assert "\n" not in str(info.value)
    assert len(ActiveLearningRun(tiny(), "random", 4, folder, bundle=digits).run()) == 3


def test_a_real_difference_is_refused_in_one_line_and_nothing_is_written(digits, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    interrupted(digits, folder, "random")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for cfg, strategy, needle in [
        (tiny(query=5), "random", r"\(query: 10 there, 5 now\)"),
        (tiny(score_batch_size=64), "random", r"\(score_batch_size: 256 there, 64 now\)"),
        (tiny(), "entropy", r"\(strategy: 'random' there, 'entropy' now\)"),
    ]:
        with pytest.raises(SaalError, match=needle) as info:
            ActiveLearningRun(cfg, strategy, 4, folder, bundle=digits).run()
        assert "\n" not in str(info.value) and "holds a different run" in str(info.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # where the run takes place is not what it is
    assert len(ActiveLearningRun(tiny(data_dir="/elsewhere"), "random", 4, folder, bundle=digits).run()) == 3


def test_a_grid_writes_nothing_until_every_check_passed(digits, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for strategies in (["random", "oracle"], ["random", "entropy[temperature=2]"]):
        with pytest.raises(SaalError):  # refused by the settings or by the checks
            run_grid(ExperimentSpec(run=tiny(), strategies=strategies, seeds=[0], out=str(out)), digits)
        assert not out.exists()
    # a different run in the second strategy's folder: the first strategy's run is not started either
    run_grid(ExperimentSpec(run=tiny(rounds=1), strategies=["entropy"], seeds=[0], out=str(out)), digits)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    spec = ExperimentSpec(run=tiny(rounds=1), strategies=["random", "entropy"], seeds=[0], out=str(out))
    edit_config(out / "entropy" / "seed-0", lambda c: c.update(initial=30))
    with pytest.raises(SaalError, match=r"holds a different run \(initial: 30 there, 20 now\)"):
        run_grid(spec, digits)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    # an experiment file of another protocol, and an output "folder" that is a file
    edit_config(out / "entropy" / "seed-0", lambda c: c.update(initial=20))
    with pytest.raises(SaalError, match=r"holds a different run protocol \(run.query: 10 there, 5 now\)"):
        check_grid(ExperimentSpec(run=tiny(rounds=1, query=5), strategies=["random"], seeds=[0], out=str(out)), digits)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaalError, match="is a file"):
        run_grid(ExperimentSpec(run=tiny(), strategies=["random"], seeds=[0], out=str(tmp_path / "file")), digits)
