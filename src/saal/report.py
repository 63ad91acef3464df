"""Tables, learning curves and paired comparisons from the run folders of one or more experiments.

:func:`build_report` reads every run folder (``config.json`` + ``rounds.json``) below the given
experiment folders, so a grid that is still running, or was stopped, reports what it has. Runs
are grouped by dataset and protocol (every setting except the strategy, the seed, the device and
the data folder); runs of one protocol found in several folders are pooled. For each group it
writes a markdown table, a learning-curve PNG and a win/tie/loss matrix; a long CSV holds every
number behind them.

Each run stores one test metric per round under its name (``config.json``'s ``metric``: ``accuracy`` for
classification, ``map`` for detection; a folder without it, written by saal 0.1.0, stores ``accuracy``).
Tables, plots and CSV columns are labelled with that name. Numbers of one run (the metric in [0, 1],
reported in %):

- the metric at a budget: its value after training on that many labels;
- AUC: the area under the metric-vs-labels curve (trapezoid rule over the labelled counts),
  divided by the budget range (last minus first labelled count), so it lies in [0, 1];
- final: the metric after the last round; best: its largest value over all rounds (the
  headline number of the SAAL paper);
- acquisition seconds per round: mean wall time of ``select`` over the rounds that acquired.

AUC, final and best are computed over finished runs only; the metric at a budget and the seconds
use every round that exists.

How runs started: where a report holds a group whose initial labels were chosen without the ground truth
(``initial_strategy``, ``initial: 0`` or a uniform draw), every group says how it started: a **ground-truth
balanced start** (the initial set drawn class-balanced with the true labels: the paper's protocol, which a
person labelling their own data cannot do) or chosen without labels; a report of ground-truth starts only is
written as before. For every ``auto`` run, one line says which strategy ``auto`` used at which budgets (from
``rounds.json``'s ``acquired_by`` and ``reason``).
"""

from __future__ import annotations

import csv
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
    records_acquisition,
    setting_defaults,
    with_defaults,
)

ALPHA = 0.05
PAIRED_ON = ("auc", "rounds")
# config.json keys that say which run it is, where it ran, or describe it, rather than which protocol it follows.
_RUN_IDENTITY = frozenset(RUN_KEYS) | INFORMATIONAL | RESUME_IGNORED
# Short names of metrics for column heads (others are used as they are).
_SHORT_NAMES = {"accuracy": "acc"}


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
        """Return the area under the metric curve over the labelled counts, divided by their range."""
        return normalised_auc(self.labelled, self.accuracy)

    def acquire_seconds(self) -> float:
        """Return the mean seconds of acquisition over the rounds that acquired (nan if none)."""
        secs = [r["acquire_seconds"] for r in self.rows if r.get("chosen")]
        return float(np.mean(secs)) if secs else math.nan


@dataclass
class Group:
    """The runs of one dataset under one protocol."""

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


def normalised_auc(labelled: np.ndarray, accuracy: np.ndarray) -> float:
    """Return ``trapezoid(accuracy, labelled) / (labelled[-1] - labelled[0])``.

    A single point (no acquisition) returns its accuracy.
    """
    x = np.asarray(labelled, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    if len(x) == 1 or x[-1] == x[0]:
        return float(y.mean())
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / (x[-1] - x[0]))


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Return (mean, sample standard deviation with ddof=1, count) of the finite ``values``.

    The standard deviation is nan for fewer than two values; the mean is nan for none.
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


# -- reading ------------------------------------------------------------------------------
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
            rounds_path = cfg_path.parent / "rounds.json"
            if cfg_path.parent.resolve() in seen:
                continue
            config = _read_json(cfg_path)
            if not isinstance(config, dict) or "strategy" not in config or "seed" not in config:
                continue  # not a run folder
            found += 1
            if not rounds_path.exists():
                continue
            rows = _read_json(rounds_path)
            metric = metric_of_config(config)
            if not isinstance(rows, list) or not all(isinstance(r, dict) and metric in r for r in rows):
                raise SaalError(f"{rounds_path} is not a list of rounds; delete that run folder or rerun it")
            if rows:
                seen.add(cfg_path.parent.resolve())
                runs.append(RunRecord(cfg_path.parent, config, rows))
        if not found:
            raise SaalError(f"{root} holds no runs (no */seed-*/config.json); give the --out folder of a `saal run`")
    if not runs:
        raise SaalError("the runs found have no finished round yet; report again after the first round")
    return runs


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


