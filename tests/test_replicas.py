"""Per-job scheduling: replicas on one Postgres share the work and survive each other; a slow
job delays no other; each job's cadence follows its state; SQLite serves one daemon."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, select

from eventsync import migrate
from eventsync.models import state_table
from eventsync.schedule import next_poll
from eventsync.testing import FakeTogether
from tests.helpers import (
    EVENTUALLY,
    event_counts,
    events_never_answered,
    wait_until,
)


def fetches_between(fake: FakeTogether, start: float, end: float) -> Counter[str]:
    """Event fetches per job that arrived at the fake between two monotonic times."""
    with fake.lock:
        arrivals = list(fake.arrivals)
    return Counter(
        path.split("/")[3]
        for at, path in arrivals
        if start <= at < end and path.endswith("/events")
    )


def test_three_replicas_share_300_jobs_without_duplicates(
    fake: FakeTogether, pg_db_url: str, run_daemon
) -> None:
    """3 replicas, 300 running jobs, several intervals: each job fetched about once an
    interval across all of them (at most 1.2 on average), every replica takes a share with no
    configuration, and no event is stored twice nor any error logged."""
    interval = 2.0
    jobs = [f"ft-r{i:03d}" for i in range(300)]
    for job_id in jobs:
        fake.add_job(job_id, events=3)
    engine = create_engine(pg_db_url)
    migrate.upgrade(engine)
    daemons = [run_daemon(pg_db_url, "--all-jobs", "--interval", str(interval)) for _ in range(3)]
    wait_until(lambda: len(event_counts(engine)) == 300)
    started = time.monotonic()
    for job_id in jobs:
        fake.add_events(job_id, 1)
    wait_until(lambda: set(event_counts(engine).values()) == {4})
    rounds = 4
    wait_until(lambda: time.monotonic() - started >= rounds * interval, timeout=EVENTUALLY)
    counted = fetches_between(fake, started, started + rounds * interval)
    per_job_per_interval = sum(counted[j] for j in jobs) / len(jobs) / rounds
    assert per_job_per_interval <= 1.2, per_job_per_interval
    # That they poll at all is shown by the new events landing above; how fast depends on
    # how busy the machine is, so it is not asserted.
    assert event_counts(engine) == dict.fromkeys(jobs, 4)
    for daemon in daemons:
        log = daemon.stderr()
        assert "job ft-r" in log, "every replica takes a share"
        for trouble in ("WARNING", "ERROR", "Traceback"):
            assert trouble not in log, log
        assert daemon.stop()[0] == 0
    engine.dispose()


def test_a_killed_replica_frees_its_jobs_within_an_interval(
    fake: FakeTogether, pg_db_url: str, run_daemon
) -> None:
    """A replica SIGKILLed in the middle of a job: its lease on the job runs out at most one
    interval after its last renewal, and another replica then syncs the job."""
    interval = 2.0
    fake.add_job("ft-held", events=5)
    engine = create_engine(pg_db_url)
    migrate.upgrade(engine)
    stuck, answer = threading.Event(), threading.Event()
    first = threading.Lock()

    def hang_the_first_fetch(path: str) -> None:
        if path.endswith("/ft-held/events") and first.acquire(blocking=False):
            stuck.set()
            answer.wait()  # the first fetch hangs until the test ends

    fake.override = hang_the_first_fetch
    try:
        doomed = run_daemon(pg_db_url, "--job-id", "ft-held", "--interval", str(interval))
        wait_until(stuck.is_set)
        survivor = run_daemon(pg_db_url, "--job-id", "ft-held", "--interval", str(interval))
        wait_until(lambda: "eventsync running" in survivor.stderr())
        doomed.proc.kill()
        killed_at = datetime.now(UTC)
        doomed.proc.wait()
        with engine.connect() as conn:
            lease_until = conn.execute(
                select(state_table.c.lease_until).where(state_table.c.job_id == "ft-held")
            ).scalar_one()
        assert lease_until <= killed_at + timedelta(seconds=interval)
        wait_until(lambda: event_counts(engine).get("ft-held") == 5)
        wait_until(lambda: "job ft-held: 5 new" in survivor.stderr())  # logged after the commit
        assert survivor.stop()[0] == 0
    finally:
        answer.set()
        wait_until(lambda: fake.in_flight == 0)
        engine.dispose()


def test_a_stalled_job_delays_no_other(fake: FakeTogether, engine: Engine, start_daemon) -> None:
    """One job's server stalls for good (with a request deadline of ten minutes): the other
    jobs' new events keep landing, interval after interval, while it hangs."""
    others = [f"ft-ok-{i}" for i in range(6)]
    for job_id in others:
        fake.add_job(job_id, events=2)
    fake.add_job("ft-stall", events=2)
    with events_never_answered(fake, "ft-stall") as stuck:
        daemon = start_daemon("--all-jobs", env={"EVENTSYNC_REQUEST_DEADLINE": "600"})
        wait_until(lambda: all(event_counts(engine).get(j) == 2 for j in others))
        wait_until(stuck.is_set)
        for round_ in (3, 4):
            for job_id in others:
                fake.add_events(job_id, 1)
            wait_until(lambda r=round_: all(event_counts(engine).get(j) == r for j in others))
        assert "ft-stall" not in event_counts(engine)  # still hanging all along
        assert daemon.proc.poll() is None


