"""One pass: for each job, fetch -> parse -> store, one transaction per job."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from eventsync import state, writer
from eventsync.client import TERMINAL_STATUSES, Job, TogetherClient
from eventsync.config import validate_job_id, workers_for
from eventsync.db import write_transaction
from eventsync.errors import ApiStatusError, ConfigError, EventsyncError, StoreError, first_line
from eventsync.events import ParsedEvents, parse_events
from eventsync.fingerprint import Fingerprint, read_body, whole_body
from eventsync.history import (
    NEW_JOB,
    HistoryOutcome,
    Position,
    note_listing,
    positions,
    sync_history,
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
    snapshots: int = 0  # new metrics snapshots stored
    checkpoints: int = 0  # new or changed checkpoints stored

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


_M_ARENA_MAX = -8  # glibc's malloc.h


def tune_malloc() -> None:
    """Two malloc arenas, as MALLOC_ARENA_MAX=2 would set at start. glibc gives each thread
    that allocates an arena of its own, up to 8 per core; with a worker per job under way,
    each arena kept its own freed fragments, and a pass's peak memory grew with its number
    of jobs. An arena count the environment sets stands; other C libraries are left alone."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 2)


@dataclass(frozen=True)
class Plan:
    """A job to sync, and the fingerprint of its last stored body when it can be trusted."""

    job: Job
    fingerprint: Fingerprint | None = None
    # How far its history is stored, when read with the plan (else read when it is synced).
    history: Position | None = None


def plan_jobs(
    client: TogetherClient,
    engine: Engine,
    job_ids: Iterable[str],
    *,
    all_jobs: bool,
    skip_finished: bool = False,
    full: bool = False,
    history: bool = True,
) -> list[Plan]:
    """The jobs of one pass, each with its status when the listing knows it.

    The configured ids, the jobs added with `eventsync jobs add`, and with `all_jobs` every
    job the API lists. The listing is read every pass; without `all_jobs` a failed listing only
    costs the statuses. With `skip_finished` (the daemon), a job that ended and had its last
    fetch is left out, unless the listing shows it active again. With `full`, or when a job's
    stored events no longer match its state row, every event fetched is compared with what is
    stored (no unchanged-body shortcut). With `history`, the listing also feeds fine_tune_jobs
    and each plan carries how far its job's history is stored.
    """
    with engine.connect() as connection:
        known = state.known_jobs(connection)
    wanted = list(dict.fromkeys([*job_ids, *(j for j, k in known.items() if k.tracked)]))
    try:
        listed = client.list_jobs()
    except EventsyncError as exc:
        if all_jobs or not wanted or (isinstance(exc, ApiStatusError) and exc.status_code == 404):
            raise
        log.warning("could not list jobs, statuses unknown this pass: %s", exc)
        listed = []
    listed = valid_ids(listed)
    stored: dict[str, Position] = {}
    if history:
        with write_transaction(engine) as connection:
            note_listing(connection, listed, now=datetime.now(UTC))
        with engine.connect() as connection:
            stored = positions(connection)
    status = {job.id: job.status for job in listed}
    models = {job.id: job.model for job in listed}

    def make_plan(job_id: str) -> Plan:
        job = Job(job_id, status.get(job_id), models.get(job_id))
        plan = plan_for(job, known.get(job_id), full)
        return replace(plan, history=stored.get(job_id, NEW_JOB)) if history else plan

    plans = [make_plan(job_id) for job_id in wanted]
    if all_jobs:
        also = set(wanted)
        plans += [make_plan(j) for j in status if j not in also]
    if not skip_finished:
        return plans
    planned = []
    for plan in plans:
        seen = known.get(plan.job.id)
        job = plan.job
        if seen is None or seen.finished_at is None:
            planned.append(plan)
        elif job.status is not None and job.status not in TERMINAL_STATUSES:
            log.info(
                "job %s is %s again; polling it again",
                job.id,
                job.status,
                extra={"job_id": job.id, "status": job.status},
            )
            planned.append(plan)
    return planned


