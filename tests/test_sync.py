"""sync, writer and state on SQLite and Postgres: exactly once, in order, a transaction a job."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select, text

from eventsync.models import events_table, state_table
from eventsync.sync import PassResult
from eventsync.testing import FakeTogether, install_write_counter, make_event, writes
from tests.helpers import (
    EVENTUALLY,
    event_counts,
    fail_inserts_of,
    fetches,
    sync_pass,
    wait_until,
)


def stored(engine: Engine, job_id: str) -> list[tuple[int, str, str | None]]:
    query = (
        select(events_table.c.seq, events_table.c.hash, events_table.c.message)
        .where(events_table.c.job_id == job_id)
        .order_by(events_table.c.seq)
    )
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(query)]  # type: ignore[misc]


def state(engine: Engine, job_id: str) -> dict[str, object]:
    with engine.connect() as conn:
        row = conn.execute(select(state_table).where(state_table.c.job_id == job_id)).one()
    return dict(row._mapping)


def test_first_sync_stores_every_event_in_server_order(fake: FakeTogether, engine: Engine) -> None:
    """All events of each job land once, and seq replays the server's order."""
    fake.add_job("ft-old", events=30, generation="2026-04")
    fake.add_job("ft-new", events=25, generation="2026-08")
    result = sync_pass(fake, engine, ["ft-old", "ft-new"])
    assert result.ok
    assert [(o.job_id, o.new, o.total) for o in result.outcomes] == [
        ("ft-old", 30, 30),
        ("ft-new", 25, 25),
    ]
    for job_id in ("ft-old", "ft-new"):
        rows = stored(engine, job_id)
        assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
        assert [r[2] for r in rows] == [e["message"] for e in fake.jobs[job_id].events]


def test_second_sync_writes_nothing(fake: FakeTogether, engine: Engine) -> None:
    """A re-poll with nothing new writes zero event rows, counted by triggers in the database."""
    fake.add_job("ft-1", events=40)
    fake.add_job("ft-2", events=40, generation="2026-08")
    sync_pass(fake, engine, ["ft-1", "ft-2"])
    install_write_counter(engine)
    result = sync_pass(fake, engine, ["ft-1", "ft-2"])
    assert result.ok
    assert [(o.new, o.updated, o.total) for o in result.outcomes] == [(0, 0, 40), (0, 0, 40)]
    assert writes(engine) == {}


def test_second_sync_writes_nothing_even_after_losing_the_fingerprint(
    fake: FakeTogether, engine: Engine
) -> None:
    """Without the list fingerprint shortcut, per-event comparison still writes nothing."""
    fake.add_job("ft-1", events=40, generation="2026-08")
    sync_pass(fake, engine, ["ft-1"])
    with engine.begin() as conn:
        conn.execute(text("UPDATE sync_state SET fingerprint = NULL"))
    install_write_counter(engine)
    assert sync_pass(fake, engine, ["ft-1"]).outcomes[0].new == 0
    assert writes(engine) == {}


def test_trickle_adds_only_new_events_after_the_old_ones(
    fake: FakeTogether, engine: Engine
) -> None:
    """New events get the next seq numbers; exactly that many rows are inserted."""
    fake.add_job("ft-1", events=10, generation="2026-08")
    sync_pass(fake, engine, ["ft-1"])
    fake.add_events("ft-1", 3)
    install_write_counter(engine)
    outcome = sync_pass(fake, engine, ["ft-1"]).outcomes[0]
    assert (outcome.new, outcome.total) == (3, 13)
    assert writes(engine) == {"INSERT": 3}
    assert [r[0] for r in stored(engine, "ft-1")] == list(range(1, 14))
    assert state(engine, "ft-1")["event_count"] == 13


