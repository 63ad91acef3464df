"""Labels out and in: streaming CSV and JSON, an image-folder tree, and import from a CSV.

Exports read the labelled items in pages of :data:`PAGE` by id (each page its own short read), so memory and
the time to the first byte do not grow with the project. Every export holds the current label of each labelled
image: ``file`` (relative to the project folder), ``label``, ``annotator`` and ``time`` (UTC, ISO 8601).

The image-folder tree (``OUT/<class>/<file>``) is what ``saal run --dataset folder:OUT`` reads. It is written
whole or not at all: every labelled image is checked first, the copies go to a hidden folder beside ``OUT`` that is
renamed to ``OUT`` at the end (and removed when a copy fails). ``--export`` decides from the suffix: ``.csv`` and
``.json`` are files, a name without a suffix (or ending in ``/``, or an existing folder) is the tree; any other
suffix is refused. Files are UTF-8.

An import reads a UTF-8 CSV with at least ``file`` and ``label`` columns (``annotator`` and ``time`` optional),
checks every row first (a malformed CSV, e.g. an unterminated quote, is reported with the line it starts on), then
adds them to the history in one transaction (kind ``import``): all or nothing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from saal.app import db
from saal.app.project import STATE_DIR, Project
from saal.errors import SaalError

PAGE = 1000
COLUMNS = ("file", "label", "annotator", "time")


def iso(seconds: float | None) -> str:
    """Return epoch ``seconds`` as UTC ISO 8601 (empty for None)."""
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def labelled_rows(engine: Engine) -> Iterator[dict[str, Any]]:
    """Yield every labelled item as ``{"file", "label", "annotator", "time"}``, by id, a page at a time."""
    it = db.items
    after = -1
    while True:
        with db.read(engine) as conn:
            page = conn.execute(
                select(it.c.id, it.c.path, it.c.label, it.c.annotator, it.c.labelled_at)
                .where(it.c.state == db.LABELLED, it.c.id > after)
                .order_by(it.c.id)
                .limit(PAGE)
            ).all()
        if not page:
            return
        for row in page:
            yield {"file": row.path, "label": row.label, "annotator": row.annotator or "", "time": iso(row.labelled_at)}
        after = int(page[-1].id)


def csv_chunks(engine: Engine) -> Iterator[str]:
    """Yield the CSV export (header first) in chunks of up to :data:`PAGE` rows."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for count, row in enumerate(labelled_rows(engine), start=1):
        writer.writerow(row)
        if count % PAGE == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def json_chunks(engine: Engine) -> Iterator[str]:
    """Yield the JSON export: one array of objects, written a row at a time."""
    yield "["
    first = True
    for row in labelled_rows(engine):
        yield ("\n" if first else ",\n") + json.dumps(row)
        first = False
    yield "\n]\n"


def export_file(project: Project, out: Path) -> int:
    """Write the CSV (``.csv``) or JSON (``.json``) export to ``out``; return the number of labelled images.

    Raises:
        SaalError: another suffix, or ``out`` is a folder.
    """
    if out.is_dir():
        raise SaalError(f"--export {out} is a folder; give a .csv or .json file, or a new folder for the image tree")
    chunks = csv_chunks if out.suffix.lower() == ".csv" else json_chunks if out.suffix.lower() == ".json" else None
    if chunks is None:
        raise SaalError(f"--export {out}: give a .csv or .json file, or a new folder for the image tree")
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            for chunk in chunks(project.engine):
                handle.write(chunk)
        tmp.replace(out)
    except OSError as error:
        _remove(tmp)
        raise _unwritable(out, error) from None
    return sum(1 for _ in labelled_rows(project.engine))


def _unwritable(out: Path, error: OSError) -> SaalError:
    return SaalError(f"cannot write --export {out} ({error.strerror or error}); give a path you can write to")


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def export_tree(project: Project, out: Path) -> int:
    """Copy each labelled image to ``out/<label>/<file, with / as __>``; return how many.

    Every image is checked before anything is written; the copies go to a hidden folder beside ``out`` that is
    renamed to ``out`` once all are there, so a failure leaves no ``out`` (and a retry is not refused).

    Raises:
        SaalError: ``out`` exists and is not an empty folder, lies inside the project folder (it would become
            images) or cannot be written, or a labelled image cannot be read.
    """
    out = out.expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SaalError(f"--export {out} exists and is not an empty folder; give a new folder")
    if out == project.root or project.root in out.parents:
        raise SaalError(f"--export {out} lies inside the project folder; give a folder outside {project.root}")
    copies: list[tuple[Path, Path]] = []
    missing: list[str] = []
    used: set[tuple[str, str]] = set()
    for row in labelled_rows(project.engine):
        source = project.resolve_image(row["file"])
        if not source.is_file() or not os.access(source, os.R_OK):
            missing.append(row["file"])
        name = row["file"].replace("/", "__")
        stem, dot, suffix = name.rpartition(".")
        for n in range(2, len(used) + 3):  # a/b.png and a__b.png would meet: keep both
            if (row["label"], name) not in used:
                break
            name = f"{stem}~{n}{dot}{suffix}"
        used.add((row["label"], name))
        copies.append((source, Path(row["label"], name)))
    if missing:
        raise SaalError(
            f"--export {out}: {len(missing)} labelled images cannot be read (first: {missing[0]}); restore them "
            "and export again (nothing was written)"
        )
    tmp = out.with_name(f".{out.name}.saal-export-{os.getpid()}")
    try:
        for source, relative in copies:
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tmp / relative)
        tmp.mkdir(parents=True, exist_ok=True)  # no labels: an empty tree
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except OSError as error:
        _remove(tmp)
        raise _unwritable(out, error) from None
    return len(copies)


