"""Property: sync stores exactly what the API sent, apart from the documented repairs, and a
second sync changes nothing. Events of both generations, generated from FineTuneEvent."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from eventsync.events import parse_created_at
from eventsync.jsonio import canonical
from eventsync.models import events_table
from eventsync.testing import FakeTogether
from tests.helpers import stored_events, sync_pass

TEXT_FIELDS = (
    "object",
    "level",
    "message",
    "type",
    "wandb_url",
    "checkpoint_path",
    "model_path",
    "hash",
    "tokenized_dataset_path",
)
INT_FIELDS = (
    "param_count",
    "token_count",
    "total_steps",
    "step",
    "training_offset",
    "early_stopping_best_step",
)
HOSTILE_TEXT = st.sampled_from(
    [
        "",
        "\x00",
        "a\x00b",
        "\u202eevil",
        "\U0001f680",
        "e\u0301",
        "'; DROP TABLE x; --",
        "<script>",
        "\\u0000",
        "null",
        "x" * 5000,
    ]
)
TEXT = st.one_of(st.text(max_size=40), HOSTILE_TEXT)
WRONG = st.one_of(
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
INT = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TYPES = st.sampled_from(
    [
        "job_pending",
        "JOB_START",
        "checkpoint_save",
        "EVAL_COMPLETE",
        "early_stopped",
        "tokenized_dataset_upload_complete",
        "mystery",
    ]
)
STAMPS = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.sampled_from(["2026-11-01T10:00:00Z", "not a date", ""]),
)


def maybe(value: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any] = WRONG) -> Any:
    """Mostly a valid value; sometimes null, or of the wrong type."""
    return st.one_of(value, value, value, st.none(), wrong)


def event(generation: str) -> st.SearchStrategy[dict[str, Any]]:
    fields: dict[str, Any] = {
        "object": st.just("fine-tune-event"),
        "created_at": STAMPS,
        "level": maybe(st.sampled_from(["info", "Info", "", "warning", "error"])),
        "message": maybe(TEXT),
        "type": maybe(TYPES),
        "param_count": maybe(INT, TEXT.filter(lambda t: not t.strip().lstrip("+-").isdigit())),
        "token_count": maybe(INT),
        "total_steps": maybe(INT),
        "wandb_url": maybe(TEXT),
        "step": maybe(INT),
        "checkpoint_path": maybe(TEXT),
        "model_path": maybe(TEXT),
    }
    if generation == "2026-04":
        fields["training_offset"] = maybe(INT)
        fields["hash"] = st.one_of(
            st.uuids().map(str), st.sampled_from(["reused-a", "reused-b", "h" * 3000])
        )
    else:
        fields["tokenized_dataset_path"] = maybe(TEXT)
        fields["early_stopping_best_step"] = maybe(INT)
        fields["early_stopping_best_metric_value"] = maybe(
            st.floats(allow_nan=False, allow_infinity=False)
        )
    required = {"object", "created_at", "message", "type"}
    optional = {k: v for k, v in fields.items() if k not in required}
    return st.fixed_dictionaries({k: fields[k] for k in required}, optional=optional)


EVENT_LISTS = st.sampled_from(["2026-04", "2026-08"]).flatmap(
    lambda g: st.lists(event(g), max_size=12)
)
job_numbers = itertools.count()


def expected_text(value: Any) -> str | None:
    """Documented repair: NUL becomes U+FFFD; anything not text is NULL."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else None


def expected_raw(value: Any) -> Any:
    """Documented repair: NUL in raw (keys too) is kept as the visible escape \\u0000."""
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    if isinstance(value, dict):
        return {expected_raw(k): expected_raw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expected_raw(v) for v in value]
    return value


def same_json(stored: Any, sent: Any) -> bool:
    """Equal as JSON values. Postgres JSONB keeps numbers as exact decimals, so the float
    2.789921847702515e+16 comes back as the int 27899218477025150: the same number."""
    if isinstance(stored, dict) and isinstance(sent, dict):
        return stored.keys() == sent.keys() and all(same_json(stored[k], sent[k]) for k in sent)
    if isinstance(stored, list) and isinstance(sent, list):
        return len(stored) == len(sent) and all(map(same_json, stored, sent))
    numbers = (int, float)
    if isinstance(stored, numbers) and isinstance(sent, numbers):
        return isinstance(stored, bool) == isinstance(sent, bool) and float(stored) == float(sent)
    return bool(stored == sent and type(stored) is type(sent))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=EVENT_LISTS)
@example(
    events=[
        {
            "object": "fine-tune-event",
            "created_at": "0001-01-01T00:00:00+02:34",
            "message": "m",
            "type": "t" * 4000,
        }
    ]
)
@example(
    events=[
        {
            "object": "fine-tune-event",
            "created_at": "",
            "message": "a",
            "type": "x",
            "hash": "same",
        },
        {
            "object": "fine-tune-event",
            "created_at": "",
            "message": "b",
            "type": "x",
            "hash": "same",
        },
    ]
)
def test_sync_stores_what_was_sent(
    fake: FakeTogether, engine: Engine, events: list[dict[str, Any]]
) -> None:
    """Each distinct event becomes one row equal to it (bar repairs); two syncs equal one."""
    job_id = f"ft-prop-{next(job_numbers)}"
    fake.add_job(job_id, events=events)
    assert sync_pass(fake, engine, [job_id]).ok
    with engine.connect() as conn:
        rows = conn.execute(
            select(events_table).where(events_table.c.job_id == job_id).order_by("seq")
        ).all()

    firsts: dict[bytes, dict[str, Any]] = {}
    for raw in events:  # documented: only an exact repeat is dropped
        firsts.setdefault(canonical(raw), raw)
    assert len(rows) == len(firsts)
    for row, raw in zip(rows, firsts.values(), strict=True):
        assert same_json(row.raw, expected_raw(raw)), (row.raw, raw)
        for name in TEXT_FIELDS:
            value = raw.get(name)
            if name == "type" and isinstance(value, str) and len(value) > 512:
                assert len(getattr(row, name)) <= 512  # documented: capped for the index
            elif name == "hash" and value == "":
                assert row.hash is None  # documented: an empty hash is no hash
            elif isinstance(value, str) or value is None:
                assert getattr(row, name) == expected_text(raw.get(name)), name
        for name in INT_FIELDS:
            value = raw.get(name)
            want = value if isinstance(value, int) and not isinstance(value, bool) else None
            assert getattr(row, name) == want, name
        assert row.created_at == parse_created_at(raw.get("created_at"))

    before = stored_events(engine, job_id)
    again = sync_pass(fake, engine, [job_id]).outcomes[0]
    assert (again.new, again.updated) == (0, 0)
    assert stored_events(engine, job_id) == before
