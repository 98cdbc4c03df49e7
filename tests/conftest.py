"""Shared setup: the fake Together API on loopback, and one fresh database per test.

Database tests run twice, on a SQLite file and on Postgres. Postgres comes from
EVENTSYNC_TEST_POSTGRES_URL (default postgresql+psycopg://127.0.0.1:5432/test); each test gets
its own database. If Postgres can't be reached the Postgres cases are skipped with the reason,
unless EVENTSYNC_REQUIRE_POSTGRES=1, which turns that skip into a failure.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import stamina
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from eventsync import db, migrate
from eventsync.client import make_http_client
from eventsync.testing import FakeTogether
from tests.helpers import (
    API_KEY,
    ATTEMPTS,
    EVENTSYNC,
    FAST_RETRY_ENV,
    INTERVAL,
    DaemonProcess,
    free_port,
    make_settings,
    serving,
    sync_pass,
    wait_until,
)
from tests.history import load

DEFAULT_PG = "postgresql+psycopg://127.0.0.1:5432/test"


@pytest.fixture(autouse=True)
def _retries_without_waits() -> Iterator[None]:
    """eventsync's retries run as in production, in stamina's testing mode: no waits, and
    ATTEMPTS tries. Subprocesses get short waits from FAST_RETRY_ENV instead."""
    stamina.set_testing(True, attempts=ATTEMPTS)
    yield
    stamina.set_testing(False)


@pytest.fixture
def real_retries() -> None:
    """stamina's real waits and stop conditions, for tests of the waits themselves."""
    stamina.set_testing(False)


@pytest.fixture(scope="session")
def _fake_server() -> Iterator[FakeTogether]:
    fake = FakeTogether(api_key=API_KEY)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(_fake_server: FakeTogether) -> Iterator[FakeTogether]:
    """The fake API, emptied for this test."""
    _fake_server.reset()
    yield _fake_server
    _fake_server.reset()


def _pg_admin_url() -> str:
    return os.environ.get("EVENTSYNC_TEST_POSTGRES_URL") or DEFAULT_PG


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the admin database, or None when Postgres is unreachable."""
    engine = create_engine(_pg_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        engine.dispose()
        reason = f"Postgres at {make_url(_pg_admin_url()).render_as_string()} unreachable: {exc}"
        if os.environ.get("EVENTSYNC_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"EVENTSYNC_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)  # only the Postgres cases use this fixture
    yield engine
    engine.dispose()


def _new_pg_database(admin: Engine) -> Iterator[str]:
    name = f"es_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(_pg_admin_url()).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to a fresh, empty database: a SQLite file, then a new Postgres database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'eventsync.db'}"
    else:
        admin = request.getfixturevalue("pg_admin")
        yield from _new_pg_database(admin)


@pytest.fixture
def pg_db_url(pg_admin: Engine) -> Iterator[str]:
    """A fresh Postgres database, for tests of Postgres-only faults."""
    yield from _new_pg_database(pg_admin)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on the fresh database, migrated to head."""
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def url(fake: FakeTogether, engine: Engine) -> str:
    """A database holding the known history (tests/history.py), for the read commands."""
    load(fake)
    sync_pass(fake, engine, ["ft-done", "ft-run", "ft-fail"])
    fake.api_key = "the-read-commands-must-not-call-the-api"
    return engine.url.render_as_string(hide_password=False)


@pytest.fixture
def http_client(fake: FakeTogether) -> Iterator[httpx.Client]:
    settings = make_settings(fake, "sqlite:///unused.db")
    with make_http_client(settings) as http:
        yield http


@pytest.fixture
def api_env(fake: FakeTogether) -> dict[str, str]:
    return {"TOGETHER_API_KEY": API_KEY, "TOGETHER_BASE_URL": fake.base_url}


@pytest.fixture
def run_daemon(fake: FakeTogether, tmp_path: Path) -> Iterator[object]:
    """Start `eventsync run` on a database URL, against the fake; killed at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(url: str, *args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        port = free_port()
        log = tmp_path / f"daemon-{len(procs)}.log"
        base = {
            k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))
        }
        with log.open("w") as stderr:
            proc = subprocess.Popen(
                [EVENTSYNC, "run", "--metrics-port", str(port), "--database-url", url, *args],
                cwd=tmp_path,
                env={
                    **base,
                    **FAST_RETRY_ENV,
                    "TOGETHER_API_KEY": API_KEY,
                    "TOGETHER_BASE_URL": fake.base_url,
                    **(env or {}),
                },
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                text=True,
            )
        procs.append(proc)
        return DaemonProcess(proc, port, log)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def start_daemon(engine: Engine, run_daemon) -> object:
    """Start `eventsync run` on the test's database, every INTERVAL; returns once it serves."""

    def start(*args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        url = engine.url.render_as_string(hide_password=False)
        daemon: DaemonProcess = run_daemon(url, "--interval", str(INTERVAL), *args, env=env)
        wait_until(lambda: serving(daemon))
        return daemon

    return start