def test_changed_content_updates_in_place(fake: FakeTogether, engine: Engine) -> None:
    """An event whose hash is known but whose content changed is updated, seq kept."""
    events = [make_event("ft-1", i) for i in range(5)]
    fake.add_job("ft-1", events=events)
    sync_pass(fake, engine, ["ft-1"])
    events[2] = dict(events[2], message="edited by the server")
    fake.set_events("ft-1", events)
    install_write_counter(engine)
    outcome = sync_pass(fake, engine, ["ft-1"]).outcomes[0]
    assert (outcome.new, outcome.updated, outcome.total) == (0, 1, 5)
    assert writes(engine) == {"UPDATE": 1}
    assert stored(engine, "ft-1")[2] == (3, events[2]["hash"], "edited by the server")


def test_an_event_inserted_before_known_ones_is_seen_last(
    fake: FakeTogether, engine: Engine
) -> None:
    """seq records when an event was first seen, so a late arrival gets the next number."""
    events = [make_event("ft-1", i, generation="2026-08") for i in range(3)]
    fake.add_job("ft-1", events=events[1:])
    sync_pass(fake, engine, ["ft-1"])
    fake.set_events("ft-1", events)
    sync_pass(fake, engine, ["ft-1"])
    assert [r[2] for r in stored(engine, "ft-1")] == [
        events[1]["message"],
        events[2]["message"],
        events[0]["message"],
    ]


def test_same_hash_in_two_jobs_is_two_rows(fake: FakeTogether, engine: Engine) -> None:
    """Uniqueness is per job: (job_id, hash)."""
    shared = make_event("ft-x", 0, hash="same-hash")
    fake.add_job("ft-a", events=[shared])
    fake.add_job("ft-b", events=[shared])
    sync_pass(fake, engine, ["ft-a", "ft-b"])
    assert stored(engine, "ft-a") == [(1, "same-hash", shared["message"])]
    assert stored(engine, "ft-b") == [(1, "same-hash", shared["message"])]


def test_all_jobs_follows_the_listing(fake: FakeTogether, engine: Engine) -> None:
    """--all-jobs syncs every listed job and records its status."""
    fake.add_job("ft-1", events=3, status="running")
    fake.add_job("ft-2", events=4, status="completed")
    result = sync_pass(fake, engine, all_jobs=True)
    assert {(o.job_id, o.total) for o in result.outcomes} == {("ft-1", 3), ("ft-2", 4)}
    assert state(engine, "ft-2")["status"] == "completed"
    assert state(engine, "ft-1")["last_synced_at"] is not None


def test_a_failing_job_does_not_stop_the_others(fake: FakeTogether, engine: Engine) -> None:
    """An unknown job fails alone, with its error recorded in its sync state."""
    fake.add_job("ft-ok", events=5)
    result = sync_pass(fake, engine, ["ft-missing", "ft-ok"])
    missing, ok = result.outcomes
    assert not result.ok
    assert missing.error is not None
    assert missing.error.kind == "not_found"
    assert (ok.new, ok.total) == (5, 5)
    recorded = state(engine, "ft-missing")
    assert recorded["last_error_kind"] == "not_found"
    assert "unknown job" in str(recorded["last_error"])
    assert recorded["last_synced_at"] is None


def test_a_crash_mid_job_leaves_that_job_untouched(fake: FakeTogether, engine: Engine) -> None:
    """The database rejects the 7th event of a job: none of that job's events are kept."""
    fake.add_job("ft-good", events=10)
    fake.add_job("ft-bad", events=5)
    sync_pass(fake, engine, ["ft-bad"])
    events = [make_event("ft-bad", i) for i in range(12)]
    events[6] = dict(events[6], message="explode")
    fake.set_events("ft-bad", events)
    fail_inserts_of(engine, "explode")
    result = sync_pass(fake, engine, ["ft-good", "ft-bad"])
    good, bad = result.outcomes
    assert good.ok
    assert good.total == 10
    assert bad.error is not None
    assert bad.error.kind == "database"
    assert len(stored(engine, "ft-bad")) == 5
    recorded = state(engine, "ft-bad")
    assert (recorded["event_count"], recorded["last_error_kind"]) == (5, "database")
    # Once the database accepts the event again, the next pass catches up completely.
    with engine.begin() as conn:
        conn.execute(
            text(
                "DROP TRIGGER boom"
                + (" ON fine_tune_events" if engine.dialect.name == "postgresql" else "")
            )
        )
    assert sync_pass(fake, engine, ["ft-bad"]).outcomes[0].new == 7
    assert len(stored(engine, "ft-bad")) == 12


