"""status, events and sql: they read the database (never the API) and print for people or
programs."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from alembic import command as alembic
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from eventsync import db, migrate, reads
from eventsync.testing import FakeTogether, make_event
from tests.helpers import API_KEY, EVENTSYNC, EVENTUALLY, Lines, run, sync_pass
from tests.history import load


def test_status_json(url: str, tmp_path: Path) -> None:
    """One object per job with status, progress, last event, last sync and last error."""
    result = run("status", "--format", "json", "--database-url", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = {j["job_id"]: j for j in json.loads(result.stdout)}
    assert set(jobs) == {"ft-done", "ft-run", "ft-fail"}
    assert (jobs["ft-run"]["status"], jobs["ft-run"]["step"], jobs["ft-run"]["total_steps"]) == (
        "running",
        25,
        100,
    )
    assert jobs["ft-run"]["progress"] == pytest.approx(0.25)
    assert jobs["ft-done"]["status"] == "completed"
    assert jobs["ft-fail"]["last_message"] == "CUDA out of memory"
    assert jobs["ft-done"]["last_synced_at"] is not None


def test_status_table_when_piped(url: str, tmp_path: Path) -> None:
    """Piped, the table is plain text: a header, a row per job, no escape codes."""
    result = run("status", "--database-url", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["job", "status", "step"]
    assert any(line.startswith("ft-run") and "25/100" in line and "25%" in line for line in lines)
    assert "\x1b[" not in result.stdout


def test_events_in_server_order_and_filters(url: str, tmp_path: Path) -> None:
    """The timeline by seq; --type (any case), --limit (the latest N), --since."""
    listed = run("events", "ft-done", "--format", "jsonl", "--database-url", url, cwd=tmp_path)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["seq"] for r in rows] == list(range(1, 8))
    assert rows[0]["type"] == "job_pending"
    typed = run(
        "events",
        "ft-run",
        "--type",
        "checkpoint_save",
        "--format",
        "json",
        "--database-url",
        url,
        cwd=tmp_path,
    )
    assert [r["type"] for r in json.loads(typed.stdout)] == ["CHECKPOINT_SAVE"]
    latest = run(
        "events", "ft-done", "--limit", "2", "--format", "csv", "--database-url", url, cwd=tmp_path
    )
    table = list(csv.DictReader(io.StringIO(latest.stdout)))
    assert [r["seq"] for r in table] == ["6", "7"]
    since = run(
        "events",
        "ft-done",
        "--since",
        "2026-11-02T09:10:00Z",
        "--format",
        "json",
        "--database-url",
        url,
        cwd=tmp_path,
    )
    assert [r["seq"] for r in json.loads(since.stdout)] == [6, 7]
    recent = run(
        "events",
        "ft-done",
        "--since",
        "1h",
        "--format",
        "json",
        "--database-url",
        url,
        cwd=tmp_path,
    )
    assert json.loads(recent.stdout) == []


def test_events_errors(url: str, tmp_path: Path) -> None:
    """An unknown job and a bad --since are one-line errors."""
    unknown = run("events", "ft-nope", "--database-url", url, cwd=tmp_path)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error: no events stored for job ft-nope")
    bad = run("events", "ft-done", "--since", "last tuesday", "--database-url", url, cwd=tmp_path)
    assert bad.returncode == 2
    assert "--since 'last tuesday'" in bad.stderr


@pytest.mark.parametrize("fmt", ["jsonl", "table"])
def test_events_follow(
    fake: FakeTogether, engine: Engine, url: str, tmp_path: Path, fmt: str
) -> None:
    """--follow prints new events as they are stored, in rows that line up with the table's
    first ones, and Ctrl-C ends it cleanly. Its output is read with a ceiling: a follow that
    printed nothing would fail here, not hang."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    proc = subprocess.Popen(
        [EVENTSYNC, "events", "ft-run", "--follow", "--format", fmt, "--database-url", url],
        cwd=tmp_path,
        env=base,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = Lines(proc.stdout)
    try:
        first = [lines.next() for _ in range(5 if fmt == "table" else 4)]
        fake.api_key = API_KEY  # the sync below may call the API; the follow must not
        fake.add_events(
            "ft-run",
            # Narrower than what came before, so that only columns kept from the
            # first rows can line up.
            [make_event("ft-run", 50, type="EVAL", message="Saved step 50", step=7)],
        )
        sync_pass(fake, engine, ["ft-run"])
        new = lines.next()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=EVENTUALLY)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err = proc.stderr.read() if proc.stderr else ""
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    if fmt == "jsonl":
        assert [json.loads(line)["seq"] for line in first] == [1, 2, 3, 4]
        assert json.loads(new)["message"] == "Saved step 50"
    else:
        header = first[0]
        assert header.split() == ["seq", *reads.TIMELINE_COLUMNS[1:]]
        assert new.split()[0] == "5"
        for column in ("type", "level", "step", "message"):
            assert new[header.index(column) - 1] == " ", column  # starts where its header does
        assert new[header.index("message") :].startswith("Saved step 50")
    assert code == 0
    assert "Traceback" not in err


