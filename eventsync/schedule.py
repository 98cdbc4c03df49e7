"""The daemon's schedule, kept in the database: when each job is next due, and who holds it.

Postgres coordinates the replicas; there is no coordinator of eventsync's own. A daemon claims
due jobs with one `UPDATE … WHERE job_id IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING`:
two daemons never claim the same row, and neither waits for the other. A claim is a lease,
renewed while the job is worked on; a daemon that dies leaves leases that run out within an
interval, and the others take its jobs. The listing, read once an interval by one daemon, is
claimed the same way in `sync_tasks`. On SQLite one daemon runs, and the same statements (no
SKIP LOCKED) serve it.

Times come from the daemon's clock (`now` parameters), so replicas on several machines need
their clocks in step (NTP), as any lease does.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    or_,
    select,
    true,
    update,
)

from eventsync.db import upsert
from eventsync.models import state_table, tasks_table

QUEUED_STATUSES = frozenset({"pending", "queued"})
LISTING = "listing"


@dataclass(frozen=True)
class Followed:
    """The jobs a daemon polls: those added with `jobs add`, the configured ids, and with
    `all_jobs` every job it knows. Finished jobs are left out until the listing shows them
    running again."""

    job_ids: tuple[str, ...]
    all_jobs: bool

    def condition(self) -> ColumnElement[bool]:
        s = state_table.c
        wanted: ColumnElement[bool] = (
            true() if self.all_jobs else or_(s.tracked.is_(True), s.job_id.in_(self.job_ids))
        )
        return and_(s.finished_at.is_(None), wanted)

    def follows(self, row: Any) -> bool:
        """The same, for a state row already read."""
        return self.all_jobs or bool(row.tracked) or row.job_id in self.job_ids


def claim(
    connection: Connection,
    followed: Followed,
    *,
    owner: str,
    now: datetime,
    lease: float,
    limit: int,
    busy: Collection[str] = (),
    due_only: bool = True,
) -> list[str]:
    """Lease up to `limit` of the followed jobs that are due (every followed one, unless
    `due_only`) and not leased by anyone, the longest overdue first. Returns their ids.

    A lease `owner` holds on a job it is not working on (`busy`) counts as free: one it
    could not give back, when the database went away as the job ended, is not left to run
    out while this daemon renews it."""
    s = state_table.c
    free = or_(
        s.lease_until.is_(None),
        s.lease_until < now,
        and_(s.lease_owner == owner, s.job_id.not_in(list(busy))),
    )
    pick = select(s.job_id).where(followed.condition(), free)
    if due_only:
        pick = pick.where(or_(s.next_due_at.is_(None), s.next_due_at <= now))
    pick = pick.order_by(s.next_due_at.asc().nulls_first(), s.job_id).limit(limit)
    if connection.dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    taken = connection.execute(
        update(state_table)
        .where(s.job_id.in_(pick.scalar_subquery()))
        .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease))
        .returning(s.job_id)
    )
    return sorted(job_id for (job_id,) in taken)


def renew(connection: Connection, *, owner: str, until: datetime) -> None:
    """Extend every lease `owner` holds, jobs and tasks."""
    for table in (state_table, tasks_table):
        connection.execute(
            update(table).where(table.c.lease_owner == owner).values(lease_until=until)
        )


def release(
    connection: Connection, job_id: str, *, owner: str, next_due_at: datetime | None, ok: bool
) -> None:
    """Give the job back, due again at `next_due_at`, counting a failure unless `ok`. A lease
    that ran out and was taken by another daemon is left to it."""
    s = state_table.c
    connection.execute(
        update(state_table)
        .where(s.job_id == job_id, s.lease_owner == owner)
        .values(
            lease_owner=None,
            lease_until=None,
            next_due_at=next_due_at,
            failures=0 if ok else s.failures + 1,
        )
    )


def give_back(connection: Connection, job_id: str, *, owner: str) -> None:
    """Give back a job not worked on (the daemon is stopping): due as it was."""
    s = state_table.c
    connection.execute(
        update(state_table)
        .where(s.job_id == job_id, s.lease_owner == owner)
        .values(lease_owner=None, lease_until=None)
    )


def release_all(connection: Connection, *, owner: str) -> None:
    """A stopping daemon's leases, given back at once so the others need not wait them out."""
    for table in (state_table, tasks_table):
        connection.execute(
            update(table)
            .where(table.c.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
        )


def claim_task(
    connection: Connection, name: str, *, owner: str, now: datetime, lease: float
) -> bool:
    """Take the task if it is due and nobody holds it. Its row is made on first use."""
    t = tasks_table.c
    connection.execute(
        upsert(connection.dialect.name, tasks_table)
        .values(name=name)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    taken = connection.execute(
        update(tasks_table)
        .where(
            t.name == name,
            or_(t.next_due_at.is_(None), t.next_due_at <= now),
            or_(t.lease_until.is_(None), t.lease_until < now),
        )
        .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease))
        .returning(t.name)
    )
    return taken.first() is not None


def finish_task(connection: Connection, name: str, *, owner: str, next_due_at: datetime) -> None:
    t = tasks_table.c
    connection.execute(
        update(tasks_table)
        .where(t.name == name, t.lease_owner == owner)
        .values(lease_owner=None, lease_until=None, next_due_at=next_due_at)
    )


def next_poll(
    status: str | None,
    *,
    ok: bool,
    failures: int,
    now: datetime,
    interval: float,
    queued_interval: float,
    backoff_max: float,
) -> datetime:
    """When a job is next due: running ones every interval, queued or pending ones every
    `queued_interval`; after `failures` failures in a row, twice as long each time, up to
    `backoff_max`. With up to 10% of jitter, so that jobs added together spread out."""
    if not ok:
        wait = min(interval * 2 ** max(0, failures - 1), max(backoff_max, interval))
    elif status in QUEUED_STATUSES:
        wait = queued_interval
    else:
        wait = interval
    return now + timedelta(seconds=wait * (1 + random.uniform(-0.1, 0)))