# -- numbers ------------------------------------------------------------------------------
def budget_points(group: Group, count: int = 5) -> list[int]:
    """Return up to ``count`` labelled counts, evenly spread over those the group's runs reached."""
    all_budgets = sorted({int(r["labelled"]) for run in group.runs for r in run.rows})
    if len(all_budgets) <= count:
        return all_budgets
    pick = np.linspace(0, len(all_budgets) - 1, count).round().astype(int)
    return [all_budgets[i] for i in sorted(set(pick))]


def accuracy_at(run: RunRecord, budget: int) -> float:
    """Return the run's metric (accuracy for classification) at ``budget`` labels (nan if it did not reach it)."""
    for r in run.rows:
        if int(r["labelled"]) == budget:
            return float(r[run.metric])
    return math.nan


def strategy_summary(group: Group, budgets: Sequence[int]) -> list[dict[str, Any]]:
    """Return one row per strategy: seeds, finished runs, and (mean, std, n) of every metric."""
    out = []
    for s in group.strategies:
        runs = group.runs_of(s)
        done = [r for r in runs if r.finished]
        out.append(
            {
                "strategy": s,
                "seeds": [r.seed for r in runs],
                "finished": len(done),
                "at": {b: mean_std([accuracy_at(r, b) for r in runs]) for b in budgets},
                "auc": mean_std([r.auc() for r in done]),
                "final": mean_std([float(r.scores[-1]) for r in done]),
                "best": mean_std([float(r.scores.max()) for r in done]),
                "acquire_seconds": mean_std([r.acquire_seconds() for r in runs]),
            }
        )
    return out


def paired_values(group: Group, a: str, b: str, paired_on: str = "auc") -> tuple[np.ndarray, np.ndarray]:
    """Return the paired samples of strategies ``a`` and ``b``.

    ``auc``: one AUC per seed that both finished. ``rounds``: one metric value per (seed, round) that
    both reached, round 0 left out (every strategy of a seed shares it).

    Raises:
        SaalError: an unknown ``paired_on``.
    """
    if paired_on not in PAIRED_ON:
        raise SaalError(f"paired_on must be one of {', '.join(PAIRED_ON)}, got {paired_on!r}")
    ra = {r.seed: r for r in group.runs_of(a)}
    rb = {r.seed: r for r in group.runs_of(b)}
    xs: list[float] = []
    ys: list[float] = []
    for seed in sorted(set(ra) & set(rb)):
        if paired_on == "auc":
            if ra[seed].finished and rb[seed].finished:
                xs.append(ra[seed].auc())
                ys.append(rb[seed].auc())
        else:
            acc_a = {int(r["round"]): float(r[ra[seed].metric]) for r in ra[seed].rows}
            acc_b = {int(r["round"]): float(r[rb[seed].metric]) for r in rb[seed].rows}
            for rnd in sorted(set(acc_a) & set(acc_b) - {0}):
                xs.append(acc_a[rnd])
                ys.append(acc_b[rnd])
    return np.array(xs), np.array(ys)


def compare(x: np.ndarray, y: np.ndarray, alpha: float = ALPHA) -> tuple[str, float]:
    """Return ("W" | "T" | "L" | "", p-value) for ``x`` against ``y`` by a two-sided paired t-test.

    "W": the mean difference is positive and p < alpha; "L": negative and p < alpha; "T"
    otherwise; "" when fewer than two pairs exist (no test possible). Identical samples are a tie
    with p = 1.
    """
    from scipy.stats import ttest_rel

    if len(x) < 2:
        return "", math.nan
    d = x - y
    if np.allclose(d, d[0], rtol=0.0, atol=1e-12):
        # Constant differences have no variance: the t statistic is undefined.
        if abs(d[0]) <= 1e-12:
            return "T", 1.0
        return ("W" if d[0] > 0 else "L"), 0.0
    p = float(ttest_rel(x, y).pvalue)
    if p < alpha:
        return ("W" if d.mean() > 0 else "L"), p
    return "T", p


def win_tie_loss(group: Group, paired_on: str = "auc", alpha: float = ALPHA) -> dict[str, dict[str, tuple[str, float]]]:
    """Return ``m[a][b] = (outcome of a against b, p-value)`` for every pair of strategies.

    The matrix is antisymmetric: ``m[a][b]`` is "W" exactly when ``m[b][a]`` is "L".
    """
    names = group.strategies
    m: dict[str, dict[str, tuple[str, float]]] = {a: {} for a in names}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x, y = paired_values(group, a, b, paired_on)
            outcome, p = compare(x, y, alpha)
            m[a][b] = (outcome, p)
            m[b][a] = ({"W": "L", "L": "W"}.get(outcome, outcome), p)
    return m


