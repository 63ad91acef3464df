"""The GPU suite in one command: acquisition speed, the engine's float64 equality, training speed before/after,
and a shortened paper protocol on CIFAR-10, every number written to files.

    python benchmarks/pack_gpu_data.py --source /tmp/cifar10-jpg      # once, where the CIFAR-10 JPEGs are
    python benchmarks/gpu.py --out benchmarks/results/gpu             # on the GPU machine: < 10 minutes
    python benchmarks/gpu.py --toy --device cpu --data npz:DIR --out /tmp/gpu-toy   # the same code at toy sizes

Parts (``--parts``, default all, in this order; each writes ``<part>.json`` and ``<part>.md`` into ``--out``):

* ``equality``: the per-instance engine against the definition (a model copy per instance) in float64 on the
  device: MLP, small CNN and ResNet-18 (random BatchNorm statistics), ASAM and SAM, the closed-form engine,
  the ``torch.func`` engine and the last-layer closed form. Passes when every relative error is below 1e-9.
* ``acquisition``: ``strategy.select`` on a 2,000-item pool with the data on the device, next to a plain
  forward pass: entropy, per-instance SAAL (ASAM and SAM), last-layer, per-batch, and the naive loop (timed on
  fewer items, extrapolated, marked ``*``); small CNN and ResNet-18; CUDA-synchronised wall times, best of 3.
  Targets: per-instance SAAL at most 4x a forward pass and at least 50x faster than the naive loop on ResNet-18.
* ``fit``: one round of training (ResNet-18, 120 labels, batch 10, crop/flip) and one evaluation, *before* (the
  saal 0.1 loop, reproduced here: batches read from the dataset every step, a per-image augmentation loop,
  the loss read back to the host every step, evaluation in batches of 256) and *after* (:func:`saal.training.fit`:
  the labelled set loaded once onto the device, one batched augmentation gather, the loss summed on the device;
  evaluation in batches of 2,048). Both train identically (same batches, same draws).
* ``protocol``: the paper's CIFAR-10 protocol shortened (``configs/paper-cifar10.yaml``: ResNet-18, Adam lr
  1e-3, batch 10, 50 epochs per round, 20 initial labels, 10 per round, subset 2,000) on the packed sample
  (``gpu-data/cifar10``: 10,000 train, 5,000 test images), for random, entropy, saal and saal-reference, with
  ``--rounds`` rounds and ``--seeds``: ``--workers`` ``saal run`` processes side by side on the one GPU, sharing
  the grid through the run folders' locks. Whatever is not finished when the time budget runs out is stopped
  (it resumes when the same command is given again) and the report covers what finished. The run folders go
  to ``runs/gpu-paper-short`` (git-ignored: checkpoints are large); the report to ``OUT/protocol/``.

``summary.md`` gathers the device, every part's headline numbers and the targets met or missed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from saal.cli import main as saal_main  # noqa: E402
from saal.data import load_dataset  # noqa: E402
from saal.data.base import ArrayDataset  # noqa: E402
from saal.errors import SaalError  # noqa: E402
from saal.models import MLP, ResNet18, SmallCNN  # noqa: E402
from saal.pool import Pool  # noqa: E402
from saal.sharpness import naive_perturbed_losses, sharpness_terms  # noqa: E402
from saal.strategies import build_strategy  # noqa: E402
from saal.tasks import Classification  # noqa: E402
from saal.training import TrainConfig, fit, make_optimizer  # noqa: E402

PARTS = ("equality", "acquisition", "fit", "protocol")
DEFAULT_DATA = "npz:gpu-data/cifar10"
ACQUISITION_METHODS = (
    "entropy",
    "saal",
    "saal[perturbation=sam]",
    "saal[scope=last-layer]",
    "saal[granularity=per-batch]",
)
EQUALITY_TOLERANCE = 1e-9
STOPPED = " (stopped at the time budget; the same command resumes)"


class Sizes:
    """How big each part is: the real suite or toy sizes for a CPU check (``--toy``)."""

    def __init__(self, toy: bool) -> None:
        self.toy = toy
        self.pool = 6 if toy else 2000
        self.k = 2 if toy else 10
        self.naive_items = {"cnn": 4 if toy else 100, "resnet18": 2 if toy else 20}
        self.repeats = 1 if toy else 3
        self.side = 8 if toy else 32  # ResNet-18's input side in the acquisition and fit parts
        self.fit_labels = 20 if toy else 120
        self.fit_epochs = 1 if toy else 5
        self.eval_items = 40 if toy else 5000


# -- timing ---------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Return the best wall seconds of ``repeats`` calls of ``fn``, synchronised with the device."""
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def met(ok: bool) -> str:
    """Return ``"met"`` or ``"missed"``."""
    return "met" if ok else "missed"


