"""Alembic from code: the schema upgraded to the newest revision, under a lock.

Migrations live in migrations/ at the top of the repo and ship in the wheel as
eventsync/migrations, so an installed eventsync migrates from any folder.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError as AlembicError
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from eventsync.db import SQLITE_BUSY_SECONDS, newer_than_eventsync
from eventsync.errors import ConfigError

log = logging.getLogger(__name__)

# Serialises migrations between processes that start together (Postgres advisory lock key).
MIGRATION_LOCK_KEY = 0x6576_656E_7473  # "events"
# One try for the migration lock; between tries the process can act on a signal.
_SQLITE_LOCK_TRY_MS = 100


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
    deadline = time.monotonic() + SQLITE_BUSY_SECONDS
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
        connection.exec_driver_sql(f"PRAGMA busy_timeout = {SQLITE_BUSY_SECONDS * 1000}")


def upgrade(engine: Engine) -> tuple[str | None, str | None]:
    """Upgrade to head under a lock. Returns (revision before, revision after)."""
    with engine.connect() as connection, _migration_lock(connection):
        before = MigrationContext.configure(connection).get_current_revision()
        head = head_revision()
        if before is not None and not is_known_revision(before):
            raise ConfigError(newer_than_eventsync(before))
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
