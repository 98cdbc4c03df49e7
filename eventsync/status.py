"""What a running daemon reports: /healthz and /metrics, and the server that answers them.

The server is waitress: a few worker threads, a connection limit, an idle timeout and a real
listen backlog, so clients can't hold it (the stdlib server it replaces gave every connection
a thread for as long as the client liked, behind a backlog of 5).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from sqlalchemy import Engine
from waitress import wasyncore
from waitress.server import create_server

from eventsync.schedule import Followed
from eventsync.state import job_states


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

    def set_job_states(self, engine: Engine, followed: Followed) -> None:
        """Jobs by state: the followed ones, and the finished ones left alone."""
        with engine.connect() as connection:
            rows = job_states(connection)
        tally: Tally[str] = Tally()
        for row in rows:
            if row.finished_at is not None:
                tally["finished"] += 1
            elif not followed.follows(row):
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
