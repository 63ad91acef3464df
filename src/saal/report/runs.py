"""Reading run folders: every (strategy, seed) run below the given folders, grouped by dataset and protocol.

A run folder holds ``config.json`` and ``rounds.json``; folders written by saal 0.1.0 (no ``metric``, no
``acquired_by``) read as they were. Runs of one protocol found in several folders are pooled into one group.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saal.errors import SaalError
from saal.experiment.storage import (
    DEFAULT_METRIC,
    INFORMATIONAL,
    RESUME_IGNORED,
    RUN_KEYS,
    metric_of_config,
    setting_defaults,
    with_defaults,
)
from saal.report.area import aubc

# config.json keys that say which run it is, where it ran, or describe it, rather than which protocol it follows.
_RUN_IDENTITY = frozenset(RUN_KEYS) | INFORMATIONAL | RESUME_IGNORED


@dataclass
class RunRecord:
    """One (strategy, seed) run read from its folder.

    Attributes:
        folder: the run folder.
        config: its ``config.json``.
        rows: its ``rounds.json`` rows (round, labelled, <metric>, train_seconds, acquire_seconds, chosen).
    """

    folder: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def strategy(self) -> str:
        return str(self.config["strategy"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def finished(self) -> bool:
        return len(self.rows) >= int(self.config.get("rounds", 0)) + 1

    @property
    def labelled(self) -> np.ndarray:
        return np.array([r["labelled"] for r in self.rows], dtype=np.float64)

    @property
    def metric(self) -> str:
        """The name of the metric the run stored (``accuracy`` for a 0.1.0 folder)."""
        return metric_of_config(self.config)

    @property
    def scores(self) -> np.ndarray:
        """The run's metric, one value per round."""
        return np.array([r[self.metric] for r in self.rows], dtype=np.float64)

    @property
    def accuracy(self) -> np.ndarray:
        """The run's metric per round (:attr:`scores`; the name of classification's metric)."""
        return self.scores

    def auc(self) -> float:
        """Return the run's AUBC: the area under its metric curve from the first nonzero labelled count to the
        last, divided by that range (:func:`saal.report.area.aubc`)."""
        return aubc(self.labelled, self.scores)

    def acquire_seconds(self) -> float:
        """Return the mean seconds of acquisition over the rounds that acquired (nan if none)."""
        secs = [r["acquire_seconds"] for r in self.rows if r.get("chosen")]
        return float(np.mean(secs)) if secs else math.nan

    def value_at(self, budget: int) -> float:
        """Return the run's metric at ``budget`` labels (nan if it did not reach it)."""
        for r in self.rows:
            if int(r["labelled"]) == budget:
                return float(r[self.metric])
        return math.nan


@dataclass
class Group:
    """The runs of one dataset under one protocol (a *regime* when a report holds several)."""

    name: str
    protocol: dict[str, Any]
    runs: list[RunRecord] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # strategy order of the experiments' files
    metric: str = DEFAULT_METRIC  # what every run of the group stored

    @property
    def strategies(self) -> list[str]:
        """The strategies in the order their experiment listed them (others after, by name)."""
        names = sorted({r.strategy for r in self.runs})
        rank = {s: i for i, s in enumerate(self.order)}
        return sorted(names, key=lambda s: (rank.get(s, len(rank)), s))

    def runs_of(self, strategy: str) -> list[RunRecord]:
        return sorted((r for r in self.runs if r.strategy == strategy), key=lambda r: r.seed)

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})

    @property
    def budgets(self) -> list[int]:
        """Every labelled count a run of the group reached, the first round's included."""
        return sorted({int(r["labelled"]) for run in self.runs for r in run.rows})

    @property
    def acquired_budgets(self) -> list[int]:
        """The labelled counts reached after an acquisition (round 1 on): those at which strategies can differ.

        Round 0 is left out: every strategy of a seed shares its labelled set there (the initial set, or none).
        """
        return sorted({int(r["labelled"]) for run in self.runs for r in run.rows if int(r["round"]) > 0})

    @property
    def regime(self) -> str:
        """The group's name and budget range, e.g. ``digits (low) 0-100``: how tables across groups name it."""
        budgets = self.budgets
        return f"{self.name} {budgets[0]}-{budgets[-1]}" if budgets else self.name

    def values_at(self, strategy: str, budget: int) -> dict[int, float]:
        """Return ``{seed: metric}`` of the runs of ``strategy`` that reached ``budget`` labels."""
        out = {r.seed: r.value_at(budget) for r in self.runs_of(strategy)}
        return {seed: v for seed, v in out.items() if not math.isnan(v)}


