"""Docs that can't rot: every README SQL example runs, and docker-compose.yml is well formed."""

from __future__ import annotations

import os
import re
import subprocess

import yaml

from tests.helpers import REPO
from tests.test_cli import EVENTSYNC

README = (REPO / "README.md").read_text()


def test_every_readme_sql_block_is_a_tested_cookbook_entry() -> None:
    """No SQL in the README escapes the tests: each block is in the cookbook test_cookbook
    runs and checks."""
    from tests.test_cookbook import cookbook

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
