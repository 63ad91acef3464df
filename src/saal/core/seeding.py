"""Seeds and generators: one place where every random choice gets its source."""

from __future__ import annotations

import numpy as np


def as_generator(generator: np.random.Generator | int | None) -> np.random.Generator:
    """Return a numpy ``Generator``: the one given, or a new one seeded with an int.

    ``None`` gives a fresh, unseeded generator (not reproducible).
    """
    if isinstance(generator, np.random.Generator):
        return generator
    if generator is None or isinstance(generator, (int, np.integer)):
        return np.random.default_rng(generator)
    raise TypeError(f"expected a numpy Generator or an int seed, got {type(generator).__name__}")


def derive_seed(rng: np.random.Generator) -> int:
    """Draw a seed for a sub-component from ``rng``."""
    return int(rng.integers(0, 2**31 - 1))
