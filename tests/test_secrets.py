"""The API key never appears in output, logs, metrics, --help or the database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
from sqlalchemy import Engine, inspect, text

from eventsync.testing import FakeTogether
from tests.helpers import EVENTSYNC, FAST_RETRY_ENV, SHUTDOWN_CEILING, free_port, wait_until

LEAK = "sk-LEAKCHECK-3b9f1e27c4d0a8e6"


def test_the_key_never_leaks(fake: FakeTogether, engine: Engine, tmp_path: Path) -> None:
    """Every command, success and failure, daemon logs, metrics, and the whole database."""
    fake.api_key = LEAK
    fake.add_job("ft-ok", events=5)
    fake.add_job("ft-done", events=3, status="completed")
    url = engine.url.render_as_string(hide_password=False)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    env = {
        **base,
        **FAST_RETRY_ENV,
        "TOGETHER_API_KEY": LEAK,
        "TOGETHER_BASE_URL": fake.base_url,
        "EVENTSYNC_DATABASE_URL": url,
        "COLUMNS": "200",
    }
    seen: list[str] = []

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [EVENTSYNC, *args],
            cwd=tmp_path,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        seen.extend([done.stdout, done.stderr])
        return done

    assert run("sync", "-v", "--job-id", "ft-ok", "--job-id", "ft-done").returncode == 0
    assert run("sync", "--job-id", "ft-missing", "--log-format", "json").returncode == 1
    assert run("sync", "--job-id", "ft-ok", "--base-url", "http://127.0.0.1:9").returncode == 1
    # The API quoting the key back in its error message.
    echo = json.dumps({"error": {"message": f"key {LEAK} is suspended"}}).encode()
    fake.override = lambda path: (403, echo, {}) if "ft-ok" in path else None
    failed = run("sync", "-v", "--job-id", "ft-ok")
    assert failed.returncode == 1
    assert "key *** is suspended" in failed.stderr
    fake.override = None
    fake.inject("status", match="ft-ok/events", status=503)
    fake.inject("reset", match="ft-ok/events")
    assert run("sync", "-v", "--job-id", "ft-ok").returncode == 0
    for command in (
        ["--help"],
        ["sync", "--help"],
        ["run", "--help"],
        ["jobs", "list"],
        ["jobs", "add", "ft-new"],
        ["db", "current"],
        ["db", "upgrade"],
    ):
        run(*command)

    port = free_port()
    log = tmp_path / "daemon.log"
    with log.open("w") as stderr:
        daemon = subprocess.Popen(
            [
                EVENTSYNC,
                "run",
                "--all-jobs",
                "--interval",
                "0.5",
                "--metrics-port",
                str(port),
                "-v",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    try:
        wait_until(lambda: log.read_text().count("pass: ") >= 2)
        seen.append(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        seen.append(httpx.get(f"http://127.0.0.1:{port}/healthz").text)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=SHUTDOWN_CEILING) == 0
    seen.append(log.read_text())

    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f"SELECT * FROM {table}")):
                seen.append(repr(tuple(row)))

    everything = "\n".join(seen)
    assert "ft-ok: 5 new" in everything  # the runs did real work with this key
    assert "eventsync_events_inserted_total" in everything
    assert LEAK not in everything
    assert LEAK[3:15] not in everything  # nor a recognisable part of it


def test_json_logs_redact_tracebacks_and_extra_fields(capsys, monkeypatch, tmp_path: Path) -> None:
    """Even a traceback or an extra field holding the key comes out as *** in JSON mode."""
    import logging

    from eventsync import logs

    monkeypatch.chdir(tmp_path)
    logs.configure("json", secret=LEAK)
    log = logging.getLogger("eventsync.test")
    try:
        raise RuntimeError(f"boom with {LEAK}")
    except RuntimeError:
        log.exception("failed", extra={"detail": LEAK})
    logging.getLogger().handlers.clear()
    line = capsys.readouterr().err.strip()
    record = json.loads(line)
    assert record["message"] == "failed"
    assert "boom with ***" in record["exc_info"]
    assert record["detail"] == "***"
    assert LEAK not in line


QUERY_SECRET = "qs-SECRET-8d2f"


def test_a_password_in_the_query_string_is_never_shown(fake: FakeTogether, tmp_path: Path) -> None:
    """A database that can't be reached is one line naming it, with ?password= and
    ?sslpassword= masked like a password in the user part."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    url = f"postgresql://u@127.0.0.1:9/x?password={QUERY_SECRET}&sslpassword={QUERY_SECRET}-ssl"
    env = {**base, "TOGETHER_API_KEY": "k-12345678", "TOGETHER_BASE_URL": fake.base_url}
    for args in (["db", "upgrade"], ["sync", "-v", "--job-id", "ft-a"], ["status"]):
        done = subprocess.run(
            [EVENTSYNC, *args, "--database-url", url],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1
        assert done.stderr.startswith(
            "error: database postgresql+psycopg://u@127.0.0.1:9/x?password=***&sslpassword=***: "
            "connection failed"
        )
        assert len(done.stderr.splitlines()) == 1
        assert QUERY_SECRET not in done.stdout + done.stderr


def test_db_upgrade_masks_a_password_in_the_query_string(pg_db_url: str, tmp_path: Path) -> None:
    """`db upgrade` names the database it migrated, and its logs, without the password."""
    url = f"{pg_db_url}?password={QUERY_SECRET}"  # the test server trusts any password
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    done = subprocess.run(
        [EVENTSYNC, "db", "upgrade", "-v", "--database-url", url],
        cwd=tmp_path,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{pg_db_url}?password=***: upgraded empty database -> ")
    assert QUERY_SECRET not in done.stdout + done.stderr
