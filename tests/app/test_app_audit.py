"""Cold start and random check (audit) images without a server: the order at zero labels, the share of check
images, their accuracy with a Wilson interval, and a project from before them (database schema 1)."""

from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from saal.app import db, default_cold_start, labels, order, ranking, status
from saal.app.claims import claim_next
from saal.app.features import FeatureCache, make_extractor
from saal.app.project import open_project
from saal.pool import Pool
from saal.strategies import build_strategy


def make_project(folder, **updates):
    return open_project(folder, classes=["red", "blue"], updates={"model": "cnn", "image_size": 16, **updates})


def cached(project):
    extractor, _ = make_extractor("cnn", 16)
    with db.read(project.engine) as conn:
        items = [(int(i), project.root / p) for i, p in conn.execute(db.select(db.items.c.id, db.items.c.path))]
    rows, failed = FeatureCache(project.state_dir, extractor).ensure(items, len(items))
    assert not failed
    return rows


def paths(project):
    with db.read(project.engine) as conn:
        return dict(conn.execute(db.select(db.items.c.id, db.items.c.path)).all())


def show_and_label(project, truth, count, who="ana"):
    """Label the next ``count`` images shown to ``who`` with their true class; return (id, picked_by) of each."""
    names, shown = paths(project), []
    for _ in range(count):
        item = claim_next(project.engine, who, 600)
        assert item is not None
        shown.append((item.id, item.picked_by))
        labels.record_label(project.engine, item.id, truth[names[item.id]], project.classes, who)
    return shown


def test_the_first_images_shown_at_zero_labels_are_the_cold_start_strategys_picks(image_folder, monkeypatch):
    folder, truth = image_folder
    project = make_project(folder, audit_share=0.0)
    assert project.settings.cold_start == default_cold_start()
    rows = cached(project)
    monkeypatch.setattr(ranking, "COLD_START_CHUNK", 8)
    snap = ranking.take_snapshot(project.engine, project.classes)
    done = ranking.cold_start(
        project.engine,
        kind="cnn",
        rows=rows,
        classes=project.classes,
        spec=project.settings.cold_start,
        seed=0,
        audit_share=0.0,
        snap=snap,
    )
    assert done.committed and done.chosen == 8 and done.ranked == 40

    # what the strategy selects on those feature rows (pixels here) for that seed, computed here on its own
    x = torch.from_numpy(np.array(rows)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).flatten(1)
    pool = Pool(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x.shape[1], 2))
    expected = build_strategy(project.settings.cold_start).select(
        model, pool, 8, np.random.default_rng([0, snap.last_event])
    )
    shown = show_and_label(project, truth, 12)
    assert [i for i, _ in shown[:8]] == expected.indices.tolist()
    assert [by for _, by in shown] == [project.settings.cold_start] * 8 + ["random"] * 4
    rest = np.setdiff1d(np.arange(40), expected.indices)
    assert [i for i, _ in shown[8:]] == np.random.default_rng([0, snap.last_event, 1]).permutation(rest)[:4].tolist()
    with db.read(project.engine) as conn:
        assert db.get_meta(conn, "cold_start_by") == project.settings.cold_start
        assert db.get_meta(conn, "current_version") == "0"


def test_check_images_are_interleaved_and_never_given_to_the_cold_start_strategy(image_folder):
    folder, truth = image_folder
    project = make_project(folder, audit_share=0.25)
    rows = cached(project)
    snap = ranking.take_snapshot(project.engine, project.classes)
    assert len(snap.audit) and set(snap.audit) <= set(snap.candidates)
    ranking.cold_start(
        project.engine,
        kind="cnn",
        rows=rows,
        classes=project.classes,
        spec="coreset",
        seed=0,
        audit_share=0.25,
        snap=snap,
    )
    shown = show_and_label(project, truth, 16)
    checks = order.audit_sequence(0, snap.audit)
    expected_slots = [g % 4 == 3 for g in range(16)]  # every 4th image shown
    assert [by == "audit" for _, by in shown] == expected_slots
    assert [i for i, by in shown if by == "audit"] == checks[:4].tolist()
    assert all(by == "coreset" for _, by in shown if by != "audit")
    assert not {i for i, by in shown if by != "audit"} & set(snap.audit.tolist())
    with sqlite3.connect(folder / ".saal-label" / "labels.db") as conn:
        recorded = conn.execute("SELECT item_id, audit FROM events ORDER BY id").fetchall()
    assert [bool(a) for _, a in recorded] == expected_slots  # the database says which labels are check labels


