"""The README cookbook, run exactly as written on both databases against a known history,
and served as Datasette canned queries."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from eventsync import migrate, reads
from eventsync.datasette import METADATA
from eventsync.demo import Demo
from eventsync.output import as_utc, parse_since
from eventsync.testing import FakeTogether
from tests.helpers import REPO, cookbook, sync_pass
from tests.history import load

README = REPO / "README.md"

RECENT = object()  # a timestamp written by the sync itself: checked to be recent

EXPECTED: list[list[tuple[Any, ...]]] = [
    [("ft-run", 25, 100, 25.0)],
    [("llama-8b", 2, 45.0), ("mistral-7b", 1, 120.0)],
    [("ft-fail", "CUDA out of memory", "2026-11-03 09:03:00")],
    [
        (20, "s3://ckpt/ft-done/step-20", "2026-11-02 09:05:00"),
        (40, "s3://ckpt/ft-done/final", "2026-11-02 09:13:00"),
    ],
    [("2026-11-02", 11), ("2026-11-03", 3)],
    [("ft-done", "llama-8b", 600.0)],
    [
        (1, "2026-11-02 09:00:00", "job_pending", "Fine tune request created"),
        (2, "2026-11-02 09:01:00", "job_start", "Job started"),
        (3, "2026-11-02 09:02:00", "training_start", "Training started"),
        (4, "2026-11-02 09:05:00", "checkpoint_save", "Saved checkpoint"),
        (5, "2026-11-02 09:09:00", "checkpoint_save", "Saved checkpoint"),
        (6, "2026-11-02 09:12:00", "training_complete", "Training completed"),
        (7, "2026-11-02 09:13:00", "job_complete", "Job finished"),
    ],
    [
        ("checkpoint_save", 3),
        ("job_pending", 3),
        ("job_start", 3),
        ("training_start", 2),
        ("job_complete", 1),
        ("job_error", 1),
        ("training_complete", 1),
    ],
    [
        (
            "ft-missing",
            "not_found",
            "job ft-missing: unknown job, the API has no such job for this key "
            "(HTTP 404: Fine-tune job 'ft-missing' not found)",
            RECENT,
        )
    ],
    [
        ("ft-done", "completed", "job_complete", "Job finished", 7, 2),
        ("ft-fail", "error", "job_error", "CUDA out of memory", 3, 0),
        ("ft-run", "running", "CHECKPOINT_SAVE", "Saved checkpoint", 4, 1),
    ],
    [
        ("llama-8b", 0.0, 3, "ft-done", 1.1, 1.1, 1.3, 1.3),
        ("llama-8b", 0.0, 1, "ft-run", 2.4, 2.3, 2.2, 2.0),
    ],
    [("ft-done", "llama-8b", 1200, 400_000, 3000.0), ("ft-run", "llama-8b", 400, 100_000, 4000.0)],
    [
        ("ft-done", "completed", 60.0, 720.0),
        ("ft-fail", "error", 120.0, 60.0),
        ("ft-run", "running", 30.0, None),
    ],
    [
        ("ft-done", 40, "s3://ckpt/ft-done/final", "2026-11-02 09:13:00"),
        ("ft-run", 25, "s3://ckpt/ft-run/step-25", "2026-11-02 10:10:00"),
    ],
    [("ft-run", "running", 2.0, 5, 25)],
]


def normal(value: Any) -> Any:
    """One spelling per value, whichever database answered."""
    if isinstance(value, datetime):
        return as_utc(value).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", value):
        return value[:19]
    if isinstance(value, float | Decimal):
        return round(float(value), 1)
    return value


def matches(row: tuple[Any, ...], want: tuple[Any, ...]) -> bool:
    got = tuple(normal(v) for v in row)
    if len(got) != len(want):
        return False
    for g, w in zip(got, want, strict=True):
        if w is RECENT:
            if (datetime.now(UTC) - as_utc(str(g))).total_seconds() > 600:
                return False
        elif g != w:
            return False
    return True


def test_the_cookbook_has_at_least_eight_questions() -> None:
    """The README promises a cookbook of at least 8 questions; each has an expected answer."""
    assert len(cookbook()) >= 8
    assert len(cookbook()) == len(EXPECTED)


@pytest.fixture
def known_history(fake: FakeTogether, engine: Engine) -> Engine:
    load(fake)
    sync_pass(fake, engine, ["ft-done", "ft-run", "ft-fail", "ft-missing"])
    return engine


def test_every_cookbook_query_answers_correctly(known_history: Engine) -> None:
    """Each query, as written in the README, gives the known answer on this database."""
    with known_history.connect() as conn:
        for (title, sql), want in zip(cookbook(), EXPECTED, strict=True):
            rows = [tuple(r) for r in conn.execute(text(sql.rstrip(";")))]
            assert len(rows) == len(want), title
            for row, expected in zip(rows, want, strict=True):
                assert matches(row, expected), (title, row, expected)


def test_datasette_metadata_is_the_cookbook() -> None:
    """The canned queries are the README's queries, word for word, in the same order."""
    metadata = json.loads(METADATA.read_text())
    queries = list(metadata["databases"]["eventsync"]["queries"].values())
    assert [(q["title"], q["sql"]) for q in queries] == cookbook()