def write_part(out: Path, name: str, data: dict[str, Any], markdown: str) -> None:
    """Write ``OUT/<name>.json`` and ``OUT/<name>.md``."""
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=float) + "\n")
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")


def table(header: list[str], rows: list[list[Any]]) -> str:
    """Return a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- (b) equality ---------------------------------------------------------------------------------------------
def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm2d non-trivial running statistics and affine parameters; return the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
    return model


def equality_cases(toy: bool) -> Iterator[tuple[str, nn.Module, torch.Tensor]]:
    """Yield ``(name, seeded model, inputs)``: the engine tests' three architectures."""
    torch.manual_seed(0)
    yield "mlp", MLP((1, 8, 8), 10), torch.randn(6 if toy else 64, 1, 8, 8)
    torch.manual_seed(0)
    side = 8 if toy else 28
    yield "cnn", SmallCNN(1, 10, side), torch.randn(4 if toy else 64, 1, side, side)
    torch.manual_seed(0)
    side = 8 if toy else 32
    yield "resnet18", randomise_norms(ResNet18(3, 10)), torch.randn(1 if toy else 16, 3, side, side)


def relative_errors(loss: torch.Tensor, pert: torch.Tensor, loss_ref: torch.Tensor, pert_ref: torch.Tensor) -> dict:
    """Return the largest relative errors of the loss, the perturbed loss and their difference (the latter
    relative to the largest reference difference)."""
    diff, diff_ref = pert - loss, pert_ref - loss_ref
    return {
        "loss": float(((loss - loss_ref).abs() / loss_ref.abs().clamp_min(1e-300)).max()),
        "max": float(((pert - pert_ref).abs() / pert_ref.abs().clamp_min(1e-300)).max()),
        "diff": float((diff - diff_ref).abs().max() / diff_ref.abs().max().clamp_min(1e-300)),
    }


def run_equality(device: torch.device, sizes: Sizes) -> tuple[dict[str, Any], str]:
    """The engine against the definition in float64 on ``device``; return (data, markdown)."""
    rows: list[dict[str, Any]] = []
    for name, model, x in equality_cases(sizes.toy):
        model, x = model.double().to(device).eval(), x.double().to(device)
        for perturbation in ("asam", "sam"):
            ref = naive_perturbed_losses(model, x, rho=0.05, perturbation=perturbation)
            ref_last = naive_perturbed_losses(model, x, rho=0.05, perturbation=perturbation, scope="last-layer")
            for label, kwargs, (loss_ref, pert_ref) in (
                ("per-instance (closed form)", {}, ref),
                ("per-instance (torch.func)", {"engine": "functional"}, ref),
                ("last-layer", {"scope": "last-layer"}, ref_last),
            ):
                t = sharpness_terms(model, x, rho=0.05, perturbation=perturbation, **kwargs)
                errors = relative_errors(t.loss, t.perturbed_loss, loss_ref, pert_ref)
                worst = max(errors.values())
                rows.append({"model": name, "perturbation": perturbation, "engine": label, "items": len(x),
                             **errors, "passed": worst <= EQUALITY_TOLERANCE})  # fmt: skip
    passed = all(r["passed"] for r in rows)
    md = [
        f"# Engine vs definition, float64 on {describe_device(device)}",
        "",
        f"Largest relative error over the batch (diff: relative to the largest reference difference); "
        f"pass <= {EQUALITY_TOLERANCE:g}. **{'All passed' if passed else 'FAILED'}.**",
        "",
        table(
            ["model", "perturbation", "engine", "items", "loss", "max", "diff", "pass"],
            [
                [
                    r["model"],
                    r["perturbation"],
                    r["engine"],
                    r["items"],
                    f"{r['loss']:.1e}",
                    f"{r['max']:.1e}",
                    f"{r['diff']:.1e}",
                    "yes" if r["passed"] else "NO",
                ]
                for r in rows
            ],
        ),
    ]
    return {
        "device": describe_device(device),
        "tolerance": EQUALITY_TOLERANCE,
        "passed": passed,
        "rows": rows,
    }, "\n".join(md)


