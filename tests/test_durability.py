"""Database faults: readers, racing migrations, two daemons, kill -9, dropped connections."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import threading
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from eventsync import db, migrate
from eventsync.client import make_http_client
from eventsync.daemon import Daemon
from eventsync.events import parse_events
from eventsync.status import Metrics
from eventsync.testing import FakeTogether
from tests.helpers import (
    EVENTSYNC,
    EVENTUALLY,
    event_counts,
    make_settings,
    sync_pass,
    wait_until,
)


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def assert_exact(engine: Engine, fake: FakeTogether) -> None:
    """The database holds every event of every job once, in the server's order."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT job_id, seq, event_key FROM fine_tune_events ORDER BY job_id, seq")
        ).all()
    stored: dict[str, list[str]] = {}
    for job_id, _seq, key in rows:
        stored.setdefault(job_id, []).append(key)
    expected = {
        job_id: [event.key for event in parse_events(job.events).events]
        for job_id, job in fake.jobs.items()
    }
    assert stored == expected


def test_a_sqlite_reader_breaks_nothing(fake: FakeTogether, tmp_path: Path) -> None:
    """`sqlite3 eventsync.db` holding a read transaction during a sync: both carry on (WAL)."""
    path = tmp_path / "eventsync.db"
    engine = db.make_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    fake.add_job("ft-1", events=50)
    reader = sqlite3.connect(path)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM fine_tune_events").fetchone() == (0,)
    assert sync_pass(fake, engine, ["ft-1"]).ok
    # The reader still sees its snapshot, then the new rows once it starts again.
    assert reader.execute("SELECT count(*) FROM fine_tune_events").fetchone() == (0,)
    reader.rollback()
    assert reader.execute("SELECT count(*) FROM fine_tune_events").fetchone() == (50,)
    assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    reader.close()
    engine.dispose()


