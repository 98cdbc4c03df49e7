"""How far the daemon scales: `eventsync run` replicas on one Postgres, the fake API 50 ms away.

For each number of jobs and of replicas, the time from start until every job has been synced
once (a *round*): how many running jobs one interval can cover. Each replica runs with the
default concurrency of 8.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, func, select

from benchmarks.server import KEY, Server
from eventsync.models import state_table


def round_seconds(url: str, server: Server, replicas: int, jobs: int) -> tuple[float, float]:
    """(seconds from start until all `jobs` were synced once by `replicas` daemons started
    together, seconds from the first job synced to the last): the first includes start-up
    (the processes, the first listing), the second is the work alone."""
    from eventsync import migrate

    engine = create_engine(url)
    migrate.upgrade(engine)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    env = {
        **base,
        "TOGETHER_API_KEY": KEY,
        "TOGETHER_BASE_URL": server.base_url,
        "EVENTSYNC_HISTORY": "false",  # events only, as measured before the history
    }
    exe = str(Path(sys.executable).with_name("eventsync"))
    command = [exe, "run", "--all-jobs", "--interval", "3600", "--metrics-port", "0"]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*command, "--database-url", url],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(replicas)
    ]
    synced = select(func.count()).where(state_table.c.last_synced_at.is_not(None))
    span = select(func.min(state_table.c.last_synced_at), func.max(state_table.c.last_synced_at))
    try:
        while True:
            with engine.connect() as conn:
                if conn.execute(synced).scalar_one() >= jobs:
                    wall = time.perf_counter() - started
                    first, last = conn.execute(span).one()
                    return wall, (last - first).total_seconds()
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a replica exited early")
            time.sleep(0.05)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        engine.dispose()
