"""events.py: raw API events of both generations -> records, with repairs and keys."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from eventsync.events import Event, parse_created_at, parse_events
from eventsync.jsonio import canonical
from eventsync.testing import make_event


def repairs_of(row: Event) -> list[str] | None:
    return None if row.repairs is None else json.loads(row.repairs)


def test_old_generation_keeps_the_api_hash() -> None:
    """A 2026-04 event is stored under its own hash, with every spec field in its column."""
    event = make_event("ft-a", 7, generation="2026-04", step=3, training_offset=42)
    row = parse_events([event]).events[0]
    assert row.field("hash") == event["hash"]
    assert row.key == f"h:{event['hash']}"
    assert row.field("training_offset") == 42
    assert row.field("step") == 3
    assert row.field("created_at") == datetime(2026, 11, 1, 0, 0, 49, tzinfo=UTC)
    assert json.loads(row.raw) == event
    assert repairs_of(row) is None


def test_new_generation_gets_a_stable_content_key() -> None:
    """A 2026-08 event has no hash; its key depends on content, not on position."""
    events = [make_event("ft-b", i, generation="2026-08") for i in range(6)]
    assert all("hash" not in e for e in events)
    parsed = parse_events(events).events
    first = [r.key for r in parsed]
    shuffled = events[:]
    random.Random(1).shuffle(shuffled)
    second = {r.key for r in parse_events(shuffled).events}
    assert len(set(first)) == 6
    assert set(first) == second
    assert all(r.field("hash") is None and r.key == f"c:{r.content_hash}" for r in parsed)
    edited = dict(events[0], message="something else")
    assert parse_events([edited]).events[0].key != first[0]


def test_new_generation_fields_are_columns() -> None:
    """tokenized_dataset_path and the early-stopping fields land in their own columns."""
    event = make_event(
        "ft-c",
        9,
        generation="2026-08",
        type="early_stopped",
        tokenized_dataset_path="s3://tok/ds.tar",
        early_stopping_best_step=120,
        early_stopping_best_metric_value=0.4375,
    )
    row = parse_events([event]).events[0]
    assert (row.field("type"), row.field("tokenized_dataset_path")) == (
        "early_stopped",
        "s3://tok/ds.tar",
    )
    assert (
        row.field("early_stopping_best_step"),
        row.field("early_stopping_best_metric_value"),
    ) == (
        120,
        0.4375,
    )


def test_types_and_levels_outside_the_spec_are_kept_verbatim() -> None:
    """UPPERCASE types and levels like 'Info' or '' are stored as sent, not rejected."""
    events = [
        make_event("ft-d", 0, type="JOB_PENDING", level="Info"),
        make_event("ft-d", 1, type="EVAL_COMPLETE", level=""),
        make_event("ft-d", 2, type="brand_new_type", level=None),
    ]
    rows = parse_events(events).events
    assert [(r.field("type"), r.field("level")) for r in rows] == [
        ("JOB_PENDING", "Info"),
        ("EVAL_COMPLETE", ""),
        ("brand_new_type", None),
    ]


def test_created_at_formats() -> None:
    """ISO strings with Z, offsets or none parse to aware UTC; anything else gives None."""
    assert parse_created_at("2026-11-01T10:00:00Z") == datetime(2026, 11, 1, 10, tzinfo=UTC)
    assert parse_created_at("2026-11-01T12:00:00+02:00") == datetime(2026, 11, 1, 10, tzinfo=UTC)
    assert parse_created_at("2026-11-01 10:00:00.5") == datetime(
        2026, 11, 1, 10, 0, 0, 500000, tzinfo=UTC
    )
    assert parse_created_at("yesterday") is None
    assert parse_created_at(1_700_000_000) is None


def test_bad_fields_become_null_and_are_recorded() -> None:
    """A field of the wrong type is stored as NULL, the rest of the event is kept."""
    event = make_event("ft-e", 6, step="not a number", total_steps=None, created_at="soon")
    event["token_count"] = "1200"  # a numeric string is simply coerced
    parsed = parse_events([event, make_event("ft-e", 7)])
    row = parsed.events[0]
    assert row.field("step") is None
    assert row.field("token_count") == 1200
    assert row.field("created_at") is None
    assert row.field("message") == event["message"]
    assert json.loads(row.raw) == event
    assert sorted(repairs_of(row)) == ["created_at:unparseable", "step:int_parsing"]
    assert parsed.repairs == {"created_at:unparseable": 1, "step:int_parsing": 1}
    assert repairs_of(parsed.events[1]) is None


def test_nul_bytes_are_replaced_in_text_and_escaped_in_raw() -> None:
    """Postgres text can't hold NUL: columns get U+FFFD, raw keeps a visible \\u0000."""
    event = make_event("ft-f", 0, message="bad\x00byte")
    row = parse_events([event]).events[0]
    assert row.field("message") == "bad\ufffdbyte"
    assert json.loads(row.raw)["message"] == "bad\\u0000byte"
    assert repairs_of(row) == ["message:nul_or_surrogate", "raw:escaped"]


