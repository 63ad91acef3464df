"""Time from an annotation in Label Studio to saal's updated predictions in Label Studio, classes and boxes.

Starts a real Label Studio (``.venv-labelstudio``: ``make labelstudio-env``; SQLite, a fresh data folder) and a real
``saal label-studio`` (its model job: the pretrained EfficientNet-Lite0 head and ``auto`` for classes, ``fcos-lite0``
and ``det-saal`` for boxes), creates a ``<Choices>`` project of CIFAR-10 JPEGs and a ``<RectangleLabels>`` project of
BCCD images (or generated images when the data is not given), connects them, and waits for the cold-start
predictions. Then, ``--rounds`` times per project, it annotates the next ``--every`` tasks of saal's order (sorted by
prediction score, ascending) with their true labels through Label Studio's API, as a person in the labelling page
would, notes when Label Studio confirmed the last of them, and polls Label Studio until (a) the project's
``model_version`` is a new saal version and (b) every task holds a prediction of it. Latency = (b) minus the
confirmation: the webhook, the model job's poll, training, scoring every unlabelled task, the commit and the push
(one prediction per task through Label Studio's import API) all included.

    python benchmarks/labelstudio_latency.py --cifar ../shared/data/cifar10-jpg.zip --bccd ../shared/data/BCCD \\
        --out benchmarks/results/labelstudio/latency.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LS_BIN = REPO / ".venv-labelstudio" / "bin" / "label-studio"
USER, PASSWORD, TOKEN = "bench@example.com", "bench-pass-123", "benchtoken0123456789"
CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def choices_config(classes: list[str]) -> str:
    inner = "".join(f'<Choice value="{c}"/>' for c in classes)
    return f'<View><Image name="image" value="$image"/><Choices name="label" toName="image">{inner}</Choices></View>'


def boxes_config(classes: list[str]) -> str:
    inner = "".join(f'<Label value="{c}"/>' for c in classes)
    return (
        '<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">'
        f"{inner}</RectangleLabels></View>"
    )


def cifar_images(archive: Path | None, per_class: int) -> tuple[list[str], list[tuple[str, bytes, str]]]:
    """Return the classes and ``(name, JPEG bytes, class)`` of the first ``per_class`` train images per class."""
    if archive is None:  # generated: two colours
        rng = np.random.default_rng(0)
        out = []
        for i in range(2 * per_class):
            image = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
            image[..., 0 if i % 2 == 0 else 2] += 140
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG")
            out.append((f"g{i:05d}.jpg", buffer.getvalue(), ("red", "blue")[i % 2]))
        return ["red", "blue"], out
    taken: dict[str, int] = {}
    out = []
    with zipfile.ZipFile(archive) as z:
        for name in sorted(z.namelist()):
            parts = name.split("/")
            if len(parts) != 3 or parts[0] != "train" or not parts[2].endswith(".jpg"):
                continue
            if taken.get(parts[1], 0) >= per_class:
                continue
            taken[parts[1]] = taken.get(parts[1], 0) + 1
            out.append((f"c{len(out):05d}.jpg", z.read(name), parts[1]))
    return sorted(taken), out


def bccd_images(folder: Path | None, n: int) -> tuple[list[str], list[tuple[str, bytes, list[Any]]]]:
    """Return the classes and ``(name, JPEG bytes, [(class, [x1, y1, x2, y2])])`` of ``n`` BCCD images."""
    if folder is None:  # generated: red and green squares
        rng = np.random.default_rng(0)
        out = []
        for i in range(n):
            image = rng.integers(0, 50, (96, 96, 3), dtype=np.uint8)
            boxes = []
            for _ in range(int(rng.integers(1, 4))):
                side = int(rng.integers(16, 32))
                x, y = (int(v) for v in rng.integers(0, 96 - side, 2))
                cls = ("cell", "blob")[int(rng.integers(0, 2))]
                image[y : y + side, x : x + side, 0 if cls == "cell" else 1] = 230
                boxes.append((cls, [x, y, x + side, y + side]))
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG")
            out.append((f"b{i:04d}.jpg", buffer.getvalue(), boxes))
        return ["cell", "blob"], out
    found = []
    classes: set[str] = set()
    for xml in sorted((folder / "Annotations").glob("*.xml"))[:n]:
        root = ET.parse(xml).getroot()
        boxes = []
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            if box is None:
                continue
            cls = str(obj.findtext("name")).strip()
            classes.add(cls)
            coords = [float(box.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax")]
            boxes.append((cls, coords))
        image = folder / "JPEGImages" / str(root.findtext("filename"))
        found.append((image.name, image.read_bytes(), boxes))
    return sorted(classes), found


class LabelStudio:
    """A real Label Studio in a subprocess, driven through its API."""

    def __init__(self, data: Path) -> None:
        if not LS_BIN.exists():
            sys.exit(f"{LS_BIN} is missing: run make labelstudio-env")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "LABEL_STUDIO_USERNAME": USER,
            "LABEL_STUDIO_PASSWORD": PASSWORD,
            "LABEL_STUDIO_USER_TOKEN": TOKEN,
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
        }
        command = [str(LS_BIN), "start", "--no-browser", "--port", str(self.port), "--data-dir", str(data)]
        self.log = open(data / "label-studio.log", "wb")  # noqa: SIM115 - the subprocess's output
        self.process = subprocess.Popen(
            [*command, "--enable-legacy-api-token"], stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Token {TOKEN}"}, timeout=300)
        start = time.monotonic()
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - start > 300:
                sys.exit("Label Studio did not start within 300 s")
            time.sleep(1)
        self.start_seconds = time.monotonic() - start
        self.version = str(self.api("GET", "/api/version").get("release"))

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.http.request(method, path, **kwargs)
        if answer.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text[:300]}")
        return answer.json() if answer.content else None

    def project(self, title: str, config: str, images: list[tuple[str, bytes, Any]]) -> dict[int, Any]:
        """Create a project with one task per image; return ``{task: truth}``."""
        pid = int(self.api("POST", "/api/projects", json={"title": title, "label_config": config})["id"])
        truth = {name: value for name, _, value in images}
        for start in range(0, len(images), 100):
            files = {f"f{i}": (n, d, "image/jpeg") for i, (n, d, _) in enumerate(images[start : start + 100])}
            self.api("POST", f"/api/projects/{pid}/import", files=files)
        self.pid_truth = {int(t["id"]): truth[t["data"]["image"].rsplit("-", 1)[-1]] for t in self.tasks(pid)}
        return {pid: self.pid_truth}

    def tasks(self, pid: int, ordering: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        query = json.dumps({"ordering": [ordering]} if ordering else {})
        while True:
            page = len(out) // 100 + 1
            found = self.api(
                "GET", "/api/tasks", params={"project": pid, "page": page, "page_size": 100, "query": query}
            )
            out += found["tasks"]
            if len(out) >= found["total"]:
                return out

    def version_of(self, pid: int) -> str:
        return str(self.api("GET", f"/api/projects/{pid}")["model_version"] or "")

    def complete(self, pid: int, version: str, n: int) -> bool:
        return self.api("GET", f"/api/projects/{pid}/model-versions/").get(version) == n

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def result_of(kind: str, truth: Any, size: tuple[int, int]) -> list[dict[str, Any]]:
    if kind == "choices":
        return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [truth]}}]
    width, height = size
    return [
        {
            "from_name": "box",
            "to_name": "image",
            "type": "rectanglelabels",
            "original_width": width,
            "original_height": height,
            "value": {
                "x": 100 * x1 / width,
                "y": 100 * y1 / height,
                "width": 100 * (x2 - x1) / width,
                "height": 100 * (y2 - y1) / height,
                "rotation": 0,
                "rectanglelabels": [cls],
            },
        }
        for cls, (x1, y1, x2, y2) in truth
    ]


def wait(predicate: Any, limit: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > limit:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return time.monotonic()


def rounds(ls: LabelStudio, pid: int, truth: dict[int, Any], kind: str, args: argparse.Namespace, sizes: dict) -> list:
    """Annotate ``--every`` tasks in saal's order, ``--rounds`` times; return each round's figures."""
    n = len(truth)
    seen = {ls.version_of(pid)}
    out = []
    for r in range(args.rounds):
        order = [int(t["id"]) for t in ls.tasks(pid, "tasks:predictions_score") if not t["is_labeled"]]
        retries = 0
        for task in order[: args.every]:
            body = {"result": result_of(kind, truth[task], sizes[task])}
            while (answer := ls.http.post(f"/api/tasks/{task}/annotations/", json=body)).status_code == 500:
                retries += 1  # Label Studio's SQLite was locked: a person would press Submit again
                time.sleep(0.5)
            if answer.status_code >= 300:
                raise RuntimeError(f"annotation of task {task}: {answer.status_code} {answer.text[:200]}")
        done = time.monotonic()
        version_at = wait(lambda: ls.version_of(pid) not in seen, 900, "a new version")
        version = ls.version_of(pid)
        seen.add(version)
        all_at = wait(lambda v=version: ls.complete(pid, v, n), 900, "every prediction")
        row = {
            "round": r + 1,
            "kind": kind,
            "tasks": n,
            "labels": (r + 1) * args.every,
            "version": version,
            "seconds_to_model_version": round(version_at - done, 2),
            "seconds_to_all_predictions": round(all_at - done, 2),
            "annotation_retries": retries,
        }
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, help="cifar10-jpg.zip (default: generated two-colour images)")
    parser.add_argument("--bccd", type=Path, help="the BCCD folder, Pascal VOC layout (default: generated boxes)")
    parser.add_argument("--per-class", type=int, default=100, help="CIFAR-10 images per class (100: 1,000 tasks)")
    parser.add_argument("--boxes", type=int, default=60, help="box images (60)")
    parser.add_argument("--every", type=int, default=10, help="annotations per round = --retrain-every (10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="saal-ls-bench-"))
    ls = LabelStudio(work)
    print(f"Label Studio {ls.version} up in {ls.start_seconds:.0f} s", flush=True)
    classes, images = cifar_images(args.cifar, args.per_class)
    box_classes, box_images = bccd_images(args.bccd, args.boxes)
    pc = next(iter(ls.project("cifar", choices_config(classes), images)))
    class_truth = ls.pid_truth
    pb = next(iter(ls.project("bccd", boxes_config(box_classes), box_images)))
    box_truth = ls.pid_truth
    sizes = {t: (0, 0) for t in class_truth}
    sizes.update({t: Image.open(io.BytesIO(d)).size for t, d in _bytes_of(ls, pb, box_images).items()})
    command = [sys.executable, "-m", "saal", "label-studio", "--label-studio-url", ls.url, "--label-studio-token"]
    command += [TOKEN, "--dir", str(work / "backend"), "--port", str(free_port()), "--connect", str(pc)]
    backend = subprocess.Popen(
        [*command, "--connect", str(pb), "--retrain-every", str(args.every)],
        stdout=open(work / "backend.log", "w"),  # noqa: SIM115 - the subprocess's output
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        start = time.monotonic()
        for pid, n in ((pc, len(class_truth)), (pb, len(box_truth))):
            wait(
                lambda p=pid, k=n: re.match(r"saal-", ls.version_of(p)) and ls.complete(p, ls.version_of(p), k),
                1800,
                "cold start",
            )
        cold = time.monotonic() - start
        print(f"cold-start predictions of both projects in {cold:.0f} s", flush=True)
        found = rounds(ls, pc, class_truth, "choices", args, sizes) + rounds(
            ls, pb, box_truth, "rectanglelabels", args, sizes
        )
    finally:
        backend.send_signal(signal.SIGINT)
        backend.wait(60)
        ls.stop()
    report = {
        "label_studio": ls.version,
        "label_studio_start_seconds": round(ls.start_seconds, 1),
        "cold_start_seconds": round(cold, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "classes": {"data": "CIFAR-10" if args.cifar else "generated", "tasks": len(class_truth)},
        "boxes": {"data": "BCCD" if args.bccd else "generated", "tasks": len(box_truth)},
        "rounds": found,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _bytes_of(ls: LabelStudio, pid: int, images: list[tuple[str, bytes, Any]]) -> dict[int, bytes]:
    data = {name: blob for name, blob, _ in images}
    return {int(t["id"]): data[t["data"]["image"].rsplit("-", 1)[-1]] for t in ls.tasks(pid)}


if __name__ == "__main__":
    main()