def test_raw_and_repairs_are_stored(fake: FakeTogether, engine: Engine) -> None:
    """raw round-trips through JSON/JSONB, NULs escaped; repairs are recorded per row."""
    event = make_event("ft-1", 0, message="nul\x00here", step="??", surprise={"nested": [1, 2]})
    fake.add_job("ft-1", events=[event])
    assert sync_pass(fake, engine, ["ft-1"]).ok
    with engine.connect() as conn:
        row = conn.execute(select(events_table).where(events_table.c.job_id == "ft-1")).one()
    assert row.raw["surprise"] == {"nested": [1, 2]}
    assert row.raw["message"] == "nul\\u0000here"
    assert row.message == "nul\ufffdhere"
    assert row.step is None
    assert sorted(row.repairs) == ["message:nul_or_surrogate", "raw:escaped", "step:int_parsing"]


def test_jobs_run_concurrently_on_reused_connections(fake: FakeTogether, engine: Engine) -> None:
    """Up to `concurrency` requests are in flight at once, over a pool of kept-alive sockets."""
    for i in range(12):
        fake.add_job(f"ft-{i}", events=3)
    fake.latency = 0.05
    result = sync_pass(fake, engine, all_jobs=True, concurrency=4, history=False)
    assert result.ok
    assert len(result.outcomes) == 12
    assert fake.max_in_flight == 4
    # 13 requests (listing + 12 jobs) over at most 4 connections, plus one for the listing.
    assert len(fake.requests) == 13
    assert len(fake.client_ports) <= 5


def test_a_job_being_stored_frees_its_request_slot(fake: FakeTogether, engine: Engine) -> None:
    """With one request in flight, the next job is fetched while the last one waits to be
    stored: the writes are held up here by a lock another connection holds."""
    for i in range(3):
        fake.add_job(f"ft-{i}", events=3)
    outcome: list[object] = []
    holder = engine.raw_connection()  # the driver's own connection, outside the pool's
    cursor = holder.cursor()
    if engine.dialect.name == "sqlite":
        cursor.execute("BEGIN IMMEDIATE")  # no other connection may write the file
    else:
        cursor.execute(f"LOCK TABLE {state_table.name} IN EXCLUSIVE MODE")  # reads still pass
    try:
        worker = threading.Thread(
            target=lambda: outcome.append(
                sync_pass(fake, engine, all_jobs=True, concurrency=1, history=False)
            )
        )
        worker.start()
        wait_until(lambda: fetches(fake, "ft-0") and fetches(fake, "ft-1"))
    finally:
        holder.rollback()
        holder.close()
    worker.join(EVENTUALLY)
    (result,) = outcome
    assert isinstance(result, PassResult)
    assert result.ok, [o.error for o in result.outcomes]
    assert fake.max_in_flight == 1
    assert event_counts(engine) == {"ft-0": 3, "ft-1": 3, "ft-2": 3}


