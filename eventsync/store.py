"""Writes and reads of events and sync state. The dialect differences live here."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from itertools import chain
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Update,
    bindparam,
    column,
    select,
    table,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from eventsync.db import checkpoint_engine
from eventsync.errors import first_line
from eventsync.events import ROW_COLUMNS, EventRow, ParsedEvents
from eventsync.models import events_table, state_table

log = logging.getLogger(__name__)

# Columns an upsert may change on an event already stored; seq and first_seen_at stay.
_CONTENT_COLUMNS = (*ROW_COLUMNS, "updated_at")


class _SqliteWriter:
    """The one writer of a SQLite file within this process, the rows written since the last
    checkpoint, and the engine that checkpoints (db.checkpoint_engine)."""

    def __init__(self, engine: Engine) -> None:
        self.lock = threading.Lock()
        self.unchecked = 0
        self.checkpoints = checkpoint_engine(engine)


_SQLITE_WRITERS: dict[str, _SqliteWriter] = {}
# Rows written before a checkpoint is run outside the write lock: about 1 MB of WAL.
_CHECKPOINT_ROWS = 1000


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One write transaction. SQLite allows one writer per file: the threads of this process
    queue on a lock rather than in SQLite's busy handler, which sleeps in steps of up to
    100 ms. Other processes still wait on the busy timeout.

    SQLite's own checkpoint runs inside the commit that fills the WAL, while the lock is
    held. Instead, the commit that brings the rows written since the last checkpoint past
    1,000 is followed by one after the lock is released, beside the next writer (a cold pass
    of 100 x 1,000 events: 1.85 -> 1.76 s). The automatic one stays for what writes little."""
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


@dataclass(frozen=True)
class SaveResult:
    new: int
    updated: int
    total: int
    # True when this save was the last successful fetch of a job that ended.
    finished_now: bool = False


