"""``saal score``: the per-instance scores of any strategy for a dataset split and a model, as CSV.

Also the model-loading options that ``saal analyze`` shares: a saved ``model.pt`` (``--weights``)
or a seeded fresh initialisation (``--seed``), optionally trained first on ``--train-on`` labelled
items.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saal.data import DatasetBundle, load_dataset
from saal.errors import SaalError
from saal.models import MODEL_NAMES, build_model
from saal.pool import Pool, initial_indices
from saal.training import TrainConfig, evaluate, fit

SPLITS = ("train", "test")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Add the dataset / model / weights options shared by ``saal score`` and ``saal analyze``."""
    p.add_argument("--dataset", default="digits", help="dataset name, folder:PATH or npz:PATH")
    p.add_argument("--data-dir", help="folder holding the standard dataset files [$SAAL_DATA_DIR or ~/.cache/saal]")
    p.add_argument("--model", default="mlp", help=f"model name: {', '.join(MODEL_NAMES)}")
    p.add_argument("--weights", help="a model.pt state_dict that `saal run` saved in a run folder")
    p.add_argument("--seed", type=int, default=0, help="seed: fresh initialisation (without --weights), subsets")
    p.add_argument(
        "--train-on",
        type=int,
        default=0,
        metavar="N",
        help="first train on N labelled train items (class-balanced when N is a multiple of the classes)",
    )
    p.add_argument("--epochs", type=int, default=30, help="epochs for --train-on")
    p.add_argument("--split", choices=SPLITS, default="train", help="which split to score (the pool)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


@dataclass
class PreparedModel:
    """A loaded dataset, a ready model, and the split it is scored on.

    Attributes:
        bundle: the dataset.
        model: the model (eval mode), weights loaded or seeded, trained if asked.
        pool: a pool over the scored split; items the model was trained on are labelled.
        description: a short line on where the weights came from.
    """

    bundle: DatasetBundle
    model: nn.Module
    pool: Pool
    description: str


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a saved state_dict (``model.pt``, or a ``checkpoint.pt`` holding one under ``"model"``).

    Raises:
        SaalError: a missing, unreadable or foreign file, or one that does not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise SaalError(f"weights file {path} does not exist; give the model.pt that `saal run` wrote in a run folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or pickled objects beyond tensors
        raise SaalError(
            f"{path} is not a readable PyTorch state_dict ({type(exc).__name__}); give a model.pt"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SaalError(f"{path} does not hold a state_dict of tensors; give the model.pt that `saal run` wrote")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} wrong shapes (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
    if problems:
        raise SaalError(
            f"{path} does not fit this model: {'; '.join(problems)}; pass the --model and --dataset it was trained with"
        )
    model.load_state_dict(state)


def prepare_model(args: argparse.Namespace) -> PreparedModel:
    """Load the dataset and the model the shared options describe, and train it if asked.

    Raises:
        SaalError: bad dataset, model, weights or sizes.
    """
    for key in ("train_on", "epochs"):
        if getattr(args, key) < (0 if key == "train_on" else 1):
            raise SaalError(f"--{key.replace('_', '-')} must be {'>= 0' if key == 'train_on' else '>= 1'}")
    bundle = load_dataset(args.dataset, args.data_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_model(args.model, bundle.input_shape, bundle.num_classes)
    source = f"seeded initialisation (seed {args.seed})"
    if args.weights:
        load_weights(model, args.weights)
        source = f"weights {args.weights}"
    try:
        model = model.to(torch.device(args.device)).eval()
    except (RuntimeError, AssertionError) as exc:  # a malformed name, or a device this machine lacks
        raise SaalError(f"cannot use device {args.device!r} ({str(exc).splitlines()[0]}); use --device cpu") from None
    trained = np.empty(0, dtype=np.int64)
    if args.train_on:
        n, c = args.train_on, bundle.num_classes
        trained = initial_indices(bundle.train_targets, n, args.seed, balanced=n % c == 0, num_classes=c)
        config = TrainConfig(epochs=args.epochs, batch_size=min(64, n))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            fit(model, bundle.train, trained, bundle.train_targets[trained], config, torch.Generator().manual_seed(0))
        accuracy = evaluate(model, bundle.test)
        source += f", trained on {n} labelled items for {args.epochs} epochs (test accuracy {100 * accuracy:.1f}%)"
    split = bundle.train if args.split == "train" else bundle.test
    pool = Pool(split, bundle.num_classes)
    if args.split == "train" and len(trained):
        pool.label(trained, bundle.train_targets[trained])
    return PreparedModel(bundle, model, pool, source)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``saal score``."""
    p = subparsers.add_parser(
        "score",
        help="write the per-instance scores of a strategy for a dataset split and a model",
        description=(
            "Score every unlabelled item of a split (or a seeded --subset) with any registered strategy "
            "spec, e.g. 'saal[score=diff]' or 'entropy', and write dataset_index, score, chosen (the "
            "strategy's choice of --k) and pick (the order of choice) to CSV."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--strategy", default="saal", help="a strategy spec, e.g. saal[rho=0.1,scope=last-layer]")
    p.add_argument("--k", type=int, default=10, help="how many the strategy chooses (the chosen flag)")
    p.add_argument("--subset", type=int, help="score only a seeded random subset of this many items")
    p.add_argument("--batch-size", type=int, help="items scored at once")
    p.add_argument("--out", default="scores.csv", help="CSV file to write")
    add_model_arguments(p)
    p.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> int:
    """Run ``saal score``; returns the exit code."""
    from saal.strategies import build_strategy

    strategy = build_strategy(args.strategy, subset=args.subset, batch_size=args.batch_size)
    prepared = prepare_model(args)
    selection = strategy.select(prepared.model, prepared.pool, args.k, np.random.default_rng(args.seed))
    pick = {int(i): r for r, i in enumerate(selection.indices)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scored = len(selection.scored_indices) > 0
    rows = selection.scored_indices if scored else selection.indices
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["dataset_index", "score", "chosen", "pick"])
        for pos, idx in enumerate(rows):
            score = f"{float(selection.scores[pos]):.9g}" if scored else ""
            r = pick.get(int(idx))
            writer.writerow([int(idx), score, int(r is not None), "" if r is None else r])
    print(f"model: {prepared.description}")
    if scored:
        print(f"wrote {len(rows)} scores of {args.strategy} on the {args.split} split to {out}")
    else:
        print(f"{args.strategy} scores nothing; wrote its {len(rows)} chosen items with an empty score column to {out}")
    print(f"chosen ({args.k}, in order): {' '.join(str(int(i)) for i in selection.indices)}")
    return 0
