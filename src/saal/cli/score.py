"""``saal score``: the per-instance scores of any strategy for a dataset split and a model, as CSV."""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, field_validator

from saal.cli.detection_outputs import write_detection_outputs
from saal.cli.model_options import MODEL_FLAGS, ModelOptions, add_model_arguments
from saal.cli.options import add_option, given, validate_options
from saal.core.progress import with_progress
from saal.core.scoring_job import ScoringJob
from saal.errors import SaalError
from saal.strategies import Selection, build_strategy
from saal.tasks.detection import Detection

FLAGS = {
    "strategy": "--strategy",
    "k": "--k",
    "subset": "--subset",
    "batch_size": "--batch-size",
    "out": "--out",
    "work_dir": "--work-dir",
    "dist_timeout": "--dist-timeout",
}


class ScoreOptions(ModelOptions):
    """The options of ``saal score``."""

    strategy: str = "saal"
    k: int = 10
    subset: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    out: str = "scores.csv"
    work_dir: str | None = None
    dist_timeout: float = Field(default=120.0, gt=0)

    @field_validator("k")
    @classmethod
    def _positive_k(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"the query size (how many the strategy chooses) must be at least 1, got {value}")
        return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``saal score`` on the ``saal`` command's subparsers."""
    p = subparsers.add_parser(
        "score",
        help="write the per-instance scores of a strategy for a dataset split and a model",
        description=(
            "Score every unlabelled item of a split (or a seeded --subset) with any registered strategy "
            "spec, e.g. 'saal[score=diff]' or 'entropy', and write dataset_index, score, chosen (the "
            "strategy's choice of --k) and pick (the order of choice) to CSV."
        ),
    )
    m = ScoreOptions
    add_option(p, "--strategy", m, "strategy", "a strategy spec, e.g. saal[rho=0.1,scope=last-layer]")
    add_option(p, "--k", m, "k", "how many the strategy chooses (the chosen flag)", type=int)
    add_option(
        p,
        "--subset",
        m,
        "subset",
        "score only a seeded random subset of this many items",
        shown_default="all",
        type=int,
    )
    add_option(p, "--batch-size", m, "batch_size", "items scored at once", shown_default="the strategy's own", type=int)
    add_option(p, "--out", m, "out", "CSV file to write")
    add_option(
        p,
        "--work-dir",
        m,
        "work_dir",
        "folder keeping finished pieces of the scoring, reused when the same command is run again",
        shown_default="OUT.parts under torchrun, none in one process",
    )
    add_option(
        p,
        "--dist-timeout",
        m,
        "dist_timeout",
        "seconds to wait for the other ranks under torchrun (joining, and every exchange)",
        type=float,
    )
    add_model_arguments(p, m)
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress on stderr (by default long scans and selections show a bar on a terminal, "
        "else a line every few seconds)",
    )
    p.set_defaults(func=with_progress(run_score))


def options_from_args(args: argparse.Namespace) -> ScoreOptions:
    """Return the validated options of ``saal score``.

    Raises:
        SaalError: ``--option: what is wrong`` for the first bad value.
    """
    values, flags = given(args, {**FLAGS, **MODEL_FLAGS})
    return validate_options(ScoreOptions, values, flags)


def run_score(args: argparse.Namespace) -> int:
    """Run ``saal score``.

    Returns:
        The exit code, 0.

    Raises:
        SaalError: a bad option, strategy, dataset or weights file, raised before the CSV is written.
    """
    opts = options_from_args(args)
    out = Path(opts.out)
    if out.is_dir():
        raise SaalError(f"--out: {out} is a folder; give the path of the CSV file to write")
    with torch.random.fork_rng(devices=[]):
        strategy = build_strategy(opts.strategy, subset=opts.subset, batch_size=opts.batch_size)
    # Under torchrun every rank scores its share of the pool and rank 0 alone writes (saal.core.scoring_job).
    settings = opts.model_dump(exclude={"out", "work_dir", "dist_timeout"})
    job = ScoringJob(settings, device=opts.device, timeout_s=opts.dist_timeout)
    try:
        prepared = opts.prepare()
        pool = prepared.pool
        job.check_items(min(opts.subset or pool.num_unlabelled, pool.num_unlabelled))
        extra: tuple[Path, Path] | None = None
        work_dir = opts.work_dir or (f"{out}.parts" if job.world_size > 1 else None)
        selection = job.run(
            lambda: strategy.select(prepared.model, pool, opts.k, np.random.default_rng(opts.seed)),
            prepared.model,
            work_dir,
        )
        scored = len(selection.scored_indices) > 0
        rows = selection.scored_indices if scored else selection.indices
        if job.is_main:
            _write_scores(out, selection, rows, scored)
            if isinstance(pool.task, Detection):
                extra = write_detection_outputs(
                    out,
                    prepared.model,
                    pool.dataset,
                    pool.task,
                    rows,
                    selection.scores if scored else None,
                    selection.indices,
                    getattr(strategy, "score_threshold", None),
                )
        job.finish(work_dir)
    finally:
        job.close()
    if not job.is_main:
        return 0
    if job.pieces_reused:
        print(f"resumed: reused {job.pieces_reused} finished pieces from {work_dir}, computed {job.pieces_computed}")
    print(f"model: {prepared.description}")
    if scored:
        print(f"wrote {len(rows)} scores of {opts.strategy} on the {opts.split} split to {out}")
    else:
        print(f"{opts.strategy} scores nothing; wrote its {len(rows)} chosen items with an empty score column to {out}")
    print(f"chosen ({opts.k}, in order): {' '.join(str(int(i)) for i in selection.indices)}")
    if extra:
        print(f"pseudo boxes of every scored image: {extra[0]}; the top {min(len(rows), 8)} drawn: {extra[1]}")
    return 0


def _write_scores(out: Path, selection: Selection, rows: np.ndarray, scored: bool) -> None:
    """Write the CSV atomically: a temporary file beside ``out``, renamed over it once complete."""
    pick = {int(i): r for r, i in enumerate(selection.indices)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["dataset_index", "score", "chosen", "pick"])
            for pos, idx in enumerate(rows):
                score = f"{float(selection.scores[pos]):.9g}" if scored else ""
                r = pick.get(int(idx))
                writer.writerow([int(idx), score, int(r is not None), "" if r is None else r])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
