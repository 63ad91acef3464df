"""The labelling database: its tables, how it is opened, and write transactions.

SQLite in WAL mode in the project folder by default (readers never wait for the writer; ``synchronous=FULL``, so
a committed label survives a killed process and a power cut), or PostgreSQL by option (a plain ``postgresql://``
URL uses psycopg 3, which the ``app`` extra installs; the label, skip and undo transactions lock the item's row with
``SELECT ... FOR UPDATE``).

A write that waits longer than its ``busy`` seconds for the lock (SQLite's write lock, a PostgreSQL row lock)
raises :class:`Busy`, which the server answers with 503 and ``Retry-After``: the web requests wait a few seconds,
the model job the default :data:`BUSY_SECONDS`.

Tables:

* ``meta``: key/value facts: which project the database belongs to, the current model version, job state.
* ``items``: one row per image: its path, whether it is readable, its *current* state and label (what the history
  below adds up to, updated in the same transaction as each history row), its ranking priority and its claim.
* ``events``: the append-only label history. A label, a relabel, a skip, an undo or an imported label each adds a
  row; no row is ever changed or deleted, so nothing a person entered is lost. ``request_id`` is unique: a form
  sent twice (a double click, a retried request) is recorded once.
* ``models``: one row per model version: when, on how many labels, with which strategy, its measured quality.
* ``audit_predictions``: what each model version predicted for the random check (audit) images it never saw
  (the next :data:`saal.app.ranking.MAX_AUDIT_TRACK` in the check order); its accuracy on those labelled later is
  read from here (:mod:`saal.app.status`).

Schema 2 added ``items.audit`` (the image is a random check image), ``items.picked_by`` (what put it where it is
in the queue: a strategy's name, ``random`` or ``audit``), ``events.audit`` (the label is a random check label)
and ``audit_predictions``; :func:`upgrade` adds them to a schema-1 database (older labels count as non-audit).

Labels are stored as text: a class name for classification. A task with richer labels (boxes) stores their JSON
in the same column; see :mod:`saal.app` for what detection would add.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from saal.errors import SaalError
from saal.extras import import_extra

import_extra("sqlalchemy", "app", "saal label")

from sqlalchemy import (  # noqa: E402  (after the one-line "install saal[app]" check)
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    make_url,
    select,
)
from sqlalchemy.exc import DBAPIError, NoSuchModuleError, OperationalError  # noqa: E402

SCHEMA_VERSION = 2
BUSY_SECONDS = 60.0  # how long a write waits for the lock by default (the model job; web requests wait less)
RETRY_AFTER = 5  # seconds, the ``Retry-After`` of a 503 answered when the database is busy
_BUSY_SQLSTATES = ("55P03", "40P01", "40001")  # PostgreSQL: lock timeout, deadlock, serialization failure


class Busy(SaalError):
    """The database stayed locked by another writer for longer than the request may wait (HTTP 503)."""


UNLABELLED, LABELLED, SKIPPED = 0, 1, 2  # the values of saal.core.pool_state.ItemState

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("path", String(1024), nullable=False, unique=True),
    Column("readable", Boolean, nullable=False, default=True),
    Column("error", Text),
    Column("state", Integer, nullable=False, default=UNLABELLED),
    Column("label", Text),
    Column("annotator", String(128)),
    Column("labelled_at", Float),
    Column("last_event", Integer),
    Column("priority", Float, nullable=False, default=0.0),
    Column("claimed_by", String(128)),
    Column("claim_until", Float),
    Column("predicted", Text),
    Column("confidence", Float),
    Column("added_at", Float, nullable=False),
    Column("audit", Boolean),  # a random check image (NULL in a schema-1 database until upgraded: not one)
    Column("picked_by", String(64)),  # what placed it in the queue: a strategy, "random" or "audit"
    Index("ix_items_queue", "state", "priority"),
    Index("ix_items_claimed_by", "claimed_by"),
    Index("ix_items_label", "label"),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("item_id", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # label | skip | undo | import
    Column("label", Text),
    Column("annotator", String(128)),
    Column("at", Float, nullable=False),
    Column("request_id", String(64), unique=True),
    Column("undoes", Integer),
    Column("prev_state", Integer, nullable=False),
    Column("prev_label", Text),
    Column("prev_annotator", String(128)),
    Column("prev_labelled_at", Float),
    Column("prev_event", Integer),
    Column("audit", Boolean),  # a label of a random check image given on the page (NULL: not one)
    Index("ix_events_item", "item_id"),
    Index("ix_events_annotator", "annotator", "id"),
)

models = Table(
    "models",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("created_at", Float, nullable=False),
    Column("kind", String(32), nullable=False),  # random | the strategy spec
    Column("model", String(64), nullable=False),
    Column("labels", Integer, nullable=False),
    Column("last_event", Integer, nullable=False),
    Column("train_seconds", Float, nullable=False),
    Column("score_seconds", Float, nullable=False),
    Column("quality", Float),
    Column("quality_n", Integer),
    Column("quality_at", Float),
    Column("note", Text),
)

audit_predictions = Table(
    "audit_predictions",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("item_id", Integer, primary_key=True, autoincrement=False),
    Column("predicted", Text, nullable=False),
)

ADDED_IN_2 = {"items": ("audit", "picked_by"), "events": ("audit",)}


def default_url(db_path: str) -> str:
    """Return the SQLAlchemy URL of the project's own SQLite file at ``db_path``."""
    return f"sqlite:///{db_path}"


