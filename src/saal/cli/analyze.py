"""``saal analyze``: how SAAL's score relates to loss, gradient norm and sharpness on a pool subset."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from saal.analysis import analyze, write_analysis
from saal.cli.model_options import MODEL_FLAGS, ModelOptions, add_model_arguments
from saal.cli.options import add_option, given, validate_options
from saal.errors import SaalError
from saal.sharpness import PERTURBATIONS, check_option

FLAGS = {
    "subset": "--subset",
    "rho": "--rho",
    "perturbation": "--perturbation",
    "score": "--score",
    "power_iters": "--power-iters",
    "batch_size": "--batch-size",
    "out": "--out",
}
SCORES = ("max", "diff")


class AnalyzeOptions(ModelOptions):
    """The options of ``saal analyze``."""

    subset: int = Field(default=500, ge=2)
    rho: float = Field(default=0.05, ge=0)
    perturbation: str = "sam"
    score: str = "max"
    power_iters: int = Field(default=20, ge=1)
    batch_size: int = Field(default=64, ge=1)
    out: str = "runs/analysis"

    @field_validator("perturbation")
    @classmethod
    def _known_perturbation(cls, value: str) -> str:
        return check_option("perturbation", value, PERTURBATIONS)

    @field_validator("score")
    @classmethod
    def _known_score(cls, value: str) -> str:
        return check_option("score", value, SCORES)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``saal analyze`` on the ``saal`` command's subparsers."""
    p = subparsers.add_parser(
        "analyze",
        help="correlate SAAL's score with loss, rho*||g|| and 0.5*rho^2*lambda_1 on a pool subset",
        description=(
            "For a model (--weights, or a seeded fresh init, optionally trained with --train-on N) and a seeded "
            "random subset of the pool, compute each instance's loss under its pseudo label, rho*||g||, "
            "0.5*rho^2*lambda_1 (top Hessian eigenvalue by power iteration) and its SAAL score; write "
            "terms.csv, correlations.json and scatter.png under --out and print the Pearson correlations."
        ),
    )
    m = AnalyzeOptions
    add_option(p, "--subset", m, "subset", "instances analysed (a seeded random subset of the pool), at least 2",
               type=int)  # fmt: skip
    add_option(p, "--rho", m, "rho", "perturbation radius", type=float)
    add_option(
        p,
        "--perturbation",
        m,
        "perturbation",
        "sam (terms ||g||, lambda_1(H): the paper's expansion) or asam (||T g||, lambda_1(T H T))",
    )
    add_option(p, "--score", m, "score", "SAAL score: max or diff")
    add_option(p, "--power-iters", m, "power_iters", "power-iteration steps for lambda_1", type=int)
    add_option(p, "--batch-size", m, "batch_size", "items handled at once", type=int)
    add_option(p, "--out", m, "out", "output folder")
    add_model_arguments(p, m)
    p.set_defaults(func=run_analyze)


def options_from_args(args: argparse.Namespace) -> AnalyzeOptions:
    """Return the validated options of ``saal analyze``.

    Raises:
        SaalError: ``--option: what is wrong`` for the first bad value.
    """
    values, flags = given(args, {**FLAGS, **MODEL_FLAGS})
    return validate_options(AnalyzeOptions, values, flags)


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``saal analyze``.

    Returns:
        The exit code, 0.

    Raises:
        SaalError: a bad option, dataset or weights file, raised before anything is written.
    """
    opts = options_from_args(args)
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise SaalError(f"--out: {opts.out} is a file; give a folder for the analysis")
    prepared = opts.prepare()
    rng = np.random.default_rng(opts.seed)
    candidates = prepared.pool.unlabelled_indices()
    if opts.subset < len(candidates):
        candidates = np.sort(rng.choice(candidates, size=opts.subset, replace=False))
    result = analyze(
        prepared.model,
        prepared.pool.dataset,
        candidates,
        rho=opts.rho,
        perturbation=opts.perturbation,
        score=opts.score,
        power_iters=opts.power_iters,
        batch_size=opts.batch_size,
        generator=rng,
    )
    meta = {
        "dataset": opts.dataset,
        "split": opts.split,
        "model": opts.model,
        "model_source": prepared.description,
        "seed": opts.seed,
    }
    paths = write_analysis(result, opts.out, meta)
    print(f"model: {prepared.description}")
    print(f"Pearson correlation with the SAAL {opts.score} score over {len(candidates)} instances:")
    names = {
        "loss": "loss",
        "grad_term": "rho*||T g||" if result.settings["perturbation"] == "asam" else "rho*||g||",
        "sharpness_term": "0.5*rho^2*lambda_1",
        "second_order": "loss + both terms",
    }
    for key, r in result.correlations().items():
        print(f"  {names[key]:<22} {'nan' if math.isnan(r) else f'{r:+.3f}'}")
    print(f"wrote {paths['csv']}, {paths['json']}, {paths['png']}")
    return 0
