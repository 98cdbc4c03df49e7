"""A job's history beside its events: its record, status changes, metrics and checkpoints,
fetched when they can have changed and stored once each.

- The record: the listing, read anyway, feeds fine_tune_jobs at no extra request
  (`note_listing`); the full record (`GET /fine-tunes/{id}`) is fetched when the job is new
  to the table or the listing showed a new status or updated_at.
- A status differing from the stored one adds a row to fine_tune_job_status_history.
- Metrics: every poll of a job past the queue asks for the steps from the last stored one
  on (`global_step_from`, which the API reads as >=: an eval snapshot logged after the train
  one of the same step is not lost). Snapshots already stored are not written again.
- Checkpoints: fetched when the job's event count moved since the last fetch, or it ended.

An API without the metrics or checkpoints endpoint (HTTP 404 on an older deployment) is noted
once per process and logged; that part is then skipped.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from eventsync.client import Job, TogetherClient
from eventsync.db import write_transaction
from eventsync.errors import NotFoundError
from eventsync.models import (
    checkpoints_table,
    jobs_table,
    metrics_table,
    state_table,
    status_history_table,
)
from eventsync.records import (
    JOB_FIELDS,
    Row,
    Rows,
    listed_fields,
    parse_checkpoints,
    parse_job,
    parse_metrics,
)

log = logging.getLogger(__name__)

QUEUED_STATUSES = frozenset({"pending", "queued"})


@dataclass
class HistoryOutcome:
    """What one job's history sync stored."""

    record: bool = False  # the full record was fetched and stored
    snapshots: int = 0  # new metrics snapshots
    checkpoints: int = 0  # new or changed checkpoints
    repairs: Counter[str] = field(default_factory=Counter)


# -- the listing ------------------------------------------------------------------------------


def note_listing(connection: Connection, listed: Sequence[Job], *, now: datetime) -> int:
    """Feed fine_tune_jobs from the listing's entries: a new job gets a row, a changed one its
    listed columns, and a changed status or updated_at makes its full record due again.
    Returns the rows written; an unchanged listing writes none."""
    entries = [(job.id, job.record) for job in listed if job.record is not None]
    if not entries:
        return 0
    j = jobs_table.c
    names = ("job_id", "record_fetched_at", *JOB_FIELDS)
    stored = {
        row.job_id: row._mapping for row in connection.execute(select(*(j[n] for n in names)))
    }
    written = 0
    for job_id, entry in entries:
        row = parse_job(entry, job_id)
        before = stored.get(job_id)
        if before is None:
            written += _insert_job(connection, row, now=now, full=False)
            continue
        fields = listed_fields(entry)
        if all(row.values[n] == before[n] for n in fields):
            continue
        before = _locked(connection, job_id)  # as it is now: a worker may have stored more
        changed = {n: row.values[n] for n in fields if row.values[n] != before[n]}
        if not changed:
            continue
        values: dict[str, Any] = {**changed, "stored_at": now}
        if "status" in changed or "updated_at" in changed:
            values["record_fetched_at"] = None
        if before["record_fetched_at"] is None or "record_fetched_at" in values:
            values.update(raw=row.raw, content_hash=row.content_hash, repairs=row.repairs)
        connection.execute(update(jobs_table).where(j.job_id == job_id).values(values))
        if "status" in changed:
            _note_status(connection, row, now=now)
        written += 1
    return written


def _locked(connection: Connection, job_id: str) -> Any:
    """The job's row, locked until the transaction ends (on Postgres; SQLite has one writer)."""
    query = select(jobs_table).where(jobs_table.c.job_id == job_id)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update()
    row = connection.execute(query).first()
    return None if row is None else row._mapping


def _insert_job(connection: Connection, row: Row, *, now: datetime, full: bool) -> int:
    """Insert the job's row and its first status; 0 if another daemon inserted it first."""
    inserted: int = connection.execute(
        _upsert(connection, jobs_table)
        .values(
            job_id=row.key,
            **row.values,
            raw=row.raw,
            content_hash=row.content_hash,
            repairs=row.repairs,
            record_fetched_at=now if full else None,
            stored_at=now,
        )
        .on_conflict_do_nothing(index_elements=["job_id"])
    ).rowcount
    if inserted:
        _note_status(connection, row, now=now)
    return inserted


def _note_status(connection: Connection, row: Row, *, now: datetime) -> None:
    connection.execute(
        insert(status_history_table).values(
            job_id=row.key,
            status=row.values["status"],
            seen_at=now,
            updated_at=row.values["updated_at"],
        )
    )


def save_record(connection: Connection, row: Row, *, now: datetime) -> None:
    """Store a job's full record, noting a new status in its history."""
    j = jobs_table.c
    before = _locked(connection, row.key)
    if before is None and _insert_job(connection, row, now=now, full=True):
        return
    before = before or _locked(connection, row.key)  # inserted meanwhile, by the listing
    connection.execute(
        update(jobs_table)
        .where(j.job_id == row.key)
        .values(
            **row.values,
            raw=row.raw,
            content_hash=row.content_hash,
            repairs=row.repairs,
            record_fetched_at=now,
            stored_at=now,
        )
    )
    if before["status"] != row.values["status"]:
        _note_status(connection, row, now=now)


