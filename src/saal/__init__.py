"""saal: Sharpness-Aware Active Learning (Kim et al., ICML 2023) and its baselines, for PyTorch."""

from saal.errors import SaalError
from saal.pool import Pool, initial_indices
from saal.strategies import Selection, Strategy, build_strategy, strategy_names

__version__ = "0.1.0"

__all__ = [
    "Pool",
    "SaalError",
    "Selection",
    "Strategy",
    "__version__",
    "build_strategy",
    "initial_indices",
    "strategy_names",
]
