"""A labelling project: a folder of images, its settings file, its database and the one-server lock.

The project folder is the image folder itself; what ``saal label`` keeps lives in ``FOLDER/.saal-label/``:
``project.json`` (classes, strategies, audit share, model, the project's id), ``labels.db`` (the SQLite database,
unless ``--db`` names another), ``secret`` (signs annotator sessions), ``features-*.npy`` (cached embeddings),
``job.log`` (the model job's output) and ``server.lock`` (held by the running server, readable by its owner only,
removed when it stops). ``secret`` and ``server.lock`` are created with mode 0600.

Images are the files below the folder, at any depth, with torchvision's image extensions, in sorted order of
their relative paths; hidden folders are ignored. Each gets a stable id (its position when it was first seen;
images added later get the next ids). A file whose header cannot be read is recorded as unreadable, with why (paths
in the reason are relative to the folder). A symbolic link to a file is an image like any other, wherever the file
lies (links to folders are not followed). A file whose name is not valid UTF-8 is recorded as unreadable under its
name with the bad bytes written ``\\xNN``, and the reason says to rename it.

A project that fails while it is being created (a scan, a database or an import error) is removed again
(:meth:`Project.discard`): no half-made ``.saal-label/`` stays behind to refuse the next try.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from saal.app import db, default_cold_start, default_strategy
from saal.errors import SaalError

STATE_DIR = ".saal-label"
SETTINGS_FILE = "project.json"
SETTINGS_FORMAT = 1
MODEL_KINDS = ("auto", "pretrained", "cnn")
NOT_UTF8 = "the file name is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf8) and restart saal label"
_CLASS_NAME = re.compile(r"^[^\s,/\\][^,/\\]{0,63}$")

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; a second server is then not detected
    fcntl = None  # type: ignore[assignment]


@dataclass
class Settings:
    """What ``project.json`` holds.

    Attributes:
        project_id: identifies the project (its database records it too).
        classes: the class names, in key order (key 1 is the first).
        task: what a label is (``classification``).
        strategy: the strategy spec that ranks unlabelled images once a model exists.
        cold_start: the strategy spec that ranks them before (on the cached embeddings alone; see
            :func:`saal.app.ranking.cold_start`).
        audit_share: the share of images shown that are random check images (0 turns them off; see
            :mod:`saal.app.order`).
        retrain_every: the model job retrains after this many new labels.
        model: ``pretrained`` (a head on the offline EfficientNet-Lite0 embeddings), ``cnn`` (the small CNN on the
            pixels) or ``auto`` (pretrained when its extra is installed, else cnn).
        image_size: the side images are resized to for the model.
        seed: seeds the initial random order, the check images and every training run.
        database: ``project`` (the SQLite file in the state folder) or the redacted URL of another database.
        claim_seconds: how long an image stays reserved for the annotator it was shown to.
    """

    project_id: str
    classes: list[str]
    task: str = "classification"
    strategy: str = field(default_factory=lambda: default_strategy())
    cold_start: str = field(default_factory=lambda: default_cold_start())
    audit_share: float = 0.1
    retrain_every: int = 20
    model: str = "auto"
    image_size: int = 128
    seed: int = 0
    database: str = "project"
    claim_seconds: int = 600
    format: int = SETTINGS_FORMAT
    created_at: float = field(default_factory=time.time)


class Project:
    """An opened project: its folder, settings and database engine.

    Use :func:`open_project`; do not construct directly.
    """

    def __init__(self, root: Path, settings: Settings, url: str) -> None:
        self.root = root
        self.settings = settings
        self.url = url
        self.engine = db.connect(url)
        self.fresh = False  # created by this open_project call (then discard() may remove it again)
        self._state_before: set[str] | None = None

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def classes(self) -> list[str]:
        return list(self.settings.classes)

    def save_settings(self) -> None:
        """Write ``project.json`` atomically (a killed process leaves the old or the new file, never half)."""
        write_settings(self.state_dir, self.settings)

    def resolve_image(self, relative: str) -> Path:
        """Return the absolute path of the image ``relative`` if it is written as a path below the project folder
        (a symbolic link there is followed, as the scan offered it; see :func:`safe_path`).

        Raises:
            SaalError: an absolute path, one that climbs out of the folder (``..``) or into the state folder.
        """
        return safe_path(self.root, relative)

    def discard(self) -> None:
        """Remove what creating this project wrote: its state folder (or the files it added there) and, with
        ``--db``, the tables it made (the database was empty, or creation would have been refused).

        Does nothing for a project that existed before it was opened.
        """
        if not self.fresh:
            return
        if self.settings.database != "project":
            with contextlib.suppress(Exception):  # best effort: the caller reports the first error
                db.metadata.drop_all(self.engine)
        self.engine.dispose()
        if self._state_before is None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        elif self.state_dir.is_dir():
            for entry in set(os.listdir(self.state_dir)) - self._state_before:
                target = self.state_dir / entry
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        self.fresh = False


def safe_path(root: Path, relative: str) -> Path:
    """Return ``root / relative`` (``root`` resolved), if the path names a file below ``root`` outside its state folder.

    The check is on the path as written: a symbolic link below ``root`` is followed wherever it points, as the
    scan offered it (the server serves only paths the scan recorded).

    Raises:
        SaalError: an absolute path, a NUL byte, a ``..`` part, or a path into ``.saal-label``.
    """
    if not relative or "\x00" in relative or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
        raise SaalError(f"{relative!r} is not a path inside the project folder")
    parts = PurePosixPath(relative).parts
    if not parts or ".." in parts or parts[0] == STATE_DIR:
        raise SaalError(f"{relative!r} is not a path inside the project folder")
    return root.resolve().joinpath(*parts)


def parse_classes(text: str) -> list[str]:
    """Return the class names of ``--classes a,b,c``.

    Raises:
        SaalError: fewer than two names, a repeated or empty name, or more than 64 characters or a slash in one.
    """
    names = [c.strip() for c in text.split(",")]
    if any(not c for c in names):
        raise SaalError(f"--classes {text!r} has an empty name; give names separated by commas, e.g. cat,dog")
    if len(names) < 2:
        raise SaalError(f"--classes {text!r} names one class; give at least two, e.g. cat,dog")
    bad = [c for c in names if not _CLASS_NAME.match(c)]
    if bad:
        raise SaalError(f"class name {bad[0]!r} is not allowed; use up to 64 characters without / \\ or commas")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise SaalError(f"class {dup[0]!r} is named twice in --classes; give each class once")
    return names


def read_settings(state_dir: Path) -> Settings | None:
    """Return the settings in ``state_dir`` (None when there is no project there).

    Raises:
        SaalError: an unreadable or foreign settings file.
    """
    path = state_dir / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != SETTINGS_FORMAT:
            raise SaalError(f"{path} has format {data.get('format')!r}; it was written by another saal version")
        return Settings(**data)
    except (json.JSONDecodeError, TypeError, AttributeError) as error:
        raise SaalError(f"{path} is not a saal label settings file ({error}); move it away to start over") from None


def write_settings(state_dir: Path, settings: Settings) -> None:
    """Write ``settings`` to ``state_dir/project.json`` atomically."""
    path = state_dir / SETTINGS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(settings), indent=2) + "\n")
    os.replace(tmp, path)


def image_files(root: Path) -> list[str]:
    """Return the relative (POSIX) paths of the images below ``root``, sorted; hidden folders are skipped.

    A name that is not valid UTF-8 keeps its bad bytes as surrogates (see :func:`stored_path`).
    """
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith("."):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def stored_path(relative: str) -> tuple[str, str | None]:
    """Return how the database records the scanned path ``relative``, and why it is unreadable (None: it is not).

    A name that is not valid UTF-8 (its bad bytes are surrogates in ``relative``) cannot be stored as text: it is
    recorded with those bytes written ``\\xNN`` and :data:`NOT_UTF8` as the reason.
    """
    try:
        relative.encode("utf-8")
        return relative, None
    except UnicodeEncodeError:
        return relative.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), NOT_UTF8


def check_header(path: Path) -> str | None:
    """Return why the image at ``path`` cannot be read (None when its header reads as an image)."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - reading the header is the check
        return None
    except Exception as error:  # PIL raises many kinds for damaged files
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"


