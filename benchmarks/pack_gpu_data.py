"""Pack a class-balanced, seeded sample of CIFAR-10 into a small folder that travels with the working tree.

    python benchmarks/pack_gpu_data.py --source /tmp/cifar10-jpg            # -> gpu-data/cifar10/{train,test}.npz

A GPU machine receives this repository's working tree (and named git-ignored paths) but cannot download
anything, and the whole tree must stay under 64 MiB. So the GPU suite (``benchmarks/gpu.py``) reads CIFAR-10
from ``gpu-data/cifar10/``: ``train.npz`` and ``test.npz`` with ``x`` (uint8, N x 32 x 32 x 3), ``y`` (int64) and
``classes``, compressed (so ``npz:`` loads them whole, into memory, ready to move to the device), and
``MANIFEST.json``: the source, the seed, what was kept and **what was left out**, the sizes and checksums.
``gpu-data/`` is git-ignored: never commit it.

The sample: ``--train-per-class`` train images and ``--test-per-class`` test images of each class, drawn
without replacement by ``numpy.random.default_rng(--seed)`` from the image folder's sorted file lists
(``SOURCE/{train,test}/<class>/*``), decoded as RGB. The default (1,000 + 500 per class: 10,000 train,
5,000 test) is about 45 MB; the rest of CIFAR-10 (40,000 train, 5,000 test images) is left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from saal.errors import SaalError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "gpu-data" / "cifar10"
TREE_LIMIT = 64 * 2**20


def _class_files(folder: Path) -> tuple[list[str], list[list[Path]]]:
    """Return the sorted class names under ``folder`` and each class's sorted image files.

    Raises:
        SaalError: the folder is missing or holds no class folder with images.
    """
    if not folder.is_dir():
        raise SaalError(f"{folder} does not exist; give --source the CIFAR-10 folder holding train/ and test/")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [
        sorted(p for p in (folder / c).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"}) for c in classes
    ]
    if not classes or any(not f for f in files):
        raise SaalError(f"{folder} must hold one folder of images per class")
    return classes, files


def pack_split(folder: Path, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Return ``(x uint8 N x 32 x 32 x 3, y int64, classes, images left out)`` of a balanced sample of ``folder``.

    Raises:
        SaalError: a class with fewer than ``per_class`` images, or an image that is not 32 x 32.
    """
    classes, files = _class_files(folder)
    xs, ys, left_out = [], [], 0
    for label, class_files in enumerate(files):
        if len(class_files) < per_class:
            raise SaalError(f"{folder / classes[label]} holds {len(class_files)} images, fewer than {per_class}")
        chosen = np.sort(rng.choice(len(class_files), size=per_class, replace=False))
        left_out += len(class_files) - per_class
        for i in chosen:
            with Image.open(class_files[i]) as img:
                pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
            if pixels.shape != (32, 32, 3):
                raise SaalError(f"{class_files[i]} is {pixels.shape[1]}x{pixels.shape[0]}; CIFAR images are 32x32")
            xs.append(pixels)
            ys.append(label)
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes, left_out


def tree_bytes(root: Path = ROOT) -> int:
    """Return the bytes of the working tree's files that git does not ignore (what a GPU machine receives)."""
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum((root / os.fsdecode(p)).stat().st_size for p in listed if p and (root / os.fsdecode(p)).is_file())


def main(argv: list[str] | None = None) -> int:
    """Pack the sample; print its size and the working tree's. Returns the exit code.

    Raises:
        SaalError: bad arguments or source (the CLI prints one line and exits 2).
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="CIFAR-10 image folder with train/<class>/* and test/<class>/*")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default gpu-data/cifar10, git-ignored)")
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.train_per_class < 1 or args.test_per_class < 1:
        raise SaalError("--train-per-class and --test-per-class must be at least 1")
    start = time.perf_counter()
    source, out = Path(args.source).expanduser(), Path(args.out)
    rng = np.random.default_rng(args.seed)
    manifest: dict[str, object] = {
        "what": "a class-balanced seeded sample of CIFAR-10 for the GPU suite (benchmarks/gpu.py); never commit it",
        "source": str(source.resolve()),
        "seed": args.seed,
        "made_by": "python benchmarks/pack_gpu_data.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    splits = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        splits[split] = pack_split(source / split, per_class, rng)
    out.mkdir(parents=True, exist_ok=True)
    for split, (x, y, classes, left_out) in splits.items():
        path = out / f"{split}.npz"
        np.savez_compressed(path, x=x, y=y, classes=np.asarray(classes))
        manifest[split] = {
            "items": len(y),
            "per_class": len(y) // len(classes),
            "left_out": left_out,
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    manifest["classes"] = splits["train"][2]
    packed = sum((out / f"{s}.npz").stat().st_size for s in splits)
    manifest["packed_bytes"] = packed
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    tree = tree_bytes()
    print(f"packed {out}: {packed / 2**20:.1f} MiB in {time.perf_counter() - start:.0f} s "
          f"(train {manifest['train']['items']}, test {manifest['test']['items']}; "  # type: ignore[index]
          f"left out {manifest['train']['left_out']} train and {manifest['test']['left_out']} test images)")  # type: ignore[index]  # fmt: skip
    print(f"working tree without ignored files: {tree / 2**20:.1f} MiB; with the pack: {(tree + packed) / 2**20:.1f} "
          f"MiB (limit {TREE_LIMIT / 2**20:.0f} MiB)")  # fmt: skip
    if tree + packed > TREE_LIMIT:
        print("warning: the tree and the pack exceed the limit; pack fewer images per class", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SaalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
