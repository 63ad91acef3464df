"""The settings of an experiment: how a model is trained, what one run is, and a grid of runs.

These are the one definition of every setting, its default and its allowed values; the command
line and protocol files both build them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from saal.errors import SaalError

OPTIMIZERS = ("adam", "sgd", "sam")


@dataclass
class TrainConfig:
    """How the model is trained each round.

    Attributes:
        optimizer: ``adam``, ``sgd`` or ``sam`` (SAM around SGD with ``momentum``).
        lr, momentum, weight_decay: optimiser settings (momentum is for sgd and sam).
        epochs: passes over the labelled set per round.
        batch_size: training batch size.
        augment: random crop (pad 4) and horizontal flip on each training batch.
        sam_rho: SAM's radius.
    """

    optimizer: Literal["adam", "sgd", "sam"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 50
    batch_size: int = 64
    augment: bool = False
    sam_rho: float = 0.05

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise SaalError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise SaalError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("lr", "momentum", "weight_decay", "sam_rho"):
            if getattr(self, key) < 0:
                raise SaalError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.lr == 0:
            raise SaalError("lr must be > 0")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class RunConfig:
    """Everything that defines one active-learning run, apart from the strategy and the seed.

    Attributes:
        dataset: a registry name, ``folder:PATH`` or ``npz:PATH``.
        model: a registry name.
        initial: size of the initial labelled set.
        initial_balanced: class-balanced (initial / classes per class) or uniform initial set.
        query: items acquired per round.
        rounds: acquisition rounds (the run records rounds + 1 accuracies).
        reinit: re-initialise to the same initial weights every round (else warm-start).
        subset: pool subset size for every strategy (None: whole pool).
        score_batch_size: pool items scored at once.
        device: torch device for training and scoring.
        train: the training settings.
    """

    dataset: str = "digits"
    model: str = "mlp"
    initial: int = 20
    initial_balanced: bool = True
    query: int = 20
    rounds: int = 5
    reinit: bool = True
    subset: int | None = None
    score_batch_size: int = 256
    device: str = "cpu"
    data_dir: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        for key in ("initial", "query", "score_batch_size"):
            if getattr(self, key) < 1:
                raise SaalError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.rounds < 0:
            raise SaalError(f"rounds must be >= 0, got {self.rounds}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExperimentSpec:
    """A grid of runs: every strategy x every seed, under one :class:`RunConfig`."""

    run: RunConfig = field(default_factory=RunConfig)
    strategies: list[str] = field(default_factory=lambda: ["random", "entropy", "saal"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out: str = "runs/default"

    def __post_init__(self) -> None:
        if isinstance(self.run, dict):
            self.run = RunConfig(**self.run)
        if not self.strategies:
            raise SaalError("no strategies given; name at least one, e.g. --strategies random,entropy")
        if not self.seeds:
            raise SaalError("no seeds given; give a count (--seeds 3) or a list (--seeds 123,456)")
        if len(set(self.seeds)) != len(self.seeds):
            raise SaalError(f"seeds repeat: {self.seeds}; give each seed once")

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run.to_dict(),
            "strategies": list(self.strategies),
            "seeds": list(self.seeds),
            "out": self.out,
        }
