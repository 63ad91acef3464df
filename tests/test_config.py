"""Protocol files: every shipped config validates, and every kind of mistake is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from saal.config import dump_experiment, load_experiment, validate
from saal.errors import SaalError
from saal.experiment import ExperimentSpec, RunConfig
from saal.strategies import build_strategy
from saal.training import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))
PAPER_STRATEGIES = ["random", "entropy", "coreset", "badge", "vaal", "saal-reference", "saal"]
CPU_STRATEGIES = ["random", "entropy", "least-confidence", "margin", "bald", "coreset", "badge", "ll4al",
                  "vaal[steps=50]", "saal", "saal[score=diff]", "saal[scope=last-layer]", "saal-reference"]  # fmt: skip

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


def test_configs_folder_holds_the_paper_and_cpu_protocols() -> None:
    names = {p.name for p in CONFIG_FILES}
    for ds in ("fashion-mnist", "svhn", "cifar10", "cifar100"):
        assert f"paper-{ds}.yaml" in names and f"paper-{ds}-sam.yaml" in names
    assert {"cpu-mnist.yaml", "cpu-cifar10.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_loads_validates_and_builds_its_strategies(path: Path) -> None:
    spec = load_experiment(path)
    assert isinstance(spec, ExperimentSpec) and isinstance(spec.run.train, TrainConfig)
    assert spec.out == f"runs/{path.stem}"
    assert "#" in path.read_text()  # every protocol says where its numbers come from
    for s in spec.strategies:
        strategy = build_strategy(s, subset=spec.run.subset, batch_size=spec.run.score_batch_size)
        assert strategy.subset == spec.run.subset


@pytest.mark.parametrize("dataset", ["fashion-mnist", "svhn", "cifar10", "cifar100"])
def test_paper_protocols_follow_the_reference(dataset: str) -> None:
    adam = load_experiment(CONFIGS / f"paper-{dataset}.yaml")
    sam = load_experiment(CONFIGS / f"paper-{dataset}-sam.yaml")
    big = dataset == "cifar100"
    for spec in (adam, sam):
        r, t = spec.run, spec.run.train
        assert spec.strategies == PAPER_STRATEGIES and spec.seeds == [123, 456, 789]
        assert (r.dataset, r.model, r.rounds, t.epochs, t.lr) == (dataset, "resnet18", 100, 50, 1e-3)
        assert (r.initial, r.query, r.subset, t.batch_size) == ((1000, 100, 10000, 100) if big else (20, 10, 2000, 10))
        assert r.initial_balanced and t.augment == dataset.startswith("cifar") and t.weight_decay == 0
    assert adam.run.train.optimizer == "adam" and adam.run.reinit
    assert sam.run.train.optimizer == "sam" and not sam.run.reinit
    assert (sam.run.train.momentum, sam.run.train.sam_rho) == (0.9, 0.05)


@pytest.mark.parametrize("name", ["cpu-mnist.yaml", "cpu-cifar10.yaml"])
def test_cpu_protocols_are_small_balanced_adam_reinit(name: str) -> None:
    spec = load_experiment(CONFIGS / name)
    r = spec.run
    assert spec.strategies == CPU_STRATEGIES and spec.seeds == [123, 456, 789]
    assert r.model == "cnn" and r.initial_balanced and r.reinit and r.train.optimizer == "adam"
    assert r.device == "cpu" and r.subset is not None
    assert r.initial + r.query * r.rounds <= 1000
    if name == "cpu-mnist.yaml":
        assert r.dataset == "mnist" and r.data_dir is None
    else:
        assert r.dataset.startswith("folder:") and r.train.augment


@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
def test_regime_protocols_span_their_budgets_on_the_whole_pool_without_the_ground_truth(dataset: str) -> None:
    low = load_experiment(CONFIGS / f"low-{dataset}-pretrained.yaml")
    mid = load_experiment(CONFIGS / f"mid-{dataset}-pretrained.yaml")
    assert (low.run.initial, low.run.query, low.run.rounds, len(low.seeds)) == (0, 10, 10, 10)  # 0 -> 100 by 10
    assert (mid.run.initial, mid.run.query, mid.run.rounds, len(mid.seeds)) == (100, 100, 9, 5)  # 100 -> 1,000
    assert mid.run.initial_strategy == "random" and low.run.initial_strategy is None
    for spec in (low, mid):
        assert spec.run.subset is None and spec.run.model == "pretrained-mlp" and spec.strategies[0] == "random"
        assert {"typiclust", "probcover", "herding", "auto", "saal", "margin"} <= set(spec.strategies)


def test_files_are_validated_by_the_settings_models_themselves(tmp_path: Path) -> None:
    """No second schema: a file's keys are the settings models' fields, nested the same way."""
    spec = validate({"strategies": ["random"], "seeds": [0], "run": {"train": {"epochs": 2}}})
    assert type(spec) is ExperimentSpec and type(spec.run) is RunConfig and type(spec.run.train) is TrainConfig
    assert spec.out == ExperimentSpec().out == "runs/default"
    assert set(yaml.safe_load(dump_experiment(spec))) == set(ExperimentSpec.model_fields)
    assert set(spec.to_dict()["run"]) == set(RunConfig.model_fields)
    assert set(spec.to_dict()["run"]["train"]) == set(TrainConfig.model_fields)


def test_minimal_file_takes_defaults_and_overrides_apply(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    spec = load_experiment(path)
    assert spec.strategies == ["random", "entropy"] and spec.seeds == [1, 2]
    assert spec.run.query == 5 and spec.run.train.lr == 0.01 and spec.run.train.epochs == 2
    assert spec.run.initial == RunConfig().initial and spec.run.train.optimizer == TrainConfig().optimizer
    assert spec.out == "runs/p"
    spec = load_experiment(
        path,
        overrides=["run.train.lr=1e-3", "seeds=[7, 8, 9]", "run.subset=100", "out=/tmp/x",
                   "strategies=[random, 'saal[score=diff]']", "run.train.augment=true", "run.train.optimizer=sam"],
    )  # fmt: skip
    assert spec.run.train.lr == 1e-3 and isinstance(spec.run.train.lr, float)
    assert spec.seeds == [7, 8, 9] and spec.run.subset == 100 and spec.out == "/tmp/x"
    assert spec.strategies == ["random", "saal[score=diff]"]
    assert spec.run.train.augment is True and spec.run.train.optimizer == "sam"
    # an override may create a section the file left out
    spec = load_experiment(write(tmp_path, "strategies: [random]\nseeds: [0]\n", "q.yaml"), ["run.train.epochs=3"])
    assert spec.run.train.epochs == 3


def test_dump_reads_back_to_an_equal_spec(tmp_path: Path) -> None:
    spec = load_experiment(CONFIGS / "paper-cifar10-sam.yaml")
    again = load_experiment(write(tmp_path, dump_experiment(spec)))
    assert again == spec


BAD_FILES = [
    ("strategies: [random]\nseeds: [1]\nrun:\n  train:\n    lr: 0\n", "run.train.lr: must be > 0"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  train:\n    lr: -1.0e-3\n", "run.train.lr: must be > 0"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  train:\n    lrr: 0.1\n", "run.train.lrr: unknown key"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  train:\n    epochs: 2.5\n", "run.train.epochs: must be a whole"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  train:\n    epochs: 0\n", "run.train.epochs: must be >= 1"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  train:\n    optimizer: rmsprop\n", "run.train.optimizer: must be one"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  train:\n    augment: sometimes\n", "run.train.augment: must be true"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  train:\n    momentum: 1.5\n", "run.train.momentum: must be < 1"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  query: 0\n", "run.query: must be >= 1"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  rounds: -1\n", "run.rounds: must be >= 0"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  subset: 0\n", "run.subset: must be >= 1"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  initial: many\n", "run.initial: must be an integer"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  model: vgg\n", "run.model: unknown model 'vgg'"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  dataset: imagenet\n", "run.dataset: unknown dataset"),
    ("strategies: [random]\nseeds: [1]\nrun:\n  device: gpu9\n", "run.device:"),
    ("strategies: [random]\nseeds: [1]\nrun: 3\n", "run: must be a mapping"),
    ("strategies: [random]\nseeds: [1]\nrounds: 3\n", "rounds: unknown key; known keys here: strategies"),
    ("strategies: [random, oracle]\nseeds: [1]\n", "strategies[1]: unknown strategy 'oracle'"),
    ("strategies: ['saal[rho=0.1']\nseeds: [1]\n", "strategies[0]: cannot read strategy"),
    ("strategies: [random, random]\nseeds: [1]\n", "strategies: a strategy is listed twice"),
    ("strategies: []\nseeds: [1]\n", "strategies: must not be empty"),
    ("strategies: random\nseeds: [1]\n", "strategies: must be a list"),
    ("strategies: [random]\nseeds: [1, 1]\n", "seeds: a seed is listed twice"),
    ("strategies: [random]\nseeds: [-1]\n", "seeds: seeds must be non-negative"),
    ("strategies: [random]\nseeds: [x]\n", "seeds[0]: must be an integer"),
    ("seeds: [1]\n", "strategies: required"),
    ("- random\n- entropy\n", "must be a mapping"),
    ("strategies: [random\nseeds: [1]\n", "invalid YAML at line"),
    ("", "the file is empty"),
]


@pytest.mark.parametrize(("text", "needle"), BAD_FILES)
def test_bad_file_is_one_line_naming_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SaalError) as info:
        load_experiment(path)
    message = str(info.value)
    assert message.startswith(f"config {path}: ") and needle in message, message
    assert "\n" not in message


BAD_OVERRIDES = [
    ("run.train.lrr=0.1", "unknown key 'run.train.lrr'; known keys under run.train: optimizer, lr"),
    ("runs.query=3", "unknown key 'runs.query'; known keys under the top level"),
    ("run.query.size=3", "run.query has no sub-keys"),
    ("run.query", "needs the form dotted.key=value"),
    ("run.train.lr=0", "run.train.lr: must be > 0"),
    ("run.train.lr=fast", "run.train.lr: must be a number"),
    ("seeds=[1, 2", "cannot read the value"),
]


@pytest.mark.parametrize(("override", "needle"), BAD_OVERRIDES)
def test_bad_override_is_one_line(tmp_path: Path, override: str, needle: str) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(SaalError) as info:
        load_experiment(path, [override])
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SaalError, match="no such file"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(SaalError, match="cannot read it"):
        load_experiment(tmp_path)  # a folder
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SaalError):
        load_experiment(binary)


# The settings models themselves: the one validator that files, the command line and Python code share.

BAD_SETTINGS = [
    (TrainConfig, {"lr": float("nan")}, "lr: must be a finite number, got nan"),
    (TrainConfig, {"lr": float("inf")}, "lr: must be a finite number, got inf"),
    (TrainConfig, {"lr": 0.0}, "lr: must be > 0, got 0.0"),
    (TrainConfig, {"momentum": 1.5}, "momentum: must be < 1, got 1.5"),
    (TrainConfig, {"epochs": 0}, "epochs: must be >= 1, got 0"),
    (TrainConfig, {"optimizer": "rmsprop"}, "optimizer: must be one of 'adam', 'sgd' or 'sam', got 'rmsprop'"),
    (TrainConfig, {"lrr": 0.1}, "lrr: unknown key; known keys here: optimizer, lr"),
    (RunConfig, {"subset": 0}, "subset: must be >= 1, got 0"),
    (RunConfig, {"rounds": -1}, "rounds: must be >= 0, got -1"),
    (RunConfig, {"model": "vgg"}, "model: unknown model 'vgg'"),
    (RunConfig, {"dataset": "imagenet"}, "dataset: unknown dataset 'imagenet'"),
    (RunConfig, {"device": "gpu9"}, "device: 'gpu9' is not a torch device"),
    (RunConfig, {"train": {"lr": -1}}, "train.lr: must be > 0, got -1"),
    (ExperimentSpec, {"seeds": [-1]}, "seeds: seeds must be non-negative integers"),
    (ExperimentSpec, {"seeds": []}, "seeds: must not be empty"),
    (ExperimentSpec, {"strategies": ["random", "oracle"]}, "strategies[1]: unknown strategy 'oracle'"),
    (ExperimentSpec, {"run": {"train": {"momentum": 2}}}, "run.train.momentum: must be < 1, got 2"),
]


@pytest.mark.parametrize(("cls", "kwargs", "message"), BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_the_key(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(SaalError) as info:
        cls(**kwargs)
    assert str(info.value) == message or str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_assignment_is_validated_too() -> None:
    train = TrainConfig()
    train.epochs = 3
    assert train.epochs == 3
    with pytest.raises(SaalError, match=r"^lr: must be a finite number, got nan$"):
        train.lr = float("nan")
    assert train.lr == 1e-3


def test_settings_keep_the_keyword_api_defaults_and_plain_dicts() -> None:
    spec = ExperimentSpec(run=RunConfig(initial=20, train=TrainConfig(epochs=3)), strategies=["random"], seeds=[4])
    assert spec.run.train.epochs == 3 and spec.run.train.lr == 1e-3 and spec.out == "runs/default"
    assert ExperimentSpec(run={"train": {"epochs": 2}}).run.train == TrainConfig(epochs=2)  # type: ignore[arg-type]
    data = spec.to_dict()
    assert list(data) == ["run", "strategies", "seeds", "out"]
    assert data["run"]["train"] == {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
                                    "epochs": 3, "batch_size": 64, "augment": False, "sam_rho": 0.05, "tune": "none",
                                    "tune_weight_decay": [0.0, 1e-4, 1e-3, 1e-2], "tune_epochs": None,
                                    "tune_folds": 3}  # fmt: skip
    keys = ["dataset", "model", "initial", "initial_balanced", "initial_strategy", "query", "rounds", "reinit",
            "subset", "score_batch_size", "device", "data_dir", "dataset_options", "model_options",
            "train", "stop_when", "stop_threshold", "stop_window", "stop_set"]  # fmt: skip
    assert list(data["run"]) == keys
    assert ExperimentSpec(**data) == spec and RunConfig(**data["run"]) == spec.run
    assert ExperimentSpec().strategies == ["random", "entropy", "saal"] and ExperimentSpec().seeds == [0, 1, 2]