def test_created_at_is_stored_as_aware_utc(fake: FakeTogether, engine: Engine) -> None:
    """Offsets are converted to UTC on both databases, and read back timezone-aware."""
    events = [
        make_event("ft-1", 0, created_at="2026-11-01T12:00:00+02:00"),
        make_event("ft-1", 1, created_at="2026-11-01T09:30:00Z"),
        make_event("ft-1", 2, created_at="2026-11-01T10:15:00"),
    ]
    fake.add_job("ft-1", events=events)
    sync_pass(fake, engine, ["ft-1"])
    query = select(events_table.c.created_at).order_by(events_table.c.created_at)
    with engine.connect() as conn:
        stamps = list(conn.execute(query).scalars())
    assert stamps == [
        datetime(2026, 11, 1, 9, 30, tzinfo=UTC),
        datetime(2026, 11, 1, 10, 0, tzinfo=UTC),
        datetime(2026, 11, 1, 10, 15, tzinfo=UTC),
    ]
    assert all(s.utcoffset() == timedelta(0) for s in stamps)


def test_large_lists_take_the_bulk_path_with_the_same_results(
    fake: FakeTogether, engine: Engine
) -> None:
    """600 new events, then 600 edited ones (COPY on Postgres): same rows, same seq, updates
    in place, and a write count that matches exactly."""
    events = [make_event("ft-big", i) for i in range(600)]
    fake.add_job("ft-big", events=events)
    assert sync_pass(fake, engine, ["ft-big"]).outcomes[0].new == 600
    edited = [dict(e, message=f"edited {i}") for i, e in enumerate(events)]
    fake.set_events("ft-big", edited)
    install_write_counter(engine)
    outcome = sync_pass(fake, engine, ["ft-big"]).outcomes[0]
    assert (outcome.new, outcome.updated, outcome.total) == (0, 600, 600)
    assert writes(engine) == {"UPDATE": 600}
    rows = stored(engine, "ft-big")
    assert [r[0] for r in rows] == list(range(1, 601))
    assert [r[2] for r in rows] == [e["message"] for e in edited]


def test_bulk_new_rows_match_rows_stored_in_small_batches(
    fake: FakeTogether, engine: Engine
) -> None:
    """The same 600 events, stored at once (COPY straight into the table on Postgres) and
    100 at a time (the upsert): every column but the job and the arrival time is equal."""
    events = [
        make_event("ft-src", i, generation="2026-08" if i % 3 else "2026-04") for i in range(600)
    ]
    events[7]["message"] = "NUL \x00 and emoji \U0001f600"  # repaired and escaped the same way
    events[8]["step"] = "12"  # coerced the same way
    fake.add_job("ft-at-once", events=events)
    fake.add_job("ft-in-steps", events=events[:100])
    assert sync_pass(fake, engine, ["ft-at-once"]).outcomes[0].new == 600
    for end in range(100, 700, 100):
        fake.set_events("ft-in-steps", events[:end])
        assert sync_pass(fake, engine, ["ft-in-steps"]).outcomes[0].new == 100
    skip = {"id", "job_id", "first_seen_at"}
    columns = [c for c in events_table.c if c.name not in skip]

    def rows(job_id: str) -> list[tuple[object, ...]]:
        query = select(*columns).where(events_table.c.job_id == job_id).order_by(events_table.c.seq)
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(query)]

    at_once, in_steps = rows("ft-at-once"), rows("ft-in-steps")
    assert len(at_once) == 600
    assert at_once == in_steps


def test_new_events_after_stored_ones_take_the_bulk_path(
    fake: FakeTogether, engine: Engine
) -> None:
    """A full re-read (the first event was edited) with 300 new events behind 300 stored ones:
    one update, 300 inserts numbered on from the stored ones, each with its arrival time."""
    events = [make_event("ft-big", i) for i in range(600)]
    fake.add_job("ft-big", events=events[:300])
    sync_pass(fake, engine, ["ft-big"])
    fake.set_events("ft-big", [dict(events[0], message="edited"), *events[1:]])
    install_write_counter(engine)
    outcome = sync_pass(fake, engine, ["ft-big"]).outcomes[0]
    assert (outcome.new, outcome.updated, outcome.total) == (300, 1, 600)
    assert writes(engine) == {"UPDATE": 1, "INSERT": 300}
    rows = stored(engine, "ft-big")
    assert [r[1] for r in rows] == [e["hash"] for e in events]
    assert [r[0] for r in rows] == list(range(1, 601))
    assert rows[0][2] == "edited"
    with engine.connect() as conn:
        ids, arrived = conn.execute(
            select(
                func.count(func.distinct(events_table.c.id)),
                func.count(events_table.c.first_seen_at),
            ).where(events_table.c.job_id == "ft-big")
        ).one()
    assert (ids, arrived) == (600, 600)


