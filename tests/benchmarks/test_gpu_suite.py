"""The GPU suite (benchmarks/gpu.py) runs end to end at toy sizes on the CPU, and refuses bad arguments."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from saal.errors import SaalError

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def toy_data(tmp_path: Path) -> Path:
    """A CIFAR-shaped pack in miniature: 8x8 RGB uint8 images, 10 classes, compressed as the packer writes it."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "pack"
    folder.mkdir()
    for split, n in (("train", 40), ("test", 20)):
        x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        np.savez_compressed(folder / f"{split}.npz", x=x, y=np.arange(n) % 10)
    return folder


@pytest.mark.slow
def test_the_toy_suite_writes_every_part(suite: ModuleType, toy_data: Path, tmp_path: Path) -> None:
    out, runs = tmp_path / "out", tmp_path / "runs"
    code = suite.main(["--toy", "--device", "cpu", "--data", f"npz:{toy_data}", "--out", str(out), "--runs", str(runs),
                       "--strategies", "random,saal", "--seeds", "7,", "--rounds", "1", "--workers", "2"])  # fmt: skip
    assert code == 0
    for part in ("equality", "acquisition", "fit", "protocol"):
        assert (out / f"{part}.json").is_file() and (out / f"{part}.md").is_file()
    equality = json.loads((out / "equality.json").read_text())
    assert equality["passed"] and len(equality["rows"]) == 18
    assert max(max(r["loss"], r["max"], r["diff"]) for r in equality["rows"]) < 1e-9
    acquisition = json.loads((out / "acquisition.json").read_text())
    methods = {(r["model"], r["method"]) for r in acquisition["rows"]}
    assert ("resnet18", "saal") in methods and ("cnn", "naive loop (model copy per instance)") in methods
    assert all(r["seconds"] > 0 for r in acquisition["rows"])
    fit = json.loads((out / "fit.json").read_text())
    assert fit["same_training"] and set(fit["results"]) == {"before", "after"}
    protocol = json.loads((out / "protocol.json").read_text())
    assert sorted(protocol["finished_runs"]) == ["random/seed-7", "saal/seed-7"]
    assert protocol["exit_codes"] == [0, 0] and protocol["report_exit_code"] == 0
    assert (out / "protocol" / "report.md").is_file()
    assert "GPU suite on CPU" in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parts", "speed"], "unknown part speed"),
        (["--device", "cpu"], "the full suite needs a GPU"),
        (["--toy", "--device", "cpu", "--workers", "0"], "--workers and --rounds must be at least 1"),
        (
            ["--toy", "--device", "cpu", "--data", "npz:/no/such/pack"],
            "make it with python benchmarks/pack_gpu_data.py",
        ),
    ],
)
def test_bad_arguments_are_refused_in_one_line(
    suite: ModuleType, args: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(SaalError, match=message) as err:
        suite.main([*args, "--out", str(tmp_path / "out")])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
