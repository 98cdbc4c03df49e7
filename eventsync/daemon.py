"""`eventsync run`: each job synced when it falls due, the listing once an interval, until a
signal, then a clean stop."""

from __future__ import annotations

import fcntl
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from eventsync import history, schedule, state
from eventsync.client import Job, TogetherClient
from eventsync.config import Settings
from eventsync.db import write_transaction
from eventsync.errors import ApiStatusError, ConfigError, EventsyncError, first_line
from eventsync.schedule import Followed
from eventsync.signals import Signals, exit_now
from eventsync.state import any_tracked
from eventsync.status import Health, Metrics
from eventsync.sync import JobOutcome, PassResult, plan_for, sync_job, valid_ids

log = logging.getLogger(__name__)

NOTHING_TO_FOLLOW = (
    "no jobs to follow: set EVENTSYNC_JOB_IDS (or --job-id), EVENTSYNC_ALL_JOBS=true (or "
    "--all-jobs), or add some with `eventsync jobs add ID`; checked again every pass"
)
# Failures that say nothing about the daemon's own health: the job is the problem.
_JOB_PROBLEMS = frozenset({"not_found"})


class Daemon:
    """Syncs each followed job when it falls due, with `concurrency` requests in flight and
    twice as many jobs under way (config.workers_for), until asked to stop; shares the work
    with any other daemon on the same Postgres (eventsync.schedule).

    Workers each take the next due job, sync it, and set when it is next due, so a slow or
    failing job holds one worker and delays no other job. Once an interval, one daemon of all
    reads the listing (new jobs, status changes), and each daemon logs a *pass*: what it
    synced since the last one. `run_pass` does one whole pass at once (every followed job),
    for tests and callers that want one.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        http: httpx.Client,
        metrics: Metrics,
        owner: str | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.client = TogetherClient.from_settings(http, settings)
        self.metrics = metrics
        self.health = Health(settings.interval)
        self.stop = threading.Event()
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.followed = Followed(settings.job_ids, settings.all_jobs)
        # A daemon that dies frees its jobs within one interval; the living renew theirs.
        self.lease = settings.interval
        # Held while work is taken or done, and by a stop while it sets `stop`: a stop then
        # either finds the work registered (and waits for it) or keeps it from being taken.
        self._lock = threading.Lock()
        self._busy = 0
        self._working: set[str] = set()  # the ids of the jobs this daemon's workers hold
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._outcomes: list[JobOutcome] = []
        self._listing_error: EventsyncError | None = None
        self._window_started = time.monotonic()
        self._ticked = False

    # -- one job ---------------------------------------------------------------------------

    def sync_one(self, job_id: str) -> JobOutcome | None:
        """Sync a job this daemon leased, then give it back, due again by its cadence."""
        if self.stop.is_set():
            with write_transaction(self.engine) as connection:
                schedule.give_back(connection, job_id, owner=self.owner)
            return None
        history_on = self.settings.history
        with self.engine.connect() as connection:
            seen = state.known_jobs(connection, [job_id]).get(job_id)
            at = history.positions(connection, [job_id]).get(job_id) if history_on else None
        job = Job(job_id, seen.status if seen else None, seen.model if seen else None)
        plan = replace(plan_for(job, seen), history=at or history.NEW_JOB)
        outcome = sync_job(self.client, self.engine, plan, history=history_on)
        ok = outcome.error is None
        s = self.settings
        due = schedule.next_poll(
            outcome.status,
            ok=ok,
            failures=(seen.failures if seen else 0) + 1,
            now=datetime.now(UTC),
            interval=s.interval,
            queued_interval=s.queued_every,
            backoff_max=s.backoff_max,
        )
        try:
            with write_transaction(self.engine) as connection:
                schedule.release(connection, job_id, owner=self.owner, next_due_at=due, ok=ok)
        except SQLAlchemyError as exc:  # the lease runs out instead
            log.warning("job %s: could not schedule its next poll: %s", job_id, first_line(exc))
        return outcome

    # -- serving ---------------------------------------------------------------------------

    def work(self) -> None:
        """A worker: take the next due job, sync it, repeat; idle, look again shortly."""
        idle = min(1.0, self.settings.interval / 4)
        while not self.stop.is_set():
            with self._lock:
                if self.stop.is_set():
                    return
                try:
                    taken = self._claim(limit=1)
                except SQLAlchemyError as exc:
                    log.warning("could not take a due job: %s", first_line(exc))
                    taken = []
                if taken:
                    self._busy += 1
                    self._working.update(taken)
            if not taken:
                self._wake.wait(idle * random.uniform(0.5, 1.0))
                continue
            try:
                outcome = self._guarded(taken[0])
            finally:
                with self._lock:
                    self._busy -= 1
                    self._working.difference_update(taken)
                    self._idle.notify_all()
            if outcome is not None:
                with self._lock:
                    self._outcomes.append(outcome)
                self._report_job(outcome)

    def _claim(self, limit: int, *, due_only: bool = True) -> list[str]:
        with write_transaction(self.engine) as connection:
            return schedule.claim(
                connection,
                self.followed,
                owner=self.owner,
                now=datetime.now(UTC),
                lease=self.lease,
                limit=limit,
                busy=self._working,
                due_only=due_only,
            )

    def _guarded(self, job_id: str) -> JobOutcome | None:
        try:
            return self.sync_one(job_id)
        except Exception:  # a bug or the database: the lease runs out, the job is retried
            log.exception("job %s: unexpected error", job_id)
            return None

    def tick(self) -> None:
        """Once an interval: read the listing if no other daemon has this interval, then
        report the pass (what this daemon synced since the last)."""
        if self.stop.is_set():
            return
        first, self._ticked = not self._ticked, True
        try:
            self._listing()
        except (EventsyncError, SQLAlchemyError) as exc:
            self._listing_error = _as_error(exc)
        except Exception:
            log.exception("reading the job listing failed with an unexpected error")
        if first:
            return  # at start, only the listing: the first pass is reported an interval on
        with self._lock:
            outcomes, self._outcomes = self._outcomes, []
            seconds = time.monotonic() - self._window_started
            self._window_started = time.monotonic()
        self._report(PassResult(outcomes=outcomes, seconds=seconds))

    def _listing(self, *, force: bool = False) -> None:
        """The listing, read by one daemon an interval (by this one, if `force`)."""
        s = self.settings
        now = datetime.now(UTC)
        with write_transaction(self.engine) as connection:
            ours = force or schedule.claim_task(
                connection, schedule.LISTING, owner=self.owner, now=now, lease=self.lease
            )
        if not ours:
            return
        try:
            listed = valid_ids(self.client.list_jobs())
        except EventsyncError as exc:
            listed = []
            missing = isinstance(exc, ApiStatusError) and exc.status_code == 404
            if s.all_jobs or missing or not self._anything_followed():
                raise
            log.warning("could not list jobs, statuses unknown this pass: %s", exc)
        finally:
            due = now + timedelta(seconds=s.interval * 0.95)
            with write_transaction(self.engine) as connection:
                schedule.finish_task(
                    connection, schedule.LISTING, owner=self.owner, next_due_at=due
                )
        with write_transaction(self.engine) as connection:
            again = state.note_listing(
                connection, listed, configured=s.job_ids, all_jobs=s.all_jobs, now=now
            )
            if s.history:
                history.note_listing(connection, listed, now=now)
        for job_id in again:
            log.info("job %s is active again; polling it again", job_id, extra={"job_id": job_id})
        self._wake.set()  # idle workers look for what the listing made due
        self._wake.clear()

    def renew(self) -> None:
        """Extend this daemon's leases (every third of a lease)."""
        try:
            with write_transaction(self.engine) as connection:
                until = datetime.now(UTC) + timedelta(seconds=self.lease)
                schedule.renew(connection, owner=self.owner, until=until)
        except SQLAlchemyError as exc:
            log.warning("could not renew this daemon's leases: %s", first_line(exc))

    def request_stop(self) -> None:
        """Stop taking jobs. Not under the lock: a worker may hold it through a claim that the
        database is slow to answer, and the grace must still run. A claim under way when
        this lands is seen by wait_for_pass, which counts work under the same lock."""
        self.stop.set()
        self._wake.set()

    def wait_for_pass(self, timeout: float) -> bool:
        """True once no job is under way (after a stop, none will start), False if one still
        is after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            return False  # work is being taken or started right now
        try:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True
        finally:
            self._lock.release()

    # -- one whole pass --------------------------------------------------------------------

    def run_pass(self) -> PassResult | None:
        """Every followed job now, whatever its due time (the listing first), and the pass
        reported as the serving loop reports one. None once stopped. Never raises."""
        with self._lock:
            if self.stop.is_set():
                return None
            self._busy += 1
        started = time.monotonic()
        try:
            if self._nothing_to_follow():
                self._report(PassResult(outcomes=[], seconds=0.0))
                return None
            self._listing(force=True)
            with self._lock:
                jobs = self._claim(limit=1_000_000, due_only=False)
                self._working.update(jobs)
            try:
                with ThreadPoolExecutor(self.settings.workers) as pool:
                    found = list(pool.map(self._guarded, jobs))
            finally:
                with self._lock:
                    self._working.difference_update(jobs)
            outcomes = [o for o in found if o is not None]
            for outcome in outcomes:
                self._report_job(outcome)
            result = PassResult(outcomes=outcomes, seconds=time.monotonic() - started)
            self._report(result)
            return result
        except (EventsyncError, SQLAlchemyError) as exc:
            self._listing_error = _as_error(exc)
            self._report(PassResult(outcomes=[], seconds=time.monotonic() - started))
            return None
        finally:
            with self._lock:
                self._busy -= 1
                self._idle.notify_all()

    # -- reporting -------------------------------------------------------------------------

    def _anything_followed(self) -> bool:
        s = self.settings
        if s.job_ids or s.all_jobs:
            return True
        with self.engine.connect() as connection:
            return any_tracked(connection)

    def _nothing_to_follow(self) -> bool:
        """No job given, none added with `jobs add`, and not --all-jobs: a daemon that would
        run forever doing nothing, which it says loudly instead."""
        return not self._anything_followed()

    def _report_job(self, outcome: JobOutcome) -> None:
        self.metrics.events_inserted.inc(outcome.new)
        self.metrics.events_updated.inc(outcome.updated)
        self.metrics.repairs.inc(sum(outcome.repairs.values()))
        if outcome.error is not None:
            self.metrics.errors.labels(outcome.error.kind).inc()
            log.warning(
                "%s", outcome.error, extra={"job_id": outcome.job_id, "kind": outcome.error.kind}
            )
        elif outcome.new or outcome.updated:
            log.info(
                "job %s: %d new, %d updated, %d total",
                outcome.job_id,
                outcome.new,
                outcome.updated,
                outcome.total,
                extra={"job_id": outcome.job_id, "new": outcome.new, "total": outcome.total},
            )

    def _report(self, result: PassResult) -> None:
        """A pass's metrics, health and log line."""
        self.metrics.pass_duration.observe(result.seconds)
        listing_error, self._listing_error = self._listing_error, None
        try:
            nothing = self._nothing_to_follow()
        except SQLAlchemyError as exc:
            nothing, listing_error = False, _as_error(exc)
        if nothing:
            if self.health.reason != NOTHING_TO_FOLLOW:  # said once, until it changes
                log.warning(NOTHING_TO_FOLLOW)
            self.health.record(False, NOTHING_TO_FOLLOW)
            self.metrics.passes.labels("failed").inc()
            return
        if listing_error is not None:
            message = str(listing_error)
            log.warning("pass failed: %s", message, extra={"kind": listing_error.kind})
            self.metrics.errors.labels(listing_error.kind).inc()
            self.metrics.passes.labels("failed").inc()
            self.health.record(False, f"last pass failed: {message}")
            return
        failed = [o for o in result.outcomes if not o.ok]
        try:
            self.metrics.set_job_states(self.engine, self.followed)
        except SQLAlchemyError as exc:
            log.warning("could not count jobs for /metrics: %s", first_line(exc))
        serious = [o for o in failed if o.error is not None and o.error.kind not in _JOB_PROBLEMS]
        if failed and len(failed) == len(result.outcomes):
            serious = failed  # not one job synced: that is the daemon's problem too
        ok = not serious
        self.metrics.passes.labels("ok" if ok else "failed").inc()
        if ok:
            self.metrics.last_success.set(time.time())
        reason = (
            f"{len(result.outcomes)} jobs, {len(failed)} failed"
            if ok
            else f"{len(serious)} of {len(result.outcomes)} jobs failed, e.g. {serious[0].error}"
        )
        self.health.record(ok, reason, result.seconds)
        log.info(
            "pass: %d jobs, %d new events, %d failed, %.2fs",
            len(result.outcomes),
            result.new,
            len(failed),
            result.seconds,
            extra={
                "jobs": len(result.outcomes),
                "new": result.new,
                "failed": len(failed),
                "seconds": round(result.seconds, 3),
            },
        )

    def serve(self, signals: Signals) -> int:
        """Work until SIGTERM/SIGINT; finish the jobs under way; return 0.

        Runs in the main thread. Returns only once no job is under way and none can start;
        work that outlasts the grace, or a second signal, ends the process at once instead.
        """
        s = self.settings
        scheduler = BackgroundScheduler(timezone=UTC)
        scheduler.add_job(
            self.tick,
            IntervalTrigger(seconds=s.interval),
            id="pass",
            next_run_time=datetime.now(UTC),  # the listing at once
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )
        scheduler.add_job(
            self.renew,
            IntervalTrigger(seconds=self.lease / 3),
            id="renew",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )
        workers = [
            threading.Thread(target=self.work, name=f"sync-{i}", daemon=True)
            for i in range(s.workers)
        ]
        with write_transaction(self.engine) as connection:
            for job_id in s.job_ids:  # due at once, whichever daemon reads the listing
                state.ensure(connection, job_id)
        signals.serving = True
        scheduler.start()
        for worker in workers:
            worker.start()
        log.info(
            "eventsync running: each job polled every %ss (queued ones every %ss), "
            "%d request(s) at a time, as %s",
            f"{s.interval:g}",
            f"{s.queued_every:g}",
            s.concurrency,
            self.owner,
            extra={"interval": s.interval, "owner": self.owner},
        )
        received = signals.wait()
        self.request_stop()
        log.info(
            "%s received: stopping after the jobs under way (send again to exit at once)",
            received.name,
        )
        # Out of the job store first: the scheduler thread, woken by the shutdown, would
        # otherwise still submit a run that fell due to the closed executor, and log an error.
        scheduler.remove_all_jobs()
        scheduler.shutdown(wait=False)
        if not self._finish_pass(signals):
            log.warning(
                "the jobs under way did not finish within %ss; exiting anyway "
                "(they roll back and are retried on the next start)",
                f"{s.shutdown_grace:g}",
            )
            exit_now(0)
        try:
            with write_transaction(self.engine) as connection:
                schedule.release_all(connection, owner=self.owner)
        except SQLAlchemyError as exc:
            log.warning("could not give back this daemon's jobs: %s", first_line(exc))
        log.info("stopped")
        return 0

    def _finish_pass(self, signals: Signals) -> bool:
        """Wait up to the grace for the jobs under way; a second signal exits at once."""
        deadline = time.monotonic() + self.settings.shutdown_grace
        while not self.wait_for_pass(timeout=min(0.05, max(0.0, deadline - time.monotonic()))):
            again = signals.poll(timeout=0)
            if again is not None:
                log.warning("second %s: exiting at once", again.name)
                exit_now(130)
            if time.monotonic() >= deadline:
                return False
        return True


