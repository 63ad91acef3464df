"""Experiment protocols as YAML files, validated on load.

A protocol file mirrors :class:`saal.experiment.ExperimentSpec`::

    strategies: [random, entropy, "saal[score=diff]"]
    seeds: [123, 456, 789]
    out: runs/my-protocol
    run:
      dataset: mnist
      model: cnn
      initial: 20
      ...
      train: {optimizer: adam, lr: 1.0e-3, epochs: 50, batch_size: 10}

Keys left out take the defaults of :class:`~saal.experiment.RunConfig` and
:class:`~saal.training.TrainConfig`. An unknown key, a wrong type or an out-of-range value is
a one-line :class:`~saal.errors.SaalError` naming the key, e.g.
``config configs/x.yaml: run.train.lr: must be > 0``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from saal.errors import SaalError
from saal.settings import ExperimentSpec, RunConfig
from saal.settings import OPTIMIZERS, TrainConfig

_TRAIN = TrainConfig()
_RUN = RunConfig()


class TrainSchema(BaseModel):
    """The ``run.train`` section: :class:`~saal.training.TrainConfig`."""

    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["adam", "sgd", "sam"] = _TRAIN.optimizer
    lr: float = Field(_TRAIN.lr, gt=0)
    momentum: float = Field(_TRAIN.momentum, ge=0, lt=1)
    weight_decay: float = Field(_TRAIN.weight_decay, ge=0)
    epochs: int = Field(_TRAIN.epochs, ge=1)
    batch_size: int = Field(_TRAIN.batch_size, ge=1)
    augment: bool = _TRAIN.augment
    sam_rho: float = Field(_TRAIN.sam_rho, ge=0)


class RunSchema(BaseModel):
    """The ``run`` section: :class:`~saal.experiment.RunConfig`."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = _RUN.dataset
    data_dir: str | None = _RUN.data_dir
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    model: str = _RUN.model
    initial: int = Field(_RUN.initial, ge=1)
    initial_balanced: bool = _RUN.initial_balanced
    query: int = Field(_RUN.query, ge=1)
    rounds: int = Field(_RUN.rounds, ge=0)
    reinit: bool = _RUN.reinit
    subset: int | None = Field(_RUN.subset, ge=1)
    score_batch_size: int = Field(_RUN.score_batch_size, ge=1)
    device: str = _RUN.device
    train: TrainSchema = Field(default_factory=TrainSchema)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from saal.data import USER_PREFIXES, dataset_names

        if value.startswith(USER_PREFIXES):
            if not value.split(":", 1)[1]:
                raise ValueError(f"{value!r} needs a path after the colon")
            return value
        if value not in dataset_names():
            raise ValueError(
                f"unknown dataset {value!r}; choose one of {', '.join(dataset_names())}, or folder:PATH or npz:PATH"
            )
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from saal.models import MODEL_NAMES

        if value not in MODEL_NAMES:
            raise ValueError(f"unknown model {value!r}; choose one of {', '.join(MODEL_NAMES)}")
        return value

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except RuntimeError:
            raise ValueError(f"{value!r} is not a torch device; write e.g. cpu, cuda or cuda:1") from None
        return value


class ExperimentSchema(BaseModel):
    """A whole protocol file: :class:`~saal.experiment.ExperimentSpec`."""

    model_config = ConfigDict(extra="forbid")

    strategies: list[str] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    out: str | None = None
    run: RunSchema = Field(default_factory=RunSchema)

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


def _check_schema_matches_dataclasses() -> None:
    # The schema repeats the dataclass fields so that a file can be validated before anything
    # heavy runs; fail loudly at import if the two drift apart.
    from dataclasses import fields

    for schema, cls in ((TrainSchema, TrainConfig), (RunSchema, RunConfig), (ExperimentSchema, ExperimentSpec)):
        if set(schema.model_fields) != {f.name for f in fields(cls)}:  # pragma: no cover - a developer mistake
            raise RuntimeError(f"{schema.__name__} fields differ from {cls.__name__} fields")
    if set(TrainSchema.model_fields["optimizer"].annotation.__args__) != set(OPTIMIZERS):  # pragma: no cover
        raise RuntimeError("TrainSchema.optimizer differs from saal.training.OPTIMIZERS")


_check_schema_matches_dataclasses()


def _format_loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _known_keys(schema: type[BaseModel]) -> str:
    return ", ".join(schema.model_fields)


def _schema_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """Return the schema class of the mapping that holds the key at ``loc`` (None if not a mapping)."""
    schema: type[BaseModel] = ExperimentSchema
    for part in loc[:-1]:
        if isinstance(part, int):
            return None
        field = schema.model_fields.get(part)
        sub = field.annotation if field is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        schema = sub
    return schema


