"""``saal label`` in a real browser: Debian's Chromium driven by Playwright against a real server and model job."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import sqlite3
from pathlib import Path

import pytest

from saal.app import default_strategy

KEY = {"red": "1", "blue": "2"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, app_helpers):
    """A server with its model job (pretrained head when available) retraining every 4 labels, on 40 images."""
    folder = tmp_path_factory.mktemp("browser") / "photos"
    truth = app_helpers.make_images(folder, 40)
    server = app_helpers.start_server(
        folder, "--classes", "red,blue", "--retrain-every", "4", "--image-size", "32", "--claim-seconds", "120"
    )
    server.truth = truth
    yield server
    server.kill(signal.SIGINT)
    assert server.process.returncode == 0


def sign_in(browser, served, name):
    context = browser.new_context(viewport={"width": 1200, "height": 760}, accept_downloads=True)
    page = context.new_page()
    page.goto(served.url)
    assert page.url.endswith("/login")
    page.fill("#name", name)
    with page.expect_navigation():
        page.click("button[type=submit]")
    page.wait_for_selector("#image")
    return page


def press(page, key):
    with page.expect_navigation():
        page.keyboard.press(key)
    page.wait_for_load_state("domcontentloaded")


def shown(page) -> str:
    return page.inner_text("#file")


def events(served, sql="SELECT kind, label, annotator, item_id FROM events ORDER BY id"):
    with sqlite3.connect(served.folder / ".saal-label" / "labels.db") as conn:
        return conn.execute(sql).fetchall()


def queue(served) -> list[int]:
    with sqlite3.connect(served.folder / ".saal-label" / "labels.db") as conn:
        return [r[0] for r in conn.execute("SELECT id FROM items WHERE state = 0 ORDER BY priority DESC, id")]


@pytest.mark.slow
def test_label_skip_undo_two_annotators_retrain_and_export(served, browser, tmp_path):
    ana = sign_in(browser, served, "ana")
    first = shown(ana)
    press(ana, KEY[served.truth[first]])  # label by keyboard
    assert events(served)[-1][:3] == ("label", served.truth[first], "ana")
    assert shown(ana) != first

    skipped = shown(ana)
    press(ana, "s")
    assert events(served)[-1][:3] == ("skip", None, "ana")
    assert shown(ana) != skipped
    press(ana, "Backspace")  # undo the skip: the image comes back
    assert shown(ana) == skipped
    assert events(served)[-1][:3] == ("undo", None, "ana")

    bo = sign_in(browser, served, "bo")  # a second annotator in another browser context
    assert shown(bo) != shown(ana)

    before = queue(served)
    assert served.status()["version"] == 0
    for page in (ana, bo, ana, bo):
        press(page, KEY[served.truth[shown(page)]])
    status = served.wait(lambda s: s["version"] >= 1, what="the first model version")
    assert status["model"]["labels"] >= 4 and status["model"]["kind"] == default_strategy()
    after = queue(served)
    assert set(after) <= set(before) and after != [i for i in before if i in set(after)]  # reordered
    ana.reload()
    assert ana.inner_text("#version") == str(status["version"])
    assert "Ranking refreshed" in ana.inner_text("#ranked")

    for page in (ana, bo, ana, bo):
        press(page, KEY[served.truth[shown(page)]])
    status = served.wait(lambda s: s["quality"] is not None, what="a measured quality")
    assert status["quality"]["version"] == 1 and status["quality"]["n"] >= 4
    ana.reload()
    assert "the strategy chose after it" in ana.inner_text("#quality")  # labelled as what it is
    assert "version 1 was right on" in ana.inner_text("#quality")
    assert "Version 1: " in ana.inner_text("#audit")  # the honest figure: random check images

    ana.goto(served.url.split("?")[0] + "labelled?label=red")
    count = ana.inner_text("#count")
    reds = sum(1 for kind, label, *_ in events(served) if kind == "label" and label == "red")
    assert count.startswith(f"{reds} labelled")

    card = ana.locator(".card").first  # fix a label from the list of labelled images
    fixed_id = int(card.get_attribute("data-item"))
    card.locator("select").select_option("blue")
    with ana.expect_navigation():
        card.locator("button").click()
    assert events(served)[-1] == ("label", "blue", "ana", fixed_id)
    ana.goto(served.url.split("?")[0] + f"items/{fixed_id}")
    assert "labelled blue by ana" in ana.inner_text("#current")
    assert ana.locator("#history tr").count() >= 3  # header, the first label, the fix
    with ana.expect_navigation():
        ana.click("#history ~ * button, form.classes button[value=red]")
    assert events(served)[-1] == ("label", "red", "ana", fixed_id)  # fixed back from its history page

    with ana.expect_download() as download:
        ana.click("text=Export CSV")
    exported = Path(tmp_path / "labels.csv")
    download.value.save_as(exported)
    rows = list(csv.DictReader(io.StringIO(exported.read_text())))
    with sqlite3.connect(served.folder / ".saal-label" / "labels.db") as conn:
        labelled = dict(conn.execute("SELECT path, label FROM items WHERE state = 1").fetchall())
    assert {r["file"]: r["label"] for r in rows} == labelled and len(rows) == 9
    assert all(served.truth[f] == label for f, label in labelled.items())

    ana.goto(served.url.split("?")[0])
    ana.wait_for_selector("#image")
    ana.screenshot(path=str(tmp_path / "label-page.png"))
    assert (tmp_path / "label-page.png").stat().st_size > 10_000
    if os.environ.get("SAAL_LABEL_SCREENSHOT"):  # how the README's screenshot is made
        shutil.copy(tmp_path / "label-page.png", os.environ["SAAL_LABEL_SCREENSHOT"])


@pytest.mark.slow
def test_a_crashed_model_job_is_restarted_and_the_page_says_why(served, browser):
    status = served.wait(lambda s: s["job"]["state"] == "idle" and s["job"]["pid"], what="an idle model job")
    pid = int(status["job"]["pid"])
    os.kill(pid, signal.SIGKILL)
    status = served.wait(lambda s: s["job"]["error"] is not None, what="the crash to be reported")
    assert "killed by signal SIGKILL" in status["job"]["error"]
    status = served.wait(
        lambda s: s["job"]["pid"] not in (None, str(pid)) and s["job"]["state"] == "idle", what="the restarted job"
    )
    page = sign_in(browser, served, "cy")
    assert "killed by signal SIGKILL" in page.inner_text("#job-error")
    # the restarted job keeps serving: a retrain request still gives a new version
    version = status["version"]
    with page.expect_navigation():
        page.click("#retrain")
    press(page, KEY[served.truth[shown(page)]])
    served.wait(lambda s: s["version"] > version, what="a retrain after the restart")
