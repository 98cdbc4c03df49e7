"""`eventsync run`: passes on an APScheduler interval until a signal, then a clean stop."""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from types import FrameType, TracebackType

import httpx
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from eventsync.client import TogetherClient
from eventsync.config import Settings
from eventsync.errors import ConfigError, EventsyncError, first_line
from eventsync.state import any_tracked
from eventsync.status import Health, Metrics
from eventsync.sync import PassResult, plan_jobs, run_pass

log = logging.getLogger(__name__)

NOTHING_TO_FOLLOW = (
    "no jobs to follow: set EVENTSYNC_JOB_IDS (or --job-id), EVENTSYNC_ALL_JOBS=true (or "
    "--all-jobs), or add some with `eventsync jobs add ID`; checked again every pass"
)
# Failures that say nothing about the daemon's own health: the job is the problem.
_JOB_PROBLEMS = frozenset({"not_found"})


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


class Signals:
    """SIGTERM and SIGINT for the main thread, whichever thread the kernel gives them to.

    The kernel hands a signal sent to the process to any of its threads that doesn't block
    it. Python runs its handler only in the main thread, at its next bytecode, and a main
    thread asleep in an untimed Event.wait never gets there: a daemon given SIGTERM went on
    polling. Python's C-level handler, in whichever thread caught the signal, also writes the
    signal's number to the wakeup fd, so a select() on it always wakes.

    Until `serving` is set there is nothing to finish, and a signal exits at once (0): a
    migration under way rolls back. From then on, `wait` and `poll` return the signals. Both
    are in place from the start, so a signal caught during the change is not lost. Create it
    in the main thread, before any other thread starts.
    """

    def __init__(self) -> None:
        self.serving = False
        self._inbox, self._wakeup = socket.socketpair()  # a socket, so Windows works too
        self._inbox.setblocking(False)
        self._wakeup.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._wakeup.fileno(), warn_on_full_buffer=False)
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if not self.serving:
            log.info("%s before the first pass: exiting", signal.Signals(signum).name)
            exit_now(0)
        # Serving: the signal is read from the wakeup fd (this only keeps the default action,
        # exit or KeyboardInterrupt, from running).

    def wait(self) -> signal.Signals:
        """The next SIGTERM or SIGINT."""
        received = self.poll(timeout=None)
        assert received is not None, "an untimed select only returns with a signal"
        return received

    def poll(self, timeout: float | None) -> signal.Signals | None:
        """The next SIGTERM or SIGINT, or None once `timeout` seconds have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._inbox], [], [], left)[0]:
                return None
            try:
                byte = self._inbox.recv(1)
            except BlockingIOError:
                continue
            if byte and byte[0] in STOP_SIGNALS:
                return signal.Signals(byte[0])

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._inbox.close()
        self._wakeup.close()

    def __enter__(self) -> Signals:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()


class Daemon:
    """Runs a pass now and then every interval, until asked to stop."""

    def __init__(
        self, settings: Settings, *, engine: Engine, http: httpx.Client, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.client = TogetherClient.from_settings(http, settings)
        self.metrics = metrics
        self.health = Health(settings.interval)
        self.stop = threading.Event()
        # Held by a pass from before it looks at `stop` until it ends, so a stop either finds
        # the pass holding it (and waits for it) or keeps it from starting. Checking `stop`
        # first and marking the pass under way after left a gap in which a stop saw no pass
        # and the process exited while one started.
        self._passing = threading.Lock()

    def run_scheduled(self) -> None:
        """What the scheduler runs. A pass that outlasts the interval makes the scheduler skip
        the run that fell due meanwhile (max_instances=1), so that run happens here, at once."""
        while not self.stop.is_set():
            started = time.monotonic()
            self.run_pass()
            if time.monotonic() - started < self.settings.interval:
                return
            log.debug("the pass outlasted the interval; catching up at once")

    def run_pass(self) -> PassResult | None:
        """One pass, or None once stopped. Never raises: a failed pass is logged and retried
        next time."""
        with self._passing:
            if self.stop.is_set():
                return None
            started = time.monotonic()
            try:
                return self._pass()
            except (EventsyncError, SQLAlchemyError) as exc:
                kind = exc.kind if isinstance(exc, EventsyncError) else "database"
                message = str(exc) if isinstance(exc, EventsyncError) else first_line(exc)
                log.warning("pass failed: %s", message, extra={"kind": kind})
                self.metrics.errors.labels(kind).inc()
                self.metrics.passes.labels("failed").inc()
                self.health.record(False, f"last pass failed: {message}")
                return None
            except Exception:
                log.exception("pass failed with an unexpected error")
                self.metrics.passes.labels("failed").inc()
                self.health.record(False, "last pass failed with an unexpected error")
                return None
            finally:
                self.metrics.pass_duration.observe(time.monotonic() - started)

    def wait_for_pass(self, timeout: float) -> bool:
        """True once no pass is under way (after a stop, none will start), False if one still
        is after `timeout` seconds."""
        if not self._passing.acquire(timeout=timeout):
            return False
        self._passing.release()  # a scheduled run waiting for it then sees `stop` and returns
        return True

    def _nothing_to_follow(self) -> bool:
        """No job given, none added with `jobs add`, and not --all-jobs: a daemon that would
        run forever doing nothing, which it says loudly instead."""
        s = self.settings
        if s.job_ids or s.all_jobs:
            return False
        with self.engine.connect() as connection:
            return not any_tracked(connection)

    def _pass(self) -> PassResult | None:
        s = self.settings
        if self._nothing_to_follow():
            if self.health.reason != NOTHING_TO_FOLLOW:  # said once, until it changes
                log.warning(NOTHING_TO_FOLLOW)
            self.health.record(False, NOTHING_TO_FOLLOW)
            self.metrics.passes.labels("failed").inc()
            return None
        jobs = plan_jobs(
            self.client, self.engine, s.job_ids, all_jobs=s.all_jobs, skip_finished=True
        )
        result = run_pass(self.client, self.engine, jobs, concurrency=s.concurrency, stop=self.stop)
        failed = [o for o in result.outcomes if not o.ok]
        for outcome in result.outcomes:
            self.metrics.events_inserted.inc(outcome.new)
            self.metrics.events_updated.inc(outcome.updated)
            self.metrics.repairs.inc(sum(outcome.repairs.values()))
            if outcome.error is not None:
                self.metrics.errors.labels(outcome.error.kind).inc()
                log.warning(
                    "%s",
                    outcome.error,
                    extra={"job_id": outcome.job_id, "kind": outcome.error.kind},
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
        self.metrics.set_job_states(self.engine, polled={plan.job.id for plan in jobs})
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
        return result

    def serve(self, signals: Signals) -> int:
        """Schedule passes until SIGTERM/SIGINT; finish the pass under way; return 0.

        Runs in the main thread. Returns only once no pass is under way and none can start, so
        the interpreter has no pass thread to wait for at exit; a pass that outlasts the grace,
        or a second signal, ends the process at once instead.
        """
        s = self.settings
        scheduler = BackgroundScheduler(timezone=UTC)
        scheduler.add_job(
            self.run_scheduled,
            IntervalTrigger(seconds=s.interval, jitter=min(s.interval * 0.1, 10)),
            id="sync-pass",
            next_run_time=datetime.now(UTC),  # the first pass runs at once
            coalesce=True,  # after a stall, one catch-up pass, not a burst
            max_instances=1,  # never two passes at once
            misfire_grace_time=None,  # a late pass still runs (the default 1 s drops it)
        )
        signals.serving = True
        scheduler.start()
        log.info(
            "eventsync running: a pass every %ss",
            f"{s.interval:g}",
            extra={"interval": s.interval},
        )
        received = signals.wait()
        self.stop.set()
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
                "the pass under way did not finish within %ss; exiting anyway "
                "(its unfinished jobs roll back and are retried on the next start)",
                f"{s.shutdown_grace:g}",
            )
            exit_now(0)
        log.info("stopped")
        return 0

    def _finish_pass(self, signals: Signals) -> bool:
        """Wait up to the grace for the pass under way; a second signal exits at once."""
        deadline = time.monotonic() + self.settings.shutdown_grace
        while not self.wait_for_pass(timeout=min(0.05, max(0.0, deadline - time.monotonic()))):
            again = signals.poll(timeout=0)
            if again is not None:
                log.warning("second %s: exiting at once", again.name)
                exit_now(130)
            if time.monotonic() >= deadline:
                return False
        return True


def exit_now(code: int) -> None:
    logging.shutdown()
    os._exit(code)


def serve(settings: Settings) -> int:
    """`eventsync run`: migrate, serve /healthz and /metrics, and sync until a signal.

    Returns the exit code. A problem the user can fix (no key, a database that can't be
    opened, a port in use) is raised as a ConfigError or SQLAlchemyError for the CLI to say.
    """
    from eventsync import db, migrate
    from eventsync.client import make_http_client
    from eventsync.status import serve_status
    from eventsync.sync import tune_gc

    with Signals() as signals:  # before any thread: a signal exits at once until serving
        metrics = Metrics()
        http = make_http_client(settings, event_hooks={"response": [metrics.on_response]})
        engine = db.make_engine(settings.database_url, pool_size=settings.concurrency)
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
