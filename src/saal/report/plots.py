"""Figures of a report (matplotlib, PNG): learning curves per group, pairwise-penalty heatmaps, and the
differences to ``random`` of every regime on one figure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saal.report.runs import Group
from saal.report.statistics import ALPHA, BASELINE, PenaltyMatrix, curve_against, mean_std

_STYLES = ("-", "--", ":")


def _pyplot() -> Any:
    """Return ``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _look(plt: Any, i: int, count: int) -> dict[str, Any]:
    """Return the colour and line style of the ``i``-th of ``count`` strategies: tab10 up to ten, then tab20 and
    three dash styles (up to 60 apart)."""
    if count <= 10:
        return {"color": plt.get_cmap("tab10").colors[i], "linestyle": "-"}
    return {"color": plt.get_cmap("tab20").colors[i % 20], "linestyle": _STYLES[(i // 20) % 3]}


def plot_curves(group: Group, path: Path) -> Path:
    """Write a learning-curve PNG: the mean test metric (%) per strategy against labels, ± std band.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for i, s in enumerate(group.strategies):
            runs = group.runs_of(s)
            budgets = sorted({int(r["labelled"]) for run in runs for r in run.rows})
            stats = [mean_std([r.value_at(b) for r in runs]) for b in budgets]
            mean = np.array([m for m, _, _ in stats]) * 100
            std = np.nan_to_num(np.array([sd for _, sd, _ in stats]) * 100)
            (line,) = ax.plot(
                budgets,
                mean,
                marker="o",
                markersize=2.5,
                linewidth=1.4,
                label=s,
                **_look(plt, i, len(group.strategies)),
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


def plot_penalty(matrix: PenaltyMatrix, title: str, path: Path) -> Path:
    """Write the pairwise-penalty matrix as a heatmap PNG: rows beat columns, 0 (white) to 1 (dark).

    Returns:
        ``path``.
    """
    plt = _pyplot()
    names = matrix.strategies
    values = np.array([[math.nan if a == b else matrix.share(a, b) for b in names] for a in names])
    size = 1.2 + 0.55 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=120)
    try:
        image = ax.imshow(values, cmap="Reds", vmin=0.0, vmax=1.0)
        for i in range(len(names)):
            for j in range(len(names)):
                if math.isfinite(values[i, j]):
                    colour = "white" if values[i, j] > 0.6 else "black"
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("column: the strategy beaten")
        ax.set_ylabel("row: the strategy better")
        ax.set_title(f"{title}: share of budgets significantly better", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _panel_against_baseline(ax: Any, group: Group, looks: dict[str, dict[str, Any]], alpha: float) -> None:
    """Draw one group's differences to ``random`` (points) against labels, confidence bands shaded; ``looks``:
    each strategy's colour and line style (the same in every panel)."""
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_title(group.regime, fontsize=9)
    ax.grid(True, alpha=0.3)
    if BASELINE not in group.strategies:
        ax.text(0.5, 0.5, f"no `{BASELINE}` runs", ha="center", va="center", transform=ax.transAxes)
        return
    for s in group.strategies:
        if s == BASELINE:
            continue
        budgets, tests = curve_against(group, s, alpha)
        if not budgets:
            continue
        mean = np.array([t.mean for t in tests]) * 100
        low = np.array([t.low for t in tests]) * 100
        high = np.array([t.high for t in tests]) * 100
        (line,) = ax.plot(budgets, mean, marker="o", markersize=2.5, linewidth=1.4, label=s, **looks[s])
        band = np.isfinite(low)
        ax.fill_between(budgets, np.where(band, low, mean), np.where(band, high, mean), color=line.get_color(),
                        alpha=0.15, linewidth=0)  # fmt: skip
    ax.set_xlabel("labelled examples", fontsize=8)
    ax.set_ylabel(f"{group.metric} − {BASELINE} (points)", fontsize=8)


def plot_against_baseline(groups: Sequence[Group], path: Path, alpha: float = ALPHA) -> Path:
    """Write one figure with a panel per group (dataset / regime): every strategy's mean difference to ``random``
    against labels, with its ``1 - alpha`` confidence interval shaded.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows + 0.6), dpi=110, squeeze=False)
    strategies = list(dict.fromkeys(s for g in groups for s in g.strategies))
    looks = {s: _look(plt, i, len(strategies)) for i, s in enumerate(strategies)}
    try:
        for ax, group in zip(axes.flat, groups, strict=False):
            _panel_against_baseline(ax, group, looks, alpha)
        for ax in list(axes.flat)[len(groups) :]:
            ax.set_visible(False)
        handles: dict[str, Any] = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        bottom = 0.0
        if handles:
            legend = fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(5, len(handles)),
                                fontsize=7, frameon=False)  # fmt: skip
            fig.canvas.draw()  # the legend's height (its rows) decides the room the panels leave below them
            bottom = legend.get_window_extent().height / fig.bbox.height + 0.01
        fig.suptitle(f"Difference to {BASELINE}: mean over seeds, {100 * (1 - alpha):g} % CI shaded", fontsize=10)
        fig.tight_layout(rect=(0, bottom, 1, 0.96))
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
