"""Time from a label to the new ranking in ``saal label``, on a folder of 5,000 images, on this CPU.

Starts a real ``saal label`` server (with its model job: the pretrained EfficientNet-Lite0 head and the ``saal``
strategy by default) on a folder of images, waits until the job has cached every image's embedding (timed: the
one-time cost), then acts as an annotator through the HTTP API: it labels ``--retrain-every`` images with their
true class, notes when the server confirmed the last of them, and polls ``/api/status`` until a new model version
is committed. Latency = the version's commit time minus that confirmation (the job's poll interval, training on all
labels so far, scoring every unlabelled image with the strategy, and the commit, all included). Repeated
``--rounds`` times.

The images: the first ``--per-class`` train JPEGs of each CIFAR-10 class from ``cifar10-jpg.zip`` (real photos,
32x32, resized to ``--image-size`` for the backbone) when the archive is given, else generated 64x64 images.

    python benchmarks/label_latency.py --zip ../shared/data/cifar10-jpg.zip --out benchmarks/results/label/latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def cifar_folder(archive: Path, root: Path, per_class: int) -> dict[str, str]:
    """Extract ``per_class`` train JPEGs of each class into ``root/<n>.jpg`` (no class in the path)."""
    truth: dict[str, str] = {}
    taken: dict[str, int] = {}
    with zipfile.ZipFile(archive) as z:
        for name in sorted(z.namelist()):
            parts = name.split("/")
            if len(parts) != 3 or parts[0] != "train" or not parts[2].endswith(".jpg"):
                continue
            if taken.get(parts[1], 0) >= per_class:
                continue
            taken[parts[1]] = taken.get(parts[1], 0) + 1
            target = root / f"{len(truth):05d}.jpg"
            target.write_bytes(z.read(name))
            truth[target.name] = parts[1]
    return truth


def generated_folder(root: Path, n: int) -> dict[str, str]:
    """Write ``n`` generated 64x64 two-class PNGs."""
    rng = np.random.default_rng(0)
    truth = {}
    for i in range(n):
        image = rng.integers(0, 90, (64, 64, 3), dtype=np.uint8)
        image[..., 0 if i % 2 else 2] += 120
        Image.fromarray(image).save(root / f"{i:05d}.png")
        truth[f"{i:05d}.png"] = "red" if i % 2 else "blue"
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zip", type=Path, help="cifar10-jpg.zip (else generated images)")
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--strategy", default="saal")
    parser.add_argument("--retrain-every", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        truth = cifar_folder(args.zip, folder, args.per_class) if args.zip else generated_folder(folder, 5000)
        classes = sorted(set(truth.values()))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "saal", "label", str(folder), "--classes", ",".join(classes), "--port", "0"]
        cmd += ["--image-size", str(args.image_size), "--strategy", args.strategy]
        cmd += ["--retrain-every", str(args.retrain_every)]
        started = time.time()
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert server.stdout is not None
        url = None
        for line in server.stdout:
            found = re.search(r"open (http://\S+)", line)
            if found:
                url = found.group(1).rstrip("/")
                break
        assert url, "the server did not start"
        client = httpx.Client(base_url=url, timeout=60)
        client.post("/login", data={"name": "bench"})

        def status() -> dict:
            return client.get("/api/status").json()

        while (s := status())["job"]["state"] != "idle":
            time.sleep(0.5)
        features_seconds = time.time() - started
        rounds = []
        for _ in range(args.rounds):
            version = s["version"]
            for _ in range(args.retrain_every):
                got = client.get("/api/next").json()
                item = got["item"]
                body = {"item_id": item["id"], "label": truth[item["file"]]}
                assert client.post("/api/label", json=body, headers={"x-csrf-token": got["csrf"]}).status_code == 200
            confirmed = time.time()
            while (s := status())["version"] == version:
                time.sleep(0.05)
            model = s["model"]
            rounds.append(
                {
                    "version": s["version"],
                    "labels": model["labels"],
                    "label_to_ranking_seconds": round(model["created_at"] - confirmed, 3),
                    "train_seconds": round(model["train_seconds"], 3),
                    "score_seconds": round(model["score_seconds"], 3),
                    "quality_of_previous": s["quality"],
                }
            )
            print(json.dumps(rounds[-1]), flush=True)
        server.send_signal(signal.SIGINT)
        server.wait(30)
    result = {
        "what": "seconds from the last of --retrain-every labels (confirmed by the server) to the new ranking's commit",
        "images": len(truth),
        "source": f"CIFAR-10 train JPEGs, {args.per_class} per class" if args.zip else "generated 64x64 PNGs",
        "classes": len(classes),
        "image_size": args.image_size,
        "strategy": args.strategy,
        "model": s["model"]["model"],
        "retrain_every": args.retrain_every,
        "first_start_seconds_until_every_embedding_cached": round(features_seconds, 1),
        "rounds": rounds,
        "median_label_to_ranking_seconds": float(np.median([r["label_to_ranking_seconds"] for r in rounds])),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": 1,
        "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
