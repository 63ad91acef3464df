"""How many labels per second a ``saal label`` server takes, on this machine.

Starts a real server (``--no-model``: the web worker alone, as the model job runs in its own process) on a folder
of generated images and sends labels from ``T`` threads, each signed in as its own annotator with its own HTTP
connection, for T in ``--threads``:

* ``label``: ``POST /api/label`` for images given out in advance (each a history row + the item's new state, one
  SQLite transaction synced to disk);
* ``next+label``: what an annotator's page does: ``GET /api/next`` (claim the next image) then ``POST /api/label``.

Every label sent is then checked against the database (one history row per label, none lost or doubled).

    python benchmarks/label_throughput.py --out benchmarks/results/label/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def start(folder: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "saal", "label", str(folder), "--classes", "a,b", "--port", "0", "--no-model"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert server.stdout is not None
    for line in server.stdout:
        found = re.search(r"open (http://\S+)", line)
        if found:
            return server, found.group(1).rstrip("/")
    raise RuntimeError("the server did not start")


def measure(url: str, threads: int, per_thread: int, mode: str, first_id: int) -> float:
    """Return labels per second for ``threads`` x ``per_thread`` labels."""
    barrier = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            client.post("/login", data={"name": f"{mode.replace('+', '_')}-{threads}-{t}"})
            csrf = client.get("/api/next").json()["csrf"]
            barrier.wait()
            for i in range(per_thread):
                if mode == "label":
                    item = first_id + t * per_thread + i
                else:
                    got = client.get("/api/next").json()
                    item = got["item"]["id"]
                body = {"item_id": item, "label": "a" if i % 2 else "b", "request_id": f"{mode}-{threads}-{t}-{i}"}
                response = client.post("/api/label", json=body, headers={"x-csrf-token": csrf})
                assert response.status_code == 200 and not response.json()["repeated"], response.text

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    began = time.perf_counter()
    for w in workers:
        w.join()
    return threads * per_thread / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,4,8")
    parser.add_argument("--labels", type=int, default=400, help="labels per measurement")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    total = 2 * args.labels * len(counts)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(total + 10):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        server, url = start(folder)
        try:
            next_id = total // 2  # "label" mode uses the upper half of the ids; claims take the best-ranked ones
            for threads in counts:
                per = args.labels // threads
                rate = measure(url, threads, per, "label", next_id)
                next_id += threads * per
                results.append(
                    {"mode": "label", "threads": threads, "labels": threads * per, "per_second": round(rate, 1)}
                )
                print(json.dumps(results[-1]), flush=True)
                rate = measure(url, threads, per, "next+label", 0)
                results.append(
                    {"mode": "next+label", "threads": threads, "labels": threads * per, "per_second": round(rate, 1)}
                )
                print(json.dumps(results[-1]), flush=True)
            with sqlite3.connect(folder / ".saal-label" / "labels.db") as conn:
                rows = conn.execute("SELECT count(*), count(DISTINCT request_id) FROM events").fetchone()
            sent = sum(r["labels"] for r in results)
            assert rows == (sent, sent), (rows, sent)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)
    out = {
        "what": "labels per second taken by one saal label server (uvicorn, one worker, SQLite WAL, synchronous=FULL)",
        "results": results,
        "checked": f"{sent} labels sent, {rows[0]} history rows, {rows[1]} distinct requests",
        "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
