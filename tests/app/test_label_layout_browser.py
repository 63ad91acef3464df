"""The labelling page's layout in a real browser (Debian's Chromium driven by Playwright): a phone and a laptop
screen, ten classes, the undo button, the retrain button, the icon."""

from __future__ import annotations

import signal
import sqlite3

import pytest

CLASSES = [f"class{i}" for i in range(1, 11)]


@pytest.fixture(scope="module")
def served(tmp_path_factory, app_helpers):
    """A server without the model job on 30 images with ten classes."""
    folder = tmp_path_factory.mktemp("layout") / "photos"
    app_helpers.make_images(folder, 30)
    server = app_helpers.start_server(folder, "--classes", ",".join(CLASSES), "--no-model")
    yield server
    server.kill(signal.SIGINT)


def open_page(browser, served, width: int, height: int, name: str):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    page.goto(served.url)
    page.fill("#name", name)
    with page.expect_navigation():
        page.click("button[type=submit]")
    page.wait_for_selector("#image")
    page.wait_for_load_state("load")
    return page, missing


def box(page, selector: str) -> dict:
    found = page.locator(selector).bounding_box()
    assert found is not None, selector
    return found


@pytest.mark.slow
def test_on_a_phone_the_image_is_on_top_at_full_width_and_every_button_fits(served, browser):
    page, missing = open_page(browser, served, 390, 844, "phone")
    image = box(page, "#image")
    assert image["width"] >= 300 and image["x"] >= 0 and image["x"] + image["width"] <= 390
    buttons = page.locator("form.classes button, .actions button, .actions a")
    assert buttons.count() == len(CLASSES) + 3
    for i in range(buttons.count()):
        b = buttons.nth(i).bounding_box()
        assert b is not None and b["x"] >= 0 and b["x"] + b["width"] <= 390.5, (buttons.nth(i).inner_text(), b)
        assert b["y"] >= image["y"] + image["height"]  # below the image, not beside it
    undo = page.locator("#undo")
    assert "undo" in undo.inner_text() and "Backspace" in undo.inner_text()
    assert box(page, "#undo")["height"] >= 24 and box(page, "#undo")["width"] >= 100  # a button, not a glyph
    assert page.evaluate("fetch('/favicon.ico').then(r => r.status)") == 200
    assert missing == []  # no 404 on the page (the icon included)

    shown = page.inner_text("#file")
    with page.expect_navigation():
        page.keyboard.press("0")  # the tenth class has a key
    with sqlite3.connect(served.folder / ".saal-label" / "labels.db") as conn:
        last = conn.execute("SELECT i.path, e.label FROM events e JOIN items i ON i.id = e.item_id ORDER BY e.id")
        assert last.fetchall()[-1] == (shown, "class10")


@pytest.mark.slow
def test_on_a_laptop_retrain_now_is_above_the_fold_and_times_say_utc(served, browser):
    page, missing = open_page(browser, served, 1280, 800, "laptop")
    image = box(page, "#image")
    assert image["width"] >= 600
    retrain = box(page, "#retrain")
    assert retrain["y"] + retrain["height"] <= 800
    assert missing == []
    with page.expect_navigation():
        page.keyboard.press("h")
    assert "when (UTC)" in page.inner_text("#history")
