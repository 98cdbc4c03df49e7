"""The `sync_state` rows: what eventsync knows of each job it follows, and its row lock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Insert, Update, bindparam, func, select, update

from eventsync.db import upsert
from eventsync.models import events_table, state_table

if TYPE_CHECKING:
    from eventsync.client import Job

# Statements built once: constructing them per job cost more than running them.
_LOCK = select(state_table).where(state_table.c.job_id == bindparam("job")).with_for_update()
_STORED = (
    select(func.count())
    .where(events_table.c.job_id == state_table.c.job_id)
    .correlate(state_table)
    .scalar_subquery()
)
_KNOWN = select(state_table, _STORED.label("stored"))


@dataclass(frozen=True)
class Known:
    """A job's state row as a pass starts, and how many events are stored for it."""

    job_id: str
    status: str | None
    model: str | None
    fingerprint: str | None
    event_count: int
    stored: int
    tracked: bool
    finished_at: datetime | None
    failures: int = 0

    @property
    def intact(self) -> bool:
        """The stored events are the ones the state row counts. Rows deleted by hand, or a
        table restored from an old backup, make this False: the next fetch is compared with
        every stored event and what is missing is stored again."""
        return self.stored == self.event_count


def known_jobs(connection: Connection, ids: Sequence[str] | None = None) -> dict[str, Known]:
    """Every job with a state row (those among `ids`, if given), by id."""
    query = _KNOWN if ids is None else _KNOWN.where(state_table.c.job_id.in_(ids))
    return {
        row.job_id: Known(
            job_id=row.job_id,
            status=row.status,
            model=row.model,
            fingerprint=row.fingerprint,
            event_count=row.event_count,
            stored=row.stored,
            tracked=bool(row.tracked),
            finished_at=row.finished_at,
            failures=row.failures,
        )
        for row in connection.execute(query)
    }


def lock(connection: Connection, job_id: str) -> Any:
    """Create the job's state row if new, then lock it for this transaction.

    The INSERT comes first so that SQLite takes its write lock before any read, and Postgres
    row-locks with FOR UPDATE: two daemons syncing the same job then take turns.
    """
    ensure(connection, job_id)
    return connection.execute(_LOCK, {"job": job_id}).one()


def ensure(connection: Connection, job_id: str) -> None:
    connection.execute(_ensure_sql(connection.dialect.name), {"job_id": job_id})


@lru_cache(maxsize=4)
def _ensure_sql(dialect: str) -> Insert:
    stmt: Any = upsert(dialect, state_table)
    return stmt.on_conflict_do_nothing(index_elements=["job_id"])  # type: ignore[no-any-return]


def update_state(connection: Connection, job_id: str, values: dict[str, Any]) -> None:
    """SET the given columns of the job's state row."""
    params = {f"new_{name}": value for name, value in values.items()}
    connection.execute(_update_sql(tuple(values)), {"job": job_id, **params})


@lru_cache(maxsize=16)
def _update_sql(columns: tuple[str, ...]) -> Update:
    """UPDATE sync_state SET the columns named WHERE job_id = :job, built once per set."""
    return (
        update(state_table)
        .where(state_table.c.job_id == bindparam("job"))
        .values({name: bindparam(f"new_{name}") for name in columns})
    )


def record_failure(
    connection: Connection, job_id: str, *, kind: str, message: str, now: datetime
) -> None:
    """Note a failed attempt on the job's state row; its events stay as they were."""
    ensure(connection, job_id)
    update_state(
        connection,
        job_id,
        {"last_attempt_at": now, "last_error": message[:2000], "last_error_kind": kind},
    )


def set_tracked(connection: Connection, job_ids: Sequence[str], *, tracked: bool) -> list[str]:
    """Mark jobs as followed (or not) by the daemon. Returns the ids whose flag changed."""
    changed = []
    for job_id in job_ids:
        if tracked:
            ensure(connection, job_id)
        result = connection.execute(
            update(state_table)
            .where(state_table.c.job_id == job_id, state_table.c.tracked.is_not(tracked))
            .values(tracked=tracked)
        )
        if result.rowcount:
            changed.append(job_id)
    return changed


def any_tracked(connection: Connection) -> bool:
    """Whether any job was added with `eventsync jobs add`."""
    query = select(state_table.c.job_id).where(state_table.c.tracked.is_(True)).limit(1)
    return connection.execute(query).first() is not None


def job_states(connection: Connection) -> list[Any]:
    """Every job eventsync knows about, with its sync state, by job id."""
    return list(connection.execute(select(state_table).order_by(state_table.c.job_id)))


def note_listing(
    connection: Connection,
    listed: Sequence[Job],
    *,
    configured: Sequence[str],
    all_jobs: bool,
    now: datetime,
) -> list[str]:
    """What the listing says, on the state rows: statuses and models, a row for each
    configured job (and with `all_jobs`, each listed one). A job whose status changed is due
    at once; a finished job the listing shows active again is polled again. Returns the ids
    of those."""
    from eventsync.client import TERMINAL_STATUSES  # the daemon's only: keep reads light

    for job_id in configured:
        ensure(connection, job_id)
    s = state_table.c
    rows = {
        r.job_id: r for r in connection.execute(select(s.job_id, s.status, s.model, s.finished_at))
    }
    again = []
    for job in listed:
        row = rows.get(job.id)
        values: dict[str, Any] = {}
        if row is None:
            if not all_jobs:
                continue
            ensure(connection, job.id)
            values = {"status": job.status, "model": job.model}
        else:
            if job.status is not None and job.status != row.status:
                values.update(status=job.status, next_due_at=now)
            if job.model is not None and job.model != row.model:
                values["model"] = job.model
            active = job.status is not None and job.status not in TERMINAL_STATUSES
            if row.finished_at is not None and active:
                values.update(finished_at=None, next_due_at=now)
                again.append(job.id)
        if values:
            update_state(connection, job.id, values)
    return again
