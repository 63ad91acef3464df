"""The model job's parts without a server: the feature cache, one ranking update, any strategy's order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saal.app import db, labels, ranking
from saal.app.features import FeatureCache, make_extractor
from saal.app.project import open_project


@pytest.fixture
def project(image_folder):
    folder, truth = image_folder
    project = open_project(folder, classes=["red", "blue"], updates={"model": "cnn", "image_size": 16})
    project.truth = truth
    return project


def cached_rows(project):
    extractor, why = make_extractor("cnn", 16)
    assert extractor.kind == "cnn" and why is None and extractor.side == 16
    cache = FeatureCache(project.state_dir, extractor)
    with db.read(project.engine) as conn:
        items = [
            (int(i), project.root / p)
            for i, p in conn.execute(db.items.select().with_only_columns(db.items.c.id, db.items.c.path))
        ]
    return cache, items


def test_the_cache_decodes_each_image_once_and_reports_damaged_pixels(project):
    cache, items = cached_rows(project)
    damaged = project.root / items[5][1].relative_to(project.root)
    damaged.write_bytes(damaged.read_bytes()[:60])  # the header survives, the pixels do not
    rows, failed = cache.ensure(items, len(items))
    assert list(failed) == [items[5][0]] and failed[items[5][0]]  # why, in PIL's words
    assert rows.shape == (len(items), 16, 16, 3) and rows[0].any()
    calls = []
    again, failed_again = cache.ensure(
        [i for i in items if i[0] != items[5][0]], len(items), lambda d, t: calls.append(t)
    )
    assert failed_again == {} and calls == [] and np.array_equal(again, rows)


def label_truth(project, count, start=0):
    with db.read(project.engine) as conn:
        paths = dict(conn.execute(db.items.select().with_only_columns(db.items.c.id, db.items.c.path)).all())
    for item_id in range(start, start + count):
        labels.record_label(project.engine, item_id, project.truth[paths[item_id]], project.classes, "ana")


def test_an_update_commits_a_new_version_ranking_and_then_measures_it(project):
    cache, items = cached_rows(project)
    rows, _ = cache.ensure(items, len(items))
    label_truth(project, 8)
    snap = ranking.take_snapshot(project.engine, project.classes)
    assert len(snap.labelled) == 8 and len(snap.candidates) == 32 and snap.version == 0
    with db.read(project.engine) as conn:
        before = dict(conn.execute(db.items.select().with_only_columns(db.items.c.id, db.items.c.priority)).all())
    first = ranking.update(
        project.engine,
        kind="cnn",
        rows=rows,
        classes=project.classes,
        strategy="saal",
        seed=0,
        models_dir=project.state_dir / "models",
        snap=snap,
    )
    assert first.version == 1 and first.quality is None
    with db.read(project.engine) as conn:
        after = conn.execute(db.items.select().where(db.items.c.state == db.UNLABELLED)).all()
        assert db.get_meta(conn, "current_version") == "1"
    assert sorted(r.priority for r in after) == [(32 - k) / 32 for k in range(32)][::-1]
    assert any(before[r.id] != r.priority for r in after) and all(r.predicted in project.classes for r in after)

    label_truth(project, 6, start=8)
    second = ranking.update(
        project.engine,
        kind="cnn",
        rows=rows,
        classes=project.classes,
        strategy="entropy",
        seed=0,
        models_dir=project.state_dir / "models",
        snap=ranking.take_snapshot(project.engine, project.classes),
    )
    assert second.version == 2 and second.quality_n == 6 and 0.0 <= second.quality <= 1.0
    with db.read(project.engine) as conn:
        measured = conn.execute(db.models.select().where(db.models.c.version == 1)).first()
    assert measured.quality == second.quality and measured.quality_n == 6


def test_an_update_saves_its_weights_and_writes_its_ranking_without_holding_the_write_lock(project, monkeypatch):
    """The weights are saved with the database free, and the ranking is written a few rows per write transaction,
    so a label or a claim waits for a moment at most (never for the whole ranking)."""
    import sqlite3

    from sqlalchemy import event

    from saal.app import order

    def lock_is_free() -> bool:
        other = sqlite3.connect(project.state_dir / "labels.db", timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.rollback()
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            other.close()

    saved_with_lock_free: list[bool] = []
    real_save = torch.save

    def save(*args, **kwargs):
        saved_with_lock_free.append(lock_is_free())
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ranking.torch, "save", save)
    monkeypatch.setattr(order, "ORDER_CHUNK", 5)
    commits: list[int] = []
    event.listen(project.engine, "commit", lambda conn: commits.append(1))
    cache, items = cached_rows(project)
    rows, _ = cache.ensure(items, len(items))
    label_truth(project, 8)
    commits.clear()
    done = ranking.update(
        project.engine,
        kind="cnn",
        rows=rows,
        classes=project.classes,
        strategy="entropy",
        seed=0,
        models_dir=project.state_dir / "models",
        snap=ranking.take_snapshot(project.engine, project.classes),
    )
    assert done.version == 1 and saved_with_lock_free == [True]
    assert (project.state_dir / "models" / "v1.pt").is_file() and not list((project.state_dir / "models").glob("*.tmp"))
    assert len(commits) >= 32 // 5 + 1  # the ranking's chunks, then the version
    with db.read(project.engine) as conn:
        after = conn.execute(db.items.select().where(db.items.c.state == db.UNLABELLED)).all()
    assert sorted(r.priority for r in after) == [(32 - k) / 32 for k in range(32)][::-1]


@pytest.mark.parametrize("spec", ["coreset", "random", "badge", "saal[scope=last-layer]", "typiclust", "auto"])
def test_every_kind_of_strategy_orders_every_candidate(project, spec, monkeypatch):
    monkeypatch.setattr(ranking, "MAX_NON_TOPK", 5)  # non-top-k strategies choose 5, the rest follow
    label_truth(project, 6)
    snap = ranking.take_snapshot(project.engine, project.classes)
    x = torch.randn(snap.size, 12)
    model = ranking.make_model("pretrained", (12,), 2, 0)
    order = ranking.order_candidates(spec, model, x, snap, 2, 0).order
    assert sorted(order.tolist()) == snap.main.tolist()  # every candidate but the check images
    assert not set(order.tolist()) & set(snap.audit.tolist()) and len(snap.audit)


@pytest.mark.parametrize("spec", ["auto", "typiclust"])
def test_on_pixels_a_cold_start_part_reads_the_pixels_themselves(project, spec):
    """With the small CNN (no pretrained backbone) typicality works on the pixels (embedding=input)."""
    cache, items = cached_rows(project)
    rows, _ = cache.ensure(items, len(items))
    label_truth(project, 8)
    snap = ranking.take_snapshot(project.engine, project.classes)
    x = ranking.as_inputs("cnn", rows)
    model = ranking.make_model("cnn", (16, 16, 3), 2, 0)
    ordered = ranking.order_candidates(spec, model, x, snap, 2, 0, kind="cnn")
    assert sorted(ordered.order.tolist()) == snap.main.tolist()
    if spec == "auto":
        assert ordered.reason and ordered.state is not None