def plan_for(job: Job, seen: state.Known | None, full: bool = False) -> Plan:
    """The plan for one job: its stored fingerprint, unless the job is new, `full` is asked
    for, or its stored events no longer match its state row."""
    if seen is None or full:
        return Plan(job)
    if not seen.intact:
        log.warning(
            "job %s: %d events stored, but its state counts %d; comparing every event "
            "fetched with what is stored",
            job.id,
            seen.stored,
            seen.event_count,
            extra={"job_id": job.id, "stored": seen.stored, "counted": seen.event_count},
        )
        return Plan(job)
    return Plan(job, Fingerprint.parse(seen.fingerprint))


def valid_ids(listed: list[Job]) -> list[Job]:
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
    for event in reversed(parsed.events):
        kind = (event.type or "").lower()
        if kind == "job_restarted":
            return False
        if kind in _END_EVENTS:
            return True
    return True


@dataclass(frozen=True)
class Saved:
    new: int
    updated: int
    total: int
    finished_now: bool  # this save was the last successful fetch of a job that ended


def sync_job(
    client: TogetherClient, engine: Engine, plan: Plan, *, history: bool = True
) -> JobOutcome:
    """Fetch, parse and store one job, and with `history` its record, metrics and
    checkpoints (eventsync.history). Errors are returned, not raised."""
    job = plan.job
    outcome = JobOutcome(job_id=job.id, status=job.status)
    # A job that may have ended gets the full look, for its restart events.
    known = plan.fingerprint if job.status not in TERMINAL_STATUSES else None
    what = f"job {job.id}"
    parsed: ParsedEvents | None = None
    try:
        content, body = client.job_events(
            job.id, lambda content: (content, read_body(content, known, what))
        )
        if body.events is not None and not body.appended:
            content = b""  # read whole: the records will hold all that is stored
        if body.events is not None:
            parsed = parse_events(body.events, careful=body.careful, consume=True)
        fingerprint, appended = body.fingerprint, body.appended
        del body  # the decoded events: the records hold all that is stored
        try:
            with write_transaction(engine) as connection:
                saved, parsed = _save(
                    connection, job, known, content, fingerprint, appended, parsed
                )
            outcome.new, outcome.updated, outcome.total = saved.new, saved.updated, saved.total
            outcome.finished = saved.finished_now
            extra = HistoryOutcome()
            if history:
                extra = sync_history(
                    client,
                    engine,
                    job,
                    at=plan.history,
                    events=saved.total,
                    finished=saved.finished_now,
                    now=datetime.now(UTC),
                )
        except SQLAlchemyError as exc:
            raise StoreError(f"{what}: database error: {first_line(exc)}") from None
    except EventsyncError as exc:
        outcome.error = exc
        _record_failure(engine, job.id, exc, unfinish=outcome.finished)
        return outcome
    except Exception as exc:  # a bug: report it, keep the other jobs going
        log.exception("job %s: unexpected error", job.id)
        outcome.error = EventsyncError(f"{what}: internal error: {type(exc).__name__}")
        _record_failure(engine, job.id, outcome.error, unfinish=outcome.finished)
        return outcome
    outcome.snapshots, outcome.checkpoints = extra.snapshots, extra.checkpoints
    if saved.finished_now:
        log.info(
            "job %s is %s: its last events are stored and it is no longer polled",
            job.id,
            job.status,
            extra={"job_id": job.id, "status": job.status},
        )
    repairs = extra.repairs + (parsed.repairs if parsed is not None else Counter())
    if repairs:
        outcome.repairs = dict(repairs)
        log.warning(
            "job %s: repaired %d field(s) to store them: %s",
            job.id,
            sum(repairs.values()),
            ", ".join(f"{k} x{v}" for k, v in sorted(repairs.items())),
            extra={"job_id": job.id, "repairs": dict(repairs)},
        )
    return outcome


