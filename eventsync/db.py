"""Engines, SQLite pragmas, and Alembic migrations run from code."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError as AlembicError
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from eventsync.errors import ConfigError, first_line
from eventsync.jsonio import column_text

log = logging.getLogger(__name__)

# Serialises migrations between processes that start together (Postgres advisory lock key).
MIGRATION_LOCK_KEY = 0x6576_656E_7473  # "events"
# How long a SQLite connection waits for another process's write lock.
_SQLITE_BUSY_SECONDS = 30
# One try for the migration lock; between tries the process can act on a signal.
_SQLITE_LOCK_TRY_MS = 100


def make_engine(url: str, *, pool_size: int = 8) -> Engine:
    """An engine for `url`: WAL and a busy timeout on SQLite, a pinged pool on Postgres."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed, connect_args={"timeout": _SQLITE_BUSY_SECONDS}, json_serializer=column_text
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=4,
        json_serializer=column_text,
    )


class _SqliteWriter:
    """The one writer of a SQLite file within this process, the rows written since the last
    checkpoint, and an engine of its own for checkpoints: its connections, opened for each
    one, never write, so they never cache the large write statements."""

    def __init__(self, engine: Engine) -> None:
        self.lock = threading.Lock()
        self.unchecked = 0
        self.checkpoints = create_engine(
            engine.url, poolclass=NullPool, connect_args={"timeout": _SQLITE_BUSY_SECONDS}
        )


_SQLITE_WRITERS: dict[str, _SqliteWriter] = {}
# Rows written before a checkpoint is run outside the write lock: about 1 MB of WAL.
_CHECKPOINT_ROWS = 1000


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One write transaction. SQLite allows one writer per file: the threads of this process
    queue on a lock rather than in SQLite's busy handler, which sleeps in steps of up to
    100 ms. Other processes still wait on the busy timeout.

    SQLite's own checkpoint runs inside the commit that fills the WAL, while the lock is
    held; instead, the commit that brings the rows written since the last checkpoint past
    _CHECKPOINT_ROWS is followed by one after the lock is released, beside the next writer.
    The automatic one stays for what writes little."""
    if engine.dialect.name != "sqlite":
        with engine.begin() as connection:
            yield connection
        return
    writer = _SQLITE_WRITERS.get(str(engine.url))
    if writer is None:
        writer = _SQLITE_WRITERS.setdefault(str(engine.url), _SqliteWriter(engine))
    # The lock before the connection: a thread waiting for it holds no connection.
    with writer.lock:
        with engine.begin() as connection:
            driver = connection.connection.driver_connection
            assert driver is not None
            before = driver.total_changes
            yield connection
            written = driver.total_changes - before
        writer.unchecked += written  # committed
        due = writer.unchecked >= _CHECKPOINT_ROWS
        if due:
            writer.unchecked = 0
    if due:
        _checkpoint(writer.checkpoints)


def _checkpoint(engine: Engine) -> None:
    """Copy the WAL into the database without waiting for readers or writers. A failure
    loses nothing: the rows are committed, and a later checkpoint copies them."""
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
    except SQLAlchemyError as exc:
        log.warning("could not checkpoint the SQLite WAL: %s", first_line(exc))


def open_reader(url: str) -> Engine:
    """An engine that can only read an eventsync database that already exists at the newest
    revision: it creates no file or folder, and migrates nothing. ConfigError, with what to
    run, otherwise."""
    engine = _read_only_engine(url)
    try:
        _check_readable(engine, url)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _read_only_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        path = Path(database).expanduser() if database != ":memory:" else None
        if path is None or not path.is_file():
            raise ConfigError(_no_database(database or ":memory:"))
        # mode=ro: SQLite opens the file read-only, and never creates it. No WAL or
        # synchronous pragma: they are a writer's settings, and the file keeps its journal mode.
        read_only = URL.create(
            "sqlite",
            database=f"file:{quote(str(path.resolve()))}",
            query={"mode": "ro", "uri": "true"},
        )
        engine = create_engine(read_only, connect_args={"timeout": _SQLITE_BUSY_SECONDS})
        event.listen(engine, "connect", _sqlite_query_only)
        return engine
    engine = create_engine(parsed, pool_pre_ping=True, pool_size=2, max_overflow=2)
    event.listen(engine, "connect", _postgres_read_only_session)
    return engine


def _sqlite_query_only(dbapi_connection: Any, _record: Any) -> None:
    # Also refuses writes to the TEMP database, which mode=ro does not cover.
    dbapi_connection.execute("PRAGMA query_only = ON")


def _postgres_read_only_session(dbapi_connection: Any, _record: Any) -> None:
    """Every transaction of the session starts read-only, so that not even a bug in a read
    can write. Set outside a transaction, so that no rollback undoes it."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        dbapi_connection.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    finally:
        dbapi_connection.autocommit = autocommit


