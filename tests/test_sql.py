"""eventsync sql: one read statement per call, refused writes, a timeout the server enforces,
and a cap on the rows it reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from eventsync import db, reads
from eventsync.errors import QueryError, QueryRefused
from tests.helpers import EVENTSYNC, run, wait_until

EVENTS = "SELECT count(*) FROM fine_tune_events"
STORED = 14  # events in tests/history.py


def stored(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(EVENTS)).scalar_one())


@pytest.fixture
def reader(url: str) -> Iterator[Engine]:
    """A read-only engine on the known history, as the read commands open it."""
    engine = db.open_reader(url)
    yield engine
    engine.dispose()


def query(engine: Engine, sql: str, *, timeout: float = 30, max_rows: int = 100) -> list[tuple]:
    return reads.read_only_query(engine, sql, timeout=timeout, max_rows=max_rows).rows


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1; DELETE FROM fine_tune_events",
        "SELECT 1; DROP TABLE fine_tune_events",
        # On Postgres today's code runs the COMMIT, then the DELETE outside the read-only
        # transaction.
        "SELECT 1;\nCOMMIT; DELETE FROM fine_tune_events",
        "SELECT 1; COMMIT; COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
    ],
)
def test_sql_runs_one_statement_only(url: str, engine: Engine, tmp_path: Path, sql: str) -> None:
    """Text after the first statement is refused with one line, and none of it runs."""
    marker = Path(f"/tmp/eventsync-{uuid.uuid4().hex}")
    result = run("sql", sql.format(marker=marker), "--database-url", url, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "error: eventsync sql runs one statement per call: remove what follows the first `;`\n"
    )
    assert stored(engine) == STORED
    assert not marker.exists()


@pytest.mark.parametrize(
    "sql",
    [
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "START TRANSACTION READ WRITE",
        "COPY fine_tune_events TO STDOUT",
        "COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
        "DO $$ BEGIN DELETE FROM fine_tune_events; END $$",
        "SET default_transaction_read_only = off",
        "RESET ALL",
        "PRAGMA query_only = OFF",
        "ATTACH 'elsewhere.db' AS elsewhere",
        "VACUUM INTO 'copy.db'",
        "CALL anything()",
        "EXPLAIN ANALYZE SELECT 1",
        "explain /* a comment */ analyse select 1",
        "EXPLAIN (FORMAT JSON, ANALYZE) SELECT 1",
        'EXPLAIN (U&"\\0061nalyze") SELECT 1',
        "-- only a comment",
        ";",
        "",
    ],
)
def test_sql_refuses_what_is_not_a_read(
    reader: Engine, sql: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Transaction control, COPY, DO, SET, PRAGMA, ATTACH, EXPLAIN ANALYZE... are refused
    before they reach the database, with a one-line reason, and create no file."""
    monkeypatch.chdir(tmp_path)  # where ATTACH and VACUUM INTO would create theirs
    before = set(tmp_path.iterdir())
    marker = Path(f"/tmp/eventsync-{uuid.uuid4().hex}")
    with pytest.raises(QueryRefused) as refused:
        query(reader, sql.format(marker=marker))
    assert "\n" not in str(refused.value)
    assert not marker.exists()
    assert set(tmp_path.iterdir()) == before