def test_the_same_event_twice_in_one_list_is_stored_once() -> None:
    """Duplicates inside one response are dropped and counted, first occurrence wins."""
    event = make_event("ft-g", 0, generation="2026-08")
    parsed = parse_events([event, dict(event), make_event("ft-g", 1, generation="2026-08")])
    assert len(parsed.events) == 2
    assert parsed.duplicates == 1
    assert parsed.repairs["duplicate_in_list"] == 1


def test_non_object_items_are_kept_in_raw() -> None:
    """An item that is not an object still becomes a row, so nothing is lost."""
    parsed = parse_events(["surprise", make_event("ft-h", 0)])
    assert json.loads(parsed.events[0].raw) == {"_not_an_object": "surprise"}
    assert parsed.repairs["not_an_object"] == 1
    assert len(parsed.events) == 2


def test_canonical_json_handles_what_orjson_refuses() -> None:
    """Integers beyond 64 bits still get a canonical form (and therefore a hash)."""
    assert canonical({"b": 2**70, "a": 1}) == b'{"a":1,"b":1180591620717411303424}'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
field_names = st.sampled_from(
    [
        "object",
        "created_at",
        "level",
        "message",
        "type",
        "step",
        "total_steps",
        "hash",
        "training_offset",
        "early_stopping_best_metric_value",
        "checkpoint_path",
        "extra_field",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(field_names, json_values, max_size=8), max_size=8))
def test_any_json_objects_parse_without_error(events: list[dict[str, Any]]) -> None:
    """Whatever the shape of each event, parsing yields one record per distinct key, and
    drops only exact repeats."""
    parsed = parse_events(events)
    assert len(parsed.events) + parsed.duplicates == len(events)
    assert len({r.key for r in parsed.events}) == len(parsed.events)
    assert len({canonical(e) for e in events}) == len(parsed.events)
    for row in parsed.events:
        assert row.key.startswith(("h:", "hs:", "c:"))


def test_timestamps_at_the_edge_of_time_become_null() -> None:
    """Year 1 with an offset overflows when moved to UTC: NULL and a repair, not a crash."""
    parsed = parse_events([make_event("ft-t", 0, created_at="0001-01-01T00:00:00+01:00")])
    assert parsed.events[0].field("created_at") is None
    assert parsed.repairs["created_at:unparseable"] == 1


def test_a_long_type_is_capped_and_a_long_hash_keyed_by_its_digest() -> None:
    """A type longer than an index can hold is shortened (stably); a long hash is kept whole
    in its column and keyed by its sha256; raw is untouched."""
    event = make_event("ft-l", 0, hash="h" * 5000, type="T" * 5000)
    first = parse_events([event]).events[0]
    again = parse_events([event]).events[0]
    assert len(first.field("type")) <= 512
    assert first.field("type") == again.field("type")
    assert first.field("hash") == "h" * 5000
    assert first.key == again.key
    assert first.key.startswith("hs:")
    assert len(first.key) == 3 + 64
    assert json.loads(first.raw)["type"] == "T" * 5000
    assert repairs_of(first) == ["type:too_long"]


def test_a_reused_hash_with_other_content_is_kept() -> None:
    """Two different events under one hash: both stored, the second keyed by its content."""
    events = [make_event("ft-r", 0, hash="same"), make_event("ft-r", 1, hash="same")]
    parsed = parse_events(events)
    assert [json.loads(r.raw)["message"] for r in parsed.events] == [e["message"] for e in events]
    assert [r.field("hash") for r in parsed.events] == ["same", "same"]
    assert parsed.events[0].key == "h:same"
    assert parsed.events[1].key == f"c:{parsed.events[1].content_hash}"
    assert repairs_of(parsed.events[1]) == ["hash:reused_with_other_content"]


def test_a_hash_can_never_equal_a_derived_key() -> None:
    """A hash crafted to equal another event's derived key, or a long hash's digest, is a
    key of its own: no event can take another's place."""
    plain = make_event("ft-k", 0, generation="2026-08")
    derived = parse_events([plain]).events[0].key
    long_hash = "x" * 1000
    long_key = parse_events([make_event("ft-k", 1, hash=long_hash)]).events[0].key
    crafted = [
        plain,
        make_event("ft-k", 1, hash=long_hash),
        make_event("ft-k", 2, hash=derived),
        make_event("ft-k", 3, hash=derived.removeprefix("c:")),
        make_event("ft-k", 4, hash=long_key),
        make_event("ft-k", 5, hash=long_key.removeprefix("hs:")),
        make_event("ft-k", 6, hash="h:" + "y"),
        make_event("ft-k", 7, hash="y"),
    ]
    parsed = parse_events(crafted)
    assert len(parsed.events) == len(crafted)
    assert len({e.key for e in parsed.events}) == len(crafted)
    assert parsed.duplicates == 0


def test_non_finite_numbers_are_a_repair() -> None:
    """NaN arrives as the text 'NaN' (see the client); the float column gets NULL."""
    event = make_event("ft-n", 0, generation="2026-08", early_stopping_best_metric_value="NaN")
    row = parse_events([event]).events[0]
    assert row.field("early_stopping_best_metric_value") is None
    assert json.loads(row.raw)["early_stopping_best_metric_value"] == "NaN"
    assert repairs_of(row) == ["early_stopping_best_metric_value:finite_number"]
