"""Command-line options backed by the settings models: help text with the model's default, one-line errors.

Every option of every ``saal`` subcommand sets one key of a :class:`~saal.validation.Settings` model;
its ``--help`` line ends with that key's default, read from the model (so the two cannot drift), and
a bad value is reported under the option's name, e.g. ``--momentum: must be < 1, got 1.5``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from saal.errors import SaalError
from saal.validation import SettingError, Settings, more_suffix, submodel

S = TypeVar("S", bound=Settings)


def default_of(model: type[BaseModel], key: str) -> Any:
    """Return the default of the dotted ``key`` of ``model`` (e.g. ``run.train.lr`` of ExperimentSpec).

    Raises:
        KeyError: ``model`` has no such key (a programming mistake).
    """
    *parents, last = key.split(".")
    for part in parents:
        sub = submodel(model, part)
        if sub is None:
            raise KeyError(key)
        model = sub
    return model.model_fields[last].get_default(call_default_factory=True)


def show_default(value: Any) -> str:
    """Return a default as the user would type it: ``0.001``, ``random,entropy``, ``false``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def add_option(
    parser: argparse.ArgumentParser,
    flag: str,
    model: type[BaseModel],
    key: str,
    help: str,
    *,
    shown_default: str | None = None,
    **kwargs: Any,
) -> argparse.Action:
    """Add ``flag`` (argparse default None: "not given") setting ``key`` of ``model``.

    The help ends with ``(default: X)``, X read from the model, or ``shown_default`` where the
    model's default needs words (e.g. ``None`` meaning "the whole pool").

    Returns:
        The argparse action.
    """
    shown = shown_default if shown_default is not None else show_default(default_of(model, key))
    return parser.add_argument(flag, default=None, help=f"{help} (default: {shown})", **kwargs)


def option_for(key: str, flags: Mapping[str, str]) -> str | None:
    """Return the option that set the value at dotted ``key`` (``seeds[0]`` was set by whoever set ``seeds``).

    Returns:
        The option's text from ``flags`` (dotted key -> option), or None if no option set it.
    """
    best: str | None = None
    for k in flags:
        if (key == k or key.startswith(f"{k}.") or key.startswith(f"{k}[")) and (best is None or len(k) > len(best)):
            best = k
    return flags[best] if best is not None else None


def validate_options(model: type[S], data: Mapping[str, Any], flags: Mapping[str, str], source: str | None = None) -> S:
    """Return ``model`` built from ``data``.

    Args:
        model: the settings model.
        data: its keys (nested dicts for nested models).
        flags: dotted key -> the command-line option that gave its value.
        source: where the other values came from (e.g. ``config x.yaml``), for errors at keys no option set.

    Raises:
        SaalError: one line: ``--option: what is wrong`` when an option gave the bad value, else
            ``SOURCE: KEY: what is wrong``.
    """
    try:
        return model.from_data(dict(data))
    except SettingError as exc:
        option = option_for(exc.key, flags)
        if option is not None:
            raise SaalError(f"{option}: {exc.problem}{more_suffix(exc.more)}") from None
        raise SaalError(f"{source}: {exc}" if source else str(exc)) from None


def given(args: argparse.Namespace, names: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Return the options of ``args`` that were given, as (key -> value, key -> option).

    Args:
        args: parsed arguments.
        names: model key -> option (e.g. ``{"train_on": "--train-on"}``); the argparse dest is the
            option without its dashes, ``-`` read as ``_``.
    """
    values: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for key, flag in names.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            values[key] = value
            flags[key] = flag
    return values, flags


__all__ = ["add_option", "default_of", "given", "option_for", "show_default", "validate_options"]