def test_datasette_serves_the_canned_queries(fake: FakeTogether, tmp_path: Path) -> None:
    """Datasette's own test client runs every canned query on the SQLite file."""
    from datasette.app import Datasette

    from eventsync import db

    target = tmp_path / "eventsync.db"  # the name the metadata's database key expects
    engine = db.make_engine(f"sqlite:///{target}")
    migrate.upgrade(engine)
    load(fake)
    sync_pass(fake, engine, ["ft-done", "ft-run", "ft-fail", "ft-missing"])
    engine.dispose()
    metadata = json.loads(METADATA.read_text())

    async def run() -> list[Any]:
        ds = Datasette([str(target)], metadata=metadata)
        await ds.invoke_startup()
        answers = []
        for name in metadata["databases"]["eventsync"]["queries"]:
            response = await ds.client.get(f"/eventsync/{name}.json?_shape=arrays")
            assert response.status_code == 200, (name, response.text)
            answers.append(response.json()["rows"])
        return answers

    for rows, want in zip(asyncio.run(run()), EXPECTED, strict=True):
        assert len(rows) == len(want)
        for row, expected in zip(rows, want, strict=True):
            assert matches(tuple(row), expected), (row, expected)


def test_every_cookbook_query_answers_against_the_demo(fake: FakeTogether, engine: Engine) -> None:
    """The offline demo shows real life: after its first sync (in which the flaky job
    fails), every README query returns rows, the jobs are completed, failed, cancelled,
    queued and running, `--since 2d` finds events, and running jobs gain events over time."""
    demo = Demo(started=datetime.now(UTC))
    demo.install(fake)
    first = sync_pass(fake, engine, all_jobs=True)
    assert [o.job_id for o in first.outcomes if not o.ok] == ["ft-flaky"]
    with engine.connect() as conn:
        for title, sql in cookbook():
            rows = conn.execute(text(sql.rstrip(";"))).all()
            assert rows, title
        # The one-liners the README passes to `eventsync sql` answer too.
        for sql in re.findall(r'eventsync sql "([^"]+)"', README.read_text()):
            assert conn.execute(text(sql)).all(), sql
        summary = text("SELECT job_id, status FROM fine_tune_job_summary")
        statuses = {job: status for job, status in conn.execute(summary)}
    assert {statuses[j] for j in ("ft-done", "ft-fail", "ft-cancel", "ft-queued")} == {
        "completed",
        "error",
        "cancelled",
        "pending",
    }
    assert {statuses[f"ft-lr-{lr}"] for lr in ("1e-5", "3e-5", "1e-4")} == {"running"}
    with engine.connect() as conn:
        recent = reads.job_timeline(conn, "ft-lr-1e-5", since=parse_since("2d"))
    assert recent
    demo.refresh(fake, now=datetime.now(UTC) + timedelta(minutes=3))
    later = {o.job_id: o for o in sync_pass(fake, engine, all_jobs=True).outcomes}
    assert later["ft-flaky"].ok  # the upstream recovered
    assert all(later[f"ft-lr-{lr}"].new > 0 for lr in ("1e-5", "3e-5", "1e-4"))
    assert later["ft-done"].new == 0
