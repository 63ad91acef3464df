"""Cold start and random check images in a real browser: Debian's Chromium driven by Playwright against a real
server and model job, on JPEGs of red circles and blue squares the test draws itself."""

from __future__ import annotations

import re
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

KEY = {"red": "1", "blue": "2"}


def draw_shapes(folder: Path, n: int, seed: int = 0) -> dict[str, str]:
    """Write ``n`` 48x48 JPEGs: a red circle or a blue square (random place and size) on a noisy grey background.

    Returns:
        ``{relative path: class}``.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    truth = {}
    for i in range(n):
        background = rng.integers(90, 170, (48, 48, 3), dtype=np.uint8)
        image = Image.fromarray(background)
        pen = ImageDraw.Draw(image)
        side = int(rng.integers(16, 30))
        x, y = (int(v) for v in rng.integers(2, 46 - side, 2))
        tint = int(rng.integers(0, 60))
        if i % 2 == 0:
            pen.ellipse((x, y, x + side, y + side), fill=(200 + tint // 2, tint, tint))
            cls = "red"
        else:
            pen.rectangle((x, y, x + side, y + side), fill=(tint, tint, 200 + tint // 2))
            cls = "blue"
        name = f"shape{i:03d}.jpg"
        image.save(folder / name, quality=90)
        truth[name] = cls
    return truth


@pytest.fixture(scope="module")
def served(tmp_path_factory, app_helpers):
    """A server on 48 drawn JPEGs: half of the images shown are check images, a model every 8 labels."""
    folder = tmp_path_factory.mktemp("audit-browser") / "shapes"
    truth = draw_shapes(folder, 48)
    server = app_helpers.start_server(
        folder,
        "--classes",
        "red,blue",
        "--audit-share",
        "0.5",
        "--retrain-every",
        "8",
        "--image-size",
        "32",
        "--cold-start",
        "typiclust",
    )
    server.truth = truth
    yield server
    server.kill(signal.SIGINT)
    assert server.process.returncode == 0


def label_shown(page, served) -> tuple[str, str]:
    """Label the image on the page with its true class by keyboard; return (file, what the page said picked it)."""
    name, picked = page.inner_text("#file"), page.inner_text("#picked")
    with page.expect_navigation():
        page.keyboard.press(KEY[served.truth[name]])
    page.wait_for_load_state("domcontentloaded")
    return name, picked


@pytest.mark.slow
def test_cold_start_order_then_the_check_image_accuracy_appears(served, browser):
    status = served.wait(lambda s: s["cold_start"] is not None, timeout=120, what="the cold-start ranking")
    assert status["cold_start"]["by"] == "typiclust" and status["version"] == 0
    page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    page.goto(served.url)
    page.fill("#name", "ana")
    with page.expect_navigation():
        page.click("button[type=submit]")
    page.wait_for_selector("#image")
    assert "chosen by typiclust" in page.inner_text("#model")
    assert "Accuracy: measured once a model exists" in page.inner_text("#audit")

    shown = [label_shown(page, served) for _ in range(8)]
    # every 2nd image shown is a check image; the others are the cold-start strategy's picks
    assert [p for _, p in shown] == ["chosen by typiclust", "a random check image (no strategy chose it)"] * 4
    with sqlite3.connect(served.folder / ".saal-label" / "labels.db") as conn:
        recorded = conn.execute(
            "SELECT i.path, e.audit FROM events e JOIN items i ON i.id = e.item_id ORDER BY e.id"
        ).fetchall()
    assert [(f, bool(a)) for f, a in recorded] == [(f, "check" in p) for f, p in shown]

    served.wait(lambda s: s["version"] >= 1, timeout=120, what="the first model version")
    page.reload()
    assert "Version 1: 0 random check images labelled since it was trained; too few yet" in page.inner_text("#audit")

    for _ in range(20):
        shown.append(label_shown(page, served))
    assert all(p == "a random check image (no strategy chose it)" for _, p in shown[9::2])
    assert not any("check" in p for _, p in shown[8::2])
    status = served.wait(
        lambda s: any(a["n"] >= 10 for a in s["audit"]), timeout=120, what="ten check labels after a version"
    )
    figure = next(a for a in status["audit"] if a["n"] >= 10)
    page.reload()
    text = page.inner_text("#audit")
    version = figure["version"]
    sentence = re.search(
        rf"Version {version} was right on (\d+) of (\d+) random check images \((\d+) %, likely between (\d+) % and "
        r"(\d+) %\)",
        text,
    )
    assert sentence is not None, text
    right, n, pct, low, high = (int(g) for g in sentence.groups())
    assert n >= 10 and 0 <= right <= n and low <= pct <= high and pct == round(100 * right / n)
    assert "which it never saw" in text