def _save(
    connection: Connection,
    job: Job,
    known: Fingerprint | None,
    content: bytes,
    fingerprint: Fingerprint,
    appended: bool,
    parsed: ParsedEvents | None,
) -> tuple[Saved, ParsedEvents | None]:
    """Store one fetched body under the job's state row lock. A shortcut taken before the
    lock (the body unchanged, or only its tail decoded) is taken only if it still holds: the
    state row has the fingerprint it was read against, and no new event's key is already
    stored (a hash an earlier event has, say). Otherwise the whole body is read again, so
    every path stores what reading the whole body stores. `parsed` is None for a body equal
    to the last stored one."""
    now = datetime.now(UTC)
    row = state.lock(connection, job.id)
    if (parsed is None or appended) and row.fingerprint != (str(known) if known else None):
        parsed, appended = _whole(content, fingerprint, job), False  # stored meanwhile
    stored = None
    if parsed is not None and appended:
        stored = writer.stored(connection, job.id, [e.key for e in parsed.events])
        if stored:
            parsed, appended, stored = _whole(content, fingerprint, job), False, None
    done: dict[str, object] = {
        "status": job.status if job.status is not None else row.status,
        "model": job.model if job.model is not None else row.model,
        "last_synced_at": now,
        "last_attempt_at": now,
        "last_error": None,
        "last_error_kind": None,
        "fingerprint": str(fingerprint),
    }
    if parsed is None:  # the body stored last, byte for byte
        state.update_state(connection, job.id, done)
        return Saved(0, 0, row.event_count, finished_now=False), None

    if stored is None:
        stored = writer.stored(connection, job.id)
    written = writer.write(connection, job.id, parsed.events, stored, max_seq=row.max_seq, now=now)
    # `stored` is every stored key of the job unless only the tail was read; keys are unique.
    total = (row.event_count if appended else len(stored)) + written.new
    finished = has_ended(job, parsed)
    state.update_state(
        connection,
        job.id,
        {
            **done,
            "event_count": total,
            "max_seq": row.max_seq + written.new,
            "repairs": row.repairs + written.repaired,
            "finished_at": (row.finished_at or now) if finished else None,
        },
    )
    saved = Saved(
        written.new, written.updated, total, finished_now=finished and row.finished_at is None
    )
    return saved, parsed


def _whole(content: bytes, fingerprint: Fingerprint, job: Job) -> ParsedEvents:
    whole = whole_body(content, fingerprint, f"job {job.id}")
    assert whole.events is not None
    return parse_events(whole.events, careful=whole.careful, consume=True)


def _record_failure(
    engine: Engine, job_id: str, error: EventsyncError, *, unfinish: bool = False
) -> None:
    """Note the failure on the job's state row. With `unfinish`, the job's events were stored
    as its last but its history was not: it stays polled until that is stored too."""
    try:
        with write_transaction(engine) as connection:
            state.record_failure(
                connection, job_id, kind=error.kind, message=str(error), now=datetime.now(UTC)
            )
            if unfinish:
                state.update_state(connection, job_id, {"finished_at": None})
    except SQLAlchemyError as exc:
        log.warning("job %s: could not record the failure: %s", job_id, first_line(exc))


def run_pass(
    client: TogetherClient,
    engine: Engine,
    jobs: list[Plan],
    *,
    concurrency: int,
    on_done: Callable[[JobOutcome], None] | None = None,
    stop: threading.Event | None = None,
    history: bool = True,
) -> PassResult:
    """Sync every job, each its own transaction: `concurrency` requests in flight (the
    client's bound), and twice as many jobs under way (config.workers_for).

    Once `stop` is set, jobs not yet started are skipped; the ones under way finish.
    """
    started = time.monotonic()

    def work(plan: Plan) -> JobOutcome | None:
        if stop is not None and stop.is_set():
            return None
        return sync_job(client, engine, plan, history=history)

    outcomes: list[JobOutcome] = []
    with ThreadPoolExecutor(workers_for(concurrency), thread_name_prefix="sync") as pool:
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
