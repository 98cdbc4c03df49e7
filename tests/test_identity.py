"""One rule for an event's identity: any sequence of fetches of a growing list stores exactly
what fetching the final list once stores, on every write path, on SQLite and Postgres."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text

from eventsync.jsonio import canonical
from eventsync.models import events_table
from eventsync.testing import FakeTogether, make_event
from eventsync.writer import COPY_THRESHOLD
from tests.helpers import stored_events, sync_pass

LONG = "L" * 300
# Hashes chosen to collide: reused ones, empty, long ones that share their first 256
# characters, and the forms eventsync derives or used to derive for other events.
PLAIN_HASHES = ["a", "b", "", LONG, LONG + "x", "h:a", "c:", "hs:"]
job_numbers = itertools.count()


@st.composite
def hostile_lists(draw: st.DrawFn) -> list[Any]:
    """Events whose hashes reuse, shadow and imitate one another, with exact repeats, a
    non-object, and sometimes a block of plain events big enough for the bulk paths."""
    size = draw(st.integers(min_value=1, max_value=12))
    events: list[Any] = []
    for i in range(size):
        kind = draw(st.sampled_from(["hash", "none", "repeat", "derived", "odd"]))
        message = draw(st.sampled_from(["x", "y", f"m{i}"]))
        event = make_event("ft-h", i % 3, generation="2026-08", message=message)
        if kind == "hash":
            event["hash"] = draw(st.sampled_from(PLAIN_HASHES))
        elif kind == "repeat" and events:
            event = draw(st.sampled_from(events))
        elif kind == "derived" and events:
            other = draw(st.sampled_from(events))
            digest = hashlib.sha256(canonical(other)).hexdigest()
            event["hash"] = draw(st.sampled_from([digest, f"c:{digest}", f"hs:{digest}"]))
        elif kind == "odd":
            event = draw(st.sampled_from(["not an event", 7, {"hash": "a"}, {"step": 2**70}]))
        events.append(event)
    if draw(st.booleans()):
        at = draw(st.integers(min_value=0, max_value=len(events)))
        block = [make_event("ft-bulk", i) for i in range(COPY_THRESHOLD + 20)]
        events[at:at] = block
    return events


@st.composite
def fetch_sequences(draw: st.DrawFn) -> tuple[list[Any], list[int]]:
    """A final list, and the lengths of the growing lists fetched before it."""
    events = draw(hostile_lists())
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(events)), max_size=4))
    return events, sorted(set(cuts))


def counted(engine: Engine, job_id: str) -> tuple[int, int]:
    """The job's state row's event_count, and the rows actually stored."""
    query = text(
        "SELECT event_count, (SELECT count(*) FROM fine_tune_events WHERE job_id = :j) "
        "FROM sync_state WHERE job_id = :j"
    )
    with engine.connect() as conn:
        state_count, stored = conn.execute(query, {"j": job_id}).one()
    return int(state_count), int(stored)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=fetch_sequences())
def test_any_fetch_sequence_stores_what_one_fetch_stores(
    fake: FakeTogether, engine: Engine, sequence: tuple[list[Any], list[int]]
) -> None:
    """Growing lists fetched one after another (tail-only decodes, multi-row inserts, COPY)
    store the same rows, counts and seq numbers as the final list fetched once."""
    events, cuts = sequence
    n = next(job_numbers)
    once, stepwise = f"ft-once-{n}", f"ft-steps-{n}"
    fake.add_job(once, events=events)
    fake.add_job(stepwise)
    for cut in [*cuts, len(events)]:
        fake.set_events(stepwise, events[:cut])
        result = sync_pass(fake, engine, [stepwise])
        assert result.ok, result.outcomes[0].error
        assert counted(engine, stepwise) == (result.outcomes[0].total,) * 2
    last = result.outcomes[0]
    first = sync_pass(fake, engine, [once]).outcomes[0]
    assert first.error is None, first.error
    expected = stored_events(engine, once, skip=frozenset({"job_id"}))
    assert stored_events(engine, stepwise, skip=frozenset({"job_id"})) == expected
    assert last.total == first.total == len(expected)
    again = sync_pass(fake, engine, [stepwise, once])
    assert [(o.new, o.updated) for o in again.outcomes] == [(0, 0), (0, 0)]


def test_a_reused_hash_in_a_later_fetch_never_overwrites(
    fake: FakeTogether, engine: Engine
) -> None:
    """[A], then [A, B] where B reuses A's hash with other content: both are kept, as when
    [A, B] is fetched at once."""
    a = make_event("ft-r", 0, hash="same", message="first")
    b = make_event("ft-r", 1, hash="same", message="second")
    fake.add_job("ft-r", events=[a])
    assert sync_pass(fake, engine, ["ft-r"]).ok
    fake.set_events("ft-r", [a, b])
    outcome = sync_pass(fake, engine, ["ft-r"]).outcomes[0]
    assert (outcome.new, outcome.updated, outcome.total) == (1, 0, 2)
    query = select(events_table.c.message).where(events_table.c.job_id == "ft-r").order_by("seq")
    with engine.connect() as conn:
        assert list(conn.execute(query).scalars()) == ["first", "second"]
