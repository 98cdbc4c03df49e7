"""`eventsync run`: passes on an APScheduler interval, clean shutdown, health and metrics."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable
from datetime import UTC, datetime
from types import FrameType, TracebackType
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import httpx
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from waitress import wasyncore
from waitress.server import create_server

from eventsync.client import RetryPolicy, TogetherClient
from eventsync.config import Settings
from eventsync.errors import EventsyncError, first_line
from eventsync.state import job_states
from eventsync.sync import PassResult, plan_jobs, run_pass

log = logging.getLogger(__name__)

# Failures that say nothing about the daemon's own health: the job is the problem.
_JOB_PROBLEMS = frozenset({"not_found"})


class Metrics:
    """Prometheus metrics in a registry of their own (so tests can run several daemons)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_inserted = Counter(
            "eventsync_events_inserted", "Events stored for the first time.", registry=r
        )
        self.events_updated = Counter(
            "eventsync_events_updated", "Stored events whose content changed.", registry=r
        )
        self.repairs = Counter(
            "eventsync_event_repairs", "Fields repaired to store an event.", registry=r
        )
        self.pass_duration = Histogram(
            "eventsync_pass_duration_seconds",
            "Duration of a sync pass.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.passes = Counter("eventsync_passes", "Sync passes.", ["result"], registry=r)
        self.http_responses = Counter(
            "eventsync_http_responses",
            "API responses by status class.",
            ["status_class"],
            registry=r,
        )
        self.errors = Counter("eventsync_errors", "Errors by kind.", ["kind"], registry=r)
        self.jobs = Gauge("eventsync_jobs", "Known jobs by state.", ["state"], registry=r)
        self.last_success = Gauge(
            "eventsync_last_success_timestamp_seconds",
            "Unix time of the end of the last successful pass.",
            registry=r,
        )
        for kind in ("auth", "not_found", "network", "payload", "database", "http_status"):
            self.errors.labels(kind)
        for result in ("ok", "failed"):
            self.passes.labels(result)

    def on_response(self, response: httpx.Response) -> None:
        self.http_responses.labels(f"{response.status_code // 100}xx").inc()

    def set_job_states(self, engine: Engine, polled: set[str]) -> None:
        """Jobs by state: the ones this pass polled, and the finished ones it left alone."""
        with engine.connect() as connection:
            rows = job_states(connection)
        tally: Tally[str] = Tally()
        for row in rows:
            if row.finished_at is not None:
                tally["finished"] += 1
            elif row.job_id not in polled:
                continue  # removed, or no longer configured
            elif row.last_error_kind == "not_found":
                tally["not_found"] += 1
            elif row.last_error_kind is not None:
                tally["failing"] += 1
            else:
                tally["active"] += 1
        for state in ("active", "finished", "failing", "not_found"):
            self.jobs.labels(state).set(tally[state])


class Health:
    """Healthy while the last pass succeeded and finished within about three intervals."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.lock = threading.Lock()
        self.last_ok: float | None = None
        self.last_pass_ok: bool | None = None
        self.last_seconds = 0.0
        self.reason = "no pass has finished yet"

    @property
    def max_age(self) -> float:
        """Three intervals, plus the time a pass takes, plus a little slack."""
        return 3 * self.interval + self.last_seconds + 5

    def record(self, ok: bool, reason: str, seconds: float = 0.0) -> None:
        with self.lock:
            self.last_pass_ok = ok
            self.reason = reason
            self.last_seconds = seconds
            if ok:
                self.last_ok = time.time()

    def check(self) -> tuple[bool, dict[str, Any]]:
        with self.lock:
            age = None if self.last_ok is None else time.time() - self.last_ok
            body: dict[str, Any] = {"last_success_age_seconds": age}
            if not self.last_pass_ok:
                return False, {**body, "status": "unhealthy", "reason": self.reason}
            if age is None or age > self.max_age:
                reason = f"no successful pass for {age:.0f}s (limit {self.max_age:.0f}s)"
                return False, {**body, "status": "unhealthy", "reason": reason}
            return True, {**body, "status": "ok", "reason": self.reason}


# Bounds of the /healthz and /metrics server (README: "The health and metrics server").
STATUS_THREADS = 4  # requests answered at once; the others queue (each takes milliseconds)
STATUS_CONNECTION_LIMIT = 500  # open connections; past it, new ones wait in the backlog
STATUS_IDLE_TIMEOUT = 10  # seconds a connection may stay silent before it is closed
STATUS_BACKLOG = 1024  # connections the kernel holds until the server accepts them
STATUS_MAX_HEADER_BYTES = 8192  # request line and headers; a larger request gets a 431


def status_app(health: Health, metrics: Metrics) -> WSGIApplication:
    """/healthz (JSON, 200 or 503) and /metrics (Prometheus text, from prometheus-client's
    own WSGI app); anything else is a 404."""
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            error = {"error": "only GET and HEAD"}
            return _json(start_response, "405 Method Not Allowed", error, [("Allow", "GET, HEAD")])
        if path == "/metrics":
            return prometheus(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            ok, body = health.check()
            return _json(start_response, "200 OK" if ok else "503 Service Unavailable", body)
        return _json(start_response, "404 Not Found", {"error": "try /healthz or /metrics"})

    return app


def _json(
    start_response: StartResponse,
    status: str,
    body: dict[str, Any],
    headers: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    data = json.dumps(body).encode()
    length = str(len(data))
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", length), *headers]
    )
    return [data]


class StatusServer:
    """/healthz and /metrics, served by waitress from a thread of its own until `close()`.

    waitress bounds what clients can hold: a few worker threads, a connection limit, an idle
    timeout, a listen backlog. The stdlib server it replaces gave every connection a thread
    for as long as the client liked, behind a backlog of 5.
    """

    def __init__(self, host: str, port: int, health: Health, metrics: Metrics) -> None:
        self._sockets: dict[int, Any] = {}  # waitress's socket map, read only by our thread
        self._server = create_server(
            status_app(health, metrics),
            map=self._sockets,
            host=host,
            port=port,
            threads=STATUS_THREADS,
            connection_limit=STATUS_CONNECTION_LIMIT,
            channel_timeout=STATUS_IDLE_TIMEOUT,
            cleanup_interval=1,  # how often idle connections are looked for
            backlog=STATUS_BACKLOG,
            max_request_header_size=STATUS_MAX_HEADER_BYTES,
            max_request_body_size=1024,  # neither endpoint takes a body
            asyncore_use_poll=True,  # select() fails past file descriptor 1023
            ident="eventsync",
        )
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="status", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        # waitress's own run() loops until the process ends; this loop also ends on close().
        while not self._closing.is_set():
            wasyncore.loop(timeout=0.5, use_poll=True, map=self._sockets, count=1)
        wasyncore.close_all(self._sockets)

    def close(self, timeout: int = 2) -> None:
        """Stop listening and close every connection, waiting at most about `timeout`."""
        self._closing.set()
        self._thread.join(timeout)
        self._server.task_dispatcher.shutdown(timeout=timeout)


def serve_status(host: str, port: int, health: Health, metrics: Metrics) -> StatusServer:
    """Serve /healthz and /metrics in the background; OSError if the port can't be had."""
    return StatusServer(host, port, health, metrics)


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
        self.client = TogetherClient(http, RetryPolicy.from_settings(settings))
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

    def _pass(self) -> PassResult:
        s = self.settings
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
