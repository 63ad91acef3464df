"""Experiment protocols as YAML files, validated on load by the settings models.

A protocol file mirrors :class:`saal.settings.ExperimentSpec`::

    strategies: [random, entropy, "saal[score=diff]"]
    seeds: [123, 456, 789]
    out: runs/my-protocol
    run:
      dataset: mnist
      model: cnn
      initial: 20
      ...
      train: {optimizer: adam, lr: 1.0e-3, epochs: 50, batch_size: 10}

``strategies`` and ``seeds`` are required; other keys left out take the defaults of
:class:`~saal.settings.RunConfig` and :class:`~saal.settings.TrainConfig`, and ``out`` defaults to
``runs/<file stem>``. An unknown key, a wrong type or an out-of-range value is a one-line
:class:`~saal.errors.SaalError` naming the key, e.g. ``config configs/x.yaml: run.train.lr: must be > 0, got 0``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from saal.errors import SaalError
from saal.settings import ExperimentSpec
from saal.validation import SettingError, known_keys, submodel

REQUIRED_KEYS = ("strategies", "seeds")


def read_protocol(path: str | os.PathLike) -> dict[str, Any]:
    """Return the mapping a protocol file holds, not yet validated.

    Raises:
        SaalError: a missing or unreadable file, invalid YAML, an empty file or one that is not a
            mapping; one line starting ``config PATH:``.
    """
    source = f"config {path}"
    try:
        text = Path(path).read_text()
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
    if not isinstance(data, dict):
        raise SaalError(f"{source}: the file must be a mapping of keys (strategies, seeds, out, run), got {data!r}")
    return data


def apply_override(data: dict[str, Any], item: str) -> str:
    """Set ``dotted.key=value`` in ``data`` (value parsed as a YAML scalar or flow collection).

    Returns:
        The dotted key that was set.

    Raises:
        SaalError: a malformed item, a key that :class:`~saal.settings.ExperimentSpec` does not have, or a
            value that is not YAML.
    """
    if "=" not in item:
        raise SaalError(f"override {item!r} needs the form dotted.key=value, e.g. run.train.lr=0.01")
    key, raw = (s.strip() for s in item.split("=", 1))
    parts = key.split(".")
    model: type[BaseModel] = ExperimentSpec
    node = data
    for depth, part in enumerate(parts):
        if part not in model.model_fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise SaalError(f"override {item!r}: unknown key {key!r}; known keys under {where}: {known_keys(model)}")
        if depth == len(parts) - 1:
            break
        sub = submodel(model, part)
        if sub is None:
            raise SaalError(f"override {item!r}: {'.'.join(parts[: depth + 1])} has no sub-keys")
        model = sub
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
    return key


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str = "config") -> dict[str, Any]:
    """Return a deep copy of ``data`` with every ``dotted.key=value`` of ``overrides`` set.

    Raises:
        SaalError: one line, ``SOURCE: override ...: what is wrong``.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        try:
            apply_override(data, item)
        except SaalError as exc:
            raise SaalError(f"{source}: {exc}") from None
    return data


def check_required(data: dict[str, Any], source: str = "config") -> None:
    """Refuse protocol data that lacks ``strategies`` or ``seeds``.

    Raises:
        SaalError: ``SOURCE: strategies: required; add it``.
    """
    for key in REQUIRED_KEYS:
        if key not in data:
            raise SaalError(f"{source}: {key}: required; add it")


def validate(
    data: Any, overrides: Sequence[str] = (), source: str = "config", default_out: str | None = None
) -> ExperimentSpec:
    """Validate a protocol already read into Python objects (after applying ``overrides``).

    Args:
        data: the protocol's mapping.
        overrides: ``"dotted.key=value"`` strings applied first.
        source: what error messages start with, e.g. ``config configs/x.yaml``.
        default_out: the ``out`` of a protocol that sets none (else ExperimentSpec's default).

    Returns:
        The validated :class:`~saal.settings.ExperimentSpec`.

    Raises:
        SaalError: one line, ``SOURCE: KEY: what is wrong``.
    """
    if not isinstance(data, dict):
        raise SaalError(f"{source}: the file must be a mapping of keys (strategies, seeds, out, run), got {data!r}")
    data = apply_overrides(data, overrides, source)
    check_required(data, source)
    if data.get("out") is None and default_out is not None:
        data["out"] = default_out
    try:
        return ExperimentSpec.from_data(data)
    except SettingError as exc:
        raise SaalError(f"{source}: {exc}") from None


def load_experiment(path: str | os.PathLike, overrides: Sequence[str] | None = None) -> ExperimentSpec:
    """Read, override and validate a protocol file.

    Args:
        path: a YAML protocol file (see ``configs/``).
        overrides: ``"dotted.key=value"`` strings applied before validation, e.g.
            ``["run.train.lr=0.01", "seeds=[1, 2]"]``; the value is parsed as YAML.

    Returns:
        The :class:`~saal.settings.ExperimentSpec`; its ``out`` defaults to ``runs/<file stem>``.

    Raises:
        SaalError: a missing or unreadable file, invalid YAML, an unknown key (in the file or an
            override), a wrong type or an out-of-range value; one line naming the key.
    """
    data = read_protocol(path)
    return validate(data, overrides or (), f"config {path}", default_out=default_out_of(path))


def default_out_of(path: str | os.PathLike) -> str:
    """Return the output folder of a protocol file that names none: ``runs/<file stem>``."""
    return str(Path("runs") / Path(path).stem)


def dump_experiment(spec: ExperimentSpec) -> str:
    """Return ``spec`` as protocol YAML that :func:`load_experiment` reads back to an equal spec."""
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


__all__ = [
    "apply_override",
    "apply_overrides",
    "check_required",
    "default_out_of",
    "dump_experiment",
    "load_experiment",
    "read_protocol",
    "validate",
]
