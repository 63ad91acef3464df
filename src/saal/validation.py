"""Validated settings models, and pydantic errors turned into one line naming the key.

Every settings model of saal (:class:`~saal.settings.TrainConfig`, :class:`~saal.settings.RunConfig`,
:class:`~saal.settings.ExperimentSpec` and the options of the ``saal`` subcommands) derives from
:class:`Settings`: constructing one with a bad value, or assigning one, raises :class:`SettingError`,
a :class:`~saal.errors.SaalError` whose message is ``KEY: what is wrong``, e.g.
``run.train.lr: must be > 0, got 0``. Callers that know where the value came from (a protocol file,
a command-line option) read :attr:`SettingError.key` and :attr:`SettingError.problem` to say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from saal.errors import SaalError

S = TypeVar("S", bound="Settings")


class SettingError(SaalError):
    """A bad setting.

    Attributes:
        key: where the bad value is, dotted with list positions, e.g. ``run.train.lr`` or ``seeds[0]``
            (empty for the top level).
        problem: what is wrong, e.g. ``must be > 0, got 0``.
        more: how many further problems the same validation found.
    """

    def __init__(self, key: str, problem: str, more: int = 0) -> None:
        self.key = key
        self.problem = problem
        self.more = more
        super().__init__(f"{key or 'top level'}: {problem}{more_suffix(more)}")


def more_suffix(more: int) -> str:
    """Return `` (and N more problems)`` for ``more`` > 0, else an empty string."""
    return f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""


class Settings(BaseModel):
    """A pydantic model that refuses unknown keys, nan and inf, and raises :class:`SettingError`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        """Validate ``data``.

        Raises:
            SettingError: the first bad value, in one line naming its key.
        """
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise setting_error(exc, type(self)) from None

    # This __init__ validates exactly as BaseModel's does (it only rewords the error): tell pydantic so,
    # as RootModel does, so that nested models validate in one pass and errors keep their full location.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        """Validate and set one attribute.

        Raises:
            SettingError: a bad value, in one line naming its key.
        """
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise setting_error(exc, type(self)) from None

    @classmethod
    def from_data(cls: type[S], data: Any) -> S:
        """Return the model that ``data`` (plain dicts, lists and scalars) describes.

        Raises:
            SettingError: the first bad value, in one line naming its key.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise setting_error(exc, cls) from None

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as nested plain dicts (JSON- and YAML-ready)."""
        return self.model_dump()


def format_loc(loc: Sequence[str | int]) -> str:
    """Return a pydantic error location as ``run.train.lr`` or ``strategies[1]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def known_keys(model: type[BaseModel]) -> str:
    """Return the keys of ``model``, comma-separated."""
    return ", ".join(model.model_fields)


def submodel(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """Return the model class of ``model``'s field ``key`` when that field is a nested model, else None."""
    field = model.model_fields.get(key)
    sub = field.annotation if field is not None else None
    return sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None


def model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """Return the model class of the mapping that holds the key at ``loc`` (None if that is not a model)."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            return None
        model = submodel(model, part)
    return model


def _number(value: Any) -> Any:
    """Return a whole float as an int (``0.0`` -> ``0``) so that bounds read naturally."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "a mapping of keys",
    "model_attributes_type": "a mapping of keys",
    "dict_type": "a mapping of keys",
}


def describe(error: Any, root: type[BaseModel]) -> str:
    """Return one pydantic error (an item of ``ValidationError.errors()``) as a short phrase saying what to write."""
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        model = model_at(root, error["loc"])
        return f"unknown key; known keys here: {known_keys(model)}" if model is not None else "unknown key"
    if kind == "missing":
        return "required; add it"
    if kind == "greater_than":
        return f"must be > {_number(ctx['gt'])}, got {value!r}"
    if kind == "greater_than_equal":
        return f"must be >= {_number(ctx['ge'])}, got {value!r}"
    if kind == "less_than":
        return f"must be < {_number(ctx['lt'])}, got {value!r}"
    if kind == "less_than_equal":
        return f"must be <= {_number(ctx['le'])}, got {value!r}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {value!r}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    expected = _EXPECTED.get(kind)
    if expected is not None:
        return f"must be {expected}, got {value!r}"
    msg = str(error["msg"])
    return f"{msg[:1].lower()}{msg[1:]}"


def setting_error(exc: ValidationError, root: type[BaseModel]) -> SettingError:
    """Return the first error of ``exc`` (raised validating ``root``) as a :class:`SettingError`.

    A validator that names a list position puts it at the front of its message (``[1]: unknown
    strategy 'x'``); that position joins the key (``strategies[1]``).
    """
    error = exc.errors()[0]
    key, text = format_loc(error["loc"]), describe(error, root)
    if error["type"] == "value_error" and text.startswith("[") and "]: " in text:
        pos, text = text.split(": ", 1)
        key += pos
    return SettingError(key, text, exc.error_count() - 1)


__all__ = ["SettingError", "Settings", "describe", "format_loc", "known_keys", "model_at", "setting_error", "submodel"]
