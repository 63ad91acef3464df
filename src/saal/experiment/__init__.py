"""Active-learning experiments: one run's rounds (:mod:`.loop`), its folder's files (:mod:`.storage`), and grids
of runs sharing an output folder (:mod:`.grid`), locked against a second process (:mod:`.folder_lock`).

One *run* is one (strategy, seed): rounds of train -> evaluate -> acquire -> label, resumable after any
round from its folder. A *grid* runs every strategy x every seed of an :class:`ExperimentSpec`.
"""

from saal.errors import RunInProgress, SaalError
from saal.experiment.folder_lock import folder_lock
from saal.experiment.grid import accuracy_table, check_device, check_grid, rows_of_folder, run_grid
from saal.experiment.loop import ActiveLearningRun, RoundResult, build_run_strategy, describe_run, seed_streams
from saal.experiment.storage import (
    DEFAULT_METRIC,
    INFORMATIONAL,
    RESUME_IGNORED,
    ROUND_FIELDS,
    check_run_folder,
    read_rounds,
    round_fields,
    run_folder,
    slug,
    write_summary,
)
from saal.settings import ExperimentSpec, RunConfig, TrainConfig

__all__ = [
    "DEFAULT_METRIC",
    "INFORMATIONAL",
    "RESUME_IGNORED",
    "ROUND_FIELDS",
    "ActiveLearningRun",
    "ExperimentSpec",
    "RoundResult",
    "RunConfig",
    "RunInProgress",
    "SaalError",
    "TrainConfig",
    "accuracy_table",
    "build_run_strategy",
    "check_device",
    "check_grid",
    "check_run_folder",
    "describe_run",
    "folder_lock",
    "read_rounds",
    "round_fields",
    "rows_of_folder",
    "run_folder",
    "run_grid",
    "seed_streams",
    "slug",
    "write_summary",
]
