"""Docs that can't rot: every README SQL example runs, docker-compose.yml is well formed, and
the read-only role it creates works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid

import pytest
import yaml
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from eventsync import db, migrate
from eventsync.testing import FakeTogether
from tests.helpers import EVENTSYNC, REPO, cookbook, sync_pass

README = (REPO / "README.md").read_text()


def test_every_readme_sql_block_is_a_tested_cookbook_entry() -> None:
    """No SQL in the README escapes the tests: each block is in the cookbook test_cookbook
    runs and checks."""

    blocks = [b.strip() for b in re.findall(r"```sql\n(.*?)```", README, flags=re.S)]
    assert blocks
    assert blocks == [sql for _, sql in cookbook()]


def test_docker_compose_is_well_formed() -> None:
    """Postgres with a healthcheck, eventsync waiting on it, key from the environment."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "eventsync"}
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    app = services["eventsync"]
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthz" in " ".join(app["healthcheck"]["test"])
    assert app["environment"]["TOGETHER_API_KEY"].startswith("${TOGETHER_API_KEY")
    assert app["environment"]["EVENTSYNC_DATABASE_URL"].startswith("postgresql+psycopg://")
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["eventsync"]' in dockerfile
    # The command compose runs exists and takes the settings compose passes.
    command = [EVENTSYNC, *app["command"], "--help"]
    shown = subprocess.run(
        command, capture_output=True, text=True, check=False, env={**os.environ, "COLUMNS": "200"}
    )
    assert shown.returncode == 0, shown.stderr
    assert "--metrics-port" in shown.stdout


READER_SQL = REPO / "docs" / "postgres-reader.sql"


def test_docker_compose_creates_a_read_only_role() -> None:
    """Postgres runs docs/postgres-reader.sql on its first start, which creates the role
    eventsync_reader that the README's Docker example queries through."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = [v.split(":") for v in compose["services"]["postgres"]["volumes"]]
    init = [(src, dst) for src, dst, *_ in mounts if dst.startswith("/docker-entrypoint-initdb.d/")]
    assert init == [
        ("./docs/postgres-reader.sql", "/docker-entrypoint-initdb.d/10-eventsync-reader.sql")
    ]
    sql = READER_SQL.read_text()
    assert "CREATE ROLE eventsync_reader LOGIN;" in sql
    assert "ALTER ROLE eventsync_reader SET default_transaction_read_only = on;" in sql
    assert "docker compose exec postgres psql -U eventsync_reader -d eventsync -c" in README


def test_the_reader_role_reads_and_cannot_write(
    pg_admin: Engine, pg_db_url: str, fake: FakeTogether
) -> None:
    """docs/postgres-reader.sql, run by psql as the docker image runs it (before eventsync
    has migrated), gives a role that can SELECT what eventsync creates later, can't write,
    and serves `eventsync status`."""
    role = f"es_reader_{uuid.uuid4().hex[:10]}"  # roles are cluster-wide: one of our own
    owner = make_url(pg_db_url)
    try:
        psql = subprocess.run(
            [
                "psql",
                "-v",
                "ON_ERROR_STOP=1",
                "--no-psqlrc",
                "-h",
                owner.host or "127.0.0.1",
                "-p",
                str(owner.port or 5432),
                # As the user eventsync migrates as (libpq's default when the URL names none):
                # the default privileges cover the tables that role creates.
                *(["-U", owner.username] if owner.username else []),
                "-d",
                owner.database or "",
                "-f",
                "-",
            ],
            input=READER_SQL.read_text().replace("eventsync_reader", role),
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PGPASSWORD": owner.password or ""},
        )
        assert psql.returncode == 0, psql.stderr
        engine = db.make_engine(pg_db_url)
        migrate.upgrade(engine)
        fake.add_job("ft-a", events=3)
        sync_pass(fake, engine, ["ft-a"])
        engine.dispose()

        as_reader = owner.set(username=role, password=None)
        reader = create_engine(as_reader)
        try:
            with reader.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM fine_tune_events")).scalar() == 3
                assert conn.exec_driver_sql("SHOW transaction_read_only").scalar() == "on"
            for write in (
                "DELETE FROM fine_tune_events",
                "INSERT INTO sync_state (job_id) VALUES ('x')",
            ):
                with reader.connect() as conn, pytest.raises(SQLAlchemyError):
                    conn.execute(text(write))
            with reader.connect() as conn:
                # The read-only default is a second guard; the grants are the first.
                conn.exec_driver_sql("SET default_transaction_read_only = off")
                conn.commit()
                with pytest.raises(SQLAlchemyError, match="permission denied"):
                    conn.execute(text("DELETE FROM fine_tune_events"))
        finally:
            reader.dispose()
        status = subprocess.run(
            [EVENTSYNC, "status", "--format", "json"],
            env={**os.environ, "EVENTSYNC_DATABASE_URL": as_reader.render_as_string(False)},
            capture_output=True,
            text=True,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert [job["job_id"] for job in json.loads(status.stdout)] == ["ft-a"]
    finally:
        with pg_admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role})
            if exists.scalar():
                # Its grants live in the test database and on it: revoke them, then drop it.
                admin_db = create_engine(pg_db_url, isolation_level="AUTOCOMMIT")
                with admin_db.connect() as there:
                    there.exec_driver_sql(f'DROP OWNED BY "{role}"')
                admin_db.dispose()
                conn.exec_driver_sql(f'DROP ROLE "{role}"')


def test_the_readme_shows_the_reader_role_as_shipped() -> None:
    """The role SQL the README shows is the SQL docs/postgres-reader.sql runs (which the test
    above runs against Postgres)."""
    blocks = re.findall(r"```postgresql\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 1
    shipped = READER_SQL.read_text().splitlines()
    shown = [line for line in blocks[0].splitlines() if line]
    assert shown == [line for line in shipped if line and not line.startswith("--")]