def test_sql_refusal_is_one_line_exit_2(url: str, tmp_path: Path) -> None:
    """On the command line a refusal is one line on stderr, exit 2, and creates no file."""
    result = run("sql", "ATTACH 'elsewhere.db' AS x", "--database-url", url, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: eventsync sql runs one read-only query")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "elsewhere.db").exists()


@pytest.mark.parametrize(
    "sql",
    [
        "WITH gone AS (DELETE FROM fine_tune_events RETURNING 1) SELECT count(*) FROM gone",
        "WITH x AS (SELECT 1) DELETE FROM fine_tune_events",
        "SELECT * INTO copied FROM fine_tune_events",
        "SELECT nextval('fine_tune_events_id_seq')",
    ],
)
def test_sql_writes_that_slip_through_are_refused_by_the_database(
    reader: Engine, engine: Engine, sql: str
) -> None:
    """A statement that starts like a read but writes fails in the database itself."""
    with pytest.raises(QueryError) as failed:
        query(reader, sql)
    assert not isinstance(failed.value, QueryRefused)
    assert stored(engine) == STORED


def test_sql_session_changes_die_with_the_connection(url: str, engine: Engine) -> None:
    """Nothing a query does to its session outlives it: set_config(...) is rolled back, and
    the connection is thrown away after each query, never handed back to the pool, so not
    even a session-level advisory lock (which a rollback keeps) stays held."""
    if engine.dialect.name != "postgresql":
        pytest.skip("session state is Postgres's")
    key = uuid.uuid4().int % 2**31
    reader = db.open_reader(url)
    try:
        answer = query(reader, "SELECT set_config('default_transaction_read_only', 'off', false)")
        assert answer == [("off",)]
        assert query(reader, f"SELECT pg_advisory_lock({key})") == [("",)]
        with reader.connect() as conn:
            assert conn.exec_driver_sql("SHOW default_transaction_read_only").scalar() == "on"
            assert conn.exec_driver_sql("SHOW transaction_read_only").scalar() == "on"
        with engine.connect() as conn:
            held = conn.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :k"),
                {"k": key},
            )
            assert held.scalar_one() == 0
    finally:
        reader.dispose()


@pytest.mark.parametrize(
    ("sql", "postgres_only"),
    [
        (f"-- how many?\n{EVENTS}", False),
        (f"/* how many? */ {EVENTS}", False),
        (f"{EVENTS};", False),
        (f"{EVENTS}; -- trailing\n/* and more */", False),
        (f"SELECT*FROM ({EVENTS}) AS c", False),
        (f"WITH c AS ({EVENTS}) SELECT * FROM c", False),
        (f"VALUES (({EVENTS}))", False),
        (f"({EVENTS})", True),
        (f"/* a /* nested */ comment */ ( ({EVENTS}) )", True),
    ],
)
def test_sql_accepts_reads(reader: Engine, sql: str, postgres_only: bool, engine: Engine) -> None:
    """Reads that start with a comment, a parenthesis, SELECT* (no space), WITH or VALUES,
    with a trailing ; and comments, are run."""
    if postgres_only and engine.dialect.name != "postgresql":
        pytest.skip("SQLite's grammar has no parenthesised query at the top")
    assert query(reader, sql) == [(STORED,)]


def test_sql_explain_and_table(reader: Engine) -> None:
    """EXPLAIN (without ANALYZE) shows a plan; TABLE reads a table on Postgres."""
    plan = query(reader, "EXPLAIN SELECT * FROM fine_tune_events")
    assert plan
    if reader.dialect.name == "postgresql":
        assert query(reader, "EXPLAIN (COSTS OFF) SELECT 1") == [("Result",)]
        assert len(query(reader, "TABLE fine_tune_events")) == STORED
    else:
        assert query(reader, "EXPLAIN QUERY PLAN SELECT * FROM fine_tune_events")


def test_sql_columns_of_an_empty_answer(reader: Engine) -> None:
    """A query with no rows still names its columns (Postgres' streaming drops them)."""
    result = reads.read_only_query(
        reader,
        "SELECT job_id, status AS state FROM sync_state WHERE job_id = 'none'",
        timeout=30,
        max_rows=10,
    )
    assert (result.columns, result.rows, result.cut) == (["job_id", "state"], [], False)


FOREVER = {
    "postgresql": "SELECT pg_sleep(600) /* {tag} */",
    "sqlite": "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) "
    "SELECT count(*) FROM c /* {tag} */",
}


def test_sql_timeout(url: str, engine: Engine, tmp_path: Path) -> None:
    """A query past --timeout is stopped: one line, exit 1; on Postgres nothing is left
    running on the server."""
    tag = uuid.uuid4().hex
    sql = FOREVER[engine.dialect.name].format(tag=tag)
    result = run("sql", sql, "--timeout", "1", "--database-url", url, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "error: query failed: the query ran past --timeout 1 s and was stopped\n"
    )
    if engine.dialect.name == "postgresql":
        assert running(engine, tag) == 0