def open_project(
    folder: str | Path,
    *,
    classes: list[str] | None = None,
    url: str | None = None,
    updates: dict[str, Any] | None = None,
) -> Project:
    """Create the project in ``folder`` or reopen it, and bring its item list up to date with the folder.

    Args:
        folder: the image folder.
        classes: the class names (required to create; when reopening they must equal the project's).
        url: a SQLAlchemy database URL; default the project's SQLite file.
        updates: settings to change (``strategy``, ``retrain_every``, ``model``, ...); saved in ``project.json``.

    Returns:
        The opened :class:`Project`.

    Raises:
        SaalError: a missing folder, a folder without images, no ``--classes`` for a new project, classes other
            than the project's, a database of another project, a bad setting.
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise SaalError(f"folder {folder} does not exist; give the folder that holds your images")
    state_dir = root / STATE_DIR
    settings = read_settings(state_dir)
    files = image_files(root)
    if not files:
        raise SaalError(
            f"folder {root} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...); give a folder of images"
        )
    new = settings is None
    if settings is None:
        if classes is None:
            raise SaalError(f"{root} is not a labelling project yet; give its classes, e.g. --classes cat,dog")
        settings = Settings(project_id=uuid.uuid4().hex, classes=list(classes))
    elif classes is not None and list(classes) != settings.classes:
        raise SaalError(
            f"project {root} was made for classes {','.join(settings.classes)}, not {','.join(classes)}; "
            f"leave --classes out or give --classes {','.join(settings.classes)}"
        )
    for key, value in (updates or {}).items():
        if value is not None:
            setattr(settings, key, value)
    _check_settings(settings)
    before = set(os.listdir(state_dir)) if state_dir.is_dir() else None
    if url is None:
        if settings.database != "project":
            raise SaalError(
                f"project {root} keeps its labels in {settings.database}; give --db with that database's URL"
            )
        state_dir.mkdir(exist_ok=True)
        url = db.default_url(str(state_dir / "labels.db"))
    else:
        settings.database = db.redacted(url)
    project = Project(root, settings, url)  # a bad --db, or another project's database, writes nothing
    db.check_owner(project.engine, settings.project_id, str(root), new=new)
    project.fresh, project._state_before = new, before
    try:
        _write(project, files)
    except BaseException:
        project.discard()  # a new project that fails half-way leaves nothing behind
        raise
    return project


def _write(project: Project, files: list[str]) -> None:
    from saal.app.order import assign_audit

    project.state_dir.mkdir(exist_ok=True)
    settings = project.settings
    if project.fresh:
        db.initialise(project.engine, settings.project_id, str(project.root))
    else:
        db.upgrade(project.engine)
    secret = project.state_dir / "secret"
    if not secret.exists():
        descriptor = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    project.save_settings()
    sync_items(project, files)
    assign_audit(project.engine, settings.seed, settings.audit_share)


def _check_settings(settings: Settings) -> None:
    from saal.app.ranking import check_cold_start
    from saal.strategies import build_strategy

    build_strategy(settings.strategy)  # an unknown strategy or option: one line now, not a crashing job later
    check_cold_start(settings.cold_start)
    share = settings.audit_share
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share < 1:
        raise SaalError(f"--audit-share must lie in [0, 1) (0 turns random check images off), got {share!r}")
    if settings.retrain_every < 1:
        raise SaalError(f"--retrain-every must be at least 1, got {settings.retrain_every}")
    if settings.model not in MODEL_KINDS:
        raise SaalError(f"--model must be one of {', '.join(MODEL_KINDS)}, got {settings.model!r}")
    if not 8 <= settings.image_size <= 512:
        raise SaalError(f"--image-size must lie in 8..512, got {settings.image_size}")
    if settings.claim_seconds < 5:
        raise SaalError(f"--claim-seconds must be at least 5, got {settings.claim_seconds}")
    if len(settings.classes) > 64:
        raise SaalError(f"{len(settings.classes)} classes are too many for one page; give at most 64")


def sync_items(project: Project, files: list[str]) -> int:
    """Add the images of ``files`` that the database does not hold yet; return how many were added.

    New items get ids after the existing ones, whether they are random check images (:mod:`saal.app.order`) and a
    seeded random order among themselves with the check images interleaved (the order before the first ranking).
    """
    from sqlalchemy import func, select

    from saal.app.order import AUDIT, RANDOM, audit_mask, audit_sequence, interleave

    with db.read(project.engine) as conn:
        known = {str(p) for p in conn.execute(select(db.items.c.path)).scalars()}
        next_id = int(conn.execute(select(func.coalesce(func.max(db.items.c.id) + 1, 0))).scalar_one())
    why: dict[str, str | None] = {}
    for relative in files:
        stored, reason = stored_path(relative)
        if stored not in known and stored not in why:
            why[stored] = reason or check_header(project.root / relative)
    fresh = list(why)
    if not fresh:
        return 0
    seed, share = project.settings.seed, project.settings.audit_share
    ids = np.arange(next_id, next_id + len(fresh), dtype=np.int64)
    audit = audit_mask(seed, ids, share)
    main = np.random.default_rng([seed, next_id]).permutation(ids[~audit])
    order, _ = interleave(main, audit_sequence(seed, ids[audit]), share, 0)
    position = np.empty(len(ids), dtype=np.int64)
    position[order - next_id] = np.arange(len(order))
    now = time.time()
    rows = []
    prefix = f"{project.root}{os.sep}"
    for offset, relative in enumerate(fresh):
        reason = why[relative]
        error = reason.replace(prefix, "") if reason else None  # paths in reasons relative to the folder
        rows.append(
            {
                "id": next_id + offset,
                "path": relative,
                "readable": error is None,
                "error": error,
                "state": db.UNLABELLED,
                "priority": float((len(ids) - position[offset]) / len(ids)),
                "added_at": now,
                "audit": bool(audit[offset]),
                "picked_by": AUDIT if audit[offset] else RANDOM,
            }
        )
    with db.write(project.engine) as conn:
        for start in range(0, len(rows), 5000):
            conn.execute(db.items.insert(), rows[start : start + 5000])
    return len(rows)


class ServerLock:
    """The lock a running server holds on its project (``flock``: it dies with the process, even by SIGKILL).

    The file records the server's pid and address (with its access token), so it is created readable by its owner
    only, and :meth:`release` removes it.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "server.lock"
        self._handle: IO[str] | None = None

    def acquire(self, address: str) -> None:
        """Take the lock and record ``address`` in it.

        Raises:
            SaalError: another server holds it (the message gives its pid and address).
        """
        handle = self._locked()
        try:
            if hasattr(os, "fchmod") and os.fstat(handle.fileno()).st_mode & 0o077:  # left by an older saal
                os.fchmod(handle.fileno(), 0o600)  # private before the token is written
        except OSError:
            handle.close()
            raise SaalError(f"{self.path} is readable by others and cannot be made private; remove it") from None
        self._handle = handle
        self.record(address)

    def _locked(self) -> IO[str]:
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # owner-only from the start
            handle = os.fdopen(descriptor, "r+")
            if fcntl is None:
                return handle
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = handle.read().strip() or "another process"
                handle.close()
                raise SaalError(
                    f"another saal label server is running on this project ({holder}); open its address, "
                    "or stop it first"
                ) from None
            try:  # the holder may have removed the file between our open and our flock: lock the current one
                if os.stat(self.path).st_ino == os.fstat(descriptor).st_ino:
                    return handle
            except FileNotFoundError:
                pass
            handle.close()

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._handle is not None

    def record(self, address: str) -> None:
        """Replace the address recorded in the held lock (what a second server's error names)."""
        if self._handle is not None:
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.write(f"pid {os.getpid()}, {address}")
            self._handle.flush()

    def release(self) -> None:
        """Remove the lock file (it holds the access token) and drop the lock."""
        if self._handle is not None:
            self.path.unlink(missing_ok=True)  # still locked: a server starting now locks a new file
            self._handle.close()
            self._handle = None