@pytest.mark.parametrize("share", [0.1, 0.3])
def test_the_audit_share_is_respected_and_seeded(tmp_path, app_helpers, share):
    app_helpers.make_images(tmp_path / "a", 300, size=8)
    project = open_project(tmp_path / "a", classes=["red", "blue"], updates={"audit_share": share, "seed": 3})
    with db.read(project.engine) as conn:
        flags = dict(conn.execute(db.select(db.items.c.id, db.items.c.audit)).all())
        queue = conn.execute(
            db.select(db.items.c.id, db.items.c.audit, db.items.c.picked_by).order_by(db.items.c.priority.desc())
        ).all()
    ids = np.arange(300)
    assert [flags[i] for i in ids] == order.audit_mask(3, ids, share).tolist()  # seeded: the same rule gives them
    count = sum(flags.values())
    assert abs(count - 300 * share) <= 3 * math.sqrt(300 * share * (1 - share))  # each with probability share
    # in the order shown, exactly floor(n * share) of the first n are check images, while check images last
    first = [bool(r.audit) for r in queue[:count]]
    assert all(sum(first[:n]) == math.floor(n * share) for n in range(1, len(first)))
    assert all((r.picked_by == "audit") == bool(r.audit) for r in queue)

    app_helpers.make_images(tmp_path / "b", 300, size=8)
    again = open_project(tmp_path / "b", classes=["red", "blue"], updates={"audit_share": share, "seed": 3})
    with db.read(again.engine) as conn:
        assert dict(conn.execute(db.select(db.items.c.id, db.items.c.audit)).all()) == flags  # same seed, same
    open_project(tmp_path / "b", updates={"seed": 4})  # another seed: other check images, interleaved again
    with db.read(again.engine) as conn:
        flags_b = dict(conn.execute(db.select(db.items.c.id, db.items.c.audit)).all())
        queue_b = conn.execute(db.select(db.items.c.audit).order_by(db.items.c.priority.desc())).scalars().all()
    assert [flags_b[i] for i in ids] == order.audit_mask(4, ids, share).tolist() and flags_b != flags
    first = [bool(a) for a in queue_b[: sum(flags_b.values())]]
    assert all(sum(first[:n]) == math.floor(n * share) for n in range(1, len(first)))


def test_interleave_keeps_both_orders_and_the_share():
    main, audit = np.arange(100, 120), np.arange(5)
    merged, is_audit = order.interleave(main, audit, 0.2, 0)
    assert merged[~is_audit].tolist() == main.tolist() and merged[is_audit].tolist() == audit.tolist()
    assert np.flatnonzero(is_audit).tolist() == [4, 9, 14, 19, 24]
    merged, is_audit = order.interleave(main[:3], audit, 0.2, 7)  # the count goes on; main runs out: checks follow
    assert merged.tolist() == [100, 101, 0, 102, 1, 2, 3, 4] and is_audit.sum() == 5
    merged, is_audit = order.interleave(main, np.arange(0), 0.5, 0)
    assert merged.tolist() == main.tolist() and not is_audit.any()


def test_wilson_interval_and_the_sentence_against_a_hand_computed_case():
    # 14 of 20, z = 1.96: centre (0.7 + 1.9208 / 20) / (1 + 3.8416 / 20) = 0.66777; half-width
    # 1.96 * sqrt(0.7 * 0.3 / 20 + 3.8416 / 1600) / 1.19208 = 0.18675
    low, high = status.wilson(14, 20)
    assert low == pytest.approx(0.48102, abs=5e-5) and high == pytest.approx(0.85452, abs=5e-5)
    assert status.audit_sentence(3, 14, 20) == (
        "Version 3 was right on 14 of 20 random check images (70 %, likely between 48 % and 85 %)."
    )
    assert status.wilson(0, 10)[0] == 0.0 and status.wilson(10, 10)[1] == pytest.approx(1.0)
    assert status.wilson(10, 10)[0] == pytest.approx(10 / (10 + 3.8416), abs=1e-9)  # n / (n + z^2) when all right
    few = status.audit_sentence(2, 4, 6)
    assert "too few yet" in few and "6 random check images" in few and "10 are needed" in few
    with pytest.raises(ValueError):
        status.wilson(3, 0)