def test_rows_deleted_by_hand_are_stored_again(fake: FakeTogether, engine: Engine) -> None:
    """Stored rows no longer matching the state row (deleted by hand, a table restored from
    an old backup) are noticed on the next pass, which stores again what the API serves,
    although the body is byte for byte the one stored last."""
    fake.add_job("ft-1", events=10)
    assert sync_pass(fake, engine, ["ft-1"]).ok
    before = stored(engine, "ft-1")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM fine_tune_events WHERE seq IN (2, 5, 10)"))
    outcome = sync_pass(fake, engine, ["ft-1"]).outcomes[0]
    assert (outcome.new, outcome.total) == (3, 10)
    after = stored(engine, "ft-1")
    assert sorted(r[1:] for r in after) == sorted(r[1:] for r in before)
    assert state(engine, "ft-1")["event_count"] == 10
    again = sync_pass(fake, engine, ["ft-1"]).outcomes[0]
    assert (again.new, again.updated, again.total) == (0, 0, 10)


def test_full_compares_every_event_even_when_the_state_looks_intact(
    fake: FakeTogether, engine: Engine
) -> None:
    """Rows deleted and the state row edited to match hide the loss from the cheap check;
    `--full` (plan_jobs(full=True)) still finds it and stores the rows again."""
    fake.add_job("ft-1", events=10, generation="2026-08")
    assert sync_pass(fake, engine, ["ft-1"]).ok
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM fine_tune_events WHERE seq > 7"))
        conn.execute(text("UPDATE sync_state SET event_count = 7"))
    assert sync_pass(fake, engine, ["ft-1"]).outcomes[0].new == 0  # looks unchanged
    outcome = sync_pass(fake, engine, ["ft-1"], full=True).outcomes[0]
    assert (outcome.new, outcome.total) == (3, 10)


NUMBERS_BODY = (
    b'{"data": ['
    b'{"object": "fine-tune-event", "hash": "n1", "type": "x", "message": "huge",'
    b' "step": 1e400, "loss": -1e400, "tiny": 1e-400},'
    b'{"object": "fine-tune-event", "hash": "n2", "type": "x", "message": "long int",'
    b' "token_count": 123456789012345678901234567890, "other": -98765432109876543210987654321},'
    b'{"object": "fine-tune-event", "type": "x", "message": "not finite",'
    b' "early_stopping_best_metric_value": NaN, "inf": Infinity, "ninf": -Infinity}'
    b"]}"
)


