"""saal: Sharpness-Aware Active Learning (Kim et al., ICML 2023) and its baselines, for PyTorch."""

from saal.data import load_dataset
from saal.errors import SaalError
from saal.models import build_model
from saal.pool import Pool, initial_indices
from saal.settings import TrainConfig
from saal.strategies import Selection, Strategy, build_strategy, strategy_names
from saal.tasks import Classification, Metric, Task
from saal.training import evaluate, fit

__version__ = "0.2.0.dev0"

__all__ = [
    "Classification",
    "Metric",
    "Pool",
    "SaalError",
    "Selection",
    "Strategy",
    "Task",
    "TrainConfig",
    "__version__",
    "build_model",
    "build_strategy",
    "evaluate",
    "fit",
    "initial_indices",
    "load_dataset",
    "strategy_names",
]