def _describe(error: dict[str, Any]) -> str:
    """Turn one pydantic error into a short phrase that says what to write instead."""
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        schema = _schema_at(error["loc"])
        known = f"; known keys here: {_known_keys(schema)}" if schema is not None else ""
        return f"unknown key{known}"
    if kind == "missing":
        return "required; add it"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}, got {value!r}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}, got {value!r}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}, got {value!r}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {value!r}"
    if kind in ("too_short",):
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    expected = {
        "int_type": "an integer",
        "int_parsing": "an integer",
        "int_from_float": "a whole number",
        "float_type": "a number",
        "float_parsing": "a number",
        "bool_type": "true or false",
        "bool_parsing": "true or false",
        "string_type": "a string",
        "list_type": "a list",
        "model_type": "a mapping of keys",
        "dict_type": "a mapping of keys",
    }.get(kind)
    if expected is not None:
        return f"must be {expected}, got {value!r}"
    return f"{error['msg'][:1].lower()}{error['msg'][1:]}"


def _first_error(exc: ValidationError) -> tuple[str, str]:
    error = exc.errors()[0]
    loc = list(error["loc"])
    # A validator that names a list position puts it at the front of its message.
    text = _describe(error)
    if error["type"] == "value_error" and text.startswith("[") and "]: " in text:
        pos, text = text.split(": ", 1)
        return _format_loc(loc) + pos, text
    return _format_loc(loc), text


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``dotted.key=value`` in ``data`` (value parsed as a YAML scalar or flow collection)."""
    if "=" not in item:
        raise SaalError(f"override {item!r} needs the form dotted.key=value, e.g. run.train.lr=0.01")
    key, raw = (s.strip() for s in item.split("=", 1))
    parts = key.split(".")
    schema: type[BaseModel] = ExperimentSchema
    node = data
    for depth, part in enumerate(parts):
        if part not in schema.model_fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise SaalError(f"override {item!r}: unknown key {key!r}; known keys under {where}: {_known_keys(schema)}")
        if depth == len(parts) - 1:
            break
        sub = schema.model_fields[part].annotation
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            raise SaalError(f"override {item!r}: {'.'.join(parts[: depth + 1])} has no sub-keys")
        schema = sub
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SaalError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a mapping in the file")
        node = child
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        raise SaalError(f"override {item!r}: cannot read the value {raw!r} as YAML") from None
    node[parts[-1]] = value


def validate(data: Any, overrides: Sequence[str] = (), source: str = "config") -> ExperimentSchema:
    """Validate a protocol already read into Python objects (after applying ``overrides``).

    Returns:
        The validated :class:`ExperimentSchema`.

    Raises:
        SaalError: one line, ``SOURCE: KEY: what is wrong``.
    """
    if not isinstance(data, dict):
        raise SaalError(f"{source}: the file must be a mapping of keys (strategies, seeds, out, run), got {data!r}")
    data = _deep_copy(data)
    for item in overrides:
        try:
            _apply_override(data, item)
        except SaalError as exc:
            raise SaalError(f"{source}: {exc}") from None
    try:
        return ExperimentSchema.model_validate(data)
    except ValidationError as exc:
        key, text = _first_error(exc)
        more = exc.error_count() - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise SaalError(f"{source}: {key or 'top level'}: {text}{suffix}") from None


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def to_spec(schema: ExperimentSchema, default_out: str) -> ExperimentSpec:
    """Return the :class:`~saal.experiment.ExperimentSpec` a validated schema describes."""
    run = schema.run.model_dump()
    run["train"] = TrainConfig(**run["train"])
    return ExperimentSpec(
        run=RunConfig(**run),
        strategies=list(schema.strategies),
        seeds=list(schema.seeds),
        out=schema.out or default_out,
    )


def load_experiment(path: str | os.PathLike, overrides: Sequence[str] | None = None) -> ExperimentSpec:
    """Read, override and validate a protocol file.

    Args:
        path: a YAML protocol file (see ``configs/``).
        overrides: ``"dotted.key=value"`` strings applied before validation, e.g.
            ``["run.train.lr=0.01", "seeds=[1, 2]"]``; the value is parsed as YAML.

    Returns:
        The :class:`~saal.experiment.ExperimentSpec`; its ``out`` defaults to ``runs/<file stem>``.

    Raises:
        SaalError: a missing or unreadable file, invalid YAML, an unknown key (in the file or an
            override), a wrong type or an out-of-range value; one line naming the key.
    """
    p = Path(path)
    source = f"config {path}"
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SaalError(f"{source}: no such file; give the path of a protocol YAML (see configs/)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SaalError(f"{source}: cannot read it ({type(exc).__name__}); give a readable YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise SaalError(f"{source}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise SaalError(f"{source}: the file is empty; it needs at least strategies and seeds")
    schema = validate(data, overrides or (), source)
    return to_spec(schema, default_out=str(Path("runs") / p.stem))


def dump_experiment(spec: ExperimentSpec) -> str:
    """Return ``spec`` as protocol YAML that :func:`load_experiment` reads back to an equal spec."""
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


__all__ = ["ExperimentSchema", "RunSchema", "TrainSchema", "dump_experiment", "load_experiment", "validate"]