def redacted(url: str) -> str:
    """Return ``url`` with any password hidden (for messages and the settings file)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: say what was given
        return url


def connect(url: str) -> Engine:
    """Return an engine on ``url``; SQLite gets WAL mode, full sync, a busy timeout and explicit transactions.

    A plain ``postgresql://`` (or ``postgres://``) URL is opened with psycopg 3 (``postgresql+psycopg://``).

    Raises:
        SaalError: a malformed URL, a driver that is not installed, or a database that cannot be opened.
    """
    try:
        parsed = make_url(url)
    except Exception:
        raise SaalError(f"--db: {url!r} is not a database URL; give e.g. postgresql://user@host/db") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    sqlite = parsed.get_backend_name() == "sqlite"
    try:
        if sqlite:
            engine = create_engine(
                parsed,
                connect_args={"timeout": BUSY_SECONDS, "check_same_thread": False},
                pool_size=16,
                max_overflow=32,
            )
            event.listen(engine, "connect", _sqlite_connect)
            event.listen(engine, "begin", _sqlite_begin)
        else:
            engine = create_engine(parsed, pool_pre_ping=True, pool_size=8, max_overflow=32)
        with engine.connect() as conn:
            conn.execute(select(1))
    except NoSuchModuleError:
        raise SaalError(
            f"--db {redacted(url)}: unknown kind of database; give e.g. postgresql://... or sqlite:///..."
        ) from None
    except ModuleNotFoundError as error:
        raise SaalError(f"--db {redacted(url)}: its driver is not installed ({error}); pip install it") from None
    except OperationalError as error:
        first = str(error.orig).splitlines()[0] if error.orig else str(error).splitlines()[0]
        raise SaalError(f"cannot open database {redacted(url)}: {first}") from None
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" event below emits BEGIN itself
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # A write transaction takes the write lock at BEGIN: two writers then queue on the busy timeout instead of
    # failing with "database is locked" when a read transaction tries to become a write one. Labels are synced
    # to disk at commit (FULL); claims, which nobody entered, are not (NORMAL: WAL still keeps them across a
    # killed process, and the next FULL commit syncs them too), which halves the disk syncs per label.
    options = conn.get_execution_options()
    conn.exec_driver_sql(f"PRAGMA busy_timeout={int(1000 * options.get('busy', BUSY_SECONDS))}")
    if options.get("write"):
        conn.exec_driver_sql(f"PRAGMA synchronous={'FULL' if options.get('durable', True) else 'NORMAL'}")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


def is_busy(error: DBAPIError) -> bool:
    """Return whether ``error`` says that a lock was not granted in time (SQLite's "database is locked", a
    PostgreSQL lock timeout, deadlock or serialization failure): trying again later may succeed."""
    if getattr(error.orig, "sqlstate", None) in _BUSY_SQLSTATES:
        return True
    message = str(error.orig or error).lower()
    return isinstance(error, OperationalError) and ("database is locked" in message or "database is busy" in message)


@contextmanager
def write(engine: Engine, *, durable: bool = True, busy: float | None = None) -> Iterator[Connection]:
    """Yield a connection inside one write transaction, committed at the end (rolled back on an exception).

    ``durable=False`` (SQLite): the commit survives a killed process but is not synced to disk on its own.

    Raises:
        Busy: the write lock (SQLite) or a row lock (PostgreSQL) was not granted within ``busy`` seconds
            (default :data:`BUSY_SECONDS`).
    """
    seconds = BUSY_SECONDS if busy is None else busy
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(write=True, durable=durable, busy=seconds)
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, int(1000 * seconds))}")
                yield conn
    except DBAPIError as error:
        if is_busy(error):
            raise Busy(f"the database is busy (another write holds it); try again in {RETRY_AFTER} s") from None
        raise


@contextmanager
def read(engine: Engine) -> Iterator[Connection]:
    """Yield a connection inside one read transaction (a consistent snapshot).

    Raises:
        Busy: the database stayed locked (rare in WAL mode: a reader waits only while it is being recovered).
    """
    try:
        with engine.connect() as conn, conn.begin():
            yield conn
    except DBAPIError as error:
        if is_busy(error):
            raise Busy(f"the database is busy; try again in {RETRY_AFTER} s") from None
        raise


def get_meta(conn: Connection, key: str, default: str | None = None) -> str | None:
    """Return the ``meta`` value of ``key`` (``default`` when unset)."""
    value = conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar_one_or_none()
    return default if value is None else str(value)


def set_meta(conn: Connection, key: str, value: str | float | int | None) -> None:
    """Set (or, with None, delete) the ``meta`` value of ``key``."""
    conn.execute(meta.delete().where(meta.c.key == key))
    if value is not None:
        conn.execute(meta.insert().values(key=key, value=str(value)))


def initialise(engine: Engine, project_id: str, folder: str) -> None:
    """Create the tables of a new project's database and record which project it belongs to.

    Raises:
        SaalError: the database already holds another project, or other tables.
    """
    check_owner(engine, project_id, folder, new=True)
    metadata.create_all(engine)
    with write(engine) as conn:
        if get_meta(conn, "project_id") is None:
            set_meta(conn, "project_id", project_id)
            set_meta(conn, "folder", folder)
            set_meta(conn, "schema", SCHEMA_VERSION)
            set_meta(conn, "current_version", 0)
            set_meta(conn, "created_at", time.time())


def upgrade(engine: Engine) -> bool:
    """Bring a database of an older schema up to :data:`SCHEMA_VERSION` (add the columns and tables it lacks).

    Existing rows keep NULL in the new columns, which reads as "not an audit image / label".

    Returns:
        Whether anything was changed.
    """
    inspector = inspect(engine)
    missing = [
        (name, column)
        for name, columns in ADDED_IN_2.items()
        for column in columns
        if column not in {c["name"] for c in inspector.get_columns(name)}
    ]
    lacks_table = "audit_predictions" not in inspector.get_table_names()
    with read(engine) as conn:
        schema = int(get_meta(conn, "schema", "1") or 1)
    if not missing and not lacks_table and schema >= SCHEMA_VERSION:
        return False
    with write(engine) as conn:
        for name, column in missing:
            kind = metadata.tables[name].c[column].type.compile(dialect=engine.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN {column} {kind}")
        set_meta(conn, "schema", SCHEMA_VERSION)
    metadata.create_all(engine)  # the new tables (existing ones are left alone)
    return True


def check_owner(engine: Engine, project_id: str, folder: str, *, new: bool = False) -> None:
    """Check that the database belongs to the project ``project_id`` (or, with ``new``, is empty or ours).

    Raises:
        SaalError: the database belongs to another project, is not a saal label database, or (for an existing
            project) is empty.
    """
    url = redacted(str(engine.url))
    tables = set(inspect(engine).get_table_names())
    if not tables:
        if new:
            return
        raise SaalError(
            f"database {url} is empty but project {folder} has labels there; give the --db it was created with"
        )
    if not {"meta", "items", "events", "models"} <= tables:
        raise SaalError(f"database {url} is not a saal label database (tables: {', '.join(sorted(tables))})")
    with read(engine) as conn:
        owner, owner_folder = get_meta(conn, "project_id"), get_meta(conn, "folder")
        schema = get_meta(conn, "schema")
    if owner != project_id:
        raise SaalError(
            f"database {url} belongs to another project (made for {owner_folder}), not {folder}; "
            "give that project's folder, or another --db"
        )
    if schema is not None and int(schema) > SCHEMA_VERSION:
        raise SaalError(f"database {url} was written by a newer saal (schema {schema}); upgrade saal")
