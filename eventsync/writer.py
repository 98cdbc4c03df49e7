"""Writes a job's events: new ones inserted, changed ones updated, the rest left alone.

`write` is the one interface; below it each database has its bulk path (multi-row VALUES on
SQLite, COPY on Postgres), and the dialect differences of writing live here and nowhere else.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from itertools import chain
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, bindparam, column, select, table
from sqlalchemy.dialects import postgresql, sqlite

from eventsync.events import API_FIELDS, Event
from eventsync.models import events_table

_OTHER_FIELDS = tuple(name for name in API_FIELDS if name != "created_at")
# Every column a write sends, in the order of the driver's row tuples. created_at comes last:
# the one value whose form differs by database.
COLUMNS = (
    "job_id",
    "seq",
    "event_key",
    *_OTHER_FIELDS,
    "raw",
    "content_hash",
    "repairs",
    "created_at",
)
_UPSERT_COLUMNS = (*COLUMNS, "updated_at")
# Columns an update may change on an event already stored; job_id, key, seq and
# first_seen_at stay.
_CONTENT_COLUMNS = (*API_FIELDS, "raw", "content_hash", "repairs", "updated_at")
_others = itemgetter(*(API_FIELDS.index(name) for name in _OTHER_FIELDS))
_CREATED_AT = API_FIELDS.index("created_at")


@dataclass(frozen=True)
class Written:
    new: int
    updated: int
    repaired: int  # of those, how many needed a repair to be stored


_STORED = select(events_table.c.event_key, events_table.c.content_hash).where(
    events_table.c.job_id == bindparam("job")
)
_STORED_AMONG = _STORED.where(events_table.c.event_key.in_(bindparam("keys", expanding=True)))


def stored(
    connection: Connection, job_id: str, keys: Sequence[str] | None = None
) -> dict[str, str]:
    """Key -> content_hash of the job's stored events (only those among `keys`, if given)."""
    if keys is None:
        found = connection.execute(_STORED, {"job": job_id})
    elif keys:
        found = connection.execute(_STORED_AMONG, {"job": job_id, "keys": list(keys)})
    else:
        return {}
    return {key: content for key, content in found}


def write(
    connection: Connection,
    job_id: str,
    events: Sequence[Event],
    known: dict[str, str],
    *,
    max_seq: int,
    now: datetime,
) -> Written:
    """Insert the events whose keys aren't in `known` (key -> stored content_hash) with the
    next seq numbers after `max_seq`, and update those whose content changed. The caller
    holds the job's state row lock, so nothing else writes the job meanwhile."""
    seq = max_seq
    new: list[tuple[int, Event]] = []
    changed: list[tuple[int, Event]] = []
    for event in events:
        stored_hash = known.get(event.key)
        if stored_hash is None:
            seq += 1
            new.append((seq, event))
        elif stored_hash != event.content_hash:
            changed.append((0, event))  # the update keeps the stored seq
    _insert_new(connection, job_id, new)
    _upsert(connection, job_id, changed, updated_at=now)
    repaired = sum(1 for _, event in chain(new, changed) if event.repairs is not None)
    return Written(new=len(new), updated=len(changed), repaired=repaired)


def _rows(
    job_id: str,
    pairs: Iterable[tuple[int, Event]],
    updated_at: Any,
    stamp: Callable[[datetime | None], Any] = lambda value: value,
) -> Iterator[tuple[Any, ...]]:
    """(seq, event) pairs as the driver's rows, in _UPSERT_COLUMNS order; `stamp` gives
    created_at the database's form."""
    for seq, e in pairs:
        yield (job_id, seq, e.key, *_others(e.values), e.raw, e.content_hash, e.repairs,
               stamp(e.values[_CREATED_AT]), updated_at)  # fmt: skip


_COMPILED: dict[str, str] = {}


