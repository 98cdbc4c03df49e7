"""The terminal-job rule, through the daemon's own pass code (in process, real HTTP and DB)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from eventsync.client import make_http_client
from eventsync.daemon import Daemon
from eventsync.status import Metrics
from eventsync.testing import FakeTogether, make_event
from tests.helpers import ATTEMPTS, event_counts, make_settings


@pytest.fixture
def daemon(fake: FakeTogether, engine: Engine) -> Iterator[Daemon]:
    settings = make_settings(fake, str(engine.url), all_jobs=True, interval=1)
    with make_http_client(settings) as http:
        yield Daemon(settings, engine=engine, http=http, metrics=Metrics())


def event_fetches(fake: FakeTogether, job_id: str) -> int:
    return sum(1 for path in fake.requests_for(job_id) if path.endswith("/events"))


def finished(engine: Engine, job_id: str) -> bool:
    with engine.connect() as conn:
        value = conn.execute(
            text("SELECT finished_at FROM sync_state WHERE job_id = :j"), {"j": job_id}
        ).scalar_one()
    return value is not None


def test_a_finished_job_gets_one_last_fetch_then_no_requests(
    fake: FakeTogether, engine: Engine, daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """completed: fetched once more, then never again; a running job keeps being polled."""
    fake.add_job("ft-run", events=3)
    fake.add_job("ft-done", events=5)
    daemon.run_pass()
    fake.add_events("ft-done", 2)  # the tail of its history, written as it finished
    fake.set_status("ft-done", "completed")
    caplog.set_level("INFO")
    daemon.run_pass()
    assert event_counts(engine) == {"ft-run": 3, "ft-done": 7}
    assert finished(engine, "ft-done")
    assert "job ft-done is completed: its last events are stored and it is no longer polled" in (
        caplog.text
    )
    fetched = event_fetches(fake, "ft-done")
    for _ in range(3):
        daemon.run_pass()
    assert event_fetches(fake, "ft-done") == fetched
    assert event_fetches(fake, "ft-run") == 5


def test_a_failed_last_fetch_is_retried(fake: FakeTogether, engine: Engine, daemon: Daemon) -> None:
    """If the fetch after the job ended fails, the next pass tries again; then it stops."""
    fake.add_job("ft-done", events=4, status="error")
    body = json.dumps({"error": {"message": "upstream broke"}}).encode()
    fake.override = lambda path: (502, body, {}) if path.endswith("/events") else None
    daemon.run_pass()
    assert event_counts(engine) == {}
    assert not finished(engine, "ft-done")
    fake.override = None
    daemon.run_pass()
    assert event_counts(engine) == {"ft-done": 4}
    assert finished(engine, "ft-done")
    fetched = event_fetches(fake, "ft-done")
    daemon.run_pass()
    assert event_fetches(fake, "ft-done") == fetched == ATTEMPTS + 1


def test_a_job_that_comes_back_is_polled_again(
    fake: FakeTogether, engine: Engine, daemon: Daemon
) -> None:
    """A finished job whose listing shows it running again is fetched again."""
    fake.add_job("ft-x", events=3, status="cancelled")
    daemon.run_pass()
    assert finished(engine, "ft-x")
    fake.set_status("ft-x", "running")
    fake.add_events("ft-x", [make_event("ft-x", 3, type="job_restarted", message="restarted")])
    daemon.run_pass()
    assert event_counts(engine) == {"ft-x": 4}
    assert not finished(engine, "ft-x")


def test_a_restart_event_after_the_end_keeps_the_job_polled(
    fake: FakeTogether, engine: Engine, daemon: Daemon
) -> None:
    """Listing says completed, but the newest lifecycle event is job_restarted: keep polling."""
    events = [
        make_event("ft-y", 0, type="JOB_COMPLETE"),
        make_event("ft-y", 1, type="JOB_RESTARTED"),
    ]
    fake.add_job("ft-y", events=events, status="completed")
    daemon.run_pass()
    assert not finished(engine, "ft-y")
    daemon.run_pass()
    assert event_fetches(fake, "ft-y") == 2


def test_one_shot_sync_still_fetches_finished_jobs(
    fake: FakeTogether, engine: Engine, daemon: Daemon
) -> None:
    """`eventsync sync` fetches what it is asked, finished or not."""
    from tests.helpers import sync_pass

    fake.add_job("ft-done", events=2, status="completed")
    daemon.run_pass()
    before = event_fetches(fake, "ft-done")
    assert sync_pass(fake, engine, ["ft-done"]).ok
    assert event_fetches(fake, "ft-done") == before + 1


def test_a_wrong_base_url_is_unhealthy(fake: FakeTogether, engine: Engine) -> None:
    """Every request 404s under a wrong prefix: the pass fails and /healthz would say so."""
    settings = make_settings(
        fake, str(engine.url), all_jobs=True, interval=1, base_url=fake.base_url + "/wrongprefix"
    )
    fake.add_job("ft-1", events=2)
    with make_http_client(settings) as http:
        daemon = Daemon(settings, engine=engine, http=http, metrics=Metrics())
        daemon.run_pass()
    ok, body = daemon.health.check()
    assert not ok
    assert "check TOGETHER_BASE_URL" in body["reason"]


def test_every_job_not_found_is_unhealthy(fake: FakeTogether, engine: Engine) -> None:
    """One unknown job is the job's problem; all of them unknown is the daemon's."""
    settings = make_settings(fake, str(engine.url), job_ids=["ft-a", "ft-b"], interval=1)
    with make_http_client(settings) as http:
        daemon = Daemon(settings, engine=engine, http=http, metrics=Metrics())
        daemon.run_pass()
        assert not daemon.health.check()[0]
        fake.add_job("ft-a", events=1)
        daemon.run_pass()
    assert daemon.health.check()[0]
