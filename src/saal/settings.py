"""The settings of an experiment: how a model is trained, what one run is, and a grid of runs.

These are the one definition of every setting, its default and its allowed values; the command
line and protocol files both build them, and so does Python code::

    ExperimentSpec(run=RunConfig(initial=20, train=TrainConfig(epochs=3)), strategies=["random"], seeds=[0])

A bad value (an unknown key, a wrong type, nan, an out-of-range number, an unknown dataset, model,
device or strategy) raises :class:`~saal.validation.SettingError` (a :class:`~saal.errors.SaalError`)
with one line naming the key, e.g. ``run.train.lr: must be > 0, got 0``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, NonNegativeFloat, PositiveInt, field_validator

from saal.errors import SaalError
from saal.validation import Settings

OPTIMIZERS = ("adam", "sgd", "sam")


def check_dataset_name(value: str) -> str:
    """Return ``value`` if it is a registered dataset, ``folder:PATH`` or ``npz:PATH``.

    Raises:
        SaalError: otherwise, listing the choices.
    """
    from saal.data import USER_PREFIXES, dataset_names

    if value.startswith(USER_PREFIXES):
        if not value.split(":", 1)[1]:
            raise SaalError(f"{value!r} needs a path after the colon")
        return value
    if value not in dataset_names():
        raise SaalError(
            f"unknown dataset {value!r}; choose one of {', '.join(dataset_names())}, or folder:PATH or npz:PATH"
        )
    return value


def check_model_name(value: str) -> str:
    """Return ``value`` if it is a registered model name.

    Raises:
        SaalError: otherwise, listing the choices.
    """
    from saal.models import MODEL_NAMES

    if value not in MODEL_NAMES:
        raise SaalError(f"unknown model {value!r}; choose one of {', '.join(MODEL_NAMES)}")
    return value


def check_device_name(value: str) -> str:
    """Return ``value`` if torch reads it as a device name (whether this machine has it is checked later).

    Raises:
        SaalError: a malformed device name.
    """
    import torch

    try:
        torch.device(value)
    except RuntimeError:
        raise SaalError(f"{value!r} is not a torch device; write e.g. cpu, cuda or cuda:1") from None
    return value


# Names checked against the registries wherever a setting holds one (run settings, `saal score` options).
DatasetName = Annotated[str, AfterValidator(check_dataset_name)]
ModelName = Annotated[str, AfterValidator(check_model_name)]
DeviceName = Annotated[str, AfterValidator(check_device_name)]


class TrainConfig(Settings):
    """How the model is trained each round.

    Attributes:
        optimizer: ``adam``, ``sgd`` or ``sam`` (SAM around SGD with ``momentum``).
        lr, momentum, weight_decay: optimiser settings (momentum is for sgd and sam).
        epochs: passes over the labelled set per round.
        batch_size: training batch size.
        augment: random crop (pad 4) and horizontal flip on each training batch.
        sam_rho: SAM's radius.
        tune: ``none``, or ``cv``: each round the weight decay (and epochs) are chosen by ``tune_folds``-fold
            cross-validation on the labelled items from the grid ``tune_weight_decay`` x ``tune_epochs``
            (:mod:`saal.tuning`); ``weight_decay`` and ``epochs`` are then only used while too few items are
            labelled to split.
        tune_weight_decay: the weight decays tried, in order of preference (a tie keeps the earlier).
        tune_epochs: the epoch counts tried (None: ``epochs`` only).
        tune_folds: folds of the cross-validation.
    """

    optimizer: Literal["adam", "sgd", "sam"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    epochs: int = Field(default=50, ge=1)
    batch_size: int = Field(default=64, ge=1)
    augment: bool = False
    sam_rho: float = Field(default=0.05, ge=0)
    tune: Literal["none", "cv"] = "none"
    tune_weight_decay: list[NonNegativeFloat] = Field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2], min_length=1)
    tune_epochs: list[PositiveInt] | None = Field(default=None, min_length=1)
    tune_folds: int = Field(default=3, ge=2)


def _default_train() -> TrainConfig:
    return TrainConfig()


class RunConfig(Settings):
    """Everything that defines one active-learning run, apart from the strategy and the seed.

    Attributes:
        dataset: a registry name, ``folder:PATH`` or ``npz:PATH``.
        model: a registry name.
        initial: size of the initial labelled set; 0 starts from no labels (round 0 evaluates the untrained
            model, and its acquisition is the first pick; see :func:`saal.experiment.loop.first_picker`).
        initial_balanced: the initial set drawn with the true labels, class-balanced (initial / classes per
            class; the paper's protocol), or uniform. Only when ``initial_strategy`` is None.
        initial_strategy: a cold-start strategy spec (``random``, ``typiclust``, ...; one whose ``cold_start``
            is true) that picks from zero labels, without the ground truth: with ``initial > 0`` it chooses the
            initial set (the untrained model is passed); with ``initial = 0`` it makes round 0's acquisition
            (None: the run's own strategy when it is cold-start, else ``random``).
        query: items acquired per round.
        rounds: acquisition rounds; the run records rounds + 1 accuracies (0: train on the initial
            set and evaluate, acquire nothing).
        reinit: re-initialise to the same initial weights every round (else warm-start).
        subset: pool subset size for every strategy (None: whole pool).
        score_batch_size: pool items scored at once.
        device: torch device for training and scoring.
        data_dir: folder of the standard dataset files (None: ``$SAAL_DATA_DIR`` or ``~/.cache/saal``).
        dataset_options: options passed to the dataset loader.
        model_options: options passed to a detector's builder (e.g. ``weights``, ``frozen``), or to a head on the
            frozen pretrained backbone (``image_size``, ``dropout``, ``hidden``; see
            :mod:`saal.models.frozen_backbone`).
        train: the training settings.
        stop_when: ``none`` (run every round) or ``stable``: end the run early once the model's predictions on a
            fixed stop set stabilise (:class:`saal.stopping.StabilisingPredictions`; classification only). The
            kappa of every round is recorded either way.
        stop_threshold: the kappa between successive models' predictions that counts as stable, in (0, 1].
        stop_window: how many successive rounds the kappa must reach ``stop_threshold``, at least 1.
        stop_set: the stop set's size, drawn (seeded) from the initially unlabelled pool (None: 1000, or the
            whole initially unlabelled pool when smaller).
    """

    dataset: DatasetName = "digits"
    model: ModelName = "mlp"
    initial: int = Field(default=20, ge=0)
    initial_balanced: bool = True
    initial_strategy: str | None = None
    query: int = Field(default=20, ge=1)
    rounds: int = Field(default=5, ge=0)
    reinit: bool = True
    subset: int | None = Field(default=None, ge=1)
    score_batch_size: int = Field(default=256, ge=1)
    device: DeviceName = "cpu"
    data_dir: str | None = None
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    model_options: dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=_default_train)
    stop_when: Literal["none", "stable"] = "none"
    stop_threshold: float = Field(default=0.99, gt=0, le=1)
    stop_window: int = Field(default=3, ge=1)
    stop_set: int | None = Field(default=None, ge=1)

    @field_validator("initial_strategy")
    @classmethod
    def _cold_start_strategy(cls, value: str | None) -> str | None:
        if value is not None:
            check_cold_start_spec(value)
        return value


def check_cold_start_spec(spec: str) -> str:
    """Return ``spec`` if it names a registered strategy that can choose from zero labels (``cold_start``).

    Raises:
        ValueError: a malformed spec, an unknown name, or a strategy that needs a trained model (one line naming
            the cold-start strategies).
    """
    from saal.strategies import parse_spec, strategy_class, strategy_names

    try:
        name, _ = parse_spec(spec)
    except SaalError as exc:
        raise ValueError(str(exc)) from None
    names = strategy_names()
    if name in names and strategy_class(name).cold_start:
        return spec
    cold = ", ".join(n for n in names if strategy_class(n).cold_start)
    if name not in names:
        raise ValueError(f"unknown strategy {name!r}; a cold-start strategy is one of {cold}")
    raise ValueError(f"{name!r} cannot choose from zero labels (it needs a trained model); choose one of {cold}")


def _default_run() -> RunConfig:
    return RunConfig()


def _default_strategies() -> list[str]:
    return ["random", "entropy", "saal"]


def _default_seeds() -> list[int]:
    return [0, 1, 2]


class ExperimentSpec(Settings):
    """A grid of runs: every strategy x every seed, under one :class:`RunConfig`.

    Attributes:
        run: the settings every run shares.
        strategies: strategy specs, e.g. ``["random", "saal[score=diff]"]``; each listed once.
        seeds: distinct non-negative seeds.
        out: the output folder.
    """

    strategies: list[str] = Field(default_factory=_default_strategies, min_length=1)
    seeds: list[int] = Field(default_factory=_default_seeds, min_length=1)
    out: str = "runs/default"
    run: RunConfig = Field(default_factory=_default_run)

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, value: list[str]) -> list[str]:
        from saal.strategies import parse_spec, strategy_names

        for i, spec in enumerate(value):
            try:
                name, _ = parse_spec(spec)
            except SaalError as exc:
                raise ValueError(f"[{i}]: {exc}") from None
            if name not in strategy_names():
                raise ValueError(f"[{i}]: unknown strategy {name!r}; choose one of {', '.join(strategy_names())}")
        if len(set(value)) != len(value):
            raise ValueError("a strategy is listed twice; list each once")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if any(s < 0 for s in value):
            raise ValueError("seeds must be non-negative integers")
        if len(set(value)) != len(value):
            raise ValueError("a seed is listed twice; give each seed once")
        return value

    def to_dict(self) -> dict[str, Any]:
        """Return the grid as nested plain dicts: ``run`` (with ``train``), ``strategies``, ``seeds``, ``out``."""
        data = self.model_dump()
        return {"run": data.pop("run"), **data}


__all__ = ["OPTIMIZERS", "ExperimentSpec", "RunConfig", "TrainConfig", "check_cold_start_spec"]
