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

An API without the metrics or checkpoints endpoint (HTTP 404 on an older deployment, before
the endpoint has answered once) is noted once per process and logged; that part is then
skipped. After an answer, a 404 means that one job has none this poll.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update

from eventsync.client import Job, TogetherClient
from eventsync.db import upsert, write_transaction
from eventsync.errors import NotFoundError
from eventsync.models import (
    checkpoints_table,
    jobs_table,
    metrics_table,
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
from eventsync.schedule import QUEUED_STATUSES


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
    new: list[Row] = []
    for job_id, entry in entries:
        row = parse_job(entry, job_id)
        before = stored.get(job_id)
        if before is None:
            new.append(row)
            continue
        fields = listed_fields(entry)
        if all(row.values[n] == before[n] for n in fields):
            continue
        before = _locked(connection, job_id)  # as it is now: a worker may have stored more
        if before is None or _older(row.values["updated_at"], before["updated_at"]):
            continue  # deleted meanwhile, or a full record newer than the listing is stored
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
            _note_statuses(connection, [row], now=now)
        written += 1
    return written + _insert_jobs(connection, new, now=now, full=False)


def _older(listed: datetime | None, stored: datetime | None) -> bool:
    return listed is not None and stored is not None and listed < stored


def _locked(connection: Connection, job_id: str) -> Any:
    """The job's row, locked until the transaction ends (on Postgres; SQLite has one writer)."""
    query = select(jobs_table).where(jobs_table.c.job_id == job_id)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update()
    row = connection.execute(query).first()
    return None if row is None else row._mapping


def _insert_jobs(connection: Connection, rows: list[Row], *, now: datetime, full: bool) -> int:
    """Insert the jobs' rows and their first statuses; a row another daemon inserted first is
    left as it is. Returns the rows inserted. One statement with a list of parameters, which
    SQLAlchemy sends as multi-row INSERTs ("insertmanyvalues") from one cached compiled form;
    a multi-row VALUES clause would be compiled afresh on every call."""
    if not rows:
        return 0
    statement = (
        upsert(connection.dialect.name, jobs_table)
        .on_conflict_do_nothing(index_elements=["job_id"])
        .returning(jobs_table.c.job_id)
    )
    params = [
        {
            "job_id": row.key,
            **row.columns(),
            "record_fetched_at": now if full else None,
            "stored_at": now,
        }
        for row in rows
    ]
    inserted = set(connection.scalars(statement, params))
    _note_statuses(connection, [row for row in rows if row.key in inserted], now=now)
    return len(inserted)


def _note_statuses(connection: Connection, rows: list[Row], *, now: datetime) -> None:
    if rows:
        connection.execute(
            insert(status_history_table),
            [
                {
                    "job_id": row.key,
                    "status": row.values["status"],
                    "seen_at": now,
                    "updated_at": row.values["updated_at"],
                }
                for row in rows
            ],
        )


def save_record(connection: Connection, row: Row, *, now: datetime) -> None:
    """Store a job's full record, noting a new status in its history."""
    j = jobs_table.c
    before = _locked(connection, row.key)
    if before is None and _insert_jobs(connection, [row], now=now, full=True):
        return
    before = before or _locked(connection, row.key)  # inserted meanwhile, by the listing
    connection.execute(
        update(jobs_table)
        .where(j.job_id == row.key)
        .values(**row.columns(), record_fetched_at=now, stored_at=now)
    )
    if before["status"] != row.values["status"]:
        _note_statuses(connection, [row], now=now)


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
    statement = upsert(connection.dialect.name, metrics_table).on_conflict_do_nothing(
        index_elements=["job_id", "content_hash"]
    )
    result = connection.execute(
        statement,
        [
            {"job_id": job_id, "seq": (seq or 0) + i, **row.columns()}
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
        values = row.columns()
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


# -- one job ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """How far a job's history is stored, read with the job's plan: whether its full record
    is due, the event count its checkpoints were fetched at, its last metrics step and the
    digests of the snapshots stored at that step."""

    record_due: bool = True
    status: str | None = None
    checkpoints_events: int | None = None
    last_step: int | None = None
    at_last_step: frozenset[str] = frozenset()


NEW_JOB = Position()


def positions(connection: Connection, ids: Sequence[str] | None = None) -> dict[str, Position]:
    """The Position of each job with a fine_tune_jobs row (of those among `ids`)."""
    query = _positions_sql(connection.dialect.name)
    if ids is not None:
        query = query.where(jobs_table.c.job_id.in_(ids))
    return {
        row.job_id: Position(
            record_due=row.record_fetched_at is None,
            status=row.status,
            checkpoints_events=row.checkpoints_events,
            last_step=row.last_step,
            at_last_step=frozenset(row.digests.split(",")) if row.digests else frozenset(),
        )
        for row in connection.execute(query)
    }


@lru_cache(maxsize=4)
def _positions_sql(dialect: str) -> Any:
    j, m = jobs_table.c, metrics_table.c
    # An alias, so that the subquery inside `digests` correlates to the job, not to `m`.
    x = metrics_table.alias("x").c
    last = select(func.max(x.global_step)).where(x.job_id == j.job_id).scalar_subquery()
    joined = (
        func.string_agg(m.content_hash, ",")
        if dialect == "postgresql"
        else func.group_concat(m.content_hash, ",")
    )
    digests = (
        select(joined)
        .where(m.job_id == j.job_id, m.global_step == last)
        .correlate(jobs_table)
        .scalar_subquery()
    )
    return select(
        j.job_id,
        j.record_fetched_at,
        j.status,
        j.checkpoints_events,
        last.label("last_step"),
        digests.label("digests"),
    )


def sync_history(
    client: TogetherClient,
    engine: Engine,
    job: Job,
    *,
    at: Position | None,
    events: int,
    finished: bool,
    now: datetime,
) -> HistoryOutcome:
    """Fetch and store what of the job's history can have changed (module docstring), from
    where `at` says it stands (read now if None). `events` is the job's stored event count.
    Runs after its events are stored; raises the API's or the database's errors."""
    outcome = HistoryOutcome()
    if at is None:
        with engine.connect() as connection:
            at = positions(connection, [job.id]).get(job.id, NEW_JOB)
    status = job.status or at.status
    if at.record_due:
        row = parse_job(client.job_record(job.id), job.id)
        with write_transaction(engine) as connection:
            save_record(connection, row, now=now)
        outcome.record = True
        outcome.repairs.update(row.problems)
        status = job.status or row.values["status"]
    if status in QUEUED_STATUSES:
        return outcome
    data = _optional(
        client, "metrics", job.id, lambda: client.job_metrics(job.id, global_step_from=at.last_step)
    )
    if data is not None:
        rows = parse_metrics(data)
        outcome.repairs.update(rows.repairs)
        fresh = _beyond(rows, at)
        if fresh is None:  # a snapshot without a step: only the database can tell
            with engine.connect() as connection:
                fresh = new_snapshots(connection, job.id, rows)
        if fresh:
            with write_transaction(engine) as connection:
                outcome.snapshots = save_snapshots(connection, job.id, fresh)
    if finished or at.checkpoints_events != events:
        data = _optional(client, "checkpoints", job.id, lambda: client.job_checkpoints(job.id))
        if data is not None:
            rows = parse_checkpoints(data)
            outcome.repairs.update(rows.repairs)
            with write_transaction(engine) as connection:
                outcome.checkpoints = save_checkpoints(
                    connection, job.id, rows, events=events, now=now
                )
    return outcome


def _optional(client: TogetherClient, name: str, job_id: str, fetch: Callable[[], Any]) -> Any:
    """What an endpoint the API may lack answers for the job; None if it lacks it (a 404)."""
    if client.endpoints.missing(name):
        return None
    try:
        data = fetch()
    except NotFoundError:
        client.endpoints.not_found(name, job_id)
        return None
    client.endpoints.answered(name)
    return data


def _beyond(rows: Rows, at: Position) -> list[Row] | None:
    """The snapshots not yet stored, told from the position alone: those past the last
    stored step, and those at it whose digest is not among the stored ones. None when a
    snapshot has no step, or one comes before the last step (an API that ignored
    global_step_from): the database then decides. A snapshot stored meanwhile by another
    daemon is skipped by the insert (unique on its digest)."""
    last = at.last_step
    fresh = []
    for row in rows.rows:
        step = row.values["global_step"]
        if step is None or (last is not None and step < last):
            return None
        if last is None or step > last or row.content_hash not in at.at_last_step:
            fresh.append(row)
    return fresh
