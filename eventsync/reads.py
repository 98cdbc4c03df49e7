"""The reads behind `status`, `events` and `sql`: they never write, and a user's query can't.

`eventsync sql` runs text from a user, so each layer holds on its own: the first keyword
must be a read's; the driver takes one statement only; the transaction is read-only, with a
statement timeout; rows are streamed up to a cap; and the connection is thrown away after.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from sqlalchemy import Connection, Engine, func, select, text

from eventsync.errors import QueryError, QueryRefused, first_line
from eventsync.models import (
    checkpoints_table,
    events_table,
    jobs_table,
    metrics_table,
    state_table,
    status_history_table,
)

SUMMARY_COLUMNS = (
    "job_id",
    "status",
    "model",
    "step",
    "total_steps",
    "progress",
    "last_event_type",
    "last_event_at",
    "last_message",
    "events",
    "checkpoints",
    "train_loss",
    "eval_loss",
    "last_synced_at",
    "last_error",
)


def _latest_metric(column: str) -> str:
    return (
        f"(SELECT m.{column} FROM fine_tune_metrics m WHERE m.job_id = s.job_id "
        f"AND m.{column} IS NOT NULL ORDER BY m.global_step DESC NULLS LAST, m.seq DESC LIMIT 1)"
    )


def job_summaries(connection: Connection, job_id: str | None = None) -> list[dict[str, Any]]:
    """One row per job (or only `job_id`'s): the summary view, with the latest loss and the
    sync state's last sync and last error. Jobs followed but without events are included."""
    query = text(
        "SELECT s.job_id, COALESCE(v.status, s.status) AS status, s.model, v.step, "
        "v.total_steps, v.progress, v.last_event_type, v.last_event_at, v.last_message, "
        "COALESCE(v.events, 0) AS events, COALESCE(v.checkpoints, 0) AS checkpoints, "
        f"{_latest_metric('train_loss')} AS train_loss, "
        f"{_latest_metric('eval_loss')} AS eval_loss, "
        "s.last_synced_at, s.last_error "
        "FROM sync_state s LEFT JOIN fine_tune_job_summary v ON v.job_id = s.job_id "
        f"{'' if job_id is None else 'WHERE s.job_id = :job '}"
        "ORDER BY s.job_id"
    )
    rows = connection.execute(query, {} if job_id is None else {"job": job_id})
    return [_with_times(dict(row._mapping)) for row in rows]


def _with_times(row: dict[str, Any]) -> dict[str, Any]:
    """SQLite's views hand timestamps back as text; make them the datetimes Postgres gives."""
    for name in ("last_event_at", "last_synced_at"):
        value = row.get(name)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            row[name] = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return row


def job_known(connection: Connection, job_id: str) -> bool:
    """Whether eventsync has a state row for the job (synced, tried, or followed)."""
    query = select(state_table.c.job_id).where(state_table.c.job_id == job_id)
    return connection.execute(query).first() is not None


def job_record(connection: Connection, job_id: str) -> dict[str, Any] | None:
    """One job's whole record: its fine_tune_jobs row (the API's record in `raw`), how much
    of its history is stored, its latest loss and checkpoint, and its status history. None
    if eventsync has neither a record nor a state row for it."""
    j, s = jobs_table.c, state_table.c
    record = connection.execute(select(jobs_table).where(j.job_id == job_id)).first()
    sync = connection.execute(select(state_table).where(s.job_id == job_id)).first()
    if record is None and sync is None:
        return None
    found: dict[str, Any] = dict(record._mapping) if record is not None else {"job_id": job_id}
    summary = next(iter(job_summaries(connection, job_id)), {})
    m, c, h = metrics_table.c, checkpoints_table.c, status_history_table.c
    found["events"] = summary.get("events", 0)
    found["snapshots"] = connection.scalar(select(func.count()).where(m.job_id == job_id))
    found["train_loss"] = summary.get("train_loss")
    found["eval_loss"] = summary.get("eval_loss")
    found["last_step"] = connection.scalar(
        select(func.max(m.global_step)).where(m.job_id == job_id)
    )
    found["checkpoints"] = connection.scalar(select(func.count()).where(c.job_id == job_id))
    latest = connection.execute(
        select(c.step, c.path)
        .where(c.job_id == job_id)
        .order_by(c.step.desc().nulls_last(), c.id.desc())
    ).first()
    found["latest_checkpoint"] = latest.path if latest is not None else None
    found["last_synced_at"] = sync.last_synced_at if sync is not None else None
    found["last_error"] = sync.last_error if sync is not None else None
    found["status_history"] = [
        {"status": row.status, "seen_at": row.seen_at, "updated_at": row.updated_at}
        for row in connection.execute(
            select(h.status, h.seen_at, h.updated_at)
            .where(h.job_id == job_id)
            .order_by(h.seen_at, h.id)
        )
    ]
    return found


TIMELINE_COLUMNS = ("seq", "created_at", "type", "level", "step", "message", "checkpoint_path")


def job_timeline(
    connection: Connection,
    job_id: str,
    *,
    event_type: str | None = None,
    since: datetime | None = None,
    after_seq: int = 0,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """A job's events in the server's order (seq), filtered. With a limit, the latest ones."""
    c = events_table.c
    query = select(*(c[name] for name in TIMELINE_COLUMNS)).where(
        c.job_id == job_id, c.seq > after_seq
    )
    if event_type is not None:
        query = query.where(func.lower(c.type) == event_type.lower())
    if since is not None:
        query = query.where(c.created_at >= since)
    if limit is not None:
        latest = query.order_by(c.seq.desc()).limit(limit).subquery()
        query = select(latest).order_by(latest.c.seq)
    else:
        query = query.order_by(c.seq)
    return [dict(row._mapping) for row in connection.execute(query)]


def follow(
    engine: Engine,
    job_id: str,
    *,
    after_seq: int,
    stop: threading.Event,
    every: float = 1.0,
    event_type: str | None = None,
    since: datetime | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """`events --follow`: the job's events stored after `after_seq`, a batch each time some
    arrive, looked for every `every` seconds, until `stop` is set."""
    while not stop.wait(every):
        with engine.connect() as connection:
            new = job_timeline(
                connection, job_id, event_type=event_type, since=since, after_seq=after_seq
            )
        if new:
            after_seq = new[-1]["seq"]
            yield new


# -- eventsync sql ---------------------------------------------------------------------------

READ_KEYWORDS = ("select", "with", "values", "table", "explain")
# A word, a parenthesis, or the rest; whitespace and comments are skipped by _tokens.
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9$]*|[()]|.", re.S)
_PLAIN_OPTIONS = re.compile(r"[A-Za-z_0-9,\s]*")


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    # True when the query had more than max_rows rows and the rest were not read.
    cut: bool


def check_read(sql: str, *, dialect: str) -> None:
    """Refuse what does not start like a read, and EXPLAIN ANALYZE (which runs the
    statement). Only the leading words are looked at: that one statement is all there is,
    and that it can't write, are left to the driver and the database, which parse SQL."""
    tokens = _tokens(sql, nested_comments=dialect == "postgresql")
    word = next((t for t in tokens if t != "("), None)
    if word is None:
        raise QueryRefused("eventsync sql needs a query, and got none")
    if word.lower() not in READ_KEYWORDS:
        raise QueryRefused(
            "eventsync sql runs one read-only query (SELECT, WITH, VALUES, TABLE, EXPLAIN); "
            f"refused: {word[:40]}"
        )
    if word.lower() != "explain":
        return
    option = next(tokens, "")
    if option.lower() in ("analyze", "analyse"):
        raise QueryRefused("eventsync sql refuses EXPLAIN ANALYZE: it runs the statement")
    if option == "(":
        options = "".join(_until_closed(tokens))
        # Plain words only: a quoted or escaped option name could spell ANALYZE.
        words = set(re.findall(r"[a-z_]+", options.lower()))
        if not _PLAIN_OPTIONS.fullmatch(options) or words & {"analyze", "analyse"}:
            raise QueryRefused(
                "eventsync sql refuses EXPLAIN ANALYZE, and EXPLAIN options other than "
                "plain words: ANALYZE runs the statement"
            )


def _tokens(sql: str, *, nested_comments: bool) -> Iterator[str]:
    """SQL's leading tokens, without whitespace and comments (nested on Postgres)."""
    pos, end = 0, len(sql)
    while pos < end:
        if sql[pos].isspace():
            pos += 1
        elif sql.startswith("--", pos):
            newline = sql.find("\n", pos)
            pos = end if newline < 0 else newline + 1
        elif sql.startswith("/*", pos):
            pos = _comment_end(sql, pos, nested=nested_comments)
        else:
            match = _TOKEN.match(sql, pos)
            assert match is not None  # "." matches any character
            yield match.group()
            pos = match.end()


def _comment_end(sql: str, pos: int, *, nested: bool) -> int:
    depth = 0
    while pos < len(sql):
        if sql.startswith("/*", pos):
            depth = depth + 1 if nested or depth == 0 else depth
            pos += 2
        elif sql.startswith("*/", pos):
            depth -= 1
            pos += 2
            if depth == 0:
                return pos
        else:
            pos += 1
    return pos  # unterminated: the database reports it


def _until_closed(tokens: Iterator[str]) -> Iterator[str]:
    """The tokens up to the parenthesis that closes an open one, joined by spaces."""
    depth = 1
    for token in tokens:
        depth += {"(": 1, ")": -1}.get(token, 0)
        if depth == 0:
            return
        yield token + " "


def read_only_query(engine: Engine, sql: str, *, timeout: float, max_rows: int) -> QueryResult:
    """Run one statement that can't write, for at most `timeout` seconds, and return at most
    `max_rows` rows. The connection is discarded afterwards, so nothing the query changed in
    its session (set_config, say) outlives it. QueryRefused or QueryError otherwise."""
    check_read(sql, dialect=engine.dialect.name)
    connection = engine.raw_connection()
    try:
        driver = connection.driver_connection
        if engine.dialect.name == "postgresql":
            return _postgres_query(driver, sql, timeout=timeout, max_rows=max_rows)
        return _sqlite_query(driver, sql, timeout=timeout, max_rows=max_rows)
    finally:
        connection.invalidate()


def _postgres_query(driver: Any, sql: str, *, timeout: float, max_rows: int) -> QueryResult:
    import psycopg

    driver.rollback()
    driver.read_only = True  # psycopg opens the transaction with BEGIN READ ONLY
    # The server-side binding cursor: stream() sends the query with the extended query
    # protocol, which takes one statement only, and without parameters the text is sent as
    # it is (a % stays a %). Single-row mode: rows arrive as they are read, never all at once.
    cursor = psycopg.Cursor(driver)
    try:
        # Enforced by the server, so a query outlives neither the timeout nor a killed client.
        cursor.execute(f"SET LOCAL statement_timeout = {max(1, round(timeout * 1000))}")
        stream: Any = cursor.stream(sql)  # a generator: closing it cancels what is left
        with closing(stream):
            rows = list(islice(stream, max_rows + 1))
            columns = [d.name for d in cursor.description or ()]
        if not rows:
            columns = _describe(driver, sql)
    except psycopg.Error as exc:
        raise _postgres_error(exc, timeout) from None
    finally:
        cursor.close()
    return QueryResult(columns, rows[:max_rows], cut=len(rows) > max_rows)


def _describe(driver: Any, sql: str) -> list[str]:
    """The column names of a query that returned no rows: stream() drops the last result,
    which holds them. The statement is parsed again, not run."""
    from psycopg.pq import ExecStatus

    if driver.pgconn.prepare(b"", sql.encode(driver.info.encoding)).status != (
        ExecStatus.COMMAND_OK
    ):
        return []
    described = driver.pgconn.describe_prepared(b"")
    return [
        described.fname(i).decode(driver.info.encoding, "replace") for i in range(described.nfields)
    ]


def _postgres_error(exc: Any, timeout: float) -> QueryError:
    from psycopg import errors

    if isinstance(exc, errors.QueryCanceled):
        return QueryError(_timed_out(timeout))
    if isinstance(exc, errors.SyntaxError) and "multiple commands" in str(exc):
        return QueryRefused(_ONE_STATEMENT)
    if exc.sqlstate is None:
        # psycopg's own refusal, not the server's: COPY, or a statement with no rows.
        return QueryRefused(f"eventsync sql can't run this: {first_line(exc)}")
    return QueryError(first_line(exc))


# SQLite VM instructions between looks at the clock: a few milliseconds of work.
_PROGRESS_STEPS = 10_000
_FETCH = 500


def _sqlite_query(driver: Any, sql: str, *, timeout: float, max_rows: int) -> QueryResult:
    import sqlite3

    deadline = time.monotonic() + timeout
    timed_out = False

    def past_deadline() -> bool:
        nonlocal timed_out
        timed_out = time.monotonic() > deadline
        return timed_out  # true aborts the statement with "interrupted"

    driver.set_progress_handler(past_deadline, _PROGRESS_STEPS)
    # A wait for another process's lock runs no instructions: the busy timeout bounds it.
    driver.execute(f"PRAGMA busy_timeout = {max(1, round(timeout * 1000))}")
    cursor = driver.cursor()
    try:
        # sqlite3 refuses a second statement itself, and steps through the rows lazily.
        cursor.execute(sql)
        columns = [d[0] for d in cursor.description or ()]
        rows: list[tuple[Any, ...]] = []
        while len(rows) <= max_rows and (
            batch := cursor.fetchmany(min(_FETCH, max_rows + 1 - len(rows)))
        ):
            rows.extend(batch)
    except sqlite3.Error as exc:
        if timed_out:
            raise QueryError(_timed_out(timeout)) from None
        if isinstance(exc, sqlite3.ProgrammingError) and "one statement" in str(exc):
            raise QueryRefused(_ONE_STATEMENT) from None
        raise QueryError(first_line(exc)) from None
    finally:
        cursor.close()
        driver.set_progress_handler(None, 0)
    return QueryResult(columns, rows[:max_rows], cut=len(rows) > max_rows)


_ONE_STATEMENT = "eventsync sql runs one statement per call: remove what follows the first `;`"


def _timed_out(timeout: float) -> str:
    return f"the query ran past --timeout {timeout:g} s and was stopped"