def test_racing_migrations(db_url: str, tmp_path: Path) -> None:
    """Four processes migrating one empty database at once: one migrates, all succeed."""
    procs = [
        subprocess.Popen(
            [EVENTSYNC, "db", "upgrade", "--database-url", db_url],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=EVENTUALLY) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    assert sum("upgraded empty database" in out for out, _ in outputs) == 1
    engine = db.make_engine(db_url)
    assert db.current_revision(engine) == db.HEAD
    engine.dispose()


def test_two_daemons_on_one_database(
    fake: FakeTogether,
    engine: Engine,
    start_daemon,
) -> None:
    """Two daemons following the same jobs: no duplicates, no errors, nothing missing."""
    if engine.dialect.name == "sqlite":
        pytest.skip("a SQLite file serves one daemon (test_replicas checks the refusal)")
    for i in range(6):
        fake.add_job(f"ft-{i}", events=40)
    first = start_daemon("--all-jobs")
    second = start_daemon("--all-jobs")

    def stored(total: int) -> bool:
        return event_counts(engine) == {f"ft-{i}": total for i in range(6)}

    for total in (55, 70, 85, 100):
        for i in range(6):
            fake.add_events(f"ft-{i}", 15)
        wait_until(partial(stored, total))  # by one daemon or the other, or both
    assert first.stop()[0] == 0
    assert second.stop()[0] == 0
    assert_exact(engine, fake)
    for daemon in (first, second):
        log = daemon.stderr()
        assert "WARNING" not in log, log
        assert "ERROR" not in log, log


@pytest.mark.parametrize("command", ["sync", "run"])
def test_kill_9_at_any_moment(
    fake: FakeTogether, engine: Engine, tmp_path: Path, command: str
) -> None:
    """SIGKILL mid-pass, again and again (one-shot sync, then the daemon): each job is always
    either whole or as it was."""
    rng = random.Random(9)
    for i in range(16):
        fake.add_job(
            f"ft-{i}", events=rng.randint(50, 300), generation=("2026-04", "2026-08")[i % 2]
        )
    # Slow enough per request (16 jobs, 4 at a time) that jobs are fetched and written all
    # through the pass, so that a kill lands among them.
    fake.latency = 0.1
    history = {job_id: {0, len(job.events)} for job_id, job in fake.jobs.items()}
    killed = 0
    for _ in range(10):
        for job_id in rng.sample(sorted(fake.jobs), 5):
            fake.add_events(job_id, rng.randint(1, 60))
            history[job_id].add(len(fake.jobs[job_id].events))
        daemon_args = ["--interval", "0.3", "--metrics-port", "0"] if command == "run" else []
        arrived = len(fake.arrivals)
        proc = subprocess.Popen(
            [
                EVENTSYNC,
                command,
                "--all-jobs",
                "--concurrency",
                "4",
                "--database-url",
                url_of(engine),
                *daemon_args,
            ],
            cwd=tmp_path,
            env=_api_env(fake),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # The kill comes once the process has made a random number of the 17 requests of its
        # (first) pass: mid-pass, however fast or slow the machine is.
        wait_until(partial(_has_made, fake, arrived + rng.randint(2, 15), proc))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
        with engine.connect() as conn:
            dupes = conn.execute(
                text(
                    "SELECT count(*) FROM (SELECT job_id, event_key FROM fine_tune_events "
                    "GROUP BY job_id, event_key HAVING count(*) > 1) d"
                )
            ).scalar_one()
        assert dupes == 0
        for job_id, count in event_counts(engine).items():
            assert count in history[job_id], (job_id, count, history[job_id])
    assert killed == 10, "every kill should land mid-pass"
    fake.latency = 0
    assert sync_pass(fake, engine, all_jobs=True).ok
    assert_exact(engine, fake)


def _has_made(fake: FakeTogether, requests: int, proc: subprocess.Popen[bytes]) -> bool:
    """The fake has seen this many requests in all, or the process has ended."""
    return len(fake.arrivals) >= requests or proc.poll() is not None


def _api_env(fake: FakeTogether) -> dict[str, str]:
    import os

    from tests.helpers import API_KEY, FAST_RETRY_ENV

    base = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    return {
        **base,
        **FAST_RETRY_ENV,
        "TOGETHER_API_KEY": API_KEY,
        "TOGETHER_BASE_URL": fake.base_url,
    }


@pytest.mark.slow
def test_postgres_backends_terminated_mid_pass(
    fake: FakeTogether, pg_admin: Engine, pg_db_url: str
) -> None:
    """pg_terminate_backend during passes: the daemon logs, retries next pass, loses nothing."""
    db_url = pg_db_url
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    for i in range(10):
        fake.add_job(f"ft-{i}", events=400)
    fake.latency = 0.02
    database = engine.url.database
    stop = threading.Event()
    terminated = []

    def terminator() -> None:
        admin = create_engine(url_of(pg_admin.engine), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            while not stop.is_set():
                n = conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                ).scalar_one()
                terminated.append(n)
                stop.wait(0.15)
        admin.dispose()

    settings = make_settings(fake, db_url, all_jobs=True, concurrency=4)
    thread = threading.Thread(target=terminator)
    try:
        with make_http_client(settings) as http:
            daemon = Daemon(settings, engine=engine, http=http, metrics=Metrics())
            registry = daemon.metrics.registry

            def database_errors() -> float:
                value = registry.get_sample_value("eventsync_errors_total", {"kind": "database"})
                return value or 0.0

            thread.start()
            # Passes go on, each writing to every job, until a kill has landed mid-write: a
            # kill of an idle pooled connection is only seen (and healed) by the pool's ping.
            # The bound is on passes, not seconds, so a slow machine gets as many chances.
            passes = 0
            while passes < 4 or (database_errors() < 1 and passes < 100):
                for i in range(10):
                    fake.add_events(f"ft-{i}", 20)
                daemon.run_pass()  # never raises, whatever the database does
                passes += 1
            stop.set()
            thread.join()
            assert sum(terminated) >= 3, "backends should have been terminated mid-pass"
            assert database_errors() >= 1
            fake.latency = 0
            result = daemon.run_pass()
        assert result is not None
        assert result.ok
        assert_exact(engine, fake)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        engine.dispose()