def _insert(dialect: str, target: Any) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT."""
    return (postgresql if dialect == "postgresql" else sqlite).insert(target)


def _upsert_sql(connection: Connection, *, from_incoming: bool = False) -> str:
    """The dialect's INSERT ... ON CONFLICT (job_id, event_key) DO UPDATE ... WHERE the
    content differs, built by SQLAlchemy once per dialect, its columns in _UPSERT_COLUMNS
    order. With `from_incoming`, the rows come from the COPY's temporary table."""
    key = connection.dialect.name + ("+incoming" if from_incoming else "")
    if key not in _COMPILED:
        target = table(events_table.name, *(column(name) for name in _UPSERT_COLUMNS))
        stmt: Any = _insert(connection.dialect.name, target)
        if from_incoming:
            incoming = table(_INCOMING, *(column(name) for name in _UPSERT_COLUMNS))
            stmt = stmt.from_select(list(_UPSERT_COLUMNS), select(*incoming.c))
        excluded = stmt.excluded
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "event_key"],
            set_={name: excluded[name] for name in _CONTENT_COLUMNS},
            where=target.c.content_hash != excluded.content_hash,
        )
        compiled = stmt.compile(dialect=connection.dialect, column_keys=list(_UPSERT_COLUMNS))
        if not from_incoming and compiled.positional:
            assert tuple(compiled.positiontup or ()) == _UPSERT_COLUMNS
        _COMPILED[key] = str(compiled)
    return _COMPILED[key]


# Below this many rows, one executemany beats setting up a COPY.
COPY_THRESHOLD = 200
_INCOMING = "eventsync_incoming"


def _insert_new(connection: Connection, job_id: str, pairs: Sequence[tuple[int, Event]]) -> None:
    """Events the job doesn't have. On Postgres a large batch is COPYed straight into the
    table (the state row lock keeps other writers out); elsewhere they take the upsert,
    which costs SQLite no more than a plain INSERT."""
    if connection.dialect.name == "postgresql" and len(pairs) >= COPY_THRESHOLD:
        _copy(connection, events_table.name, _rows(job_id, pairs, None))
    else:
        _upsert(connection, job_id, pairs, updated_at=None)


def _upsert(
    connection: Connection,
    job_id: str,
    pairs: Sequence[tuple[int, Event]],
    *,
    updated_at: datetime | None,
) -> None:
    """Upsert (seq, event) pairs. The driver gets plain tuples: SQLAlchemy's per-row bind
    processing cost more than the insert itself."""
    if not pairs:
        return
    if connection.dialect.name == "sqlite":
        _sqlite_upsert(connection, job_id, pairs, updated_at)
    elif len(pairs) >= COPY_THRESHOLD:
        _copy_upsert(connection, _rows(job_id, pairs, updated_at))
    else:  # psycopg takes named parameters
        named = [
            dict(zip(_UPSERT_COLUMNS, row, strict=True)) for row in _rows(job_id, pairs, updated_at)
        ]
        connection.exec_driver_sql(_upsert_sql(connection), named)


def _sqlite_upsert(
    connection: Connection,
    job_id: str,
    pairs: Sequence[tuple[int, Event]],
    updated_at: datetime | None,
) -> None:
    """Multi-row VALUES statements, each as many rows as a power of two, so that a handful of
    statement texts serve every job: sqlite3's executemany releases the GIL around every
    row, and each row then waits for a busy thread to hand it back. The parameters are built
    one statement at a time, so a large job never has them all."""
    driver = connection.connection.driver_connection
    assert driver is not None
    widest = _widest_statement(driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    single = _upsert_sql(connection)
    now = _sqlite_time(updated_at)
    start = 0
    while start < len(pairs):
        size = min(widest, 1 << ((len(pairs) - start).bit_length() - 1))
        rows = _rows(job_id, pairs[start : start + size], now, _sqlite_time)
        connection.exec_driver_sql(_multi_row(single, size), tuple(chain.from_iterable(rows)))
        start += size


def _widest_statement(variable_limit: int) -> int:
    """The largest power of two of rows whose parameters fit SQLite's limit, at most 1024."""
    rows = max(1, min(1024, variable_limit // len(_UPSERT_COLUMNS)))
    return 1 << (rows.bit_length() - 1)


@lru_cache(maxsize=64)
def _multi_row(single: str, rows: int) -> str:
    """`single` (one row of ? placeholders) with its VALUES group repeated `rows` times."""
    group = f"({', '.join(['?'] * len(_UPSERT_COLUMNS))})"
    head, found, tail = single.partition(group)
    assert found, single
    return head + ", ".join([group] * rows) + tail


def _sqlite_time(value: datetime | None) -> str | None:
    """SQLAlchemy's SQLite DATETIME text, so the model reads it back unchanged. Every value
    is UTC already (events.parse_created_at, datetime.now(UTC)): the offset is cut off."""
    return None if value is None else value.isoformat(" ", "microseconds")[:26]


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
    formats a row in about half the time it takes for text, and the server parses no
    numbers or timestamps."""
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
    string. Built on first use, so that SQLite users never load psycopg."""
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