# -- (a) acquisition ------------------------------------------------------------------------------------------
def acquisition_model(name: str, sizes: Sizes) -> tuple[nn.Module, torch.Tensor]:
    """Return a seeded fresh model (eval mode) and random inputs for the pool."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "cnn":
        side = 8 if sizes.toy else 28
        return SmallCNN(1, 10, side).eval(), torch.randn(sizes.pool, 1, side, side, generator=g)
    return ResNet18(3, 10).eval(), torch.randn(sizes.pool, 3, sizes.side, sizes.side, generator=g)


def forward_pass(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> None:
    """A plain batched eval-mode forward pass over device-resident inputs, gradients off."""
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            model(inputs[start : start + batch_size])


def run_acquisition(device: torch.device, sizes: Sizes, batch_size: int = 256) -> tuple[dict[str, Any], str]:
    """Time the forward pass, the strategies and the naive loop on both models; return (data, markdown)."""
    rows: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    for name in ("cnn", "resnet18"):
        model, inputs = acquisition_model(name, sizes)
        model, inputs = model.to(device), inputs.to(device)
        dataset = ArrayDataset(inputs, np.zeros(len(inputs)))  # on the device: no host copy per batch
        pool = Pool(dataset, 10)
        forward_pass(model, inputs, batch_size)  # warm-up (allocator, cuDNN algorithm choice)
        seconds = {
            "forward pass": timed(lambda m=model, x=inputs: forward_pass(m, x, batch_size), device, sizes.repeats)
        }
        items = {"forward pass": len(inputs)}
        for spec in ACQUISITION_METHODS:
            strategy = build_strategy(spec, batch_size=batch_size)
            strategy.select(model, pool, sizes.k, 0)  # warm-up
            seconds[spec] = timed(lambda s=strategy, m=model, p=pool: s.select(m, p, sizes.k, 0), device, sizes.repeats)
            items[spec] = len(inputs)
        n = sizes.naive_items[name]
        few = inputs[:n]
        naive_perturbed_losses(model, few[:1])
        seconds["naive loop (model copy per instance)"] = timed(
            lambda m=model, x=few: naive_perturbed_losses(m, x), device, 1
        )
        items["naive loop (model copy per instance)"] = n
        forward = seconds["forward pass"]
        for method, s in seconds.items():
            scaled = s * len(inputs) / items[method]
            rows.append({"model": name, "method": method, "items_timed": items[method], "seconds": scaled,
                         "x_forward": scaled / forward, "extrapolated": items[method] < len(inputs)})  # fmt: skip
        naive = next(r["seconds"] for r in rows if r["model"] == name and r["method"].startswith("naive"))
        saal = next(r["seconds"] for r in rows if r["model"] == name and r["method"] == "saal")
        targets.append({"model": name, "saal_x_forward": saal / forward, "naive_over_saal": naive / saal})
    resnet = next(t for t in targets if t["model"] == "resnet18")
    verdict = {
        "saal_at_most_4x_forward_on_resnet18": resnet["saal_x_forward"] <= 4.0,
        "saal_at_least_50x_faster_than_naive_on_resnet18": resnet["naive_over_saal"] >= 50.0,
    }
    md = [
        f"# Acquisition speed on {describe_device(device)}",
        "",
        f"`strategy.select(model, pool, k={sizes.k})` over {len(inputs)} pool items held on the device, pool batch "
        f"{batch_size}, fresh seeded weights; CUDA-synchronised wall seconds, best of {sizes.repeats}. The naive "
        "loop is timed on fewer items and scaled to the pool (`*`).",
        "",
        table(
            ["model", "method", "seconds", "x forward"],
            [
                [
                    r["model"],
                    r["method"],
                    f"{r['seconds']:.3f}{' *' if r['extrapolated'] else ''}",
                    f"{r['x_forward']:.2f}",
                ]
                for r in rows
            ],
        ),
        "",
        "Targets (ResNet-18): per-instance SAAL <= 4x the forward pass: "
        f"**{met(verdict['saal_at_most_4x_forward_on_resnet18'])}** ({resnet['saal_x_forward']:.2f}x); "
        f">= 50x faster than the naive loop: **{met(verdict['saal_at_least_50x_faster_than_naive_on_resnet18'])}** "
        f"({resnet['naive_over_saal']:.1f}x).",
    ]
    data = {
        "device": describe_device(device),
        "pool": len(inputs),
        "batch_size": batch_size,
        "rows": rows,
        "targets": targets,
        "verdict": verdict,
    }
    return data, "\n".join(md)


# -- fit before / after ---------------------------------------------------------------------------------------
def _augment_per_image(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """saal 0.1's augmentation: one crop and flip per image, in a Python loop."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def fit_before(
    model: nn.Module, dataset: ArrayDataset, indices: np.ndarray, config: TrainConfig, generator: torch.Generator
) -> float:
    """saal 0.1's training loop: host batches moved every step, per-image augmentation, the loss read back to
    the host every step. Returns the last epoch's mean loss."""
    device = next(model.parameters()).device
    optimizer = make_optimizer(list(model.parameters()), config)
    model.train()
    labels = dataset.targets[indices]
    epoch_loss = math.nan
    for _ in range(config.epochs):
        total, count = 0.0, 0
        order = torch.randperm(len(indices), generator=generator).numpy()
        for start in range(0, len(order), config.batch_size):
            pos = order[start : start + config.batch_size]
            x = dataset.inputs[torch.as_tensor(indices[pos])]
            y = torch.as_tensor(labels[pos])
            if config.augment:
                x = _augment_per_image(x, generator)
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        epoch_loss = total / max(count, 1)
    model.eval()
    return epoch_loss