# -- metrics and checkpoints ------------------------------------------------------------------


def new_snapshots(connection: Connection, job_id: str, rows: Rows) -> list[Row]:
    """The snapshots of `rows` not yet stored for the job."""
    if not rows.rows:
        return []
    m = metrics_table.c
    hashes = [r.content_hash for r in rows.rows]
    known = set(
        connection.scalars(
            select(m.content_hash).where(m.job_id == job_id, m.content_hash.in_(hashes))
        )
    )
    return [r for r in rows.rows if r.content_hash not in known]


def save_snapshots(connection: Connection, job_id: str, rows: list[Row]) -> int:
    """Store new snapshots after the job's last; one stored meanwhile is skipped."""
    if not rows:
        return 0
    m = metrics_table.c
    seq = connection.scalar(select(func.coalesce(func.max(m.seq), 0)).where(m.job_id == job_id))
    statement = _upsert(connection, metrics_table).on_conflict_do_nothing(
        index_elements=["job_id", "content_hash"]
    )
    result = connection.execute(
        statement,
        [
            {
                "job_id": job_id,
                "seq": (seq or 0) + i,
                **row.values,
                "raw": row.raw,
                "content_hash": row.content_hash,
                "repairs": row.repairs,
            }
            for i, row in enumerate(rows, start=1)
        ],
    )
    return result.rowcount if result.rowcount >= 0 else len(rows)


def save_checkpoints(
    connection: Connection, job_id: str, rows: Rows, *, events: int, now: datetime
) -> int:
    """Store new and changed checkpoints; note the event count they were fetched at."""
    c = checkpoints_table.c
    query = select(c.checkpoint_key, c.content_hash).where(c.job_id == job_id)
    stored = {key: digest for key, digest in connection.execute(query)}
    written = 0
    for row in rows.rows:
        values = {**row.values, "raw": row.raw, "content_hash": row.content_hash}
        values["repairs"] = row.repairs
        if row.key not in stored:
            connection.execute(
                insert(checkpoints_table).values(job_id=job_id, checkpoint_key=row.key, **values)
            )
        elif stored[row.key] != row.content_hash:
            connection.execute(
                update(checkpoints_table)
                .where(c.job_id == job_id, c.checkpoint_key == row.key)
                .values(**values, updated_at=now)
            )
        else:
            continue
        written += 1
    connection.execute(
        update(jobs_table).where(jobs_table.c.job_id == job_id).values(checkpoints_events=events)
    )
    return written


def _upsert(connection: Connection, table: Any) -> Any:
    return (postgresql if connection.dialect.name == "postgresql" else sqlite).insert(table)


# -- one job ----------------------------------------------------------------------------------

_s, _j, _m = state_table.c, jobs_table.c, metrics_table.c
_WHERE_WE_ARE = select(
    _s.event_count,
    _j.job_id.label("has_record"),
    _j.record_fetched_at,
    _j.checkpoints_events,
    _j.status,
    select(func.max(_m.global_step))
    .where(_m.job_id == _s.job_id)
    .scalar_subquery()
    .label("last_step"),
).select_from(state_table.outerjoin(jobs_table, _j.job_id == _s.job_id))


def sync_history(
    client: TogetherClient,
    engine: Engine,
    job: Job,
    *,
    finished: bool,
    now: datetime,
) -> HistoryOutcome:
    """Fetch and store what of the job's history can have changed (module docstring). Runs
    after its events are stored; raises the API's or the database's errors."""
    outcome = HistoryOutcome()
    with engine.connect() as connection:
        at = connection.execute(_WHERE_WE_ARE.where(_s.job_id == job.id)).one()
    status = job.status or at.status
    if at.has_record is None or at.record_fetched_at is None:
        row = parse_job(client.job_record(job.id), job.id)
        with write_transaction(engine) as connection:
            save_record(connection, row, now=now)
        outcome.record = True
        _count(outcome, row.repairs)
        status = job.status or row.values["status"]
    if status in QUEUED_STATUSES:
        return outcome
    if not client.endpoints.missing("metrics"):
        try:
            data = client.job_metrics(job.id, global_step_from=at.last_step)
        except NotFoundError as exc:
            client.endpoints.note_missing("metrics", exc)
        else:
            rows = parse_metrics(data)
            outcome.repairs.update(rows.repairs)
            with engine.connect() as connection:
                fresh = new_snapshots(connection, job.id, rows)
            if fresh:
                with write_transaction(engine) as connection:
                    outcome.snapshots = save_snapshots(connection, job.id, fresh)
    if not client.endpoints.missing("checkpoints") and (
        finished or at.checkpoints_events != at.event_count
    ):
        try:
            data = client.job_checkpoints(job.id)
        except NotFoundError as exc:
            client.endpoints.note_missing("checkpoints", exc)
        else:
            rows = parse_checkpoints(data)
            outcome.repairs.update(rows.repairs)
            with write_transaction(engine) as connection:
                outcome.checkpoints = save_checkpoints(
                    connection, job.id, rows, events=at.event_count, now=now
                )
    return outcome


def _count(outcome: HistoryOutcome, repairs: str | None) -> None:
    if repairs:
        outcome.repairs.update(orjson.loads(repairs))