def test_each_version_is_measured_on_check_labels_that_came_after_it(image_folder):
    folder, truth = image_folder
    project = make_project(folder, audit_share=0.5)
    rows = cached(project)
    names = paths(project)
    show_and_label(project, truth, 6)
    kwargs = dict(kind="cnn", rows=rows, classes=project.classes, strategy="entropy", seed=0, audit_share=0.5)
    first = ranking.update(
        project.engine,
        models_dir=project.state_dir / "models",
        snap=ranking.take_snapshot(project.engine, project.classes),
        **kwargs,
    )
    assert first.version == 1
    with db.read(project.engine) as conn:
        predicted = dict(
            conn.execute(
                db.select(db.audit_predictions.c.item_id, db.audit_predictions.c.predicted).where(
                    db.audit_predictions.c.version == 1
                )
            ).all()
        )
        before = {
            int(i) for i in conn.execute(db.select(db.items.c.id).where(db.items.c.state == db.LABELLED)).scalars()
        }
    assert predicted and not set(predicted) & before  # predictions only for check images it never saw

    shown = show_and_label(project, truth, 24)
    checked = [i for i, by in shown if by == "audit"]
    assert len(checked) == 12 and all(i in predicted for i in checked)
    # an imported label of a check image is not a check label; an undone one no longer counts
    spare = next(i for i in predicted if i not in checked)
    labels.record_label(project.engine, spare, truth[names[spare]], project.classes, "old", kind="import")
    right = sum(predicted[i] == truth[names[i]] for i in checked)
    got = status.snapshot(project.engine, project.classes)
    figure = got.audit[0]
    assert (figure["version"], figure["n"], figure["right"]) == (1, 12, right)
    assert (figure["low"], figure["high"]) == pytest.approx(status.wilson(right, 12))
    assert figure["text"].startswith(f"Version 1 was right on {right} of 12 random check images")

    last = shown[-1]
    labels.undo_last(project.engine, "ana", 600)
    n_after = 11 if last[1] == "audit" else 12
    assert status.snapshot(project.engine, project.classes).audit[0]["n"] == n_after
    # the other figure (the strategy's picks and the imported label) is measured without the check labels
    second = ranking.update(
        project.engine,
        models_dir=project.state_dir / "models",
        snap=ranking.take_snapshot(project.engine, project.classes),
        **kwargs,
    )
    strategy_picks = sum(1 for i, by in shown[:-1] if by != "audit")
    assert second.quality_n == strategy_picks + 1
    figures = status.snapshot(project.engine, project.classes).audit
    assert [f["version"] for f in figures] == [2, 1] and figures[0]["n"] == 0 and "too few yet" in figures[0]["text"]


SCHEMA_1 = """
CREATE TABLE meta ("key" VARCHAR(64) NOT NULL, value TEXT NOT NULL, PRIMARY KEY ("key"));
CREATE TABLE items (id INTEGER NOT NULL, path VARCHAR(1024) NOT NULL, readable BOOLEAN NOT NULL, error TEXT,
    state INTEGER NOT NULL, label TEXT, annotator VARCHAR(128), labelled_at FLOAT, last_event INTEGER,
    priority FLOAT NOT NULL, claimed_by VARCHAR(128), claim_until FLOAT, predicted TEXT, confidence FLOAT,
    added_at FLOAT NOT NULL, PRIMARY KEY (id), UNIQUE (path));
CREATE INDEX ix_items_queue ON items (state, priority);
CREATE INDEX ix_items_claimed_by ON items (claimed_by);
CREATE INDEX ix_items_label ON items (label);
CREATE TABLE events (id INTEGER NOT NULL, item_id INTEGER NOT NULL, kind VARCHAR(16) NOT NULL, label TEXT,
    annotator VARCHAR(128), at FLOAT NOT NULL, request_id VARCHAR(64), undoes INTEGER, prev_state INTEGER NOT NULL,
    prev_label TEXT, prev_annotator VARCHAR(128), prev_labelled_at FLOAT, prev_event INTEGER, PRIMARY KEY (id),
    UNIQUE (request_id));
CREATE INDEX ix_events_item ON events (item_id);
CREATE INDEX ix_events_annotator ON events (annotator, id);
CREATE TABLE models (version INTEGER NOT NULL, created_at FLOAT NOT NULL, kind VARCHAR(32) NOT NULL,
    model VARCHAR(64) NOT NULL, labels INTEGER NOT NULL, last_event INTEGER NOT NULL, train_seconds FLOAT NOT NULL,
    score_seconds FLOAT NOT NULL, quality FLOAT, quality_n INTEGER, quality_at FLOAT, note TEXT,
    PRIMARY KEY (version));
"""