def find_runs(folders: Sequence[str | os.PathLike]) -> list[RunRecord]:
    """Return every run below ``folders`` (a run folder holds ``config.json`` and ``rounds.json``).

    A run folder with a ``config.json`` but no rounds yet is left out.

    Raises:
        SaalError: no folders given, a folder that is missing or not a folder, a folder without
            any run, or an unreadable ``config.json`` / ``rounds.json``.
    """
    if not folders:
        raise SaalError("no experiment folders given; name one or more --out folders of `saal run`")
    runs: list[RunRecord] = []
    seen: set[Path] = set()
    for folder in folders:
        root = Path(folder)
        if not root.exists():
            raise SaalError(f"{root}: no such folder; give the --out folder of a `saal run`")
        if not root.is_dir():
            raise SaalError(f"{root} is not a folder; give the --out folder of a `saal run`")
        found = 0
        for cfg_path in sorted(root.rglob("config.json")):
            if cfg_path.parent.resolve() in seen:
                continue
            config = _read_json(cfg_path)
            if not isinstance(config, dict) or "strategy" not in config or "seed" not in config:
                continue  # not a run folder
            found += 1
            run = _read_run(cfg_path.parent, config)
            if run is not None:
                seen.add(cfg_path.parent.resolve())
                runs.append(run)
        if not found:
            raise SaalError(f"{root} holds no runs (no */seed-*/config.json); give the --out folder of a `saal run`")
    if not runs:
        raise SaalError("the runs found have no finished round yet; report again after the first round")
    return runs


def _read_run(folder: Path, config: dict[str, Any]) -> RunRecord | None:
    """Return the run of ``folder`` (None when it has no round yet).

    Raises:
        SaalError: an unreadable ``rounds.json``, or one whose rows lack the run's metric.
    """
    rounds_path = folder / "rounds.json"
    if not rounds_path.exists():
        return None
    rows = _read_json(rounds_path)
    metric = metric_of_config(config)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and metric in r for r in rows):
        raise SaalError(f"{rounds_path} is not a list of rounds; delete that run folder or rerun it")
    return RunRecord(folder, config, rows) if rows else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaalError(f"{path} is unreadable ({type(exc).__name__}); delete that run folder or rerun it") from None


def protocol_of(config: dict[str, Any]) -> dict[str, Any]:
    """Return the protocol part of a run's ``config.json``: every setting but which run it is and where it ran.

    A setting the file lacks takes today's default, so that runs written before that setting existed share a
    protocol with newer runs; informational fields (saal version, task, metric, strategy details) are left out.
    """
    filled = with_defaults(config, setting_defaults())
    return {k: v for k, v in filled.items() if k not in _RUN_IDENTITY}


def strategy_order(runs: Sequence[RunRecord]) -> list[str]:
    """Return the strategies in the order of the ``experiment.json`` files beside the runs (if any)."""
    order: list[str] = []
    for run in runs:
        path = run.folder.parent.parent / "experiment.json"
        try:
            listed = json.loads(path.read_text()).get("strategies", [])
        except (OSError, ValueError, AttributeError):
            continue
        order += [s for s in listed if isinstance(s, str) and s not in order]
    return order


def dataset_title(dataset: str) -> str:
    """Return a dataset's name for headings: ``folder:/data/cifar10-jpg`` -> ``cifar10-jpg``, others unchanged.

    The full name stays in each group's protocol line.
    """
    kind, sep, path = dataset.partition(":")
    if sep and kind in ("folder", "npz") and path:
        return Path(path.rstrip("/\\")).name or dataset
    return dataset


def group_runs(runs: Sequence[RunRecord]) -> list[Group]:
    """Group runs by dataset and protocol; one (strategy, seed) per group (the one with most rounds).

    Strategies keep the order of their ``experiment.json`` (see :func:`strategy_order`).

    Groups of one dataset under different protocols are named ``dataset (FOLDER)`` after the
    experiment folder of their first run.
    """
    by_key: dict[str, Group] = {}
    order = strategy_order(runs)
    for run in runs:
        protocol = protocol_of(run.config)
        key = json.dumps([run.metric, protocol], sort_keys=True)
        if key not in by_key:
            name = dataset_title(str(protocol.get("dataset", "?")))
            by_key[key] = Group(name, protocol, order=order, metric=run.metric)
        group = by_key[key]
        twin = next((r for r in group.runs if r.strategy == run.strategy and r.seed == run.seed), None)
        if twin is None:
            group.runs.append(run)
        elif len(run.rows) > len(twin.rows):
            group.runs[group.runs.index(twin)] = run
    groups = list(by_key.values())
    names = [g.name for g in groups]
    for g in groups:
        if names.count(g.name) > 1:
            g.name = f"{g.name} ({g.runs[0].folder.parent.parent.name})"
    return groups


def budget_points(group: Group, count: int = 5) -> list[int]:
    """Return up to ``count`` labelled counts, evenly spread over those the group's runs reached."""
    all_budgets = group.budgets
    if len(all_budgets) <= count:
        return all_budgets
    pick = np.linspace(0, len(all_budgets) - 1, count).round().astype(int)
    return [all_budgets[i] for i in sorted(set(pick))]


def accuracy_at(run: RunRecord, budget: int) -> float:
    """Return the run's metric (accuracy for classification) at ``budget`` labels (nan if it did not reach it)."""
    return run.value_at(budget)


def used_by(row: dict[str, Any]) -> str:
    """Return the strategy that made a round's acquisition: ``acquired_by``, or for ``auto`` the strategy its
    ``reason`` names first ("" when the round records none)."""
    by = str(row.get("acquired_by") or "")
    reason = str(row.get("reason") or "")
    if re.match(r"^\s*auto\b", by) and ":" in reason:
        return reason.split(":", 1)[0].strip()
    return by
