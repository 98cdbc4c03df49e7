"""The floor: the same responses fetched with one keep-alive httpx client, json-decoded, and
bulk-inserted with the bare driver into a table of the same shape. No validation, no ORM."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg

COLUMNS = (
    "job_id",
    "seq",
    "hash",
    "object",
    "created_at",
    "level",
    "message",
    "type",
    "param_count",
    "token_count",
    "total_steps",
    "wandb_url",
    "step",
    "checkpoint_path",
    "model_path",
    "training_offset",
    "raw",
)
FIELDS = COLUMNS[3:-1]


def fetched(
    base_url: str, key: str, job_ids: list[str], concurrency: int
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Each job's decoded events; `concurrency` requests in flight on one pooled client."""
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(
        base_url=base_url + "/v1", headers=headers, limits=limits, timeout=60
    ) as http:

        def get(job_id: str) -> tuple[str, list[dict[str, Any]]]:
            return job_id, json.loads(http.get(f"/fine-tunes/{job_id}/events").content)["data"]

        with ThreadPoolExecutor(concurrency) as pool:
            yield from pool.map(get, job_ids)


def _rows(job_id: str, events: list[dict[str, Any]]) -> Iterator[tuple[Any, ...]]:
    for seq, e in enumerate(events, 1):
        yield (job_id, seq, e.get("hash"), *(e.get(f) for f in FIELDS), json.dumps(e))


def fetch_only(base_url: str, key: str, job_ids: list[str], concurrency: int) -> int:
    return sum(len(events) for _, events in fetched(base_url, key, job_ids, concurrency))


def sqlite_floor(path: str, base_url: str, key: str, job_ids: list[str], concurrency: int) -> int:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"CREATE TABLE IF NOT EXISTS floor_events ({', '.join(COLUMNS)})")
    placeholders = ", ".join("?" for _ in COLUMNS)
    total = 0
    for job_id, events in fetched(base_url, key, job_ids, concurrency):
        db.executemany(f"INSERT INTO floor_events VALUES ({placeholders})", _rows(job_id, events))
        db.commit()
        total += len(events)
    db.close()
    return total


def postgres_floor(url: str, base_url: str, key: str, job_ids: list[str], concurrency: int) -> int:
    total = 0
    with psycopg.connect(url) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS floor_events (job_id text, seq int, hash text, "
            "object text, created_at text, level text, message text, type text, "
            "param_count bigint, token_count bigint, total_steps bigint, wandb_url text, "
            "step bigint, checkpoint_path text, model_path text, training_offset bigint, "
            "raw jsonb)"
        )
        db.commit()
        for job_id, events in fetched(base_url, key, job_ids, concurrency):
            with (
                db.cursor() as cur,
                cur.copy(f"COPY floor_events ({', '.join(COLUMNS)}) FROM STDIN") as copy,
            ):
                for row in _rows(job_id, events):
                    copy.write_row(row)
            db.commit()
            total += len(events)
    return total


def main(argv: list[str]) -> None:
    """`python -m benchmarks.floor sqlite|postgres TARGET BASE_URL KEY JOB...`: the floor as
    a whole process, start-up included, as `eventsync sync` is timed."""
    kind, target, base_url, key, *job_ids = argv
    insert = sqlite_floor if kind == "sqlite" else postgres_floor
    print(insert(target, base_url, key, job_ids, 8))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
