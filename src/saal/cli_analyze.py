"""``saal analyze``: how SAAL's score relates to loss, gradient norm and sharpness on a pool subset."""

from __future__ import annotations

import argparse
import math

import numpy as np

from saal.cli_score import add_model_arguments, prepare_model
from saal.errors import SaalError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``saal analyze``."""
    p = subparsers.add_parser(
        "analyze",
        help="correlate SAAL's score with loss, rho*||g|| and 0.5*rho^2*lambda_1 on a pool subset",
        description=(
            "For a model (--weights, or a seeded fresh init, optionally trained with --train-on N) and a seeded "
            "random subset of the pool, compute each instance's loss under its pseudo label, rho*||g||, "
            "0.5*rho^2*lambda_1 (top Hessian eigenvalue by power iteration) and its SAAL score; write "
            "terms.csv, correlations.json and scatter.png under --out and print the Pearson correlations."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--subset", type=int, default=500, help="instances analysed (a seeded random subset of the pool)")
    p.add_argument("--rho", type=float, default=0.05, help="perturbation radius")
    p.add_argument(
        "--perturbation",
        default="sam",
        help="sam (terms ||g||, lambda_1(H): the paper's expansion) or asam (||T g||, lambda_1(T H T))",
    )
    p.add_argument("--score", default="max", help="SAAL score: max or diff")
    p.add_argument("--power-iters", type=int, default=20, help="power-iteration steps for lambda_1")
    p.add_argument("--batch-size", type=int, default=64, help="items handled at once")
    p.add_argument("--out", default="runs/analysis", help="output folder")
    add_model_arguments(p)
    p.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``saal analyze``; returns the exit code."""
    from saal.analysis import analyze, write_analysis

    if args.subset < 2:
        raise SaalError(f"--subset must be at least 2 to correlate anything, got {args.subset}")
    if args.batch_size < 1:
        raise SaalError(f"--batch-size must be at least 1, got {args.batch_size}")
    prepared = prepare_model(args)
    rng = np.random.default_rng(args.seed)
    candidates = prepared.pool.unlabelled_indices()
    if args.subset < len(candidates):
        candidates = np.sort(rng.choice(candidates, size=args.subset, replace=False))
    result = analyze(
        prepared.model,
        prepared.pool.dataset,
        candidates,
        rho=args.rho,
        perturbation=args.perturbation,
        score=args.score,
        power_iters=args.power_iters,
        batch_size=args.batch_size,
        generator=rng,
    )
    meta = {
        "dataset": args.dataset,
        "split": args.split,
        "model": args.model,
        "model_source": prepared.description,
        "seed": args.seed,
    }
    paths = write_analysis(result, args.out, meta)
    print(f"model: {prepared.description}")
    print(f"Pearson correlation with the SAAL {args.score} score over {len(candidates)} instances:")
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
