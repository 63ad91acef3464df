"""Optional dependencies: a missing one is a one-line error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from saal.errors import SaalError


class MissingExtra(SaalError):
    """An optional package that a feature needs is not installed."""


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``, the optional dependency that ``feature`` needs.

    Returns:
        The imported module.

    Raises:
        MissingExtra: the module is not installed; the message names ``pip install 'saal[extra]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(
            f"{feature} needs the optional package {module!r} ({error}); install it with: pip install 'saal[{extra}]'"
        ) from None
