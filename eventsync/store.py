"""Reads behind `status`, `events` and `sql`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select, text

from eventsync.errors import first_line
from eventsync.models import events_table
from eventsync.state import job_states as job_states  # the CLI's, for now
from eventsync.state import set_tracked as set_tracked

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
    "last_synced_at",
    "last_error",
)


def job_summaries(connection: Connection) -> list[dict[str, Any]]:
    """One row per job: the summary view, with the sync state's last sync and last error.
    Jobs that are followed but have no events yet are included too."""
    query = text(
        "SELECT s.job_id, COALESCE(v.status, s.status) AS status, s.model, v.step, "
        "v.total_steps, v.progress, v.last_event_type, v.last_event_at, v.last_message, "
        "COALESCE(v.events, 0) AS events, COALESCE(v.checkpoints, 0) AS checkpoints, "
        "s.last_synced_at, s.last_error "
        "FROM sync_state s LEFT JOIN fine_tune_job_summary v ON v.job_id = s.job_id "
        "ORDER BY s.job_id"
    )
    return [dict(row._mapping) for row in connection.execute(query)]


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


READ_KEYWORDS = ("select", "with", "values", "explain", "table")


class QueryError(Exception):
    """The database refused a query of `eventsync sql` (a syntax error, a write...)."""


def read_only_query(connection: Connection, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one query that can't write: refused up front unless it reads, and run in a
    read-only transaction (Postgres) or with query_only (SQLite) so the database refuses
    any write that slips through (a data-modifying CTE, say)."""
    words = sql.strip().split(None, 1)
    if not words or words[0].lower() not in READ_KEYWORDS:
        raise ValueError(
            "eventsync sql runs read-only queries (SELECT, WITH, VALUES, EXPLAIN); "
            f"refused: {words[0] if words else 'an empty query'}"
        )
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")
    else:
        connection.exec_driver_sql("PRAGMA query_only = ON")
    # The driver's own cursor and no parameters: a % in the query is just a character.
    cursor = connection.connection.cursor()
    try:
        cursor.execute(sql)
        columns = [d[0] for d in cursor.description or ()]
        return columns, [tuple(row) for row in cursor.fetchall()]
    except connection.dialect.loaded_dbapi.Error as exc:
        raise QueryError(first_line(exc)) from None
    finally:
        cursor.close()
        connection.rollback()
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql("PRAGMA query_only = OFF")
