"""`eventsync run` as a real subprocess against the fake API, on SQLite and Postgres."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text

from eventsync.testing import FakeTogether
from tests.helpers import (
    API_KEY,
    EVENTSYNC,
    DaemonProcess,
    event_counts,
    events_never_answered,
    run,
    wait_until,
)


def metrics(daemon: DaemonProcess) -> dict[str, float]:
    """Every sample of /metrics, parsed with prometheus-client's own parser."""
    text = daemon.get("/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_new_events_land_at_the_next_pass(fake: FakeTogether, engine: Engine, start_daemon) -> None:
    """The first pass runs at once; events added later are stored by the next pass (or the one
    after, if a pass was already under way as they came)."""
    fake.add_job("ft-a", events=20)
    fake.add_job("ft-b", events=5, generation="2026-08")
    daemon = start_daemon("--job-id", "ft-a", "--job-id", "ft-b")
    wait_until(lambda: event_counts(engine) == {"ft-a": 20, "ft-b": 5})
    passes_before = daemon.stderr().count("pass: ")
    fake.add_events("ft-b", 3)
    wait_until(lambda: event_counts(engine).get("ft-b") == 8)
    code, _ = daemon.stop()
    assert code == 0
    lines = daemon.stderr().splitlines()
    landed = next(i for i, line in enumerate(lines) if "job ft-b: 3 new" in line)
    passes_until_then = sum("pass: " in line for line in lines[:landed])
    assert passes_until_then <= passes_before + 1


def test_health_and_metrics(fake: FakeTogether, engine: Engine, start_daemon) -> None:
    """/healthz is 200 after a good pass and 503 once the key is rejected; /metrics parses."""
    fake.add_job("ft-a", events=12)
    fake.add_job("ft-done", events=4, status="completed")
    started_at = time.time()
    daemon = start_daemon("--all-jobs")
    wait_until(lambda: daemon.get("/healthz").status_code == 200)
    assert daemon.get("/healthz").json()["status"] == "ok"
    wait_until(lambda: metrics(daemon).get("eventsync_events_inserted_total") == 16)
    # The job gauges are counted once a pass.
    wait_until(lambda: metrics(daemon).get("eventsync_jobs{state=finished}") == 1)
    sample = metrics(daemon)
    assert sample["eventsync_pass_duration_seconds_count"] >= 1
    assert sample["eventsync_http_responses_total{status_class=2xx}"] >= 3
    assert sample["eventsync_jobs{state=finished}"] == 1
    assert sample["eventsync_jobs{state=active}"] == 1
    assert started_at <= sample["eventsync_last_success_timestamp_seconds"] <= time.time()
    assert all(
        name.startswith("eventsync_") or name.startswith(("python_", "process_")) for name in sample
    )

    fake.api_key = "rotated-key"  # the daemon's key is now rejected
    wait_until(lambda: daemon.get("/healthz").status_code == 503)
    body = daemon.get("/healthz").json()
    assert body["status"] == "unhealthy"
    assert "API key is missing or was rejected" in body["reason"]
    assert metrics(daemon)["eventsync_errors_total{kind=auth}"] >= 1
    assert daemon.proc.poll() is None  # the daemon stays up and tries again next pass
    assert daemon.stop()[0] == 0
    assert API_KEY not in daemon.stderr()


def test_a_daemon_with_nothing_to_follow_says_so(
    fake: FakeTogether, engine: Engine, start_daemon, tmp_path: Path
) -> None:
    """No job ids, no --all-jobs, nothing added: a warning at start and a 503 saying what to
    set, instead of running forever without a word; `jobs add` then makes it healthy."""
    fake.add_job("ft-a", events=3)
    daemon = start_daemon()
    wait_until(lambda: "no jobs to follow" in daemon.stderr())
    body = daemon.get("/healthz").json()
    assert (daemon.get("/healthz").status_code, body["status"]) == (503, "unhealthy")
    assert body["reason"].startswith("no jobs to follow: set EVENTSYNC_JOB_IDS")
    url = engine.url.render_as_string(hide_password=False)
    assert run("jobs", "add", "ft-a", "--database-url", url, cwd=tmp_path).returncode == 0
    wait_until(lambda: daemon.get("/healthz").status_code == 200)
    assert event_counts(engine) == {"ft-a": 3}
    assert daemon.stderr().count("no jobs to follow") == 1  # said once, not every pass
    assert daemon.stop()[0] == 0


def test_quiet_passes_log_one_line(fake: FakeTogether, engine: Engine, start_daemon) -> None:
    """A job logs when it gains events; a pass with nothing new logs just its summary.
    Which pass counts the job depends on when it was synced (one may end first at start)."""
    fake.add_job("ft-a", events=3)
    daemon = start_daemon("--job-id", "ft-a")

    def passes() -> list[str]:
        return [line for line in daemon.stderr().splitlines() if "pass: " in line]

    def quiet_since_the_sync() -> int:
        found = passes()
        counted = [i for i, line in enumerate(found) if "0 new events" not in line]
        return len(found) - 1 - counted[0] if counted else 0

    wait_until(lambda: quiet_since_the_sync() >= 2)
    daemon.stop()
    (counted,) = [line for line in passes() if "0 new events" not in line]
    assert " 3 new events, 0 failed" in counted
    lines = daemon.stderr().splitlines()
    started = next(i for i, line in enumerate(lines) if "eventsync running" in line)
    others = [
        line
        for line in lines[started + 1 :]
        if "pass: " not in line and "SIGTERM" not in line and "stopped" not in line
    ]
    assert len(others) == 1
    assert "job ft-a: 3 new" in others[0]


def test_sigterm_during_a_pass_leaves_no_half_written_job(
    fake: FakeTogether, engine: Engine, start_daemon
) -> None:
    """SIGTERM mid-pass: the jobs under way finish, the daemon exits 0, and every job is
    either complete or untouched."""
    sizes = {f"ft-{i}": 300 + i for i in range(8)}
    for job, size in sizes.items():
        fake.add_job(job, events=size)
    fake.latency = 0.4
    daemon = start_daemon("--all-jobs", "--concurrency", "2")
    wait_until(lambda: len(event_counts(engine)) >= 1)
    code, _ = daemon.stop()
    assert code == 0, daemon.stderr()
    counts = event_counts(engine)
    assert counts, "at least one job was stored before the signal"
    assert all(counts[job] == sizes[job] for job in counts)
    assert len(counts) < len(sizes), "the signal should have landed mid-pass"
    assert "stopped" in daemon.stderr()  # the jobs under way finished: not cut off by the grace


def test_a_second_signal_exits_at_once(fake: FakeTogether, engine: Engine, start_daemon) -> None:
    """With a pass stuck on an API that never answers, and a grace of ten minutes, a second
    SIGTERM ends the process (130) without waiting for either."""
    fake.add_job("ft-slow", events=5)
    daemon = start_daemon("--job-id", "ft-slow", env={"EVENTSYNC_SHUTDOWN_GRACE": "600"})
    with events_never_answered(fake) as stuck:
        wait_until(stuck.is_set)
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "SIGTERM received: stopping" in daemon.stderr())
        code, _ = daemon.stop()
        assert code == 130
        assert "second SIGTERM: exiting at once" in daemon.stderr()