# -- writing ------------------------------------------------------------------------------
def _mean_std(ms: tuple[float, float, int], digits: int = 1, scale: float = 100.0) -> str:
    """Format ``(mean, std, n)`` as ``mean ± std`` (scaled; 100 gives %); the std is left out for one value."""
    mean, std, n = ms
    if n == 0:
        return "–"
    if n == 1 or math.isnan(std):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def describe_protocol(protocol: dict[str, Any]) -> str:
    """Return a one-paragraph description of a protocol (model, training, budgets)."""
    t = protocol.get("train", {}) or {}
    opt = str(t.get("optimizer", "?"))
    opt_text = f"{opt} lr {t.get('lr')}"
    if opt in ("sgd", "sam"):
        opt_text += f", momentum {t.get('momentum')}"
    if opt == "sam":
        opt_text += f", rho {t.get('sam_rho')}"
    if t.get("weight_decay"):
        opt_text += f", weight decay {t.get('weight_decay')}"
    start = "re-initialised to the same initial weights each round" if protocol.get("reinit") else "warm-started"
    balanced = "class-balanced" if protocol.get("initial_balanced") else "uniform"
    initial = f"initial {protocol.get('initial')} labels ({balanced})"
    if protocol.get("initial_strategy") or protocol.get("initial") == 0:
        initial = f"initial {protocol.get('initial')} labels (chosen without labels)"
    subset = protocol.get("subset")
    return (
        f"dataset `{protocol.get('dataset')}`; model `{protocol.get('model')}`; optimizer {opt_text}, {start}; "
        f"{t.get('epochs')} epochs, batch {t.get('batch_size')}, augmentation {'on' if t.get('augment') else 'off'}; "
        f"{initial}, query {protocol.get('query')} per round, "
        f"{protocol.get('rounds')} round{'' if protocol.get('rounds') == 1 else 's'}; "
        f"{'pool subset ' + str(subset) + ' per round' if subset else 'whole pool scored'}."
    )


def ground_truth_start(protocol: dict[str, Any], metric: str = DEFAULT_METRIC) -> bool:
    """Return whether runs of ``protocol`` started from an initial set drawn class-balanced with the true labels
    (``initial > 0``, no ``initial_strategy``, ``initial_balanced``, a classification metric)."""
    return (
        int(protocol.get("initial") or 0) > 0
        and not protocol.get("initial_strategy")
        and bool(protocol.get("initial_balanced"))
        and metric == DEFAULT_METRIC
    )


def describe_start(protocol: dict[str, Any], metric: str = DEFAULT_METRIC) -> str:
    """Return one markdown line saying how runs of ``protocol`` got their first labels."""
    initial, by = int(protocol.get("initial") or 0), protocol.get("initial_strategy")
    if ground_truth_start(protocol, metric):
        return (
            f"Start: **ground-truth balanced start**: the initial {initial} labels were drawn class-balanced with "
            "the true labels (the paper's protocol; a person labelling their own data cannot do this)."
        )
    if initial == 0:
        first = f"`{by}`" if by else "each run's own strategy when it is cold-start, else `random`"
        return f"Start: chosen without labels: no initial labels; the first pick by {first} (see `acquired_by`)."
    if by:
        return f"Start: chosen without labels: the initial {initial} labels were picked by `{by}` from zero labels."
    return f"Start: chosen without labels: the initial {initial} labels were drawn uniformly at random."


def used_by(row: dict[str, Any]) -> str:
    """Return the strategy that made a round's acquisition: ``acquired_by``, or for ``auto`` the strategy its
    ``reason`` names first ("" when the round records none)."""
    by = str(row.get("acquired_by") or "")
    reason = str(row.get("reason") or "")
    if re.match(r"^\s*auto\b", by) and ":" in reason:
        return reason.split(":", 1)[0].strip()
    return by


