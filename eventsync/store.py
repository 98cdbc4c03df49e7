"""Writes and reads of events and sync state. The dialect differences live here."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Insert, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from eventsync.events import EVENT_FIELDS, ParsedEvents
from eventsync.models import events_table, state_table

# Columns an upsert may change on an event already stored; seq and first_seen_at stay.
_CONTENT_COLUMNS = (*EVENT_FIELDS, "raw", "content_hash", "repairs")


@dataclass(frozen=True)
class SaveResult:
    new: int
    updated: int
    total: int
    # True when this save was the last successful fetch of a job that ended.
    finished_now: bool = False


def _insert(connection: Connection, table: Any) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def list_fingerprint(parsed: ParsedEvents) -> str:
    """Changes whenever any event is added, removed, reordered or edited."""
    digest = hashlib.sha256()
    for row in parsed.rows:
        digest.update(row["content_hash"].encode())
    return f"{len(parsed.rows)}:{digest.hexdigest()}"


def _lock_state(connection: Connection, job_id: str) -> Any:
    """Create the job's state row if new, then lock it for this transaction.

    The INSERT comes first so that SQLite takes its write lock before any read, and Postgres
    row-locks with FOR UPDATE: two daemons syncing the same job then take turns.
    """
    connection.execute(_ensure_state(connection, job_id))
    return connection.execute(
        select(state_table).where(state_table.c.job_id == job_id).with_for_update()
    ).one()


def _ensure_state(connection: Connection, job_id: str) -> Insert:
    stmt: Any = _insert(connection, state_table).values(job_id=job_id)
    return stmt.on_conflict_do_nothing(index_elements=["job_id"])  # type: ignore[no-any-return]


def save_events(
    connection: Connection,
    job_id: str,
    parsed: ParsedEvents,
    *,
    status: str | None,
    finished: bool = False,
    now: datetime | None = None,
) -> SaveResult:
    """Upsert one job's events inside the caller's transaction; write nothing unchanged.

    `finished` says the job has ended and this fetch is its last: the state row records it.
    """
    now = now or datetime.now(UTC)
    fingerprint = list_fingerprint(parsed)
    state = _lock_state(connection, job_id)
    finished_now = finished and state.finished_at is None
    done = {
        "status": status if status is not None else state.status,
        "last_synced_at": now,
        "last_attempt_at": now,
        "last_error": None,
        "last_error_kind": None,
        "finished_at": (state.finished_at or now) if finished else None,
    }
    if state.fingerprint == fingerprint:
        _update_state(connection, job_id, done)
        return SaveResult(new=0, updated=0, total=state.event_count, finished_now=finished_now)

    rows = connection.execute(
        select(events_table.c.hash, events_table.c.content_hash).where(
            events_table.c.job_id == job_id
        )
    )
    stored: dict[str, str] = {hash_: content for hash_, content in rows}
    seq = state.max_seq
    new_rows: list[dict[str, Any]] = []
    changed_rows: list[dict[str, Any]] = []
    for row in parsed.rows:
        known = stored.get(row["hash"])
        if known is None:
            seq += 1
            new_rows.append({**row, "job_id": job_id, "seq": seq})
        elif known != row["content_hash"]:
            changed_rows.append({**row, "job_id": job_id, "seq": 0, "updated_at": now})
    _upsert(connection, new_rows)
    _upsert(connection, changed_rows)

    total = len(stored) + len(new_rows)
    repairs = sum(1 for row in new_rows + changed_rows if row["repairs"])
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


def _upsert(connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT (job_id, hash) DO UPDATE, only where the content differs."""
    if not rows:
        return
    stmt: Any = _insert(connection, events_table)
    excluded = stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "hash"],
        set_={name: excluded[name] for name in (*_CONTENT_COLUMNS, "updated_at")},
        where=events_table.c.content_hash != excluded.content_hash,
    )
    connection.execute(stmt, list(rows))


def _update_state(connection: Connection, job_id: str, values: dict[str, Any]) -> None:
    connection.execute(update(state_table).where(state_table.c.job_id == job_id).values(**values))


def record_failure(
    connection: Connection, job_id: str, *, kind: str, message: str, now: datetime | None = None
) -> None:
    """Note a failed attempt on the job's state row; its events stay as they were."""
    now = now or datetime.now(UTC)
    connection.execute(_ensure_state(connection, job_id))
    _update_state(
        connection,
        job_id,
        {"last_attempt_at": now, "last_error": message[:2000], "last_error_kind": kind},
    )


def event_count(connection: Connection, job_id: str | None = None) -> int:
    query = select(func.count()).select_from(events_table)
    if job_id is not None:
        query = query.where(events_table.c.job_id == job_id)
    return int(connection.execute(query).scalar_one())


def set_tracked(connection: Connection, job_ids: Sequence[str], *, tracked: bool) -> list[str]:
    """Mark jobs as followed (or not) by the daemon. Returns the ids whose flag changed."""
    changed = []
    for job_id in job_ids:
        if tracked:
            connection.execute(_ensure_state(connection, job_id))
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