def run_fit(device: torch.device, sizes: Sizes, data: str) -> tuple[dict[str, Any], str]:
    """Time one round of training and one evaluation, before and after; return (data, markdown)."""
    bundle = load_dataset(data)
    train, test = bundle.train, bundle.test
    if not isinstance(train, ArrayDataset) or not isinstance(test, ArrayDataset):
        raise SaalError(f"{data} must load into memory (a compressed .npz) for the fit part")
    rng = np.random.default_rng(0)
    indices = np.sort(rng.choice(len(train), sizes.fit_labels, replace=False))
    config = TrainConfig(epochs=sizes.fit_epochs, batch_size=10, augment=True)
    task = Classification(bundle.num_classes)
    torch.manual_seed(0)
    initial = ResNet18(bundle.channels, bundle.num_classes)
    results: dict[str, Any] = {}
    for label in ("before", "after", "before", "after"):  # alternated: load bursts fall on both
        model = copy.deepcopy(initial).to(device)
        synchronize(device)
        start = time.perf_counter()
        if label == "before":
            loss = fit_before(model, train, indices, config, torch.Generator().manual_seed(1))
        else:
            loss = fit(
                model, train, indices, train.targets[indices], config, torch.Generator().manual_seed(1)
            ).final_loss
        synchronize(device)
        seconds = time.perf_counter() - start
        test_part = ArrayDataset(test.inputs[: sizes.eval_items], test.targets[: sizes.eval_items])
        eval_batch = 256 if label == "before" else 2048
        accuracy = task.evaluate(model, test_part, eval_batch).value
        eval_seconds = timed(lambda m=model, d=test_part, b=eval_batch: task.evaluate(m, d, b), device, sizes.repeats)
        best = results.get(label)
        if best is None or seconds < best["fit_seconds"]:
            results[label] = {"fit_seconds": seconds, "final_loss": loss, "eval_seconds": eval_seconds,
                              "eval_batch": eval_batch, "accuracy": accuracy}  # fmt: skip
    steps = sizes.fit_epochs * math.ceil(sizes.fit_labels / 10)
    same = math.isclose(results["before"]["final_loss"], results["after"]["final_loss"], rel_tol=1e-4)
    md = [
        f"# Training and evaluation speed, before and after, on {describe_device(device)}",
        "",
        f"ResNet-18, {sizes.fit_labels} labels, batch 10, crop/flip, {sizes.fit_epochs} epochs ({steps} steps); "
        f"evaluation of {sizes.eval_items} test images. Best of two alternated runs each.",
        "",
        table(
            ["", "fit s", "ms / step", "eval s", "eval batch", "final loss"],
            [
                [
                    k,
                    f"{v['fit_seconds']:.2f}",
                    f"{1000 * v['fit_seconds'] / steps:.1f}",
                    f"{v['eval_seconds']:.3f}",
                    v["eval_batch"],
                    f"{v['final_loss']:.5f}",
                ]
                for k, v in results.items()
            ],
        ),
        "",
        f"Speed-up: training {results['before']['fit_seconds'] / results['after']['fit_seconds']:.2f}x, "
        f"evaluation {results['before']['eval_seconds'] / max(results['after']['eval_seconds'], 1e-9):.2f}x; "
        f"the same training (final loss equal to 1e-4 relative): {'yes' if same else 'NO'}.",
    ]
    return {"device": describe_device(device), "steps": steps, "results": results, "same_training": same}, "\n".join(md)


