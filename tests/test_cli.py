"""The eventsync command, run as a real subprocess: output, exit codes, errors, migrations."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from eventsync import db, migrate
from eventsync.models import events_table
from eventsync.testing import FakeTogether
from tests.helpers import API_KEY, EVENTSYNC, read_pty, run


def count(db_url: str) -> int:
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(events_table)).scalar_one())
    finally:
        engine.dispose()


def test_sync_migrates_then_prints_one_line_per_job(
    fake: FakeTogether, api_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """First run creates the schema (and says so), then stores and summarises each job."""
    fake.add_job("ft-a", events=12)
    fake.add_job("ft-b", events=7, generation="2026-08")
    first = run(
        "sync",
        "--job-id",
        "ft-a",
        "--job-id",
        "ft-b",
        "--database-url",
        db_url,
        cwd=tmp_path,
        env=api_env,
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["ft-a: 12 new, 12 total", "ft-b: 7 new, 7 total"]
    assert "database migrated from an empty database to" in first.stderr
    fake.add_events("ft-b", 2)
    again = run(
        "sync",
        "--database-url",
        db_url,
        cwd=tmp_path,
        env={**api_env, "EVENTSYNC_JOB_IDS": "ft-a,ft-b"},
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["ft-a: 0 new, 12 total", "ft-b: 2 new, 9 total"]
    assert "migrated" not in again.stderr
    assert count(db_url) == 21


def test_default_database_is_sqlite_in_the_working_folder(
    fake: FakeTogether, api_env: dict[str, str], tmp_path: Path
) -> None:
    """Without --database-url, eventsync.db appears in the current folder."""
    fake.add_job("ft-a", events=3)
    result = run("sync", "--all-jobs", cwd=tmp_path, env=api_env)
    assert result.returncode == 0, result.stderr
    assert count(f"sqlite:///{tmp_path / 'eventsync.db'}") == 3


def test_failures_exit_1_with_one_line_each(
    fake: FakeTogether, api_env: dict[str, str], tmp_path: Path
) -> None:
    """An unknown job fails alone: named on stderr with its cause, the rest still synced."""
    fake.add_job("ft-ok", events=4)
    result = run("sync", "--job-id", "ft-ok", "--job-id", "ft-gone", cwd=tmp_path, env=api_env)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["ft-ok: 4 new, 4 total"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: job ft-gone: unknown job, the API has no such job for this key "
        "(HTTP 404: Fine-tune job 'ft-gone' not found) [not_found]"
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("env", "args", "code", "message"),
    [
        (
            {"TOGETHER_API_KEY": ""},
            ["--job-id", "ft-a"],
            1,
            "error: no API key: set TOGETHER_API_KEY in the environment or in .env",
        ),
        (
            {"TOGETHER_API_KEY": "wrong"},
            ["--job-id", "ft-a"],
            1,
            "error: job ft-a: the API key is missing or was rejected "
            "(HTTP 401: Invalid API key provided.) [auth]",
        ),
        (
            {},
            [],
            2,
            "error: no jobs to sync: pass --job-id ID (repeatable), "
            "set EVENTSYNC_JOB_IDS, add some with `eventsync jobs add`, or use --all-jobs",
        ),
        ({}, ["--job-id", "../../files"], 2, "error: invalid job id '../../files'"),
        (
            {},
            ["--job-id", "ft-a", "--base-url", "http://127.0.0.1:9"],
            1,
            "error: job ft-a: network error: ConnectError",
        ),
        (
            {},
            ["--job-id", "ft-a", "--database-url", "postgresql://u:pw@127.0.0.1:9/x"],
            1,
            "error: database postgresql+psycopg://u:***@127.0.0.1:9/x: connection failed",
        ),
    ],
)
def test_user_mistakes_are_one_line_not_a_traceback(
    fake: FakeTogether,
    api_env: dict[str, str],
    tmp_path: Path,
    env: dict[str, str],
    args: list[str],
    code: int,
    message: str,
) -> None:
    """Missing or wrong key, no jobs, bad id, wrong URL, unreachable database."""
    fake.add_job("ft-a", events=1)
    result = run("sync", *args, cwd=tmp_path, env={**api_env, **env})
    assert result.returncode == code, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(message)
    assert "Traceback" not in result.stderr
    assert "pw@" not in result.stderr


def test_db_upgrade_and_current_from_any_folder(db_url: str, tmp_path: Path) -> None:
    """`eventsync db upgrade` works outside the repo (migrations ship in the package);
    `db current` only reads: it creates no SQLite file, and says an empty database is one."""
    before = run("db", "current", "--database-url", db_url, cwd=tmp_path)
    if db_url.startswith("sqlite"):
        assert before.returncode == 1
        assert before.stderr.startswith("error: no eventsync database at ")
        assert list(tmp_path.iterdir()) == []
    else:
        assert before.returncode == 0, before.stderr
        assert "current: none (empty database)" in before.stdout
    up = run("db", "upgrade", "--database-url", db_url, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert f"upgraded empty database -> {db.HEAD}" in up.stdout
    again = run("db", "upgrade", "--database-url", db_url, cwd=tmp_path)
    assert f"already at {db.HEAD}" in again.stdout
    after = run("db", "current", "--database-url", db_url, cwd=tmp_path)
    assert f"current: {db.HEAD}" in after.stdout
    assert "up to date" in after.stdout


def test_help_names_every_setting(tmp_path: Path) -> None:
    """`sync --help` lists each flag with its environment variable."""
    result = run("sync", "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert result.returncode == 0
    for shown in (
        "--job-id",
        "EVENTSYNC_JOB_IDS",
        "--all-jobs",
        "--database-url",
        "EVENTSYNC_DATABASE_URL",
        "--base-url",
        "TOGETHER_BASE_URL",
        "--concurrency",
        "EVENTSYNC_CONCURRENCY",
        "TOGETHER_API_KEY",
    ):
        assert shown in result.stdout, shown


def test_the_api_key_never_appears_in_output(
    fake: FakeTogether, api_env: dict[str, str], tmp_path: Path
) -> None:
    """A full verbose run with successes and failures never prints the key."""
    fake.add_job("ft-a", events=5)
    result = run(
        "sync", "-v", "--job-id", "ft-a", "--job-id", "ft-missing", cwd=tmp_path, env=api_env
    )
    assert result.returncode == 1
    assert "ft-a: 5 new" in result.stdout
    assert API_KEY not in result.stdout + result.stderr


def test_progress_bar_on_a_terminal_only(
    fake: FakeTogether, api_env: dict[str, str], tmp_path: Path
) -> None:
    """A progress bar is drawn when stderr is a terminal, and never when it is piped."""
    import pty

    for i in range(10):
        fake.add_job(f"ft-{i}", events=2)
    fake.latency = 0.05
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    proc = subprocess.Popen(
        [EVENTSYNC, "sync", "--all-jobs", "--concurrency", "2"],
        cwd=tmp_path,
        env={**env, **api_env, "TERM": "xterm", "COLUMNS": "100"},
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    drawn = read_pty(master)
    assert proc.wait(timeout=30) == 0
    os.close(master)
    assert proc.stdout is not None
    with proc.stdout:
        assert len(proc.stdout.read().splitlines()) == 10
    assert b"syncing" in drawn
    assert b"/10" in drawn

    piped = run("sync", "--all-jobs", cwd=tmp_path, env=api_env)
    assert piped.returncode == 0
    assert "syncing" not in piped.stderr


def test_a_database_newer_than_eventsync_is_a_clear_error(
    fake: FakeTogether, api_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """A schema revision this version doesn't know: one line telling the user what to do."""
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    engine.dispose()
    fake.add_job("ft-a", events=1)
    synced = run("sync", "--job-id", "ft-a", "--database-url", db_url, cwd=tmp_path, env=api_env)
    assert synced.returncode == 1
    assert "schema revision f00d, which this eventsync" in synced.stderr
    assert "Traceback" not in synced.stderr
    current = run("db", "current", "--database-url", db_url, cwd=tmp_path)
    assert "the database is newer than this eventsync" in current.stdout


