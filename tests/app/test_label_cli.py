"""``saal label`` on the command line: help, bad input as one line with nothing written, export and import."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest

from saal.app import labels
from saal.app.project import open_project
from saal.cli import main
from saal.data import load_dataset


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["label", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_says_everything(capsys):
    with pytest.raises(SystemExit) as done:
        main(["label", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for needed in (
        "--classes",
        "--db",
        "--strategy",
        "--retrain-every",
        "--cold-start",
        "--audit-share",
        "random check images",
        "95 %",
        "--export",
        "--import",
        "--token",
        "127.0.0.1",
        "1-9",
        "Backspace",
        "skip",
        "random",
        "EfficientNet-Lite0",
        "SQLite",
    ):
        assert needed in text, needed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "is not a labelling project yet; give its classes"),
        (("--classes", "cat"), "names one class; give at least two"),
        (("--classes", "cat,,dog"), "has an empty name"),
        (("--classes", "cat,cat"), "named twice"),
        (("--classes", "cat,dog", "--strategy", "sharpest"), "unknown strategy 'sharpest'"),
        (("--classes", "cat,dog", "--retrain-every", "0"), "--retrain-every must be at least 1"),
        (("--classes", "cat,dog", "--audit-share", "1"), "--audit-share must lie in [0, 1)"),
        (("--classes", "cat,dog", "--audit-share", "-0.1"), "--audit-share must lie in [0, 1)"),
        (("--classes", "cat,dog", "--audit-share", "nan"), "--audit-share must lie in [0, 1)"),
        (("--classes", "cat,dog", "--cold-start", "entropy"), "--cold-start 'entropy' needs a trained model"),
        (("--classes", "cat,dog", "--cold-start", "nosuch"), "unknown strategy 'nosuch'"),
        (("--classes", "cat,dog", "--db", "nonsense://"), "--db"),
        (("--classes", "cat,dog", "--import", "no-such-labels.csv"), "does not exist; give a CSV"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(capsys, image_folder, args, message):
    folder, _ = image_folder
    code, out, err = run(capsys, str(folder), "--port", "0", *args)
    assert out == ""
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (folder / ".saal-label").exists()


def test_a_folder_without_images_and_a_missing_folder(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    code, _, err = run(capsys, str(tmp_path), "--classes", "a,b", "--port", "0")
    assert code == 2 and "holds no images" in err and err.count("\n") == 1
    code, _, err = run(capsys, str(tmp_path / "missing"), "--classes", "a,b")
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / ".saal-label").exists()


def test_other_classes_another_projects_database_and_a_busy_port(capsys, image_folder, tmp_path):
    folder, _ = image_folder
    open_project(folder, classes=["red", "blue"])
    settings = (folder / ".saal-label" / "project.json").read_text()
    code, _, err = run(capsys, str(folder), "--classes", "cat,dog", "--port", "0")
    assert code == 2 and "was made for classes red,blue, not cat,dog" in err and err.count("\n") == 1

    other = tmp_path / "other"
    other.mkdir()
    (other / "a.png").write_bytes((folder / "img001.png").read_bytes())
    url = f"sqlite:///{folder / '.saal-label' / 'labels.db'}"
    code, _, err = run(capsys, str(other), "--classes", "x,y", "--db", url, "--export", str(tmp_path / "o.csv"))
    assert code == 2 and "belongs to another project" in err and err.count("\n") == 1
    assert not (other / ".saal-label").exists()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        code, _, err = run(capsys, str(folder), "--port", str(taken.getsockname()[1]), "--no-model")
    assert code == 2 and "cannot listen on 127.0.0.1" in err and err.count("\n") == 1
    assert (folder / ".saal-label" / "project.json").read_text() == settings


def test_export_csv_json_and_a_tree_that_the_folder_loader_reads_then_import(capsys, image_folder, tmp_path):
    folder, truth = image_folder
    project = open_project(folder, classes=["red", "blue"])
    files = sorted(truth)
    with project.engine.connect() as conn:
        ids = dict(conn.exec_driver_sql("SELECT path, id FROM items").fetchall())
    for name in files[:12]:
        labels.record_label(project.engine, ids[name], truth[name], project.classes, "ana")

    code, out, _ = run(capsys, str(folder), "--export", str(tmp_path / "labels.csv"))
    assert code == 0 and "wrote 12 labels" in out
    rows = list(csv.DictReader((tmp_path / "labels.csv").open()))
    assert {r["file"]: r["label"] for r in rows} == {f: truth[f] for f in files[:12]}
    assert all(r["annotator"] == "ana" and r["time"].endswith("Z") for r in rows)
    code, out, _ = run(capsys, str(folder), "--export", str(tmp_path / "labels.json"))
    assert json.loads((tmp_path / "labels.json").read_text()) == rows

    tree = tmp_path / "tree"
    code, out, _ = run(capsys, str(folder), "--export", str(tree))
    assert code == 0 and "folder:" in out
    bundle = load_dataset(f"folder:{tree}", test_fraction=0.25)  # what saal run --dataset folder: reads
    assert bundle.classes == ["blue", "red"] and len(bundle.train) + len(bundle.test) == 12
    code, _, err = run(capsys, str(folder), "--export", str(tree))
    assert code == 2 and "not an empty folder" in err
    code, _, err = run(capsys, str(folder), "--export", str(folder / "inside"))
    assert code == 2 and "inside the project folder" in err

    source = tmp_path / "more.csv"
    source.write_text("file,label,annotator\n" + "".join(f"{f},{truth[f]},old-tool\n" for f in files[12:20]))
    code, out, _ = run(capsys, str(folder), "--import", str(source))
    assert code == 0 and "imported 8 labels" in out
    code, out, _ = run(capsys, str(folder), "--export", str(tmp_path / "all.csv"))
    assert "wrote 20 labels" in out
    code, _, err = run(capsys, str(folder), "--import", str(tmp_path / "nope.csv"))
    assert code == 2 and "does not exist" in err


def test_the_tree_keeps_subfolder_files_apart(capsys, image_folder, tmp_path):
    folder, truth = image_folder
    project = open_project(folder, classes=["red", "blue"])
    with project.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, path FROM items WHERE path LIKE 'sub/%' LIMIT 2").fetchall()
    for item_id, path in rows:
        labels.record_label(project.engine, item_id, truth[path], project.classes, "ana")
    run(capsys, str(folder), "--export", str(tmp_path / "t"))
    copied = sorted(p.relative_to(tmp_path / "t").as_posix() for p in (tmp_path / "t").rglob("*.png"))
    assert copied == sorted(f"{truth[p]}/{p.replace('/', '__')}" for _, p in rows)
    assert Path(tmp_path / "t").is_dir()
