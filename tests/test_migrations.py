"""Alembic: upgrade, check and downgrade from the repo root, and from code, on both databases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from eventsync import db, migrate, views
from tests.helpers import REPO

ALEMBIC = [sys.executable, "-m", "alembic"]


def alembic(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EVENTSYNC_DATABASE_URL": db_url}
    return subprocess.run(
        [*ALEMBIC, *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )


def test_alembic_upgrade_check_downgrade(db_url: str) -> None:
    """`alembic upgrade head`, `alembic check` and `alembic downgrade base` all pass."""
    up = alembic(db_url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    check = alembic(db_url, "check")
    assert check.returncode == 0, check.stderr + check.stdout
    assert "No new upgrade operations detected" in check.stdout + check.stderr
    engine = db.make_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"fine_tune_events", "sync_state", "alembic_version"} <= tables
        indexes = {i["name"] for i in inspect(engine).get_indexes("fine_tune_events")}
        assert {"ix_fine_tune_events_job_id_created_at", "ix_fine_tune_events_type"} <= indexes
        down = alembic(db_url, "downgrade", "base")
        assert down.returncode == 0, down.stderr
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_from_code_is_idempotent(db_url: str) -> None:
    """db.upgrade migrates an empty database once, then reports it is already at head."""
    engine = db.make_engine(db_url)
    try:
        assert migrate.upgrade(engine) == (None, db.HEAD)
        assert migrate.upgrade(engine) == (db.HEAD, db.HEAD)
        assert db.current_revision(engine) == db.HEAD
    finally:
        engine.dispose()


def test_raw_is_jsonb_on_postgres_and_no_enums(db_url: str) -> None:
    """raw is JSONB on Postgres; type and level are plain text columns with no CHECKs."""
    engine = db.make_engine(db_url)
    try:
        migrate.upgrade(engine)
        columns = {c["name"]: c for c in inspect(engine).get_columns("fine_tune_events")}
        assert inspect(engine).get_check_constraints("fine_tune_events") == []
        if engine.dialect.name == "postgresql":
            assert type(columns["raw"]["type"]).__name__ == "JSONB"
            assert inspect(engine).get_enums() == []
        assert "VARCHAR" in str(columns["type"]["type"]).upper()
        assert "VARCHAR" in str(columns["level"]["type"]).upper()
        unique = {
            tuple(u["column_names"])
            for u in inspect(engine).get_unique_constraints("fine_tune_events")
        }
        assert ("job_id", "event_key") in unique
    finally:
        engine.dispose()


def test_migrations_ship_in_the_wheel(tmp_path: Path) -> None:
    """A non-editable install carries migrations/ as eventsync/migrations."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    import zipfile

    (wheel,) = tmp_path.glob("eventsync-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "eventsync/migrations/env.py" in names
    assert "eventsync/migrations/script.py.mako" in names
    versions = sorted(p.name for p in (REPO / "migrations" / "versions").glob("*.py"))
    assert versions
    for name in versions:
        assert f"eventsync/migrations/versions/{name}" in names


def test_migrated_views_are_the_current_definitions(engine: Engine) -> None:
    """The views a fresh database gets from the migrations are those of eventsync/views.py:
    editing a view without a migration (or the reverse) fails here."""
    current = views.definitions(engine.dialect.name)
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            found = dict(
                conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'view'")).all()
            )
            assert {name: _words(sql) for name, sql in found.items()} == {
                name: _words(sql) for name, sql in current.items()
            }
            return
        conn.execute(text("CREATE SCHEMA current_views"))
        conn.execute(text("SET LOCAL search_path = current_views, public"))
        for sql in current.values():
            conn.execute(text(sql))
        query = text(
            "SELECT viewname, pg_get_viewdef(format('%I.%I', schemaname, viewname)::regclass) "
            "FROM pg_views WHERE schemaname = :schema"
        )
        migrated = dict(conn.execute(query, {"schema": "public"}).all())
        defined = dict(conn.execute(query, {"schema": "current_views"}).all())
        conn.execute(text("DROP SCHEMA current_views CASCADE"))
    assert migrated == defined


def _words(sql: str) -> str:
    return " ".join(sql.replace("(", " ( ").replace(")", " ) ").split()).rstrip(";")


def test_the_revisions_eventsync_knows_are_the_migrations() -> None:
    """db.REVISIONS, which read commands check without importing Alembic, lists exactly the
    revisions in migrations/versions, oldest first."""
    script = ScriptDirectory.from_config(migrate.alembic_config())
    assert tuple(reversed([r.revision for r in script.walk_revisions()])) == db.REVISIONS
    assert script.get_current_head() == db.HEAD
