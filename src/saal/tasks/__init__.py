"""Tasks: what a label, a batch, a loss, an embedding and a metric are for one kind of prediction."""

from saal.tasks.base import Metric, Task, check_task_support
from saal.tasks.classification import Classification

__all__ = ["Classification", "Metric", "Task", "check_task_support"]
