"""The dataset / model / weights options that ``saal score`` and ``saal analyze`` share."""

from __future__ import annotations

import argparse
from typing import Literal

from pydantic import Field

from saal.cli.options import add_option
from saal.model_loading import PreparedModel, prepare_model
from saal.models import MODEL_NAMES
from saal.settings import DatasetName, DeviceName, ModelName
from saal.validation import Settings

# model key -> option
MODEL_FLAGS = {
    "dataset": "--dataset",
    "data_dir": "--data-dir",
    "model": "--model",
    "weights": "--weights",
    "seed": "--seed",
    "train_on": "--train-on",
    "epochs": "--epochs",
    "split": "--split",
    "device": "--device",
}


class ModelOptions(Settings):
    """Which dataset and model to load, and how to prepare the model (see :func:`saal.model_loading.prepare_model`)."""

    dataset: DatasetName = "digits"
    data_dir: str | None = None
    model: ModelName = "mlp"
    weights: str | None = None
    seed: int = Field(default=0, ge=0)
    train_on: int = Field(default=0, ge=0)
    epochs: int = Field(default=30, ge=1)
    split: Literal["train", "test"] = "train"
    device: DeviceName = "cpu"

    def prepare(self) -> PreparedModel:
        """Return the loaded dataset and the ready model these options describe.

        Raises:
            SaalError: bad dataset files, weights, device or sizes.
        """
        return prepare_model(
            self.dataset,
            self.model,
            data_dir=self.data_dir,
            weights=self.weights,
            seed=self.seed,
            train_on=self.train_on,
            epochs=self.epochs,
            split=self.split,
            device=self.device,
        )


def add_model_arguments(p: argparse.ArgumentParser, model: type[ModelOptions]) -> None:
    """Add the options of :class:`ModelOptions` to ``p``, with the defaults of ``model``."""
    add_option(
        p, "--dataset", model, "dataset", "dataset name, folder:PATH, npz:PATH, npy:FOLDER, voc:PATH or coco:PATH"
    )
    add_option(
        p,
        "--data-dir",
        model,
        "data_dir",
        "folder holding the standard dataset files",
        shown_default="$SAAL_DATA_DIR or ~/.cache/saal",
    )
    add_option(p, "--model", model, "model", f"model name: {', '.join(MODEL_NAMES)}")
    add_option(
        p,
        "--weights",
        model,
        "weights",
        "a model.pt state_dict that `saal run` saved in a run folder",
        shown_default="a seeded fresh initialisation",
    )
    add_option(p, "--seed", model, "seed", "seed: fresh initialisation (without --weights), subsets", type=int)
    add_option(
        p,
        "--train-on",
        model,
        "train_on",
        "first train on N labelled train items (class-balanced when N is a multiple of the classes)",
        metavar="N",
        type=int,
    )
    add_option(p, "--epochs", model, "epochs", "epochs for --train-on", type=int)
    add_option(p, "--split", model, "split", "which split to score (the pool): train or test")
    add_option(p, "--device", model, "device", "torch device, e.g. cpu or cuda")


__all__ = ["MODEL_FLAGS", "ModelOptions", "add_model_arguments"]
