"""The files of a run folder: what identifies a run, its rounds, its checkpoint, and how they are written.

A run folder (``OUT/<strategy slug>/seed-<seed>``) holds:

- ``config.json``: the run's record (:func:`run_record`). Part of it identifies the run: the strategy spec as
  given, the seed and every setting that changes results (:class:`~saal.settings.RunConfig` less
  :data:`RESUME_IGNORED`). The rest is informational and never compared (:data:`INFORMATIONAL`: the saal
  version, the task, the metric, the strategy's resolved options and ``repr``, the seed streams), so that a
  later saal, whose strategies gained options or whose records gained fields, still resumes the folder.
- ``rounds.json`` (one row per round; the metric stored under its name, e.g. ``accuracy``; which strategy made the
  round's acquisition and why, ``acquired_by`` and ``reason``; round 0's ``start``: how the initial set was chosen)
  and ``rounds.csv`` (the same but ``start``, ``per_class``, ``details`` and ``stopped``). A classification run's rows
  carry ``kappa``: Cohen's kappa between this round's and the previous round's predictions on the stop set (null
  at round 0; :mod:`saal.stopping`); the round where ``--stop-when stable`` ended the run carries ``"stopped":
  true``. Rows written before saal recorded ``acquired_by`` or ``kappa`` lack them and are written back as they
  were.
- ``checkpoint.pt``: everything needed to continue; ``model.pt`` once finished.

Every file is written atomically (a temporary file, then a rename), so a run killed at any moment leaves
each file either as it was or complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from saal.errors import SaalError
from saal.settings import RunConfig

# Settings that may change between a run and its resumption: they do not change its results (the device
# changes the last bits at most; the data folder is where the same data lies). ``score_batch_size`` is NOT
# among them: BALD's Monte-Carlo dropout masks fall on items by batch, so the batch size changes its choices.
RESUME_IGNORED = frozenset({"device", "data_dir"})
# config.json fields recorded for people and tools, never compared on resume.
INFORMATIONAL = frozenset({"strategy_repr", "strategy_options", "seed_streams", "task", "metric", "saal_version"})
# config.json fields that say which run of a protocol a folder holds (the strategy and the seed).
RUN_KEYS = ("strategy", "seed")
# The metric a folder without a ``metric`` field (written by saal 0.1.0, classification only) stores.
DEFAULT_METRIC = "accuracy"
# The fields of a round row other than its metric.
ROW_KEYS = (
    "round",
    "labelled",
    "train_seconds",
    "acquire_seconds",
    "chosen",
    "acquired_by",
    "reason",
    "start",
    "per_class",
    "details",
    "kappa",
    "stopped",
)
# The columns that say which strategy made each round's acquisition and why (rows of older saal lack them).
ACQUISITION_FIELDS = ("acquired_by", "reason")
# The column of the stopping rule's measure (rows of older saal, and of detection runs, lack it).
STABILITY_FIELDS = ("kappa",)
CONFIG_FILE = "config.json"
ROUNDS_FILE = "rounds.json"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"


# -- names ----------------------------------------------------------------------------------
def slug(spec: str) -> str:
    """Return a folder-safe name for a strategy spec (``saal[scope=last-layer]`` -> ``saal_scope=last-layer``)."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", spec.replace("[", "_").replace("]", "")).strip("_")


def run_folder(out: str | os.PathLike[str], spec: str, seed: int) -> Path:
    """Return the folder of one (strategy, seed) run under ``out``."""
    return Path(out) / slug(spec) / f"seed-{seed}"


def round_fields(metric: str = DEFAULT_METRIC) -> tuple[str, ...]:
    """Return the columns of ``rounds.csv`` for a run that stores ``metric`` (classification: ``accuracy``), less
    :data:`ACQUISITION_FIELDS` (which follow when the rows record them)."""
    return ("round", "labelled", metric, "train_seconds", "acquire_seconds", "chosen")


def records_acquisition(rows: Iterable[Mapping[str, Any]]) -> bool:
    """Return whether any of ``rows`` records who made its acquisition (``acquired_by``; older rows do not)."""
    return any("acquired_by" in row for row in rows)


def records_kappa(rows: Iterable[Mapping[str, Any]]) -> bool:
    """Return whether any of ``rows`` records the stopping rule's ``kappa`` (rows of older saal and of detection
    runs do not)."""
    return any("kappa" in row for row in rows)


