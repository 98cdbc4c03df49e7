"""Engines, SQLite pragmas, and Alembic migrations run from code."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError as AlembicError
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from eventsync.errors import ConfigError
from eventsync.events import json_text

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
            parsed, connect_args={"timeout": _SQLITE_BUSY_SECONDS}, json_serializer=json_text
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=4,
        json_serializer=json_text,
    )


def checkpoint_engine(engine: Engine) -> Engine:
    """An engine on the same SQLite file for WAL checkpoints (store.write_transaction), on
    connections of its own, opened for each one: a connection from the pool would also
    write, and keep a second set of the large cached statements (12 MB more for 100 jobs)."""
    return create_engine(
        engine.url, poolclass=NullPool, connect_args={"timeout": _SQLITE_BUSY_SECONDS}
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
            raise ConfigError(
                f"the database is at schema revision {before}, which this eventsync "
                f"(newest revision {head}) does not know: upgrade eventsync"
            )
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
