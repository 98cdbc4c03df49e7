"""Stopping `eventsync run`: whichever thread catches the signal, however a pass is timed, and
while it still waits to migrate, it exits as the README says."""

from __future__ import annotations

import ctypes
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from eventsync import migrate
from eventsync.client import make_http_client
from eventsync.daemon import Daemon
from eventsync.status import Metrics
from eventsync.testing import FakeTogether
from tests.helpers import (
    API_KEY,
    EVENTSYNC,
    SHUTDOWN_CEILING,
    event_counts,
    events_never_answered,
    make_settings,
    wait_until,
)


def _tgkill() -> Any:
    """glibc's tgkill (2.30+), which sends a signal to one thread of a process, or None."""
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None, use_errno=True), "tgkill", None)


@pytest.mark.skipif(_tgkill() is None, reason="needs Linux and glibc's tgkill to aim a signal")
def test_a_sigterm_caught_by_another_thread_still_stops_the_daemon(
    fake: FakeTogether,
    engine: Engine,
    start_daemon,
) -> None:
    """The kernel may give a process's SIGTERM to any of its threads, and in CI a daemon given
    one went on polling. Aimed at a thread other than the main one, it stops the daemon."""
    fake.add_job("ft-1", events=3)
    daemon = start_daemon("--job-id", "ft-1")
    wait_until(lambda: "pass: " in daemon.stderr())
    pid = daemon.proc.pid
    others = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
    # A pass's worker threads come and go: the first that still exists takes the signal.
    aimed = [tid for tid in others if _tgkill()(pid, tid, signal.SIGTERM) == 0]
    assert aimed, f"no thread of {pid} besides the main one took the signal"
    assert daemon.proc.wait(timeout=SHUTDOWN_CEILING) == 0
    log = daemon.stderr()
    assert "SIGTERM received: stopping" in log
    assert "stopped" in log


def test_a_stop_as_a_pass_starts_waits_for_that_pass(fake: FakeTogether, engine: Engine) -> None:
    """A stop that lands just after a pass looked at the stop flag (its thread is held right
    there) still waits for that pass: the daemon never says no pass is under way, to exit,
    while one is about to run."""
    fake.add_job("ft-1", events=3)
    settings = make_settings(fake, str(engine.url), job_ids=["ft-1"])
    with make_http_client(settings) as http:
        daemon = Daemon(settings, engine=engine, http=http, metrics=Metrics())
        held, go_on = threading.Event(), threading.Event()

        def hold_after_the_stop_check(frame: FrameType, event: str, _arg: object) -> Any:
            is_set = frame.f_code is threading.Event.is_set.__code__
            if event == "call" and is_set and frame.f_locals["self"] is daemon.stop:
                return hold_on_return
            return None

        def hold_on_return(_frame: FrameType, event: str, _arg: object) -> Any:
            if event == "return" and not held.is_set():
                held.set()
                go_on.wait()
            return hold_on_return

        def scheduled_pass() -> None:
            sys.settrace(hold_after_the_stop_check)
            try:
                daemon.run_pass()
            finally:
                sys.settrace(None)

        passes = daemon.metrics.passes.labels("ok")
        thread = threading.Thread(target=scheduled_pass)
        thread.start()
        try:
            wait_until(held.is_set)
            daemon.stop.set()
            said_none_under_way = daemon.wait_for_pass(timeout=0)
        finally:
            go_on.set()
        if not said_none_under_way:
            assert daemon.wait_for_pass(timeout=SHUTDOWN_CEILING)
        passes_when_stopped = passes._value.get()
        thread.join()
    assert passes._value.get() == passes_when_stopped


def test_a_pass_that_outlasts_the_grace_is_cut_off(
    fake: FakeTogether,
    engine: Engine,
    start_daemon,
) -> None:
    """A pass stuck on an API that never answers: when the grace runs out the daemon exits 0
    anyway and says so, and the job it cut off wrote nothing."""
    fake.add_job("ft-stuck", events=5)
    with events_never_answered(fake) as stuck:
        daemon = start_daemon("--job-id", "ft-stuck", env={"EVENTSYNC_SHUTDOWN_GRACE": "1"})
        wait_until(stuck.is_set)
        code, _ = daemon.stop()
        assert code == 0
        assert "did not finish within 1s; exiting anyway" in daemon.stderr()
        assert event_counts(engine) == {}


@contextmanager
def _migration_lock_held(db_url: str) -> Iterator[None]:
    """Another process holding what a migrating eventsync must wait for: the advisory lock on
    Postgres, the write lock on SQLite."""
    if make_url(db_url).get_backend_name() == "sqlite":
        holder = sqlite3.connect(make_url(db_url).database or "", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.close()
        return
    engine = create_engine(db_url)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": migrate.MIGRATION_LOCK_KEY})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": migrate.MIGRATION_LOCK_KEY})
    engine.dispose()


def test_sigterm_while_waiting_to_migrate_exits_at_once(
    fake: FakeTogether, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """A daemon queued behind another process's lock before it migrates says so, and a
    SIGTERM ends it (0) there and then, not once the lock is free or its wait runs out."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    env = {**base, "TOGETHER_API_KEY": API_KEY, "TOGETHER_BASE_URL": fake.base_url}
    log = tmp_path / "daemon.log"
    command = [EVENTSYNC, "run", "--job-id", "ft-1", "--metrics-port", "0"]
    with _migration_lock_held(db_url), log.open("w") as stderr:
        proc = subprocess.Popen(
            [*command, "--database-url", db_url],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            wait_until(lambda: "waiting for another" in log.read_text())
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=SHUTDOWN_CEILING) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "SIGTERM before the first pass: exiting" in log.read_text()