def test_numbers_outside_the_spec_are_stored_with_their_spelling(
    fake: FakeTogether, engine: Engine
) -> None:
    """1e400, -1e400, integers past 64 bits, NaN and Infinity: every event is stored,
    its columns NULL where they can't hold the value, a repair recorded, and raw valid JSON
    that the database itself reads, with the original spelling."""
    fake.add_job("ft-n")
    fake.override = lambda path: (200, NUMBERS_BODY, {}) if path.endswith("/events") else None
    result = sync_pass(fake, engine, ["ft-n"])
    assert result.ok, result.outcomes[0].error
    assert result.outcomes[0].new == 3
    # The database itself must read raw: json_extract on SQLite, ->> on Postgres.
    extract = "raw ->> '{}'" if engine.dialect.name == "postgresql" else "json_extract(raw, '$.{}')"
    texts = ["step", "loss", "inf", "ninf", "early_stopping_best_metric_value"]
    query = (
        "SELECT message, step, token_count, early_stopping_best_metric_value, repairs, raw, "
        + ", ".join(f"CAST({extract.format(f)} AS TEXT)" for f in texts)
        + " FROM fine_tune_events WHERE job_id = 'ft-n' ORDER BY seq"
    )
    with engine.connect() as conn:
        found = [tuple(row) for row in conn.execute(text(query))]
        if engine.dialect.name == "sqlite":
            assert conn.execute(text("SELECT min(json_valid(raw)) FROM fine_tune_events")).scalar()
    huge, long_int, not_finite = found
    assert huge[:4] == ("huge", None, None, None)
    assert huge[6:8] == ("1e400", "-1e400")
    assert long_int[:3] == ("long int", None, None)
    raw = long_int[5] if isinstance(long_int[5], dict) else json.loads(long_int[5])
    assert (raw["token_count"], raw["other"]) == (
        123456789012345678901234567890,
        -98765432109876543210987654321,
    )
    assert not_finite[3] is None
    assert not_finite[8:] == ("Infinity", "-Infinity", "NaN")
    repairs = [set(r[4] if isinstance(r[4], list) else json.loads(r[4])) for r in found]
    assert {"raw:number_as_text", "step:int_parsing"} <= repairs[0]
    assert repairs[1] == {"token_count:less_than_equal"}
    assert {"raw:number_as_text", "early_stopping_best_metric_value:finite_number"} <= repairs[2]
    again = sync_pass(fake, engine, ["ft-n"]).outcomes[0]
    assert (again.error, again.new, again.updated) == (None, 0, 0)


def test_bytes_that_are_not_utf8_are_replaced_and_recorded(
    fake: FakeTogether, engine: Engine
) -> None:
    """Invalid UTF-8 inside a body: the job is stored, the bad bytes become U+FFFD in the
    columns and in raw, and the repair is recorded. The other events are untouched."""
    fake.add_job("ft-u")
    body = (
        b'{"data": [{"object": "fine-tune-event", "hash": "u1", "type": "x",'
        b' "message": "loss \xff\xfe fell"},'
        b' {"object": "fine-tune-event", "hash": "u2", "type": "x", "message": "caf\xc3\xa9"}]}'
    )
    fake.override = lambda path: (200, body, {}) if path.endswith("/events") else None
    result = sync_pass(fake, engine, ["ft-u"])
    assert result.ok, result.outcomes[0].error
    with engine.connect() as conn:
        found = conn.execute(
            text("SELECT message, repairs, raw FROM fine_tune_events ORDER BY seq")
        ).all()
    (bad, bad_repairs, bad_raw), (good, good_repairs, _) = found
    assert bad == "loss \ufffd\ufffd fell"
    as_list = bad_repairs if isinstance(bad_repairs, list) else json.loads(bad_repairs)
    assert "message:nul_or_surrogate" in as_list
    assert (bad_raw if isinstance(bad_raw, dict) else json.loads(bad_raw))["message"] == bad
    assert (good, good_repairs) == ("caf\u00e9", None)
    assert sync_pass(fake, engine, ["ft-u"]).outcomes[0].error is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
@pytest.mark.parametrize("tuned", [True, False])
def test_worker_threads_share_two_malloc_arenas(tuned: bool) -> None:
    """tune_malloc holds glibc to two arenas however many threads allocate (untuned, eight
    threads get more: the check can tell the two apart). glibc's malloc_stats lists them."""
    program = textwrap.dedent(f"""
        import ctypes, threading
        from eventsync.sync import tune_malloc
        if {tuned}:
            tune_malloc()
        def churn():
            kept = [bytes(1000 + i % 7) for i in range(20000)]
        threads = [threading.Thread(target=churn) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ctypes.CDLL("libc.so.6").malloc_stats()
    """)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True
    )
    arenas = sum(1 for line in done.stderr.splitlines() if line.startswith("Arena "))
    assert arenas >= 1
    assert (arenas <= 2) is tuned
