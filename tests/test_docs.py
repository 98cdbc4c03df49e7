"""Docs that can't rot: every README SQL example runs, and docker-compose.yml is well formed."""

from __future__ import annotations

import os
import re
import subprocess

import yaml
from sqlalchemy import Engine, text

from eventsync.fakeapi import FakeTogether
from tests.helpers import REPO, sync_pass
from tests.test_cli import EVENTSYNC

README = (REPO / "README.md").read_text()


def readme_queries() -> list[str]:
    """Each statement of each ```sql block in the README, as written."""
    blocks = re.findall(r"```sql\n(.*?)```", README, flags=re.S)
    statements = [s.strip() for block in blocks for s in block.split(";\n")]
    return [s.rstrip(";") for s in statements if (s and not s.startswith("--")) or "\n" in s]


def test_readme_has_sql_examples() -> None:
    """The README shows at least four queries."""
    assert len(readme_queries()) >= 4


def test_every_readme_query_runs_and_answers(fake: FakeTogether, engine: Engine) -> None:
    """Against a small history (one job failing), every README query returns rows."""
    fake.add_job("ft-demo-0000", events=8)
    fake.add_job("ft-demo-0001", events=3, generation="2026-08")
    sync_pass(fake, engine, ["ft-demo-0000", "ft-demo-0001", "ft-missing"])
    with engine.connect() as conn:
        for query in readme_queries():
            rows = conn.execute(text(query)).all()
            assert rows, query
    with engine.connect() as conn:
        timeline = conn.execute(text(readme_queries()[1])).all()
    assert [r.seq for r in timeline] == list(range(1, 9))
    assert [r.message for r in timeline] == [e["message"] for e in fake.jobs["ft-demo-0000"].events]


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
