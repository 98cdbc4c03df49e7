"""One pass: for each job, fetch -> parse -> store, one transaction per job."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from eventsync.client import TERMINAL_STATUSES, Job, TogetherClient
from eventsync.config import validate_job_id
from eventsync.errors import ApiStatusError, ConfigError, EventsyncError, StoreError, first_line
from eventsync.events import ParsedEvents, parse_events
from eventsync.store import (
    SaveResult,
    job_states,
    mark_unchanged,
    record_failure,
    save_events,
    write_transaction,
)

log = logging.getLogger(__name__)

# Lifecycle events after which a job_restarted would mean the job came back.
_END_EVENTS = frozenset({"job_complete", "job_error", "job_stopped", "cancel_requested"})


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
    finished: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class PassResult:
    outcomes: list[JobOutcome]
    seconds: float
    skipped: int = 0  # jobs not started because of a shutdown

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def new(self) -> int:
        return sum(o.new for o in self.outcomes)


def tune_gc() -> None:
    """Make the cyclic garbage collector fit a pass. A cold pass of 100 jobs x 1,000 events
    allocates about 340,000 short-lived containers; at CPython's default gen-0 threshold of
    700 the collector ran 530 times and took 0.77 s of a 6 s pass, rescanning the objects
    each worker holds. At 10,000 it runs a few times (0.02 s). Objects that exist at start
    (modules, schemas) are frozen out of its scans. Garbage without cycles is freed at once
    either way, so memory does not grow."""
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def plan_jobs(
    client: TogetherClient,
    engine: Engine,
    job_ids: Iterable[str],
    *,
    all_jobs: bool,
    skip_finished: bool = False,
) -> list[Job]:
    """The jobs of one pass, each with its status when the listing knows it.

    The configured ids, the jobs added with `eventsync jobs add`, and with `all_jobs` every
    job the API lists. The listing is read every pass; without `all_jobs` a failed listing only
    costs the statuses. With `skip_finished` (the daemon), a job that ended and had its last
    fetch is left out, unless the listing shows it active again.
    """
    with engine.connect() as connection:
        states = {row.job_id: row for row in job_states(connection)}
    wanted = list(dict.fromkeys([*job_ids, *(j for j, s in states.items() if s.tracked)]))
    try:
        listed = client.list_jobs()
    except EventsyncError as exc:
        if all_jobs or not wanted or (isinstance(exc, ApiStatusError) and exc.status_code == 404):
            raise
        log.warning("could not list jobs, statuses unknown this pass: %s", exc)
        listed = []
    listed = _valid_ids(listed)
    status = {job.id: job.status for job in listed}
    models = {job.id: job.model for job in listed}

    def make_job(job_id: str) -> Job:
        state = states.get(job_id)
        fingerprint = state.fingerprint if state is not None else None
        return Job(job_id, status.get(job_id), fingerprint, models.get(job_id))

    jobs = [make_job(job_id) for job_id in wanted]
    if all_jobs:
        jobs += [make_job(j) for j in status if j not in set(wanted)]
    if not skip_finished:
        return jobs
    planned = []
    for job in jobs:
        state = states.get(job.id)
        if state is None or state.finished_at is None:
            planned.append(job)
        elif job.status is not None and job.status not in TERMINAL_STATUSES:
            log.info(
                "job %s is %s again; polling it again",
                job.id,
                job.status,
                extra={"job_id": job.id, "status": job.status},
            )
            planned.append(job)
    return planned


def _valid_ids(listed: list[Job]) -> list[Job]:
    """The listed jobs whose ids pass the check an id from the command line passes. The API
    is not trusted to send only ids: any other is never requested nor stored, and one
    warning a pass says so."""
    valid, invalid = [], []
    for job in listed:
        try:
            valid.append(replace(job, id=validate_job_id(job.id)))
        except ConfigError:
            invalid.append(job.id)
    if invalid:
        shown = ", ".join(repr(job_id[:80]) for job_id in invalid[:5])
        log.warning(
            "the job listing holds %d invalid job id(s), skipped: %s%s",
            len(invalid),
            shown,
            ", ..." if len(invalid) > 5 else "",
        )
    return valid


def has_ended(job: Job, parsed: ParsedEvents) -> bool:
    """The listing says the job ended, and its own events don't show a restart after that."""
    if job.status not in TERMINAL_STATUSES:
        return False
    for row in reversed(parsed.rows):
        kind = (row.type or "").lower()
        if kind == "job_restarted":
            return False
        if kind in _END_EVENTS:
            return True
    return True


def sync_job(client: TogetherClient, engine: Engine, job: Job) -> JobOutcome:
    """Fetch, parse and store one job. Errors are returned, not raised."""
    outcome = JobOutcome(job_id=job.id, status=job.status)
    # A body identical to the last one stored needs no decoding, parsing or comparing, and
    # one that only appends needs just its tail; but a job that may have ended gets the full
    # look, for its restart events.
    known = job.fingerprint if job.status not in TERMINAL_STATUSES else None
    parsed = None
    try:
        fetched = client.job_events(job.id, known=known)
        fingerprint, appended = fetched.fingerprint, fetched.appended
        if fetched.events is not None:
            parsed = parse_events(fetched.events)
        del fetched  # the rows hold all that is stored: free the decoded events
        try:
            with write_transaction(engine) as connection:
                if parsed is None:
                    count = mark_unchanged(connection, job.id, status=job.status, model=job.model)
                    saved = SaveResult(0, 0, count)
                else:
                    saved = save_events(
                        connection,
                        job.id,
                        parsed,
                        status=job.status,
                        model=job.model,
                        fingerprint=fingerprint,
                        appended=appended,
                        finished=has_ended(job, parsed),
                    )
        except SQLAlchemyError as exc:
            raise StoreError(f"job {job.id}: database error: {first_line(exc)}") from None
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
    outcome.finished = saved.finished_now
    if saved.finished_now:
        log.info(
            "job %s is %s: its last events are stored and it is no longer polled",
            job.id,
            job.status,
            extra={"job_id": job.id, "status": job.status},
        )
    if parsed is not None and parsed.repairs:
        outcome.repairs = dict(parsed.repairs)
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
        with write_transaction(engine) as connection:
            record_failure(connection, job_id, kind=error.kind, message=str(error))
    except SQLAlchemyError as exc:
        log.warning("job %s: could not record the failure: %s", job_id, first_line(exc))


def run_pass(
    client: TogetherClient,
    engine: Engine,
    jobs: list[Job],
    *,
    concurrency: int,
    on_done: Callable[[JobOutcome], None] | None = None,
    stop: threading.Event | None = None,
) -> PassResult:
    """Sync every job, up to `concurrency` at once; each job is its own transaction.

    Once `stop` is set, jobs not yet started are skipped; the ones under way finish.
    """
    started = time.monotonic()

    def work(job: Job) -> JobOutcome | None:
        if stop is not None and stop.is_set():
            return None
        return sync_job(client, engine, job)

    outcomes: list[JobOutcome] = []
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="sync") as pool:
        for outcome in pool.map(work, jobs):
            if outcome is None:
                continue
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)
    return PassResult(
        outcomes=outcomes,
        seconds=time.monotonic() - started,
        skipped=len(jobs) - len(outcomes),
    )