# -- (c) the shortened paper protocol -------------------------------------------------------------------------
def protocol_command(args: argparse.Namespace, runs: Path) -> list[str]:
    """Return the ``saal run`` command every worker runs (the same command: the folder locks split the grid)."""
    cmd = [sys.executable, "-m", "saal", "run", "--config", str(ROOT / "configs" / "paper-cifar10.yaml"),
           "--dataset", args.data, "--device", args.device, "--strategies", args.strategies,
           "--seeds", args.seeds, "--rounds", str(args.rounds), "--out", str(runs), "--quiet"]  # fmt: skip
    if args.toy:
        cmd += ["--model", "cnn", "--epochs", "1", "--subset", "20", "--initial", "10", "--query", "2"]
    return cmd


def run_protocol(args: argparse.Namespace, out: Path, deadline: float) -> tuple[dict[str, Any], str]:
    """Run the grid with ``--workers`` processes until done or ``deadline``; report what finished."""
    runs = Path(args.runs)
    cmd = protocol_command(args, runs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    logs = out / "protocol-logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    workers = []
    for i in range(args.workers):
        log = open(logs / f"worker-{i}.log", "w")  # noqa: SIM115 - closed below
        workers.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True), log))  # fmt: skip
        time.sleep(0.5 if not args.toy else 0.0)  # staggered: the first creates the output folder
    stopped = False
    while any(p.poll() is None for p, _ in workers):
        if time.time() > deadline:
            for p, _ in workers:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            stopped = True
            for p, _ in workers:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            break
        time.sleep(0.2)
    for _, log in workers:
        log.close()
    codes = [p.returncode for p, _ in workers]
    wall = time.perf_counter() - start
    report_dir = out / "protocol"
    report_errors = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(report_errors):
        report_code = saal_main(["report", str(runs), "--out", str(report_dir)]) if runs.is_dir() else 2
    finished, rounds_done = [], 0
    for rounds_file in sorted(runs.glob("*/seed-*/rounds.json")):
        rows = json.loads(rounds_file.read_text())
        rounds_done += len(rows)
        if len(rows) == args.rounds + 1:
            finished.append(f"{rounds_file.parent.parent.name}/{rounds_file.parent.name}")
    data = {"command": cmd, "workers": args.workers, "wall_seconds": wall, "stopped_at_deadline": stopped,
            "exit_codes": codes, "finished_runs": finished, "rounds_recorded": rounds_done,
            "report": str(report_dir), "report_exit_code": report_code}  # fmt: skip
    md = [
        f"# Shortened paper protocol on {describe_device(torch.device(args.device))}",
        "",
        f"`{' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}`, {args.workers} such processes "
        f"side by side for {wall:.0f} s{STOPPED if stopped else ''}: {len(finished)} runs finished, "
        f"{rounds_done} rounds recorded. Report: [protocol/report.md](protocol/report.md).",
        "",
        "Data: the packed CIFAR-10 sample (see gpu-data/cifar10/MANIFEST.json where it was made): "
        "10,000 train and 5,000 test images by default; the other 40,000 train and 5,000 test images are left out.",
    ]
    if report_code != 0:
        md.append(f"\n`saal report` failed: {report_errors.getvalue().strip() or 'no run folder'}")
    return data, "\n".join(md)