def _no_database(where: str) -> str:
    return f"no eventsync database at {where}: run `eventsync sync` or `eventsync db upgrade` first"


def _check_readable(engine: Engine, url: str) -> None:
    current = current_revision(engine)
    head = head_revision()
    if current is None:
        parsed = make_url(url)
        where = (
            parsed.database or ""
            if parsed.get_backend_name() == "sqlite"
            else parsed.render_as_string(hide_password=True)
        )
        raise ConfigError(_no_database(where))
    if not is_known_revision(current):
        raise ConfigError(_newer_than_eventsync(current, head))
    if current != head:
        raise ConfigError(
            f"the database is at schema revision {current}, this eventsync needs {head}: "
            "run `eventsync db upgrade`"
        )


def _newer_than_eventsync(revision: str, head: str | None) -> str:
    return (
        f"the database is at schema revision {revision}, which this eventsync "
        f"(newest revision {head}) does not know: upgrade eventsync"
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets `sqlite3 eventsync.db` read while a sync writes; the busy timeout makes
    # concurrent writers wait instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_SECONDS * 1000}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def migrations_dir() -> Path:
    """The Alembic script folder: inside the installed package, or the repo's top level."""
    packaged = resources.files("eventsync") / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def is_known_revision(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except AlembicError:
        return False


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def _migration_lock(connection: Connection) -> Iterator[None]:
    if connection.dialect.name == "postgresql":
        _wait_for_advisory_lock(connection)
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()
    else:
        # An exclusive transaction around the whole migration: a second process waits for it,
        # then finds the schema at head and does nothing.
        _begin_exclusive(connection)
        try:
            yield
        except BaseException:
            connection.rollback()
            raise
        connection.commit()


def _wait_for_advisory_lock(connection: Connection) -> None:
    """Poll for the lock (not a blocking call), so that a signal can still stop the process."""
    waited = False
    while not connection.execute(
        text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
    ).scalar_one():
        if not waited:
            log.info("waiting for another eventsync to finish migrating the database")
            waited = True
        connection.rollback()
        time.sleep(0.25)


def _begin_exclusive(connection: Connection) -> None:
    """BEGIN EXCLUSIVE, retried from Python while another process writes, for up to the busy
    timeout. SQLite's busy handler sleeps inside C, where no signal handler runs: a SIGTERM
    to a process queued there took effect only when the 30 s timeout ran out."""
    connection.exec_driver_sql(f"PRAGMA busy_timeout = {_SQLITE_LOCK_TRY_MS}")
    deadline = time.monotonic() + _SQLITE_BUSY_SECONDS
    waited = False
    try:
        while True:
            try:
                connection.exec_driver_sql("BEGIN EXCLUSIVE")
                return
            except OperationalError as exc:
                busy = getattr(exc.orig, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() >= deadline:
                    raise
            connection.rollback()
            if not waited:
                log.info("waiting for another process's write to the database, to migrate it")
                waited = True
    finally:
        connection.exec_driver_sql(f"PRAGMA busy_timeout = {_SQLITE_BUSY_SECONDS * 1000}")


def upgrade(engine: Engine) -> tuple[str | None, str | None]:
    """Upgrade to head under a lock. Returns (revision before, revision after)."""
    with engine.connect() as connection, _migration_lock(connection):
        before = MigrationContext.configure(connection).get_current_revision()
        head = head_revision()
        if before is not None and not is_known_revision(before):
            raise ConfigError(_newer_than_eventsync(before, head))
        if before != head:
            command.upgrade(alembic_config(connection), "head")
            connection.commit()
        return before, head


def ensure_schema(engine: Engine) -> None:
    """Migrate an empty or older database, saying so; do nothing to a current one."""
    before, after = upgrade(engine)
    if before != after:
        log.info(
            "database migrated from %s to %s",
            before or "an empty database",
            after,
            extra={"revision_before": before, "revision_after": after},
        )
