"""events.py: raw API events of both generations -> rows, with repairs and derived hashes."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from eventsync.events import EventRow, canonical_json, parse_created_at, parse_events
from eventsync.fakeapi import make_event


def repairs_of(row: EventRow) -> list[str] | None:
    return None if row.repairs is None else json.loads(row.repairs)


def test_old_generation_keeps_the_api_hash() -> None:
    """A 2026-04 event is stored under its own hash, with every spec field in its column."""
    event = make_event("ft-a", 7, generation="2026-04", step=3, training_offset=42)
    row = parse_events([event]).rows[0]
    assert row.hash == event["hash"]
    assert row.training_offset == 42
    assert row.step == 3
    assert row.created_at == datetime(2026, 11, 1, 0, 0, 49, tzinfo=UTC)
    assert json.loads(row.raw) == event
    assert repairs_of(row) is None


def test_new_generation_gets_a_stable_content_hash() -> None:
    """A 2026-08 event has no hash; the derived one depends on content, not on position."""
    events = [make_event("ft-b", i, generation="2026-08") for i in range(6)]
    assert all("hash" not in e for e in events)
    first = [r.hash for r in parse_events(events).rows]
    shuffled = events[:]
    random.Random(1).shuffle(shuffled)
    second = {r.hash for r in parse_events(shuffled).rows}
    assert len(set(first)) == 6
    assert set(first) == second
    edited = dict(events[0], message="something else")
    assert parse_events([edited]).rows[0].hash != first[0]


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
    row = parse_events([event]).rows[0]
    assert (row.type, row.tokenized_dataset_path) == ("early_stopped", "s3://tok/ds.tar")
    assert (row.early_stopping_best_step, row.early_stopping_best_metric_value) == (
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
    rows = parse_events(events).rows
    assert [(r.type, r.level) for r in rows] == [
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
    row = parsed.rows[0]
    assert row.step is None
    assert row.token_count == 1200
    assert row.created_at is None
    assert row.message == event["message"]
    assert json.loads(row.raw) == event
    assert sorted(repairs_of(row)) == ["created_at:unparseable", "step:int_parsing"]
    assert parsed.repairs == {"created_at:unparseable": 1, "step:int_parsing": 1}
    assert repairs_of(parsed.rows[1]) is None


def test_nul_bytes_are_replaced_in_text_and_escaped_in_raw() -> None:
    """Postgres text can't hold NUL: columns get U+FFFD, raw keeps a visible \\u0000."""
    event = make_event("ft-f", 0, message="bad\x00byte")
    row = parse_events([event]).rows[0]
    assert row.message == "bad\ufffdbyte"
    assert json.loads(row.raw)["message"] == "bad\\u0000byte"
    assert repairs_of(row) == ["message:nul_or_surrogate", "raw:escaped"]


def test_the_same_event_twice_in_one_list_is_stored_once() -> None:
    """Duplicates inside one response are dropped and counted, first occurrence wins."""
    event = make_event("ft-g", 0, generation="2026-08")
    parsed = parse_events([event, dict(event), make_event("ft-g", 1, generation="2026-08")])
    assert len(parsed.rows) == 2
    assert parsed.duplicates == 1
    assert parsed.repairs["duplicate_in_list"] == 1


def test_non_object_items_are_kept_in_raw() -> None:
    """An item that is not an object still becomes a row, so nothing is lost."""
    parsed = parse_events(["surprise", make_event("ft-h", 0)])
    assert json.loads(parsed.rows[0].raw) == {"_not_an_object": "surprise"}
    assert parsed.repairs["not_an_object"] == 1
    assert len(parsed.rows) == 2


def test_canonical_json_handles_what_orjson_refuses() -> None:
    """Integers beyond 64 bits still get a canonical form (and therefore a hash)."""
    assert canonical_json({"b": 2**70, "a": 1}) == b'{"a":1,"b":1180591620717411303424}'


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
    """Whatever the shape of each event, parsing yields one row per distinct hash."""
    parsed = parse_events(events)
    assert len(parsed.rows) + parsed.duplicates == len(events)
    assert len({r.hash for r in parsed.rows}) == len(parsed.rows)
    for row in parsed.rows:
        assert isinstance(row.hash, str)
        assert row.hash


def test_timestamps_at_the_edge_of_time_become_null() -> None:
    """Year 1 with an offset overflows when moved to UTC: NULL and a repair, not a crash."""
    parsed = parse_events([make_event("ft-t", 0, created_at="0001-01-01T00:00:00+01:00")])
    assert parsed.rows[0].created_at is None
    assert parsed.repairs["created_at:unparseable"] == 1


def test_indexed_columns_are_capped_and_raw_keeps_the_original() -> None:
    """A hash or type longer than an index can hold is shortened (stably), raw untouched."""
    event = make_event("ft-l", 0, hash="h" * 5000, type="T" * 5000)
    first = parse_events([event]).rows[0]
    again = parse_events([event]).rows[0]
    assert len(first.hash) <= 512
    assert len(first.type) <= 512
    assert first.hash == again.hash
    assert json.loads(first.raw)["type"] == "T" * 5000
    assert sorted(repairs_of(first)) == ["hash:too_long", "type:too_long"]


def test_a_reused_hash_with_other_content_is_kept() -> None:
    """Two different events under one hash: both stored, the second under a derived hash."""
    events = [make_event("ft-r", 0, hash="same"), make_event("ft-r", 1, hash="same")]
    parsed = parse_events(events)
    assert [json.loads(r.raw)["message"] for r in parsed.rows] == [e["message"] for e in events]
    assert parsed.rows[0].hash == "same"
    assert parsed.rows[1].hash.startswith("same~")
    assert repairs_of(parsed.rows[1]) == ["hash:reused_with_other_content"]
    assert parse_events(events).rows[1].hash == parsed.rows[1].hash


def test_non_finite_numbers_are_a_repair() -> None:
    """NaN arrives as the text 'NaN' (see the client); the float column gets NULL."""
    event = make_event("ft-n", 0, generation="2026-08", early_stopping_best_metric_value="NaN")
    row = parse_events([event]).rows[0]
    assert row.early_stopping_best_metric_value is None
    assert json.loads(row.raw)["early_stopping_best_metric_value"] == "NaN"
    assert repairs_of(row) == ["early_stopping_best_metric_value:finite_number"]