def export(project: Project, out: str) -> str:
    """Export to ``out``: a ``.csv`` or ``.json`` file, else a new folder (the image tree).

    Returns:
        One line saying what was written.

    Raises:
        SaalError: as :func:`export_file` and :func:`export_tree`.
    """
    path = Path(out).expanduser()
    folder = out.endswith(("/", os.sep)) or path.is_dir()
    if path.suffix.lower() in (".csv", ".json") and not folder:
        n = export_file(project, path)
        return f"wrote {n} labels to {path}"
    if path.suffix and not folder:
        raise SaalError(
            f"--export {out}: {path.suffix} is neither .csv nor .json; give a .csv or .json file, or a folder "
            f"for the image tree (a name without a suffix, or end it with /)"
        )
    n = export_tree(project, path)
    return f"copied {n} labelled images into {path}/<class>/ (read it with saal run --dataset folder:{path})"


def import_source(path: str) -> Path:
    """Return the CSV file that ``--import`` names, checked before the project is created or opened.

    Raises:
        SaalError: the file does not exist.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise SaalError(f"--import {source} does not exist; give a CSV with file and label columns")
    return source


def import_csv(project: Project, path: str, annotator: str = "import") -> str:
    """Add the labels of the CSV at ``path`` to the history (see the module docstring).

    Returns:
        One line saying how many labels were added, and how many were already there.

    Raises:
        SaalError: a missing or unreadable file, missing columns, a file not in the project, a label that is not
            a class; nothing is added then.
    """
    source = import_source(path)
    rows = read_import(source)
    with db.read(project.engine) as conn:
        known = {
            str(r.path): (int(r.id), r.label, bool(r.readable))
            for r in conn.execute(select(db.items.c.id, db.items.c.path, db.items.c.label, db.items.c.readable))
        }
    changes = []
    for number, row in rows:
        name = (row.get("file") or "").strip()
        while name.startswith("./"):
            name = name[2:]
        label = (row.get("label") or "").strip()
        if name.startswith(f"{STATE_DIR}/") or name not in known:
            raise SaalError(f"--import {source} line {number}: {name!r} is not an image of this project")
        if label not in project.classes:
            raise SaalError(
                f"--import {source} line {number}: {label!r} is not a class; use one of {', '.join(project.classes)}"
            )
        item_id, current, readable = known[name]
        if not readable:
            raise SaalError(f"--import {source} line {number}: {name} cannot be read, so it cannot be labelled")
        if current != label:
            who = (row.get("annotator") or "").strip() or annotator
            changes.append((item_id, label, who, _parse_time(row.get("time"), source, number)))
    from saal.app.labels import record_many

    record_many(project.engine, changes, project.classes, kind="import")
    return f"imported {len(changes)} labels from {source} ({len(rows) - len(changes)} were there already)"


def read_import(source: Path) -> list[tuple[int, dict[str, str]]]:
    """Return the rows of the import CSV ``source``, each with the line it starts on.

    Raises:
        SaalError: the file is not UTF-8, is malformed (an unterminated quote, a stray quote: the message names the
            line the bad row starts on) or lacks the ``file`` and ``label`` columns.
    """
    rows: list[tuple[int, dict[str, str]]] = []
    start = 1
    try:
        with open(source, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, strict=True)
            fields = set(reader.fieldnames or [])
            if not {"file", "label"} <= fields:
                raise SaalError(f"--import {source} needs the columns file and label; it has {sorted(fields)}")
            start = reader.line_num + 1
            for row in reader:
                rows.append((start, row))
                start = reader.line_num + 1
    except UnicodeDecodeError as error:
        raise SaalError(f"--import {source} is not UTF-8 text ({error.reason}); save it as a UTF-8 CSV") from None
    except csv.Error as error:
        raise SaalError(
            f"--import {source} is malformed at line {start} ({error}); check the quotes on that line"
        ) from None
    except OSError as error:
        raise SaalError(f"--import {source} cannot be read ({error.strerror or error})") from None
    return rows


def _parse_time(text: str | None, source: Path, number: int) -> float | None:
    if not text or not text.strip():
        return None
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise SaalError(f"--import {source} line {number}: time {text!r} is not ISO 8601") from None