def test_sql_reads(url: str, tmp_path: Path) -> None:
    """A query's answer as a table, JSON or CSV; % in the SQL is just a character."""
    result = run(
        "sql",
        "SELECT job_id, status FROM fine_tune_job_summary WHERE job_id LIKE 'ft-%' ORDER BY job_id",
        "--format",
        "json",
        "--database-url",
        url,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"job_id": "ft-done", "status": "completed"},
        {"job_id": "ft-fail", "status": "error"},
        {"job_id": "ft-run", "status": "running"},
    ]
    as_csv = run(
        "sql",
        "SELECT count(*) AS n FROM fine_tune_events",
        "--format",
        "csv",
        "--database-url",
        url,
        cwd=tmp_path,
    )
    assert as_csv.stdout.splitlines() == ["n", "14"]


@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM fine_tune_events",
        "UPDATE sync_state SET status = 'x'",
        "DROP TABLE fine_tune_events",
        "PRAGMA journal_mode = DELETE",
        "WITH gone AS (DELETE FROM fine_tune_events RETURNING 1) SELECT count(*) FROM gone",
    ],
)
def test_sql_refuses_writes(url: str, engine: Engine, tmp_path: Path, query: str) -> None:
    """Anything that could write is refused, up front or by the read-only transaction."""
    result = run("sql", query, "--database-url", url, cwd=tmp_path)
    assert result.returncode in (1, 2)
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM fine_tune_events")).scalar_one() == 14


def test_read_commands_never_call_the_api(url: str, fake: FakeTogether, tmp_path: Path) -> None:
    """status, events and sql make no request at all."""
    before = len(fake.arrivals)
    for args in (["status"], ["events", "ft-done"], ["sql", "SELECT 1"]):
        assert run(*args, "--database-url", url, cwd=tmp_path).returncode == 0
    # Each has exited, and a request it had made would have reached the fake before that.
    assert len(fake.arrivals) == before


# -- the read commands open the database read-only, and never create or migrate it ----------

READ_COMMANDS = [
    ("status",),
    ("events", "ft-done"),
    ("events", "ft-done", "--follow"),
    ("sql", "SELECT 1"),
    ("jobs", "list"),
]
HOW_TO_CREATE = "run `eventsync sync` or `eventsync db upgrade` first"


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_read_commands_create_nothing(tmp_path: Path, command: tuple[str, ...]) -> None:
    """A missing database file or folder (a typo, the wrong folder) is one line saying what
    to run, exit 1, and nothing is created on disk."""
    (tmp_path / "data").mkdir()
    for given, shown in (
        (f"sqlite:///{tmp_path}/data/typo.db", f"{tmp_path}/data/typo.db"),
        (
            f"sqlite:///{tmp_path}/no/such/folder/eventsync.db",
            f"{tmp_path}/no/such/folder/eventsync.db",
        ),
        (None, "eventsync.db"),  # the default, in the working folder
    ):
        url = ["--database-url", given] if given else []
        result = run(*command, *url, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr == f"error: no eventsync database at {shown}: {HOW_TO_CREATE}\n"
        assert tree(tmp_path) == ["data"]


def schema_at(db_url: str, revision: str | None) -> None:
    """Leave the database empty (None), at an older revision, or at one unknown to us."""
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            if revision in ("0002", "f00d"):
                alembic.upgrade(migrate.alembic_config(conn), "0002")
                conn.commit()
            if revision == "f00d":
                conn.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
                conn.commit()
    finally:
        engine.dispose()


@pytest.mark.parametrize("revision", [None, "0002", "f00d"])
def test_read_commands_never_migrate(db_url: str, tmp_path: Path, revision: str | None) -> None:
    """An empty database, an older schema (which they used to migrate), or a newer one:
    one line saying what to run, exit 1, and the schema is left as it was."""
    schema_at(db_url, revision)
    where = make_url(db_url)
    shown = (
        where.database
        if where.get_backend_name() == "sqlite"
        else where.render_as_string(hide_password=True)
    )
    expected = {
        None: f"no eventsync database at {shown}: {HOW_TO_CREATE}",
        "0002": "the database is at schema revision 0002, this eventsync needs "
        f"{db.HEAD}: run `eventsync db upgrade`",
        "f00d": "the database is at schema revision f00d, which this eventsync "
        f"(newest revision {db.HEAD}) does not know: upgrade eventsync",
    }[revision]
    for command in READ_COMMANDS:
        result = run(*command, "--database-url", db_url, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (1, f"error: {expected}\n"), command
    engine = db.make_engine(db_url)
    try:
        assert db.current_revision(engine) == revision
    finally:
        engine.dispose()


def test_reads_a_wal_database_held_open_and_one_closed_cleanly(
    fake: FakeTogether, tmp_path: Path
) -> None:
    """A read-only open works on a SQLite file that a running sync or daemon holds open
    (its rows still in the -wal file, a -shm beside it) and on one that was closed cleanly
    (no -wal, no -shm): the -shm is where readers of a WAL database meet the writer."""
    path = tmp_path / "eventsync.db"
    url = f"sqlite:///{path}"
    writer = db.make_engine(url)
    migrate.upgrade(writer)
    load(fake)
    sync_pass(fake, writer, ["ft-done", "ft-run", "ft-fail"])
    wal = path.with_name("eventsync.db-wal")
    try:
        with writer.connect():  # the daemon is still running
            assert wal.stat().st_size > 0
            held = run("status", "--format", "json", "--database-url", url, cwd=tmp_path)
            assert held.returncode == 0, held.stderr
            assert len(json.loads(held.stdout)) == 3
    finally:
        writer.dispose()
    assert not wal.exists()
    closed = run("status", "--format", "json", "--database-url", url, cwd=tmp_path)
    assert closed.returncode == 0, closed.stderr
    assert len(json.loads(closed.stdout)) == 3
