"""A dataset, a ready model and the pool it is scored on: saved weights or a seeded initialisation, trained if asked.

``saal score`` and ``saal analyze`` both start from :func:`prepare_model`; :func:`load_weights`
loads a ``model.pt`` that ``saal run`` saved (or a ``checkpoint.pt`` holding one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from saal.data import DatasetBundle, load_dataset
from saal.errors import SaalError
from saal.models import build_model
from saal.pool import Pool, initial_indices
from saal.settings import TrainConfig
from saal.training import evaluate, fit

SPLITS = ("train", "test")
Split = Literal["train", "test"]


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


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a saved state_dict (``model.pt``, or a ``checkpoint.pt`` holding one under ``"model"``) into ``model``.

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


def prepare_model(
    dataset: str = "digits",
    model: str = "mlp",
    *,
    data_dir: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    train_on: int = 0,
    epochs: int = 30,
    split: Split = "train",
    device: str = "cpu",
) -> PreparedModel:
    """Load ``dataset`` and a ``model`` for it, and train the model first if asked.

    Args:
        dataset, data_dir: the dataset (a registry name, ``folder:PATH`` or ``npz:PATH``) and where its files are.
        model: a registry model name.
        weights: a ``model.pt`` to load (None: a fresh initialisation seeded with ``seed``).
        seed: seeds the fresh initialisation, the training and the labelled items.
        train_on: first train on this many labelled train items (class-balanced when a multiple of the
            classes); 0 trains nothing.
        epochs: training epochs for ``train_on``.
        split: the split the returned pool covers.
        device: the torch device the model is moved to.

    Returns:
        A :class:`PreparedModel`.

    Raises:
        SaalError: bad dataset, model, weights, device or sizes.
    """
    if train_on < 0:
        raise SaalError(f"train_on must be >= 0, got {train_on}")
    if epochs < 1:
        raise SaalError(f"epochs must be >= 1, got {epochs}")
    if split not in SPLITS:
        raise SaalError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    bundle = load_dataset(dataset, data_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(model, bundle.input_shape, bundle.num_classes, task=bundle.task.name)
    source = f"seeded initialisation (seed {seed})"
    if weights:
        load_weights(net, weights)
        source = f"weights {weights}"
    try:
        net = net.to(torch.device(device)).eval()
    except (RuntimeError, AssertionError) as exc:  # a malformed name, or a device this machine lacks
        raise SaalError(f"cannot use device {device!r} ({str(exc).splitlines()[0]}); use --device cpu") from None
    trained = np.empty(0, dtype=np.int64)
    detection = bundle.task.name == "detection"
    if train_on and detection:  # detection: a uniform labelled set, batches of 2 images, mAP
        trained, source = _train_detector(net, bundle, train_on, epochs, seed, source)
    elif train_on:
        n, c = train_on, bundle.num_classes
        if n > len(bundle.train_targets):
            raise SaalError(f"cannot train on {n} items: the train split has {len(bundle.train_targets)}")
        trained = initial_indices(bundle.train_targets, n, seed, balanced=n % c == 0, num_classes=c)
        config = TrainConfig(epochs=epochs, batch_size=min(64, n))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fit(net, bundle.train, trained, bundle.train_targets[trained], config, torch.Generator().manual_seed(0))
        accuracy = evaluate(net, bundle.test)
        source += f", trained on {n} labelled items for {epochs} epochs (test accuracy {100 * accuracy:.1f}%)"
    scored_split = bundle.train if split == "train" else bundle.test
    pool = Pool(scored_split, task=bundle.task) if detection else Pool(scored_split, bundle.num_classes)
    if split == "train" and len(trained):
        pool.label(trained, bundle.train_targets[trained])
    return PreparedModel(bundle, net, pool, source)


def _train_detector(
    net: nn.Module, bundle: DatasetBundle, n: int, epochs: int, seed: int, source: str
) -> tuple[np.ndarray, str]:
    """Train a detector on ``n`` seeded uniform train images; return them and the description with its mAP@0.5.

    Raises:
        SaalError: more images than the train split has.
    """
    if n > len(bundle.train_targets):
        raise SaalError(f"cannot train on {n} items: the train split has {len(bundle.train_targets)}")
    task = bundle.task
    trained = initial_indices(bundle.train_targets, n, seed, balanced=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = TrainConfig(epochs=epochs, batch_size=2)
        generator = torch.Generator().manual_seed(0)
        fit(net, bundle.train, trained, bundle.train_targets[trained], config, generator, task=task)
    score = task.evaluate(net, bundle.test)
    done = f"trained on {n} labelled images for {epochs} epochs (test {score.name} {100 * score.value:.1f}%)"
    return trained, f"{source}, {done}"


__all__ = ["SPLITS", "PreparedModel", "load_weights", "prepare_model"]
