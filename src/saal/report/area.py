"""Areas under a budget curve: the one computation every report number of a whole run builds on.

Kept apart from :mod:`saal.report.statistics` so that reading runs (:mod:`saal.report.runs`, whose records know
their own AUBC) does not depend on the statistics that read them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def normalised_auc(labelled: Sequence[float] | np.ndarray, accuracy: Sequence[float] | np.ndarray) -> float:
    """Return ``trapezoid(accuracy, labelled) / (labelled[-1] - labelled[0])``.

    A single point (no acquisition) returns its accuracy.
    """
    x = np.asarray(labelled, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    if len(x) == 1 or x[-1] == x[0]:
        return float(y.mean())
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / (x[-1] - x[0]))


def aubc(labelled: Sequence[float] | np.ndarray, accuracy: Sequence[float] | np.ndarray) -> float:
    """Return the area under the budget curve: :func:`normalised_auc` from the first nonzero labelled count to the
    last, so it lies in [0, 1] for a metric in [0, 1].

    A point at 0 labels (a run started from no labels: the untrained model) is left out, as it says nothing of
    the strategy; a run that has only that point returns its value.
    """
    x = np.asarray(labelled, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    keep = x > 0
    if keep.any():
        x, y = x[keep], y[keep]
    return normalised_auc(x, y)


__all__ = ["aubc", "normalised_auc"]