def running(engine: Engine, tag: str) -> int:
    """Backends running a query with this tag (but not this one)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE :tag AND pid <> pg_backend_pid()"
                ),
                {"tag": f"%{tag}%"},
            ).scalar_one()
        )


def test_sql_timeout_outlives_a_killed_client(url: str, engine: Engine) -> None:
    """kill -9 of the client leaves no query running on Postgres past the timeout: the
    server enforces it (without it, pg_sleep(600) would run for ten minutes)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("a killed SQLite client takes its query with it")
    tag = uuid.uuid4().hex
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    client = subprocess.Popen(
        [EVENTSYNC, "sql", FOREVER["postgresql"].format(tag=tag), "--timeout", "3"],
        env={**base, "EVENTSYNC_DATABASE_URL": url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: running(engine, tag) == 1, timeout=60)
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=10)
        wait_until(lambda: running(engine, tag) == 0, timeout=60)
    finally:
        client.kill()
        client.wait()


def test_sql_max_rows(url: str, tmp_path: Path) -> None:
    """--max-rows N prints N rows and a note on stderr when there were more; none when not."""
    sql = "SELECT seq FROM fine_tune_events WHERE job_id = 'ft-done' ORDER BY seq"
    cut = run("sql", sql, "--max-rows", "3", "--format", "csv", "--database-url", url, cwd=tmp_path)
    assert cut.returncode == 0, cut.stderr
    assert cut.stdout.splitlines() == ["seq", "1", "2", "3"]
    assert cut.stderr == "note: showing the first 3 rows; more were cut: use --max-rows\n"
    whole = run(
        "sql", sql, "--max-rows", "7", "--format", "csv", "--database-url", url, cwd=tmp_path
    )
    assert whole.stdout.splitlines() == ["seq", "1", "2", "3", "4", "5", "6", "7"]
    assert whole.stderr == ""


MANY_ROWS = {
    "postgresql": "SELECT generate_series(1, 5000000) AS n",
    "sqlite": "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 5000000) "
    "SELECT n FROM c",
}
# Runs a command and prints its peak RSS in KiB, alone among this process's children.
PEAK_RSS = (
    "import resource, subprocess, sys; "
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "sys.stdout.write(done.stdout); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def peak_rss(*args: str, url: str) -> tuple[list[str], int]:
    """The command's stdout lines and its peak RSS in MiB."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, EVENTSYNC, *args],
        env={**base, "EVENTSYNC_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    *lines, rss = done.stdout.splitlines()
    return lines, int(rss) // 1024


def test_sql_row_cap_bounds_memory(url: str, engine: Engine) -> None:
    """Rows are streamed and reading stops after the cap: five million rows with
    --max-rows 10 take no more memory than SELECT 1 (fetching them all takes hundreds of MB)."""
    baseline, baseline_mib = peak_rss("sql", "SELECT 1", "--format", "csv", url=url)
    assert baseline == ["?column?" if engine.dialect.name == "postgresql" else "1", "1"]
    sql = MANY_ROWS[engine.dialect.name]
    rows, mib = peak_rss("sql", sql, "--max-rows", "10", "--format", "csv", url=url)
    assert rows == ["n", *map(str, range(1, 11))]
    assert mib < baseline_mib + 40, (mib, baseline_mib)


def test_reader_refuses_writes_even_outside_eventsync_sql(reader: Engine, engine: Engine) -> None:
    """The engine the read commands use can't write, whatever runs on it: a bug included."""
    with reader.connect() as conn, pytest.raises(SQLAlchemyError, match=r"read-?only"):
        conn.execute(text("DELETE FROM fine_tune_events"))
    autocommit = reader.execution_options(isolation_level="AUTOCOMMIT")
    with autocommit.connect() as conn, pytest.raises(SQLAlchemyError, match=r"read-?only"):
        conn.execute(text("UPDATE sync_state SET status = 'x'"))
    assert stored(engine) == STORED