def auto_lines(group: Group) -> list[str]:
    """Return markdown: per ``auto`` run of ``group``, which strategy it used at which budgets (none without
    ``auto`` runs that record it)."""
    lines: list[str] = []
    for run in sorted(group.runs, key=lambda r: (r.strategy, r.seed)):
        if not re.match(r"^\s*auto\b", run.strategy):
            continue
        spans: list[list[Any]] = []  # [strategy, first budget, last budget]
        for row in run.rows:
            used = used_by(row)
            if not used:
                continue
            if spans and spans[-1][0] == used:
                spans[-1][2] = int(row["labelled"])
            else:
                spans.append([used, int(row["labelled"]), int(row["labelled"])])
        if spans:
            text = ", ".join(f"`{u}` at {a}{'' if a == b else f'-{b}'} labels" for u, a, b in spans)
            lines.append(f"- `{run.strategy}` seed {run.seed}: {text}")
    if not lines:
        return []
    return [f"### What auto chose ({group.name})", "", *lines, ""]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "dataset"


def plot_curves(group: Group, path: Path) -> Path:
    """Write a learning-curve PNG: the mean test metric (%) per strategy against labels, ± std band.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    # tab20 and three dash styles keep up to 60 strategies apart (the default cycle repeats after 10).
    colours = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]  # a ListedColormap
    styles = ("-", "--", ":")
    try:
        for i, s in enumerate(group.strategies):
            runs = group.runs_of(s)
            budgets = sorted({int(r["labelled"]) for run in runs for r in run.rows})
            stats = [mean_std([accuracy_at(r, b) for r in runs]) for b in budgets]
            mean = np.array([m for m, _, _ in stats]) * 100
            std = np.nan_to_num(np.array([sd for _, sd, _ in stats]) * 100)
            (line,) = ax.plot(
                budgets,
                mean,
                marker="o",
                markersize=2.5,
                linewidth=1.4,
                label=s,
                color=colours[i % 20],
                linestyle=styles[(i // 20) % 3],
            )
            ax.fill_between(budgets, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("labelled examples")
        ax.set_ylabel(f"test {group.metric} (%)")
        ax.set_title(f"{group.name}: mean ± std over seeds")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _markdown_group(
    group: Group,
    budgets: list[int],
    summary: list[dict[str, Any]],
    matrix: dict,
    png: str,
    paired_on: str,
    alpha: float,
) -> list[str]:
    lines = [f"## {group.name}", "", f"Protocol: {describe_protocol(group.protocol)}", ""]
    expected_seeds = len(group.seeds)
    metric = group.metric
    short = _SHORT_NAMES.get(metric, metric)
    head = ["strategy", "seeds", *[f"{short} @ {b}" for b in budgets], "AUC", "final", "best", "acquire s/round"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for row in summary:
        n_seeds = len(row["seeds"])
        flag = ""
        if n_seeds < expected_seeds or row["finished"] < n_seeds:
            flag = " *"
            notes.append(
                f"`{row['strategy']}`: {n_seeds} of {expected_seeds} seeds, {row['finished']} finished "
                f"(seeds {', '.join(map(str, row['seeds']))})"
            )
        cells = [
            f"`{row['strategy']}`{flag}",
            f"{row['finished']}/{n_seeds}",
            *[_mean_std(row["at"][b]) for b in budgets],
            _mean_std(row["auc"], 2),
            _mean_std(row["final"]),
            _mean_std(row["best"]),
            _mean_std(row["acquire_seconds"], 2, scale=1.0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Test {metric} in %, mean ± sample standard deviation (ddof = 1) over seeds. `seeds` is finished/started "
        f"runs. `{short} @ N`: after training on N labels (every run that reached N). AUC: area under the "
        f"{metric}-vs-labels curve by the trapezoid rule, divided by the budget range, in % (finished runs). "
        "final: after the last round; best: the best round (the SAAL paper's headline metric); both over "
        "finished runs. acquire s/round: mean wall seconds of one acquisition.",
    ]
    if notes:
        lines += ["", "\\* incomplete: " + "; ".join(notes) + "."]
    lines += ["", f"![learning curves]({png})", ""]
    lines += _per_class_lines(group, alpha)
    names = group.strategies
    seeds = len(group.seeds)
    unit = "normalised AUC per seed" if paired_on == "auc" else f"{metric} per (seed, round), round 0 left out"
    lines += [
        f"### Win / tie / loss ({group.name})",
        "",
        f"Row strategy against column strategy: a two-sided paired t-test (scipy.stats.ttest_rel) on the "
        f"{unit}, paired by seed; **W** when the row's mean is higher and p < {alpha}, **L** when lower and "
        f"p < {alpha}, **T** otherwise, blank when fewer than two pairs exist."
        + (
            f" With {seeds} seeds the test has little power: a tie often means 'not enough seeds to tell'."
            if seeds < 10
            else ""
        ),
        "",
        "| | " + " | ".join(f"`{n}`" for n in names) + " | W-T-L |",
        "|" + "---|" * (len(names) + 2),
    ]
    for a in names:
        cells = ["·" if a == b else matrix[a][b][0] for b in names]
        w, t, lo = (sum(matrix[a][b][0] == c for b in names if b != a) for c in "WTL")
        lines.append(f"| `{a}` | " + " | ".join(cells) + f" | {w}-{t}-{lo} |")
    lines.append("")
    return lines


def _final_values(run: RunRecord, key: str) -> dict[str, float]:
    """Return the last round's ``per_class`` or ``details`` values of a run (empty when it has none)."""
    value = run.rows[-1].get(key) if run.rows else None
    return {str(k): float(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _class_auc(run: RunRecord, name: str) -> float:
    """Return the normalised AUC of one class's per-class metric over a run's rounds (nan where a round lacks it)."""
    values = [float((r.get("per_class") or {}).get(name, math.nan)) for r in run.rows]
    return normalised_auc(run.labelled, np.asarray(values))


def _per_class_lines(group: Group, alpha: float) -> list[str]:
    """Return markdown: per strategy, the final per-class metric and other recorded values (detection: ``map``,
    ``boxes_labelled``), and each class's AUC with a paired test against ``random`` when the group has it.
    Nothing for runs that record no per-class values."""
    finished = [r for r in group.runs if r.finished]
    classes = sorted({c for r in finished for c in _final_values(r, "per_class")})
    details = sorted({d for r in finished for d in _final_values(r, "details")})
    if not classes or group.metric == DEFAULT_METRIC:
        return []
    head = ["strategy", *[f"{c} final" for c in classes], *[f"{c} AUC" for c in classes], *details]
    lines = [f"### Per class ({group.name})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_seed = {s: {r.seed: r for r in finished if r.strategy == s} for s in group.strategies}
    base = by_seed.get("random", {})
    for s in group.strategies:
        runs = list(by_seed[s].values())
        cells = [f"`{s}`"]
        cells += [_mean_std(mean_std([_final_values(r, "per_class").get(c, math.nan) for r in runs])) for c in classes]
        for c in classes:
            text = _mean_std(mean_std([_class_auc(r, c) for r in runs]), 2)
            seeds = sorted(set(by_seed[s]) & set(base))
            if s != "random" and len(seeds) >= 2:
                x = np.array([_class_auc(by_seed[s][k], c) for k in seeds])
                y = np.array([_class_auc(base[k], c) for k in seeds])
                outcome, p = compare(x, y, alpha)
                text += f" {outcome} (p {p:.2f})" if outcome else ""
            cells.append(text)
        for d in details:
            scale = 100.0 if d.startswith("map") else 1.0
            cells.append(_mean_std(mean_std([_final_values(r, "details").get(d, math.nan) for r in runs]), 1, scale))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Final: the per-class {group.metric} after the last round, in %; AUC: the area under each class's curve "
        f"(as above), with W / T / L against `random` by a paired t-test over seeds (p < {alpha}); further "
        "columns: the other values each round records (`map`: mAP@[.5:.95] in %; `boxes_labelled`: boxes in the "
        "labelled set at the last round), mean ± std over finished runs.",
        "",
    ]
    return lines


def build_report(
    folders: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    budgets: Sequence[int] | None = None,
    paired_on: str = "auc",
    alpha: float = ALPHA,
) -> Path:
    """Read the runs below ``folders`` and write the report into ``out``.

    Writes ``report.md`` (a table, learning curves and a win/tie/loss matrix per dataset and
    protocol), ``curves-<dataset>.png`` per group, ``rounds.csv`` (one row per run and round:
    dataset, strategy, seed, round, labelled, the metric under its name, seconds, ...), ``runs.csv`` (one row
    per run: AUC, final, best, ...) and ``comparisons.csv`` (every pair: outcome, p-value, n). Tables, plots
    and columns are labelled with the metric each group's runs stored (``accuracy`` for classification).

    Args:
        budgets: labelled counts for the ``acc @ N`` columns (default: five spread over the range).
        paired_on: ``auc`` (one value per seed) or ``rounds`` (one per seed and round).

    Returns:
        The path of ``report.md``.

    Raises:
        SaalError: missing or empty folders, unreadable run files, or bad options.
    """
    if paired_on not in PAIRED_ON:
        raise SaalError(f"--paired-on must be one of {', '.join(PAIRED_ON)}, got {paired_on!r}")
    if not 0 < alpha < 1:
        raise SaalError(f"alpha must lie in (0, 1), got {alpha}")
    groups = group_runs(find_runs(folders))
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise SaalError(f"{out_dir} is a file; give a folder for the report")
    out_dir.mkdir(parents=True, exist_ok=True)
    md = ["# Active-learning report", "", "Sources: " + ", ".join(f"`{f}`" for f in folders), ""]
    round_rows: list[dict[str, Any]] = []
    run_rows: list[dict[str, Any]] = []
    comparison_rows: list[dict[str, Any]] = []
    used_png: set[str] = set()
    mark_starts = any(not ground_truth_start(g.protocol, g.metric) for g in groups)
    acquisitions = records_acquisition(r for g in groups for run in g.runs for r in run.rows)
    for group in groups:
        cols = sorted(set(budgets)) if budgets else budget_points(group)
        summary = strategy_summary(group, cols)
        matrix = win_tie_loss(group, paired_on, alpha)
        png = f"curves-{_slug(group.name)}.png"
        while png in used_png:
            png = png.replace(".png", "_.png")
        used_png.add(png)
        plot_curves(group, out_dir / png)
        lines = _markdown_group(group, cols, summary, matrix, png, paired_on, alpha)
        if mark_starts:
            lines[4:4] = [describe_start(group.protocol, group.metric), ""]  # after the protocol line
        md += lines + auto_lines(group)
        for run in group.runs:
            base = {"dataset": group.name, "strategy": run.strategy, "seed": run.seed}
            round_rows += _round_rows(group, run, acquisitions)
            run_rows.append(
                {
                    **base,
                    "rounds_done": len(run.rows),
                    "finished": run.finished,
                    "auc": run.auc() if run.finished else "",
                    f"final_{group.metric}": float(run.scores[-1]) if run.finished else "",
                    f"best_{group.metric}": float(run.scores.max()) if run.finished else "",
                    "acquire_seconds_per_round": run.acquire_seconds(),
                    "run_folder": str(run.folder),
                }
            )
        for a in group.strategies:
            for b in group.strategies:
                if a != b:
                    x, _ = paired_values(group, a, b, paired_on)
                    outcome, p = matrix[a][b]
                    comparison_rows.append(
                        {
                            "dataset": group.name,
                            "strategy": a,
                            "against": b,
                            "outcome": outcome,
                            "p_value": p,
                            "pairs": len(x),
                            "paired_on": paired_on,
                        }
                    )
    _write_csv(out_dir / "rounds.csv", round_rows)
    _write_csv(out_dir / "runs.csv", run_rows)
    _write_csv(out_dir / "comparisons.csv", comparison_rows)
    md += [
        "Files: `rounds.csv` (every run and round), `runs.csv` (per-run AUC, final, best), "
        "`comparisons.csv` (every pair: outcome, p-value, number of pairs).",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def _round_rows(group: Group, run: RunRecord, acquisitions: bool) -> list[dict[str, Any]]:
    """Return the report's ``rounds.csv`` rows of one run; ``acquired_by`` and ``reason`` when ``acquisitions``
    (some run of the report records them; empty for the rounds that do not)."""
    t = group.protocol.get("train", {}) or {}
    rows = []
    for r in run.rows:
        extra = {"acquired_by": r.get("acquired_by", ""), "reason": r.get("reason", "")} if acquisitions else {}
        rows.append(
            {
                "dataset": group.name,
                "strategy": run.strategy,
                "seed": run.seed,
                "round": r["round"],
                "labelled": r["labelled"],
                group.metric: r[group.metric],
                "train_seconds": r.get("train_seconds"),
                "acquire_seconds": r.get("acquire_seconds"),
                "chosen": " ".join(map(str, r.get("chosen", []))),
                **extra,
                "finished": run.finished,
                "model": group.protocol.get("model"),
                "optimizer": t.get("optimizer"),
                "run_folder": str(run.folder),
            }
        )
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(rows[0]) if rows else []
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


__all__ = [
    "Group",
    "RunRecord",
    "build_report",
    "compare",
    "find_runs",
    "group_runs",
    "normalised_auc",
    "strategy_summary",
    "win_tie_loss",
]