def _insert(dialect: str, table: Any) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT."""
    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


def list_fingerprint(parsed: ParsedEvents) -> str:
    """Changes whenever any event is added, removed, reordered or edited."""
    digest = hashlib.sha256()
    for row in parsed.rows:
        digest.update(row.content_hash.encode())
    return f"{len(parsed.rows)}:{digest.hexdigest()}"


# Statements built once: constructing them per job cost more than running them.
_LOCK_STATE = select(state_table).where(state_table.c.job_id == bindparam("job")).with_for_update()
_STATE_COUNT = select(state_table.c.event_count).where(state_table.c.job_id == bindparam("job"))
_STORED = select(events_table.c.hash, events_table.c.content_hash).where(
    events_table.c.job_id == bindparam("job")
)
_STORED_AMONG = _STORED.where(events_table.c.hash.in_(bindparam("hashes", expanding=True)))


def _lock_state(connection: Connection, job_id: str) -> Any:
    """Create the job's state row if new, then lock it for this transaction.

    The INSERT comes first so that SQLite takes its write lock before any read, and Postgres
    row-locks with FOR UPDATE: two daemons syncing the same job then take turns.
    """
    _ensure_state(connection, job_id)
    return connection.execute(_LOCK_STATE, {"job": job_id}).one()


def _ensure_state(connection: Connection, job_id: str) -> None:
    connection.execute(_ensure_state_sql(connection.dialect.name), {"job_id": job_id})


@lru_cache(maxsize=4)
def _ensure_state_sql(dialect: str) -> Insert:
    stmt: Any = _insert(dialect, state_table)
    return stmt.on_conflict_do_nothing(index_elements=["job_id"])  # type: ignore[no-any-return]


def save_events(
    connection: Connection,
    job_id: str,
    parsed: ParsedEvents,
    *,
    status: str | None,
    model: str | None = None,
    fingerprint: str | None = None,
    appended: bool = False,
    finished: bool = False,
    now: datetime | None = None,
) -> SaveResult:
    """Upsert one job's events inside the caller's transaction; write nothing unchanged.

    `fingerprint` identifies the response the events came from (a digest of its body): when
    it equals the stored one there is nothing to compare. `appended` says `parsed` holds only
    the events after those already stored, so only their hashes are looked up. `finished`
    says the job has ended and this fetch is its last: the state row records it.
    """
    now = now or datetime.now(UTC)
    fingerprint = fingerprint or list_fingerprint(parsed)
    state = _lock_state(connection, job_id)
    finished_now = finished and state.finished_at is None
    done = {
        "status": status if status is not None else state.status,
        "model": model if model is not None else state.model,
        "last_synced_at": now,
        "last_attempt_at": now,
        "last_error": None,
        "last_error_kind": None,
        "finished_at": (state.finished_at or now) if finished else None,
    }
    if state.fingerprint == fingerprint:
        _update_state(connection, job_id, done)
        return SaveResult(new=0, updated=0, total=state.event_count, finished_now=finished_now)

    if appended:
        hashes = [row.hash for row in parsed.rows]
        found = connection.execute(_STORED_AMONG, {"job": job_id, "hashes": hashes})
    else:
        found = connection.execute(_STORED, {"job": job_id})
    stored: dict[str, str] = {hash_: content for hash_, content in found}
    seq = state.max_seq
    new_rows: list[tuple[int, EventRow]] = []
    changed_rows: list[tuple[int, EventRow]] = []
    for row in parsed.rows:
        known = stored.get(row.hash)
        if known is None:
            seq += 1
            new_rows.append((seq, row))
        elif known != row.content_hash:
            changed_rows.append((0, row))  # the update keeps the stored seq
    _insert_new(connection, job_id, new_rows)
    _upsert(connection, job_id, changed_rows, updated_at=now)

    total = state.event_count + len(new_rows)
    repairs = sum(1 for _, row in new_rows + changed_rows if row.repairs)
    _update_state(
        connection,
        job_id,
        {
            **done,
            "event_count": total,
            "max_seq": seq,
            "fingerprint": fingerprint,
            "repairs": state.repairs + repairs,
        },
    )
    return SaveResult(
        new=len(new_rows), updated=len(changed_rows), total=total, finished_now=finished_now
    )


# Every column an upsert sends, in the order of the driver's row tuples.
_UPSERT_COLUMNS = ("job_id", "seq", *_CONTENT_COLUMNS)
_COMPILED: dict[str, str] = {}


def _upsert_sql(connection: Connection, *, from_incoming: bool = False) -> str:
    """The dialect's INSERT ... ON CONFLICT (job_id, hash) DO UPDATE ... WHERE the content
    differs, built by SQLAlchemy once per dialect, its columns in _UPSERT_COLUMNS order. With
    `from_incoming`, the rows come from the COPY's temporary table rather than parameters."""
    key = connection.dialect.name + ("+incoming" if from_incoming else "")
    if key not in _COMPILED:
        target = table(events_table.name, *(column(name) for name in _UPSERT_COLUMNS))
        stmt: Any = _insert(connection.dialect.name, target)
        if from_incoming:
            incoming = table(_INCOMING, *(column(name) for name in _UPSERT_COLUMNS))
            stmt = stmt.from_select(list(_UPSERT_COLUMNS), select(*incoming.c))
        excluded = stmt.excluded
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "hash"],
            set_={name: excluded[name] for name in _CONTENT_COLUMNS},
            where=target.c.content_hash != excluded.content_hash,
        )
        compiled = stmt.compile(dialect=connection.dialect, column_keys=list(_UPSERT_COLUMNS))
        if not from_incoming and compiled.positional:
            assert tuple(compiled.positiontup or ()) == _UPSERT_COLUMNS
        _COMPILED[key] = str(compiled)
    return _COMPILED[key]


def _insert_new(connection: Connection, job_id: str, rows: Sequence[tuple[int, EventRow]]) -> None:
    """Insert (seq, row) pairs whose hashes the job doesn't have. Its state row is locked
    (_lock_state), so no other writer can store them meanwhile: on Postgres a large batch is
    COPYed straight into the table, without the temporary table and the ON CONFLICT (a cold
    pass of 100 x 1,000 events: 2.56 -> 2.20 s). Elsewhere they take the upsert, which costs
    SQLite no more than a plain INSERT."""
    if connection.dialect.name == "postgresql" and len(rows) >= _COPY_THRESHOLD:
        _copy(connection, events_table.name, _driver_rows(job_id, rows, None))
    else:
        _upsert(connection, job_id, rows, updated_at=None)


def _upsert(
    connection: Connection,
    job_id: str,
    rows: Sequence[tuple[int, EventRow]],
    *,
    updated_at: datetime | None,
) -> None:
    """Upsert (seq, row) pairs. The driver gets plain tuples: SQLAlchemy's per-row bind
    processing cost more than the insert itself."""
    if not rows:
        return
    if connection.dialect.name == "sqlite":
        _sqlite_upsert(connection, job_id, rows, updated_at)
    elif len(rows) >= _COPY_THRESHOLD:
        _copy_upsert(connection, _driver_rows(job_id, rows, updated_at))
    else:  # psycopg takes named parameters
        named = [
            dict(zip(_UPSERT_COLUMNS, values, strict=True))
            for values in _driver_rows(job_id, rows, updated_at)
        ]
        connection.exec_driver_sql(_upsert_sql(connection), named)


