"""The one exception type that user-facing mistakes raise.

The CLI turns a :class:`SaalError` into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SaalError(ValueError):
    """A mistake in the user's input: the message says what is wrong and what to do."""


class RunInProgress(SaalError):
    """A run folder that another process is running right now (see :mod:`saal.experiment.folder_lock`)."""