def extra_fields(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """Return the optional columns ``rows`` call for, in order: :data:`ACQUISITION_FIELDS` when a row records
    who acquired, then :data:`STABILITY_FIELDS` when a row records a kappa."""
    return (ACQUISITION_FIELDS if records_acquisition(rows) else ()) + (STABILITY_FIELDS if records_kappa(rows) else ())


def run_finished(config: Mapping[str, Any], rows: list[dict[str, Any]]) -> bool:
    """Return whether a run folder's run is finished: every round done (``rounds + 1`` rows; ``rounds`` from its
    ``config.json``), or ended early by its stopping rule (its last row says ``"stopped": true``)."""
    return len(rows) >= int(config.get("rounds", 0)) + 1 or bool(rows and rows[-1].get("stopped"))


ROUND_FIELDS = round_fields()


def metric_of_config(config: Mapping[str, Any]) -> str:
    """Return the metric a run's ``config.json`` says its rounds store (``accuracy`` when it says none: 0.1.0)."""
    metric = config.get("metric")
    return metric if isinstance(metric, str) and metric else DEFAULT_METRIC


def metric_of_rows(rows: Iterable[Mapping[str, Any]]) -> str:
    """Return the metric round rows store: ``accuracy`` if any row has it, else the first other score key.

    Rows may carry ``strategy`` and ``seed`` (a grid's rows) besides the fields of :data:`ROW_KEYS`.
    """
    others: list[str] = []
    for row in rows:
        if DEFAULT_METRIC in row:
            return DEFAULT_METRIC
        others += [k for k in row if k not in ROW_KEYS and k not in RUN_KEYS and k not in others]
    return others[0] if others else DEFAULT_METRIC


# -- what identifies a run --------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """Return ``value`` as plain JSON values (tuples become lists; anything JSON lacks becomes its ``repr``)."""
    return json.loads(json.dumps(value, default=repr))


def setting_defaults() -> dict[str, Any]:
    """Return today's default of every setting (``RunConfig().to_dict()`` as JSON values)."""
    return jsonable(RunConfig().to_dict())


def run_record(
    config: RunConfig,
    spec: str,
    seed: int,
    *,
    strategy_repr: str,
    strategy_options: Mapping[str, Any],
    seed_streams: Mapping[str, int],
    task: Mapping[str, Any],
    metric: str,
) -> dict[str, Any]:
    """Return what a run's ``config.json`` holds: its identity, then the informational fields.

    Returns:
        ``{"strategy", "strategy_repr", "seed", "seed_streams", <every RunConfig setting>, "strategy_options",
        "task", "metric", "saal_version"}`` as JSON values (the layout of saal 0.1.0 plus the new fields).
    """
    from saal import __version__

    return jsonable(
        {
            "strategy": spec,
            "strategy_repr": strategy_repr,
            "seed": int(seed),
            "seed_streams": dict(seed_streams),
            **config.to_dict(),
            "strategy_options": dict(strategy_options),
            "task": dict(task),
            "metric": metric,
            "saal_version": __version__,
        }
    )


def with_defaults(record: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``record`` with every setting it lacks set to its default, nested dicts included.

    A setting added after a folder was written is missing from its ``config.json``; the run used what is now
    that setting's default (the behaviour before the setting existed), so that is what it is compared as.
    """
    out = dict(record)
    for key, default in defaults.items():
        if key not in out:
            out[key] = default
        elif isinstance(default, dict) and default and isinstance(out[key], dict):
            out[key] = with_defaults(out[key], default)
    return out


def identity(record: Mapping[str, Any], ignore: Iterable[str] = RESUME_IGNORED) -> dict[str, Any]:
    """Return the part of a ``config.json`` that must match for a folder to be resumed, defaults filled in.

    Informational fields (:data:`INFORMATIONAL`) and ``ignore`` (default :data:`RESUME_IGNORED`) are left out.
    """
    dropped = INFORMATIONAL | frozenset(ignore)
    return {k: v for k, v in with_defaults(record, setting_defaults()).items() if k not in dropped}


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """Return the dotted key of the first difference (keys sorted) between two JSON-like values, None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else prefix.rstrip(".")


def lookup(d: Any, dotted: str) -> Any:
    """Return the value at a dotted key of nested dicts (None where a part is missing)."""
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def read_json_dict(path: Path, what: str, remedy: str) -> dict[str, Any]:
    """Return a JSON object read from ``path``.

    Raises:
        SaalError: the file is unreadable or not a JSON object (``what`` names it, ``remedy`` says what to do).
    """
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise SaalError(f"{path} is unreadable; {remedy}") from None
    if not isinstance(value, dict):
        raise SaalError(f"{path} is not {what}; {remedy}")
    return value


def check_run_folder(folder: str | os.PathLike[str], record: Mapping[str, Any]) -> bool:
    """Return whether ``folder`` already holds the run ``record`` describes (False: no ``config.json`` yet).

    Only the identity is compared (:func:`identity`); a setting the folder's file lacks counts as its default.
    Nothing is written.

    Raises:
        SaalError: the folder holds a run with another identity (one line naming the first differing key), or
            an unreadable ``config.json``.
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.exists():
        return False
    remedy = f"delete {folder} or choose another --out"
    theirs = identity(read_json_dict(path, "a run's config", remedy))
    mine = identity(jsonable(dict(record)))
    key = first_difference(theirs, mine)
    if key is not None:
        raise SaalError(
            f"{folder} holds a different run ({key}: {lookup(theirs, key)!r} there, {lookup(mine, key)!r} now); "
            "choose another --out or delete that folder"
        )
    return True


# -- writing ----------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` through a synced temporary file and a rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_config(folder: Path, record: Mapping[str, Any]) -> None:
    """Create ``folder`` if needed and write ``config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / CONFIG_FILE, json.dumps(dict(record), indent=2))


def rounds_csv(rows: list[dict[str, Any]], metric: str = DEFAULT_METRIC) -> str:
    """Return ``rounds.csv``'s text: :func:`round_fields` columns, then ``acquired_by`` and ``reason``, then
    ``kappa``, each when a row records it (:func:`extra_fields`; empty in rows that do not, and where the value is
    null), floats with 6 decimals, chosen space-separated; a value holding a comma or a quote is quoted as CSV
    does."""
    fields = round_fields(metric) + extra_fields(rows)
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        values = [row.get(f, "") if f != "chosen" else " ".join(map(str, row[f])) for f in fields]
        writer.writerow(["" if v is None else f"{v:.6f}" if isinstance(v, float) else str(v) for v in values])
    return text.getvalue()


def write_rounds(folder: Path, rows: list[dict[str, Any]], metric: str = DEFAULT_METRIC) -> None:
    """Write ``rounds.json`` and ``rounds.csv`` from round rows, unless ``rounds.json`` already says the same."""
    text = json.dumps(rows, indent=1)
    path = folder / ROUNDS_FILE
    if path.exists() and path.read_text() == text:
        return
    atomic_write_text(path, text)
    atomic_write_text(folder / "rounds.csv", rounds_csv(rows, metric))


def save_model(folder: Path, state_dict: Mapping[str, Any]) -> None:
    """Write the finished model's ``state_dict`` to ``model.pt``."""
    atomic_torch_save(state_dict, folder / MODEL_FILE)


def save_checkpoint(folder: Path, state: Mapping[str, Any]) -> None:
    """Write ``checkpoint.pt`` (the commit point of a round: write it after every other file of the round)."""
    atomic_torch_save(dict(state), folder / CHECKPOINT_FILE)


def has_checkpoint(folder: Path) -> bool:
    """Return whether ``folder`` holds a ``checkpoint.pt``."""
    return (folder / CHECKPOINT_FILE).exists()


def load_checkpoint(folder: Path, device: torch.device) -> dict[str, Any]:
    """Return the state in ``folder/checkpoint.pt`` (tensors on ``device``).

    Raises:
        SaalError: a truncated or foreign file.
    """
    path = folder / CHECKPOINT_FILE
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:
        raise corrupt_checkpoint(path, exc) from None
    if not isinstance(state, dict):
        raise SaalError(f"{path} is corrupt (not a checkpoint); delete it to restart that run")
    return state


def corrupt_checkpoint(path: Path, exc: BaseException) -> SaalError:
    """Return the one-line error for a checkpoint that cannot be used."""
    return SaalError(f"{path} is corrupt ({type(exc).__name__}); delete it to restart that run")


# -- reading and summaries ----------------------------------------------------------------------
def read_rounds(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Return the round rows of a run folder (from ``rounds.json``).

    Raises:
        OSError: no ``rounds.json``. ValueError: a file that is not JSON.
    """
    return json.loads((Path(folder) / ROUNDS_FILE).read_text())


def write_summary(out: str | os.PathLike[str], rows: list[dict[str, Any]]) -> Path:
    """Write ``OUT/results.csv``: one row per (strategy, seed, round), the metric under its name, and who made the
    round's acquisition and why, and the stopping rule's kappa, where the rows record them (empty for rows of older
    runs).

    Returns:
        The path written.
    """
    path = Path(out) / "results.csv"
    text = io.StringIO(newline="")
    fields = ["strategy", "seed", *round_fields(metric_of_rows(rows))[:-1], *extra_fields(rows)]
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())
    return path