def test_jobs_added_while_running_are_picked_up(
    fake: FakeTogether, engine: Engine, start_daemon, tmp_path: Path
) -> None:
    """`eventsync jobs add` on the same database reaches a running daemon at its next pass."""
    fake.add_job("ft-later", events=6)
    daemon = start_daemon()
    wait_until(lambda: "no jobs to follow" in daemon.stderr())
    url = engine.url.render_as_string(hide_password=False)
    added = subprocess.run(
        [EVENTSYNC, "jobs", "add", "ft-later", "--database-url", url],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "ft-later: added"
    wait_until(lambda: event_counts(engine).get("ft-later") == 6)
    listed = subprocess.run(
        [EVENTSYNC, "jobs", "list", "--format", "json", "--database-url", url],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    (record,) = json.loads(listed.stdout)
    assert (record["job_id"], record["followed"], record["events"]) == ("ft-later", True, 6)
    assert record["last_sync"] is not None
    assert daemon.stop()[0] == 0


def test_json_logs(fake: FakeTogether, engine: Engine, start_daemon) -> None:
    """--log-format json writes one JSON object per line, with structured fields."""
    fake.add_job("ft-a", events=2)
    daemon = start_daemon("--job-id", "ft-a", "--log-format", "json")
    wait_until(lambda: "pass: " in daemon.stderr())
    daemon.stop()
    records = [json.loads(line) for line in daemon.stderr().splitlines() if line.strip()]
    passes = [r for r in records if r["message"].startswith("pass: ")]
    assert passes
    assert passes[0]["level"] == "INFO"
    assert passes[0]["new"] == 2
    assert {"time", "logger", "message"} <= set(passes[0])


def test_history_off_keeps_events_only(fake: FakeTogether, engine: Engine, start_daemon) -> None:
    """EVENTSYNC_HISTORY=false: the daemon's listing feeds no history table."""
    fake.add_job("ft-a", events=4)
    daemon = start_daemon("--all-jobs", env={"EVENTSYNC_HISTORY": "false"})
    wait_until(lambda: event_counts(engine) == {"ft-a": 4})
    code, _ = daemon.stop()
    assert code == 0
    with engine.connect() as conn:
        for table in ("fine_tune_jobs", "fine_tune_job_status_history", "fine_tune_metrics"):
            assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 0, table