def test_an_unusable_sqlite_path_is_one_line(tmp_path: Path) -> None:
    """A database file under a path that can't be a folder: one line, no traceback."""
    bad = "sqlite:////proc/version/x/eventsync.db"
    result = run("db", "upgrade", "--database-url", bad, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: database sqlite:////proc/version/x/eventsync.db: ")
    assert "Traceback" not in result.stderr


def test_jobs_remove_of_an_unknown_id_creates_nothing(db_url: str, tmp_path: Path) -> None:
    """Removing a job that was never followed says so and leaves no row behind."""
    removed = run("jobs", "remove", "ft-never", "--database-url", db_url, cwd=tmp_path)
    assert removed.stdout.strip() == "ft-never: was not followed"
    listed = run("jobs", "list", "--format", "json", "--database-url", db_url, cwd=tmp_path)
    assert json.loads(listed.stdout) == []


def test_sync_full_stores_again_what_was_lost_behind_its_back(
    fake: FakeTogether, api_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """`sync --full` compares every event even when the list and the counts look unchanged."""
    fake.add_job("ft-a", events=6)
    args = ("sync", "--job-id", "ft-a", "--database-url", db_url)
    assert run(*args, cwd=tmp_path, env=api_env).returncode == 0
    engine = db.make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM fine_tune_events WHERE seq > 4"))
            conn.execute(text("UPDATE sync_state SET event_count = 4"))
    finally:
        engine.dispose()
    plain = run(*args, cwd=tmp_path, env=api_env)
    assert plain.stdout.splitlines() == ["ft-a: 0 new, 4 total"]
    full = run(*args, "--full", cwd=tmp_path, env=api_env)
    assert full.returncode == 0, full.stderr
    assert full.stdout.splitlines() == ["ft-a: 2 new, 6 total"]
    assert count(db_url) == 6
