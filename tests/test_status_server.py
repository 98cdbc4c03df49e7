"""/healthz and /metrics of a real `eventsync run` under load: many connections at once, idle
and half-sent ones, clients that reset; stderr stays JSON lines all along."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from eventsync.status import STATUS_IDLE_TIMEOUT
from eventsync.testing import FakeTogether
from tests.helpers import DaemonProcess, wait_until


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: the status server never touches the database."""
    return f"sqlite:///{tmp_path / 'eventsync.db'}"


@pytest.fixture
def daemon(fake: FakeTogether, engine: Engine, start_daemon) -> DaemonProcess:
    """A daemon logging JSON, healthy after its first pass."""
    fake.add_job("ft-a", events=3)
    daemon = start_daemon("--job-id", "ft-a", "--log-format", "json")
    wait_until(lambda: daemon.get("/healthz").status_code == 200, timeout=15)
    return daemon


def stderr_records(daemon: DaemonProcess) -> list[dict[str, object]]:
    """Every line the daemon wrote to stderr, each parsed as JSON (a line that isn't fails)."""
    return [json.loads(line) for line in daemon.stderr().splitlines()]


def url(daemon: DaemonProcess, path: str) -> str:
    return f"http://127.0.0.1:{daemon.port}{path}"


def test_the_endpoints_answer_as_before(daemon: DaemonProcess) -> None:
    """/healthz is JSON, /metrics is Prometheus text, anything else a JSON 404."""
    health = daemon.get("/healthz")
    assert health.headers["content-type"] == "application/json"
    assert health.json()["status"] == "ok"
    scraped = daemon.get("/metrics")
    assert scraped.headers["content-type"].startswith("text/plain")
    assert "eventsync_events_inserted_total 3.0" in scraped.text
    missing = daemon.get("/nope")
    assert (missing.status_code, missing.json()) == (404, {"error": "try /healthz or /metrics"})
    assert httpx.post(url(daemon, "/healthz"), timeout=10).status_code == 405
    assert daemon.stop()[0] == 0
    stderr_records(daemon)


def test_500_concurrent_requests_are_all_answered(daemon: DaemonProcess) -> None:
    """500 requests on 500 connections at once: every one gets its answer."""

    async def fetch_all() -> list[httpx.Response | BaseException]:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            paths = ["/healthz" if i % 2 else "/metrics" for i in range(500)]
            return await asyncio.gather(
                *(client.get(url(daemon, path)) for path in paths), return_exceptions=True
            )

    answers = asyncio.run(fetch_all())
    failed = [a for a in answers if not isinstance(a, httpx.Response) or a.status_code != 200]
    assert failed == []
    assert daemon.stop()[0] == 0
    assert all(r["level"] != "ERROR" for r in stderr_records(daemon))


def test_idle_and_half_sent_connections_are_closed_and_block_nobody(
    daemon: DaemonProcess,
) -> None:
    """200 connections that send nothing or half a request line: a normal request is still
    answered, and the server closes each of them after its idle timeout."""
    idle = []
    for i in range(200):
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
        if i % 2:
            sock.sendall(b"GET /healthz HT")
        idle.append(sock)
    try:
        assert httpx.get(url(daemon, "/healthz"), timeout=30).status_code == 200
        deadline = time.monotonic() + STATUS_IDLE_TIMEOUT + 60
        for sock in idle:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1024) == b""  # closed by the server, without an answer
    finally:
        for sock in idle:
            sock.close()
    assert daemon.stop()[0] == 0
    stderr_records(daemon)


def test_client_resets_leave_no_traceback(daemon: DaemonProcess) -> None:
    """Clients that send a request and reset the connection (SO_LINGER 0): no traceback, no
    line on stderr that isn't JSON, and the server goes on answering."""
    for i in range(100):
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
        sock.sendall(
            f"GET /{'metrics' if i % 2 else 'healthz'} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        if i % 3 == 0:
            time.sleep(0.01)  # some resets land mid-answer, others before the request is read
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert httpx.get(url(daemon, "/metrics"), timeout=30).status_code == 200
    assert daemon.stop()[0] == 0
    assert "Traceback" not in daemon.stderr()
    assert all("exc_info" not in r for r in stderr_records(daemon))


def test_sigterm_with_connections_open_exits_cleanly(daemon: DaemonProcess) -> None:
    """Open clients don't keep a stopping daemon alive: with 50 connections that keep
    sending half a request (so no idle timeout ever closes them), SIGTERM still exits 0."""
    clients = [socket.create_connection(("127.0.0.1", daemon.port), timeout=30) for _ in range(50)]
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(0.5):
            for sock in clients:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X")

    dripping = threading.Thread(target=drip, daemon=True)
    dripping.start()
    try:
        code, _ = daemon.stop()
        assert code == 0
        records = stderr_records(daemon)
        assert records[-1]["message"] == "stopped"
    finally:
        stop.set()
        dripping.join()
        for sock in clients:
            sock.close()
