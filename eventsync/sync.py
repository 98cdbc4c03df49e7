"""One pass: for each job, fetch -> parse -> store, one transaction per job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from eventsync.client import Job, TogetherClient
from eventsync.errors import EventsyncError, StoreError
from eventsync.events import parse_events
from eventsync.store import SaveResult, record_failure, save_events

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    """What one job's sync did: its counts, or the error that stopped it."""

    job_id: str
    status: str | None = None
    new: int = 0
    updated: int = 0
    total: int = 0
    repairs: dict[str, int] = field(default_factory=dict)
    error: EventsyncError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class PassResult:
    outcomes: list[JobOutcome]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def new(self) -> int:
        return sum(o.new for o in self.outcomes)


def select_jobs(client: TogetherClient, job_ids: Iterable[str], *, all_jobs: bool) -> list[Job]:
    """The configured ids (with their status when the listing knows it), plus every listed
    job when `all_jobs`. Without `all_jobs` a failed listing only costs the statuses."""
    wanted = list(dict.fromkeys(job_ids))
    try:
        listed = client.list_jobs()
    except EventsyncError as exc:
        if all_jobs or not wanted:
            raise
        log.warning("could not list jobs, statuses unknown this pass: %s", exc)
        listed = []
    status = {job.id: job.status for job in listed}
    jobs = [Job(id=job_id, status=status.get(job_id)) for job_id in wanted]
    if all_jobs:
        jobs += [job for job in listed if job.id not in set(wanted)]
    return jobs


def sync_job(client: TogetherClient, engine: Engine, job: Job) -> JobOutcome:
    """Fetch, parse and store one job. Errors are returned, not raised."""
    outcome = JobOutcome(job_id=job.id, status=job.status)
    try:
        data = client.job_events(job.id)
        parsed = parse_events(data)
        try:
            with engine.begin() as connection:
                saved: SaveResult = save_events(connection, job.id, parsed, status=job.status)
        except SQLAlchemyError as exc:
            raise StoreError(f"job {job.id}: database error: {_short(exc)}") from None
    except EventsyncError as exc:
        outcome.error = exc
        _record_failure(engine, job.id, exc)
        return outcome
    except Exception as exc:  # a bug: report it, keep the other jobs going
        log.exception("job %s: unexpected error", job.id)
        outcome.error = EventsyncError(f"job {job.id}: internal error: {type(exc).__name__}")
        _record_failure(engine, job.id, outcome.error)
        return outcome
    outcome.new, outcome.updated, outcome.total = saved.new, saved.updated, saved.total
    outcome.repairs = dict(parsed.repairs)
    if parsed.repairs:
        log.warning(
            "job %s: repaired %d field(s) to store them: %s",
            job.id,
            sum(parsed.repairs.values()),
            ", ".join(f"{k} x{v}" for k, v in sorted(parsed.repairs.items())),
            extra={"job_id": job.id, "repairs": dict(parsed.repairs)},
        )
    return outcome


def _record_failure(engine: Engine, job_id: str, error: EventsyncError) -> None:
    try:
        with engine.begin() as connection:
            record_failure(connection, job_id, kind=error.kind, message=str(error))
    except SQLAlchemyError as exc:
        log.warning("job %s: could not record the failure: %s", job_id, _short(exc))


def _short(exc: BaseException) -> str:
    """The first line of a driver error, without SQLAlchemy's SQL and parameter dump."""
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


def run_pass(
    client: TogetherClient,
    engine: Engine,
    jobs: list[Job],
    *,
    concurrency: int,
    on_done: Callable[[JobOutcome], None] | None = None,
) -> PassResult:
    """Sync every job, up to `concurrency` at once; each job is its own transaction."""
    started = time.monotonic()
    outcomes: list[JobOutcome] = []
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="sync") as pool:
        for outcome in pool.map(lambda job: sync_job(client, engine, job), jobs):
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)
    return PassResult(outcomes=outcomes, seconds=time.monotonic() - started)