def old_project(folder, truth):
    """Write a project as saal wrote it before check images (settings format 1 without the new keys, database
    schema 1) with 5 labels and a model version 1 row."""
    state = folder / ".saal-label"
    state.mkdir()
    settings = {
        "project_id": "0" * 32,
        "classes": ["red", "blue"],
        "task": "classification",
        "strategy": "entropy",
        "retrain_every": 20,
        "model": "cnn",
        "image_size": 16,
        "seed": 0,
        "database": "project",
        "claim_seconds": 600,
        "format": 1,
        "created_at": 1.0,
    }
    (state / "project.json").write_text(json.dumps(settings))
    (state / "secret").write_text("s" * 64)
    files = sorted(truth)
    with sqlite3.connect(state / "labels.db") as conn:
        conn.executescript(SCHEMA_1)
        meta = {"project_id": "0" * 32, "folder": str(folder.resolve()), "schema": "1", "current_version": "1"}
        conn.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        for i, name in enumerate(files):
            done = i < 5
            conn.execute(
                "INSERT INTO items (id, path, readable, state, label, annotator, labelled_at, last_event, priority, "
                "added_at) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, 1.0)",
                (
                    i,
                    name,
                    1 if done else 0,
                    truth[name] if done else None,
                    "ana" if done else None,
                    2.0 if done else None,
                    i + 1 if done else None,
                    1.0 - i / 100,
                ),
            )
            if done:
                conn.execute(
                    "INSERT INTO events (id, item_id, kind, label, annotator, at, prev_state) "
                    "VALUES (?, ?, 'label', ?, 'ana', 2.0, 0)",
                    (i + 1, i, truth[name]),
                )
        conn.execute("INSERT INTO models VALUES (1, 3.0, 'entropy', 'cnn', 5, 5, 0.1, 0.1, NULL, NULL, NULL, NULL)")
    return files


def test_a_project_from_before_check_images_opens_and_keeps_working(image_folder):
    folder, truth = image_folder
    files = old_project(folder, truth)
    project = open_project(folder)
    assert project.settings.audit_share == 0.1 and project.settings.strategy == "entropy"
    with sqlite3.connect(folder / ".saal-label" / "labels.db") as conn:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(items)")}
        assert {"audit", "picked_by"} <= columns
        assert "audit" in {r[1] for r in conn.execute("PRAGMA table_info(events)")}
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("2",)
        labelled = conn.execute("SELECT path, label, audit FROM items WHERE state = 1 ORDER BY id").fetchall()
        events = conn.execute("SELECT count(*), count(audit) FROM events").fetchone()
        unlabelled = conn.execute("SELECT id, audit FROM items WHERE state = 0").fetchall()
    assert labelled == [(f, truth[f], 0) for f in files[:5]]  # every label kept; none of them a check label
    assert events == (5, 0)
    ids = np.asarray([i for i, _ in unlabelled])
    assert [bool(a) for _, a in unlabelled] == order.audit_mask(0, ids, 0.1).tolist()  # check images from now on

    got = status.snapshot(project.engine, project.classes)
    assert got.labelled == 5 and got.version == 1 and [a["n"] for a in got.audit] == [0]
    item = claim_next(project.engine, "bo", 600)
    labels.record_label(project.engine, item.id, truth[files[item.id]], project.classes, "bo")
    snap = ranking.take_snapshot(project.engine, project.classes)
    assert len(snap.labelled) == 6 and set(snap.audit) <= set(snap.candidates)
    assert open_project(folder).settings.project_id == "0" * 32  # and it opens again, unchanged