def _driver_rows(
    job_id: str, rows: Sequence[tuple[int, EventRow]], updated_at: datetime | None
) -> Iterator[tuple[Any, ...]]:
    """(seq, row) pairs as the driver's rows, in _UPSERT_COLUMNS order (Postgres)."""
    return ((job_id, seq, *row, updated_at) for seq, row in rows)


def _sqlite_upsert(
    connection: Connection,
    job_id: str,
    rows: Sequence[tuple[int, EventRow]],
    updated_at: datetime | None,
) -> None:
    """Multi-row VALUES statements, each as many rows as a power of two, so that a handful of
    statement texts serve every job. sqlite3's executemany releases the GIL around every
    row, and each row then waits for a busy thread to hand it back (up to 5 ms): with the
    other workers parsing, one statement per few hundred rows was 200 times faster. The
    parameters are built one statement at a time, so a large job never has them all."""
    driver = connection.connection.driver_connection
    assert driver is not None
    widest = _widest_statement(driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    single = _upsert_sql(connection)
    # SQLite keeps times as text, in the form SQLAlchemy's DATETIME reads back.
    now = _sqlite_time(updated_at)
    tail = () if now is None else (now,)
    start = 0
    while start < len(rows):
        size = min(widest, 1 << ((len(rows) - start).bit_length() - 1))
        batch = rows[start : start + size]
        nulls = _null_columns([row for _, row in batch])
        if now is None:
            nulls += (len(ROW_COLUMNS),)  # updated_at
        values = itemgetter(*(i for i in range(len(ROW_COLUMNS) - 1) if i not in nulls))
        params = chain.from_iterable(
            (job_id, seq, *values(row), _sqlite_time(row[-1]), *tail) for seq, row in batch
        )
        connection.exec_driver_sql(_multi_row(single, size, nulls), tuple(params))
        start += size


_JUST_NONE = {None}


def _null_columns(rows: Sequence[EventRow]) -> tuple[int, ...]:
    """The EventRow fields (but created_at) that are None in every row. They are written as
    NULL in the statement's text: sqlite3 looks up an adapter for each None it binds, which
    made the five values a new 2026-04 event leaves empty (four fields and updated_at) cost
    as much as the other 18."""
    first = rows[0]
    return tuple(
        i
        for i in range(len(ROW_COLUMNS) - 1)
        if first[i] is None and set(map(itemgetter(i), rows)) == _JUST_NONE
    )


def _widest_statement(variable_limit: int) -> int:
    """The largest power of two of rows whose parameters fit SQLite's limit, at most 1024."""
    rows = max(1, min(1024, variable_limit // len(_UPSERT_COLUMNS)))
    return 1 << (rows.bit_length() - 1)


@lru_cache(maxsize=64)
def _multi_row(single: str, rows: int, nulls: tuple[int, ...]) -> str:
    """`single` (one row of ? placeholders) with its VALUES group repeated `rows` times, NULL
    in place of the placeholders of the row fields `nulls` (updated_at is the last)."""
    placeholders = ", ".join(["?"] * len(_UPSERT_COLUMNS))
    head, found, tail = single.partition(f"({placeholders})")
    assert found, single
    slots = ["?", "?"] + ["NULL" if i in nulls else "?" for i in range(len(ROW_COLUMNS) + 1)]
    group = f"({', '.join(slots)})"
    return head + ", ".join([group] * rows) + tail


# Below this many rows, one executemany beats setting up a COPY.
_COPY_THRESHOLD = 200
_INCOMING = "eventsync_incoming"


def _copy_upsert(connection: Connection, rows: Iterable[tuple[Any, ...]]) -> None:
    """Postgres: COPY the rows into a temporary table, then one INSERT ... SELECT ... ON
    CONFLICT: the bulk path, several times faster than row-by-row inserts."""
    connection.exec_driver_sql(
        f"CREATE TEMP TABLE IF NOT EXISTS {_INCOMING} ON COMMIT DELETE ROWS AS "
        f"SELECT {', '.join(_UPSERT_COLUMNS)} FROM {events_table.name} WITH NO DATA"
    )
    _copy(connection, _INCOMING, rows)
    connection.exec_driver_sql(_upsert_sql(connection, from_incoming=True))


def _copy(connection: Connection, table_name: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """COPY rows, in _UPSERT_COLUMNS order, into `table_name`, in the binary format: psycopg
    formats a row in about half the time it takes for text (3 ms rather than 5.5 ms of CPU
    per 1,000 events), and the server parses no numbers or timestamps."""
    driver = connection.connection.driver_connection
    assert driver is not None
    types = _copy_types(connection)
    statement = f"COPY {table_name} ({', '.join(_UPSERT_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
    with driver.cursor() as cursor:
        cursor.adapters.register_dumper(None, _jsonb_text())
        with cursor.copy(statement) as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)


@lru_cache(maxsize=1)
def _jsonb_text() -> type:
    """A psycopg dumper for JSON text (raw, repairs) as it is, in jsonb's binary form: a
    version byte, then the text. psycopg's own would encode the text again as a JSON
    string. Built on first use, so that SQLite users never load psycopg (8 MB)."""
    from psycopg.adapt import Dumper
    from psycopg.postgres import types
    from psycopg.pq import Format

    class JsonbText(Dumper):
        format = Format.BINARY
        oid = types["jsonb"].oid

        def dump(self, obj: str) -> bytes:
            return b"\x01" + obj.encode()

    return JsonbText


def _copy_types(connection: Connection) -> list[int]:
    """The type of each _UPSERT_COLUMNS column as the database has it, which a binary COPY
    must name; read once per connection."""
    types: list[int] | None = connection.connection.info.get("eventsync_copy_types")
    if types is None:
        found: dict[str, int] = dict(
            connection.exec_driver_sql(
                "SELECT attname, atttypid::int FROM pg_attribute "
                f"WHERE attrelid = '{events_table.name}'::regclass "
                "AND attnum > 0 AND NOT attisdropped"
            ).all()
        )
        types = connection.connection.info["eventsync_copy_types"] = [
            found[c] for c in _UPSERT_COLUMNS
        ]
    return types


def _sqlite_time(value: datetime | None) -> str | None:
    """SQLAlchemy's SQLite DATETIME text, so the model reads it back unchanged. Every value
    is UTC already (events.parse_created_at, datetime.now(UTC)): the offset is cut off."""
    return None if value is None else value.isoformat(" ", "microseconds")[:26]


def mark_unchanged(
    connection: Connection,
    job_id: str,
    *,
    status: str | None,
    model: str | None = None,
    now: datetime | None = None,
) -> int:
    """A fetch whose body is byte-for-byte the one last stored: only the state row changes.
    Returns the job's event count."""
    now = now or datetime.now(UTC)
    values: dict[str, Any] = {
        "last_synced_at": now,
        "last_attempt_at": now,
        "last_error": None,
        "last_error_kind": None,
    }
    if status is not None:
        values["status"] = status
    if model is not None:
        values["model"] = model
    _update_state(connection, job_id, values)
    return int(connection.execute(_STATE_COUNT, {"job": job_id}).scalar_one())


def _update_state(connection: Connection, job_id: str, values: dict[str, Any]) -> None:
    params = {f"new_{name}": value for name, value in values.items()}
    connection.execute(_update_state_sql(tuple(values)), {"job": job_id, **params})


@lru_cache(maxsize=16)
def _update_state_sql(columns: tuple[str, ...]) -> Update:
    """UPDATE sync_state SET the columns named WHERE job_id = :job, built once per set."""
    return (
        update(state_table)
        .where(state_table.c.job_id == bindparam("job"))
        .values({name: bindparam(f"new_{name}") for name in columns})
    )


def record_failure(
    connection: Connection, job_id: str, *, kind: str, message: str, now: datetime | None = None
) -> None:
    """Note a failed attempt on the job's state row; its events stay as they were."""
    now = now or datetime.now(UTC)
    _ensure_state(connection, job_id)
    _update_state(
        connection,
        job_id,
        {"last_attempt_at": now, "last_error": message[:2000], "last_error_kind": kind},
    )


def set_tracked(connection: Connection, job_ids: Sequence[str], *, tracked: bool) -> list[str]:
    """Mark jobs as followed (or not) by the daemon. Returns the ids whose flag changed."""
    changed = []
    for job_id in job_ids:
        if tracked:
            _ensure_state(connection, job_id)
        result = connection.execute(
            update(state_table)
            .where(state_table.c.job_id == job_id, state_table.c.tracked.is_not(tracked))
            .values(tracked=tracked)
        )
        if result.rowcount:
            changed.append(job_id)
    return changed


def tracked_job_ids(connection: Connection) -> list[str]:
    query = select(state_table.c.job_id).where(state_table.c.tracked.is_(True))
    return list(connection.execute(query.order_by(state_table.c.job_id)).scalars())


def job_states(connection: Connection) -> list[Any]:
    """Every job eventsync knows about, with its sync state, by job id."""
    return list(connection.execute(select(state_table).order_by(state_table.c.job_id)))
