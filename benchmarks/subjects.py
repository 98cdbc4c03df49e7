"""What is measured: eventsync itself (the same pieces `eventsync sync` composes), and peers."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from typing import Any

from sqlalchemy import Engine

from eventsync import db
from eventsync import migrate as schema
from eventsync.client import TogetherClient, make_http_client
from eventsync.config import Settings
from eventsync.sync import PassResult, plan_jobs, run_pass, tune_gc


def eventsync_pass(
    url: str, base_url: str, key: str, concurrency: int = 8, *, history: bool = False
) -> PassResult:
    """One `eventsync sync --all-jobs` pass, in process, on an already migrated database:
    events only (what the floor and the peers do), or with `history` the jobs' records,
    metrics and checkpoints too."""
    tune_gc()  # as eventsync's main() does
    settings = Settings(
        database_url=url,
        api_key=key,
        base_url=base_url,  # type: ignore[arg-type]
        all_jobs=True,
        concurrency=concurrency,
        history=history,
    )
    engine = db.make_engine(settings.database_url, pool_size=settings.workers)
    try:
        with make_http_client(settings) as http:
            client = TogetherClient.from_settings(http, settings)
            jobs = plan_jobs(client, engine, [], all_jobs=True, history=history)
            result = run_pass(client, engine, jobs, concurrency=concurrency, history=history)
    finally:
        engine.dispose()
    if not result.ok:
        raise RuntimeError(f"eventsync pass failed: {result.outcomes[0].error}")
    return result


def migrate(url: str) -> Engine:
    engine = db.make_engine(url)
    schema.upgrade(engine)
    return engine


def sdk_loop(path: str, base_url: str, key: str, job_ids: list[str]) -> int:
    """The official `together` SDK in a loop, insert-or-ignore into SQLite."""
    import together

    client = together.Together(api_key=key, base_url=base_url, max_retries=0)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS sdk_events (job_id, hash, created_at, type, message,"
        " step, raw, PRIMARY KEY (job_id, hash))"
    )
    total = 0
    for job_id in job_ids:
        events = client.fine_tuning.list_events(job_id).data
        db.executemany(
            "INSERT OR IGNORE INTO sdk_events VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (job_id, e.hash, e.created_at, e.type, e.message, e.step, e.model_dump_json())
                for e in events
            ],
        )
        db.commit()
        total += len(events)
    db.close()
    client.close()
    return total


def dlt_pipeline(url: str, base_url: str, key: str, job_ids: list[str], workdir: str) -> int:
    """A dlt pipeline merging on (job_id, hash), into SQLite (sqlalchemy) or Postgres."""
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "ERROR")
    import dlt
    import httpx

    @dlt.resource(name="events", write_disposition="merge", primary_key=("job_id", "hash"))
    def events() -> Any:
        with httpx.Client(
            base_url=base_url + "/v1", timeout=60, headers={"Authorization": f"Bearer {key}"}
        ) as http:
            for job_id in job_ids:
                data = http.get(f"/fine-tunes/{job_id}/events").json()["data"]
                yield [{**e, "job_id": job_id} for e in data]

    if url.startswith("sqlite"):
        destination = dlt.destinations.sqlalchemy(credentials=url)
    else:
        import getpass

        from sqlalchemy.engine import make_url

        # dlt insists on a user and a password, even where the server trusts the connection.
        parsed = make_url(url)
        parsed = parsed.set(
            drivername="postgresql",
            username=parsed.username or getpass.getuser(),
            password=parsed.password or "unused",
        )
        destination = dlt.destinations.postgres(
            credentials=parsed.render_as_string(hide_password=False)
        )
    pipeline = dlt.pipeline(
        pipeline_name="bench",
        destination=destination,
        dataset_name="bench",
        pipelines_dir=tempfile.mkdtemp(dir=workdir),
    )
    info = pipeline.run(events())
    info.raise_on_failed_jobs()
    return len(job_ids)
