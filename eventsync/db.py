"""Engines: the writer's, the readers', and the one write transaction a job gets.

Which schema a database has is read here without Alembic (a read command shouldn't pay for
importing it): REVISIONS lists the migrations, and a test holds it equal to migrations/.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Connection, Engine, Table, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url

from eventsync.errors import ConfigError
from eventsync.jsonio import column_text

# Every schema revision in migrations/versions, oldest first; the database must be at HEAD.
REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006")
HEAD = REVISIONS[-1]
# How long a SQLite connection waits for another process's write lock.
SQLITE_BUSY_SECONDS = 30


def upsert(dialect: str, table: Table) -> Any:
    """The dialect's own INSERT, the one with ON CONFLICT: Postgres' or SQLite's."""
    from sqlalchemy.dialects import postgresql, sqlite

    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


def make_engine(url: str, *, pool_size: int = 8) -> Engine:
    """An engine for `url`: WAL and a busy timeout on SQLite, a pinged pool on Postgres."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed, connect_args={"timeout": SQLITE_BUSY_SECONDS}, json_serializer=column_text
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        parsed,
        # Postgres's JIT compiles a query it thinks costly; for eventsync's short queries that
        # took longer than running them (125 of 204 ms for the stored-event counts of 100 jobs).
        connect_args={} if "options" in parsed.query else {"options": "-c jit=off"},
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=4,
        json_serializer=column_text,
    )


# One lock per SQLite file: the threads of this process queue on it, not in SQLite's busy
# handler, which sleeps in steps of up to 100 ms. Other processes still wait on the busy timeout.
_SQLITE_WRITE_LOCKS: dict[str, threading.Lock] = {}


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One write transaction; on SQLite, which allows one writer per file, only one thread of
    this process at a time."""
    if engine.dialect.name != "sqlite":
        with engine.begin() as connection:
            yield connection
        return
    lock = _SQLITE_WRITE_LOCKS.setdefault(str(engine.url), threading.Lock())
    # The lock before the connection: a thread waiting for it holds no connection.
    with lock, engine.begin() as connection:
        yield connection


def open_reader(url: str, *, any_revision: bool = False) -> Engine:
    """An engine that can only read an eventsync database that already exists at the newest
    revision (at any, with `any_revision`): it creates no file or folder, and migrates
    nothing. ConfigError, with what to run, otherwise."""
    engine = _read_only_engine(url)
    if any_revision:
        return engine
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
        engine = create_engine(read_only, connect_args={"timeout": SQLITE_BUSY_SECONDS})
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
    if current is None:
        parsed = make_url(url)
        where = (
            parsed.database or ""
            if parsed.get_backend_name() == "sqlite"
            else parsed.render_as_string(hide_password=True)
        )
        raise ConfigError(_no_database(where))
    if current not in REVISIONS:
        raise ConfigError(newer_than_eventsync(current))
    if current != HEAD:
        raise ConfigError(
            f"the database is at schema revision {current}, this eventsync needs {HEAD}: "
            "run `eventsync db upgrade`"
        )


def newer_than_eventsync(revision: str) -> str:
    return (
        f"the database is at schema revision {revision}, which this eventsync "
        f"(newest revision {HEAD}) does not know: upgrade eventsync"
    )


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at; None for a database eventsync never made."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        found = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        return str(found) if found is not None else None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets `sqlite3 eventsync.db` read while a sync writes; the busy timeout makes
    # concurrent writers wait instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_SECONDS * 1000}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
