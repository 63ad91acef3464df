"""Cold-start selection at scale: time, memory, the approximations against the exact choice, scikit-activeml beside.

For every registered cold-start strategy of ``--strategies`` (default: typiclust, probcover, herding, uherding,
saal-herding; the ones not registered are skipped), on seeded clustered random embeddings (100 Gaussian clusters,
10 classes = cluster mod 10; the pool's items *are* the embeddings, read with ``embedding="input"``), picking
``k = 10`` with one torch thread:

* ``time``: selection seconds at 50,000 x 1,280, with nothing labelled and with 20 labelled items (a linear head
  on the embeddings trained on them, 30 epochs: what uherding's margin and saal-herding's SAAL score read).
* ``memory``: peak resident memory of one selection at 20,000 and 1,000,000 items (20 labelled), each in a fresh
  subprocess; the peak is the kernel's high-water mark (VmHWM) reset just before ``select``. ``growth`` is the
  peak minus the resident size just before (what the selection adds); ``beside_embeddings`` the peak minus the
  ``N x d`` float32 embedding matrix the pool holds. ``--memory-dim`` (default 128) keeps the 1M matrix at 0.5 GB.
* ``agreement``: each strategy's approximation against its exact choice, same seed, at 5,000 items (seeds 0-2;
  0 and 20 labelled) with every sample size scaled to 5,000 / 50,000 of its default (as aggressive as the
  defaults are at 50,000), and for the herding strategies also at 20,000 with the defaults. Reported: the share
  of identical picks and the ratio of the objectives (approximate / exact): for the herding strategies their own
  (uncertainty-weighted) coverage over every candidate, with the bandwidth and weights they used; for TypiClust
  and ProbCover, which optimise something else, the Gaussian-kernel coverage at MaxHerding's default bandwidth.
* ``skactiveml``: at 10,000 items, scikit-activeml's implementation of the same method on the same embeddings
  (MaxHerding with ``gamma = 1 / (2 sigma^2)``; TypiClust with ``k = 20`` neighbours; ProbCover with its own
  purity rule, and with our radius given to it): whether the choice is the same, and the time ratio. Installed
  apart from the project (``pip install --no-deps --target DIR scikit-activeml makefun``) and put on
  ``sys.path`` here only (``--skactiveml-path``).

Each row is a JSON line on stdout and appended to ``--out``::

    OMP_NUM_THREADS=1 python benchmarks/cold_start_selection.py --skactiveml-path /work/skactiveml-pkgs \\
        --out benchmarks/results/cold-start/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from saal.data import ArrayDataset
from saal.pool import Pool
from saal.strategies import Strategy, strategy_class, strategy_names, strategy_options
from saal.strategies.embedding_input import l2_normalise
from saal.strategies.herding import DEFAULT_BANDWIDTH, coverage, margin_uncertainty, pool_logits
from saal.training import TrainConfig, fit

COLD_START = ("typiclust", "probcover", "herding", "uherding", "saal-herding")
HERDING = ("herding", "uherding", "saal-herding")
SAMPLE_OPTIONS = ("sample", "candidates", "candidate_sample", "coverage_sample")
CLASSES = 10
MIB = 1024**2
Emit = Callable[[dict[str, Any]], None]
LAST_CPU = [0.0]  # CPU seconds of the last timed selection: the machine is shared, wall time depends on the load


def embeddings(n: int, d: int, seed: int = 0, clusters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Return ``n`` seeded points of a mixture of ``clusters`` Gaussians (``n x d`` float32) and their classes."""
    centres = np.random.default_rng(seed).standard_normal((clusters, d), dtype=np.float32)
    x = np.empty((n, d), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    for start in range(0, n, 65536):
        g = np.random.default_rng([seed, start])
        which = g.integers(0, clusters, min(n, start + 65536) - start)
        x[start : start + len(which)] = centres[which] + 0.7 * g.standard_normal((len(which), d), dtype=np.float32)
        y[start : start + len(which)] = which % CLASSES
    return x, y


def cluster_ids(n: int, seed: int = 0, clusters: int = 100) -> np.ndarray:
    """Return the cluster each of :func:`embeddings`' points was drawn from (the same draws, without the points)."""
    out = np.empty(n, dtype=np.int64)
    for start in range(0, n, 65536):
        out[start : min(n, start + 65536)] = np.random.default_rng([seed, start]).integers(
            0, clusters, min(n, start + 65536) - start
        )
    return out


def shared_clusters(cluster: np.ndarray, ours: np.ndarray, theirs: np.ndarray) -> float:
    """The share of the clusters ``ours`` picks from that ``theirs`` picks from too."""
    mine = set(cluster[ours].tolist())
    return round(len(mine & set(cluster[theirs].tolist())) / len(mine), 3)


def setup(n: int, d: int, labelled: int, seed: int = 0) -> tuple[Pool, nn.Module, np.ndarray]:
    """Return a pool over the embeddings (``labelled`` seeded items labelled), a linear head trained on them, and
    the embeddings."""
    x, y = embeddings(n, d, seed)
    pool = Pool(ArrayDataset(torch.from_numpy(x), y), CLASSES)
    torch.manual_seed(seed)
    model = nn.Linear(d, CLASSES)
    if labelled:
        idx = np.sort(np.random.default_rng(seed + 1).choice(n, labelled, replace=False))
        pool.label(idx, y[idx])
        cfg = TrainConfig(epochs=30, batch_size=16)
        fit(model, pool.dataset, idx, y[idx], cfg, torch.Generator().manual_seed(seed))
    model.eval()
    return pool, model, x


def build(name: str, **options: Any) -> Strategy:
    """Return the strategy ``name`` on the input embeddings, with the ``options`` it takes."""
    known = strategy_options(name)
    return strategy_class(name)(embedding="input", **{k: v for k, v in options.items() if k in known})


def timed(strategy: Strategy, model: nn.Module, pool: Pool, k: int, seed: int) -> tuple[Any, float]:
    """Return the selection and its wall seconds (the CPU seconds are in :data:`LAST_CPU`)."""
    t0, c0 = time.perf_counter(), time.process_time()
    sel = strategy.select(model, pool, k, seed)
    LAST_CPU[0] = time.process_time() - c0
    return sel, time.perf_counter() - t0


def run_time(names: list[str], args: argparse.Namespace, emit: Emit) -> None:
    for labelled in (0, 20):
        pool, model, _ = setup(args.time_size, args.dim, labelled)
        for name in names:
            load = os.getloadavg()[0]
            sel, seconds = timed(build(name), model, pool, args.k, 0)
            emit({"section": "time", "strategy": name, "n": args.time_size, "d": args.dim, "labelled": labelled,
                  "seconds": round(seconds, 2), "cpu_seconds": round(LAST_CPU[0], 2),
                  "picks": sel.indices.tolist(), "reason": sel.reason,
                  "load_1min_before": round(load, 2)})  # fmt: skip


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child_memory(name: str, n: int, d: int, k: int) -> None:
    """Measure one selection in this (fresh) process and print one JSON line."""
    torch.set_num_threads(1)
    pool, model, x = setup(n, d, 20)
    strategy = build(name)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current size
    sel, seconds = timed(strategy, model, pool, k, 0)
    peak = _status("VmHWM")
    print(json.dumps({"rss_before_mib": round(before / MIB, 1), "peak_mib": round(peak / MIB, 1),
                      "growth_mib": round((peak - before) / MIB, 1), "embedding_mib": round(x.nbytes / MIB, 1),
                      "beside_embeddings_mib": round((peak - x.nbytes) / MIB, 1), "seconds": round(seconds, 2),
                      "reason": sel.reason}))  # fmt: skip


def run_memory(names: list[str], args: argparse.Namespace, emit: Emit) -> None:
    for name in names:
        rows: dict[int, dict[str, Any]] = {}
        for n in args.memory_sizes:
            cmd = [sys.executable, __file__, "--child-memory", name, "--n", str(n)]
            cmd += ["--memory-dim", str(args.memory_dim)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                row = {"error": f"timed out after {args.timeout} s"}
            except subprocess.CalledProcessError as exc:
                row = {"error": exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else f"exit {exc.returncode}"}
            rows[n] = row
            emit({"section": "memory", "strategy": name, "n": n, "d": args.memory_dim, "labelled": 20, **row})
        small, large = (rows[n] for n in (min(rows), max(rows)))
        if "peak_mib" in small and "peak_mib" in large:
            emit({"section": "memory-ratio", "strategy": name, "sizes": [min(rows), max(rows)],
                  "peak_beside_embeddings": round(large["beside_embeddings_mib"] / small["beside_embeddings_mib"], 3),
                  "growth": round(large["growth_mib"] / max(small["growth_mib"], 1e-9), 3)})  # fmt: skip


def approximate_options(name: str, n: int, scale: float) -> dict[str, Any]:
    """The sample options of ``name`` at ``scale`` times their defaults (and herding's exact limit at 0)."""
    defaults = strategy_options(name)
    out: dict[str, Any] = {k: max(1, round(defaults[k] * scale)) for k in SAMPLE_OPTIONS if defaults.get(k)}
    if "exact_limit" in defaults:
        out["exact_limit"] = 0 if scale < 1 else defaults["exact_limit"]
    return out


def exact_options(name: str, n: int) -> dict[str, Any]:
    """The options that make ``name`` exact on ``n`` candidates."""
    defaults = strategy_options(name)
    return {"exact_limit": n} if "exact_limit" in defaults else {k: None for k in SAMPLE_OPTIONS if k in defaults}


def objective(name: str, strategy: Strategy, model: nn.Module, pool: Pool, x: torch.Tensor, picks: np.ndarray) -> float:
    """The objective a choice is judged by (module docstring), over every unlabelled item."""
    cands, lab = pool.unlabelled_indices(), pool.labelled_indices()
    chosen = x[torch.as_tensor(np.concatenate([lab, picks]))]
    bw = getattr(strategy, "last_bandwidth", None) or DEFAULT_BANDWIDTH
    weights = None
    if name in HERDING and len(lab):
        if getattr(strategy, "uncertainty", "") == "margin":
            t = getattr(strategy, "last_temperature", None) or 1.0
            weights = margin_uncertainty(pool_logits(model, pool, cands, 1024), t)
        elif getattr(strategy, "uncertainty", "") == "saal":
            from saal.sharpness import pool_sharpness

            weights = torch.as_tensor(pool_sharpness(model, pool.dataset, cands, batch_size=1024).perturbed_loss)
    return coverage(x[torch.as_tensor(cands)], chosen, bw, weights)


def compare(name: str, n: int, scale: float, seeds: range, args: argparse.Namespace, emit: Emit) -> None:
    for labelled in (0, 20):
        pool, model, raw = setup(n, args.dim, labelled)
        x = l2_normalise(torch.from_numpy(raw))
        cluster = cluster_ids(n)
        for seed in seeds:
            runs = {}
            for kind, opts in (("exact", exact_options(name, n)), ("approximate", approximate_options(name, n, scale))):
                s = build(name, **opts)
                sel, seconds = timed(s, model, pool, args.k, seed)
                runs[kind] = (sel, seconds, objective(name, s, model, pool, x, sel.indices), opts)
            (ex, ex_s, ex_obj, _), (ap, ap_s, ap_obj, opts) = runs["exact"], runs["approximate"]
            emit({"section": "agreement", "strategy": name, "n": n, "d": args.dim, "labelled": labelled,
                  "seed": seed, "approximate_options": opts,
                  "identical_picks": len(set(ex.indices.tolist()) & set(ap.indices.tolist())) / args.k,
                  "shared_clusters": shared_clusters(cluster, ex.indices, ap.indices),
                  "objective_ratio": round(ap_obj / ex_obj, 4) if ex_obj else None,
                  "seconds_exact": round(ex_s, 2), "seconds_approximate": round(ap_s, 2)})  # fmt: skip


def run_agreement(names: list[str], args: argparse.Namespace, emit: Emit) -> None:
    for name in names:
        compare(name, args.agreement_size, args.agreement_size / 50_000, range(3), args, emit)
    for name in (n for n in names if n in HERDING):
        compare(name, 20_000, 1.0, range(1), args, emit)


def same(ours: np.ndarray, theirs: np.ndarray) -> str:
    if ours.tolist() == theirs.tolist():
        return "same picks, same order"
    shared = len(set(ours.tolist()) & set(theirs.tolist()))
    return "same picks, other order" if shared == len(ours) else f"{shared} of {len(ours)} picks shared"


def skactiveml_runs(name: str, pool: Pool, model: nn.Module, raw: np.ndarray, k: int) -> list[tuple[str, Any, Any]]:
    """Return ``(label, ours, theirs)`` pairs of callables giving picks for ``name``; empty when it has no twin."""
    from skactiveml.pool import MaxHerding, ProbCover, TypiClust

    lab = pool.labelled_indices()
    y = np.full(len(raw), np.nan)
    y[lab] = pool.labels_of(lab)
    xn = l2_normalise(raw)

    def ours(**opts: Any) -> Callable[[], np.ndarray]:
        return lambda: build(name, **opts).select(model, pool, k, 0).indices

    if name == "herding":
        them = MaxHerding(metric="rbf", metric_dict={"gamma": 1 / (2 * DEFAULT_BANDWIDTH**2)}, random_state=0)
        theirs = lambda: them.query(raw, y, batch_size=k)  # noqa: E731
        return [("exact", ours(exact_limit=len(raw)), theirs), ("default", ours(), theirs)]
    if name == "typiclust":
        them_t = TypiClust(k=20, random_state=0)
        theirs = lambda: them_t.query(xn, y, batch_size=k)  # noqa: E731
        return [("exact", ours(**exact_options(name, len(raw))), theirs), ("default", ours(), theirs)]
    if name == "probcover":
        them_p = ProbCover(n_classes=CLASSES, random_state=0)
        picks_p = lambda: them_p.query(xn, y, batch_size=k)  # noqa: E731

        def fixed() -> np.ndarray:
            given = ProbCover(n_classes=CLASSES, deltas=[them_p.delta_max_], random_state=0)
            with warnings.catch_warnings():  # one radius given: it skips the purity test, and warns of purity -1
                warnings.simplefilter("ignore", UserWarning)
                return given.query(xn, y, batch_size=k)

        return [("purity rule each", ours(**exact_options(name, len(raw))), picks_p),
                ("their radius given to both", lambda: build(name, delta=float(them_p.delta_max_),
                 **exact_options(name, len(raw))).select(model, pool, k, 0).indices, fixed)]  # fmt: skip
    return []


def run_skactiveml(names: list[str], args: argparse.Namespace, emit: Emit) -> None:
    sys.path.insert(0, str(args.skactiveml_path))
    import skactiveml

    for labelled in (0, 20):
        pool, model, raw = setup(args.sk_size, args.dim, labelled)
        for name in names:
            pairs = skactiveml_runs(name, pool, model, raw, args.k)
            if not pairs:
                note = (
                    "this package's hybrid: nothing to compare"
                    if name == "saal-herding"
                    else "not in this scikit-activeml release (UHerding is only in its development branch)"
                )
                emit({"section": "skactiveml", "strategy": name, "labelled": labelled,
                      "version": skactiveml.__version__, "note": note})  # fmt: skip
                continue
            for label, ours, theirs in pairs:
                emit({"section": "skactiveml", "strategy": name, "variant": label, "n": args.sk_size, "d": args.dim,
                      "labelled": labelled, "version": skactiveml.__version__,
                      **side_by_side(ours, theirs, pool, raw)})  # fmt: skip


def side_by_side(ours: Callable[[], Any], theirs: Callable[[], Any], pool: Pool, raw: np.ndarray) -> dict[str, Any]:
    """Run both choices; return how they compare: picks, clusters, Gaussian coverage, wall and CPU seconds."""
    times = []
    picks = []
    for run in (theirs, ours):
        t0, c0 = time.perf_counter(), time.process_time()
        picks.append(np.asarray(run()))
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    (their_picks, our_picks), ((their_s, their_c), (our_s, our_c)) = picks, times
    x = l2_normalise(torch.from_numpy(raw))
    lab, cands = pool.labelled_indices(), torch.as_tensor(pool.unlabelled_indices())
    cover = [coverage(x[cands], x[torch.as_tensor(np.concatenate([lab, p]))], DEFAULT_BANDWIDTH) for p in picks]
    return {"choice": same(our_picks, their_picks), "ours": our_picks.tolist(), "theirs": their_picks.tolist(),
            "shared_clusters": shared_clusters(cluster_ids(len(raw)), our_picks, their_picks),
            "coverage_ratio_ours_over_theirs": round(cover[1] / cover[0], 4),
            "seconds_ours": round(our_s, 2), "seconds_theirs": round(their_s, 2),
            "cpu_seconds_ours": round(our_c, 2), "cpu_seconds_theirs": round(their_c, 2),
            "time_ratio_theirs_over_ours": round(their_s / our_s, 2),
            "cpu_ratio_theirs_over_ours": round(their_c / our_c, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=",".join(COLD_START))
    parser.add_argument("--sections", default="time,memory,agreement,skactiveml")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--time-size", type=int, default=50_000)
    parser.add_argument("--memory-sizes", default="20000,1000000")
    parser.add_argument("--memory-dim", type=int, default=128)
    parser.add_argument("--agreement-size", type=int, default=5_000)
    parser.add_argument("--sk-size", type=int, default=10_000)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per memory subprocess")
    parser.add_argument("--skactiveml-path", type=Path, help="folder scikit-activeml was installed into")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.memory_sizes = [int(s) for s in args.memory_sizes.split(",")]
    torch.set_num_threads(1)
    if args.child_memory:
        child_memory(args.child_memory, args.n, args.memory_dim, args.k)
        return
    registered = set(strategy_names())
    names = [s for s in args.strategies.split(",") if s in registered and strategy_class(s).cold_start]

    def emit(row: dict[str, Any]) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as fh:
                fh.write(line + "\n")

    sections = {"time": run_time, "memory": run_memory, "agreement": run_agreement, "skactiveml": run_skactiveml}
    for section in args.sections.split(","):
        if section == "skactiveml" and args.skactiveml_path is None:
            print("skactiveml section skipped: give --skactiveml-path", file=sys.stderr)
            continue
        sections[section](names, args, emit)


if __name__ == "__main__":
    main()