def test_queued_jobs_are_polled_less_often_than_running_ones(
    fake: FakeTogether, engine: Engine, start_daemon
) -> None:
    """Running jobs every interval, queued ones every EVENTSYNC_QUEUED_INTERVAL: by the time
    the running job has been fetched 8 times, the queued one (5x slower) at most 4 times."""
    fake.add_job("ft-running", events=1)
    fake.add_job("ft-queued", events=1, status="queued")
    start_daemon("--all-jobs", "--interval", "0.4", env={"EVENTSYNC_QUEUED_INTERVAL": "2"})
    wait_until(lambda: len(fake.requests_for("ft-running")) >= 8)
    queued = [p for p in fake.requests_for("ft-queued") if p.endswith("/events")]
    assert 1 <= len(queued) <= 4


def test_a_second_daemon_on_one_sqlite_file_is_refused(
    fake: FakeTogether, tmp_path: Path, run_daemon
) -> None:
    """SQLite serves one daemon: the second gets a one-line error at start (exit 1), and the
    first keeps running."""
    url = f"sqlite:///{tmp_path / 'one.db'}"
    fake.add_job("ft-1", events=2)
    first = run_daemon(url, "--job-id", "ft-1")
    wait_until(lambda: "eventsync running" in first.stderr())
    second = run_daemon(url, "--job-id", "ft-1")
    assert second.proc.wait(timeout=EVENTUALLY) == 1
    lines = second.stderr().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: another eventsync daemon (pid ")
    assert "a SQLite file serves one daemon; to run replicas, use Postgres" in lines[0]
    assert first.proc.poll() is None
    assert first.stop()[0] == 0


@pytest.mark.parametrize(
    ("status", "ok", "failures", "expected"),
    [
        ("running", True, 1, 10.0),
        ("queued", True, 1, 50.0),
        ("pending", True, 1, 50.0),
        (None, True, 1, 10.0),
        ("running", False, 1, 10.0),
        ("running", False, 2, 20.0),
        ("running", False, 4, 80.0),
        ("running", False, 30, 600.0),
    ],
)
def test_cadence(status: str | None, ok: bool, failures: int, expected: float) -> None:
    """Running every interval, queued or pending every queued interval, failing ones twice as
    long after each failure up to the cap; jitter only ever shortens the wait, by up to 10%."""
    now = datetime(2026, 12, 1, tzinfo=UTC)
    due = next_poll(
        status,
        ok=ok,
        failures=failures,
        now=now,
        interval=10,
        queued_interval=50,
        backoff_max=600,
    )
    wait = (due - now).total_seconds()
    assert 0.9 * expected <= wait <= expected


def test_stopping_gives_the_jobs_back(fake: FakeTogether, engine: Engine, start_daemon) -> None:
    """A daemon that stops leaves no lease behind: another may take its jobs at once."""
    fake.add_job("ft-1", events=2)
    daemon = start_daemon("--job-id", "ft-1")
    wait_until(lambda: event_counts(engine).get("ft-1") == 2)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=EVENTUALLY) == 0
    with engine.connect() as conn:
        owners = conn.execute(select(state_table.c.lease_owner)).scalars().all()
    assert owners == [None]