# -- the suite ------------------------------------------------------------------------------------------------
def describe_device(device: torch.device) -> str:
    """Return the device in words (the GPU's name, or the CPU's)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the checked arguments.

    Raises:
        SaalError: a bad argument (one line).
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/gpu", help="folder for every measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--toy", action="store_true", help="toy sizes (a CPU check that the suite works)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--data", default=DEFAULT_DATA, help="the packed CIFAR-10 sample (benchmarks/pack_gpu_data.py)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall seconds for the whole suite")
    p.add_argument("--strategies", default="random,entropy,saal,saal-reference")
    p.add_argument("--seeds", default="123,456,789")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--workers", type=int, default=6, help="saal run processes side by side on the GPU")
    p.add_argument("--runs", default=str(ROOT / "runs" / "gpu-paper-short"), help="run folders of the protocol")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in parts if s not in PARTS]
    if unknown or not parts:
        raise SaalError(f"--parts: unknown part {unknown[0] if unknown else '(none)'}; choose from {', '.join(PARTS)}")
    args.parts = parts
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SaalError(f"--device {args.device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SaalError("no CUDA GPU here; give --toy --device cpu to check the suite at toy sizes")
    if device.type == "cpu" and not args.toy:
        raise SaalError("the full suite needs a GPU; on the CPU give --toy")
    if args.workers < 1 or args.rounds < 1 or args.budget_s <= 0:
        raise SaalError("--workers and --rounds must be at least 1, --budget-s positive")
    if ("fit" in parts or "protocol" in parts) and args.data.startswith("npz:"):
        path = Path(args.data[4:])
        if not (path if path.is_absolute() else ROOT / path).exists():
            raise SaalError(f"{args.data} does not exist; make it with python benchmarks/pack_gpu_data.py --source DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the suite. Returns 0 when every check passed, 1 when an equality check failed.

    Raises:
        SaalError: a bad argument (the command line prints one line and exits 2).
    """
    args = parse_args(argv)
    start = time.time()
    deadline = start + args.budget_s
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sizes = Sizes(args.toy)
    environment = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "toy": args.toy,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
        "command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "environment.json").write_text(json.dumps(environment, indent=2) + "\n")
    summary = [
        f"# GPU suite on {environment['device']}",
        "",
        f"`{environment['command']}`, torch {torch.__version__}",
        "",
    ]
    part_seconds: dict[str, float] = {}
    status = 0
    for part in args.parts:
        t0 = time.time()
        print(f"[{time.time() - start:6.1f} s] {part} ...", flush=True)
        if part == "equality":
            data, md = run_equality(device, sizes)
            verdict = "all passed" if data["passed"] else "FAILED"
            summary.append(
                f"- engine vs definition, float64: {verdict} ({len(data['rows'])} checks; [equality.md](equality.md))"
            )
            status = status or (0 if data["passed"] else 1)
        elif part == "acquisition":
            data, md = run_acquisition(device, sizes)
            r = next(t for t in data["targets"] if t["model"] == "resnet18")
            summary.append(
                f"- acquisition, ResNet-18: per-instance SAAL {r['saal_x_forward']:.2f}x a forward pass, "
                f"{r['naive_over_saal']:.1f}x faster than the naive loop ([acquisition.md](acquisition.md))"
            )
        elif part == "fit":
            data, md = run_fit(device, sizes, args.data)
            b, a = data["results"]["before"], data["results"]["after"]
            summary.append(
                f"- one training round: {b['fit_seconds']:.2f} s before, {a['fit_seconds']:.2f} s after; "
                f"evaluation {b['eval_seconds']:.3f} s before, {a['eval_seconds']:.3f} s after ([fit.md](fit.md))"
            )
        else:
            data, md = run_protocol(args, out, deadline - 15)
            summary.append(
                f"- shortened paper protocol: {len(data['finished_runs'])} runs finished in "
                f"{data['wall_seconds']:.0f} s ([protocol.md](protocol.md))"
            )
        write_part(out, part, data, md)
        part_seconds[part] = time.time() - t0
    total = time.time() - start
    summary += [
        "",
        table(["part", "seconds"], [[k, f"{v:.1f}"] for k, v in part_seconds.items()] + [["total", f"{total:.1f}"]]),
    ]
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print(f"[{total:6.1f} s] done: {out}/summary.md", flush=True)
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SaalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