def _as_error(exc: Exception) -> EventsyncError:
    if isinstance(exc, EventsyncError):
        return exc
    error = EventsyncError(f"database error: {first_line(exc)}")
    error.kind = "database"
    return error


@contextmanager
def _one_daemon_per_sqlite_file(url: str) -> Iterator[None]:
    """On SQLite, hold `FILE.daemon.lock` while serving: a second daemon on the same file
    gets a ConfigError (SQLite has one writer at a time; replicas need Postgres)."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        yield
        return
    path = Path(database).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".daemon.lock"), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(
                f"another eventsync daemon ({holder}) already runs on {path}: a SQLite file "
                "serves one daemon; to run replicas, use Postgres"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield


def serve(settings: Settings) -> int:
    """`eventsync run`: migrate, serve /healthz and /metrics, and sync until a signal.

    Returns the exit code. A problem the user can fix (no key, a database that can't be
    opened, a port in use) is raised as a ConfigError or SQLAlchemyError for the CLI to say.
    """
    from eventsync import db, migrate
    from eventsync.client import make_http_client
    from eventsync.status import serve_status
    from eventsync.sync import tune_gc, tune_malloc

    tune_malloc()  # before any thread

    with Signals() as signals, _one_daemon_per_sqlite_file(settings.database_url):
        metrics = Metrics()
        http = make_http_client(settings, event_hooks={"response": [metrics.on_response]})
        engine = db.make_engine(settings.database_url, pool_size=settings.workers)
        try:
            migrate.ensure_schema(engine)
            daemon = Daemon(settings, engine=engine, http=http, metrics=metrics)
            tune_gc()
            server = None
            if settings.metrics_port:
                try:
                    server = serve_status(
                        settings.metrics_host, settings.metrics_port, daemon.health, metrics
                    )
                except OSError as exc:
                    raise ConfigError(
                        f"cannot serve /healthz and /metrics on {settings.metrics_host}:"
                        f"{settings.metrics_port}: {exc.strerror or exc} (choose another "
                        "--metrics-port, or 0 to disable)"
                    ) from None
                log.info(
                    "serving /healthz and /metrics on http://%s:%d",
                    settings.metrics_host,
                    settings.metrics_port,
                )
            try:
                return daemon.serve(signals)  # returns once no pass is under way, or exits
            finally:
                if server is not None:
                    server.close()
        finally:
            engine.dispose()
            http.close()
