"""records.py: any record, snapshot or checkpoint becomes rows that fit their columns."""

from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from eventsync.jsonio import decode
from eventsync.records import (
    CHECKPOINT_FIELDS,
    JOB_FIELDS,
    parse_checkpoints,
    parse_job,
    parse_metrics,
)

ANY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(
    [
        *JOB_FIELDS,
        *CHECKPOINT_FIELDS,
        "train/loss",
        "eval/loss",
        "train/global_step",
        "train/learning_rate",
        "lr_scheduler",
        "training_method",
        "batch_size",
    ]
)
OBJECTS = st.dictionaries(KEYS | st.text(max_size=5), ANY, max_size=12)
BIG = 2**63


def _fits(value: object) -> bool:
    if value is None or isinstance(value, str):
        return value is None or (
            "\x00" not in value and value.encode("utf-8", "strict") is not None
        )
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -BIG <= value < BIG
    if isinstance(value, float):
        return math.isfinite(value)
    return hasattr(value, "tzinfo") and value.tzinfo is not None  # type: ignore[union-attr]


@given(OBJECTS | ANY)
def test_any_record_gives_a_row_that_fits(raw: object) -> None:
    """Whatever the API sends as a job record, every column holds a value its type can store,
    and `raw` is valid JSON that keeps it."""
    row = parse_job(raw, "ft-1")
    assert set(row.values) == set(JOB_FIELDS)
    assert all(_fits(v) for v in row.values.values())
    kept = raw if isinstance(raw, dict) else {"_not_an_object": raw}
    if "raw:escaped" in json.loads(row.repairs or "[]"):  # NULs shown as \u0000
        kept = json.loads(json.dumps(kept).replace("\\u0000", "\\\\u0000"))
    assert json.loads(row.raw) == kept


@given(st.lists(OBJECTS | ANY, max_size=6))
def test_any_metrics_list_gives_rows_that_fit(items: list[object]) -> None:
    """Every snapshot gives a row of finite numbers (an integer step), exact repeats once."""
    rows = parse_metrics(items)
    assert len({r.content_hash for r in rows.rows}) == len(rows.rows)
    for row in rows.rows:
        step = row.values["global_step"]
        assert step is None or (type(step) is int and -BIG <= step < BIG)
        for name in ("train_loss", "eval_loss", "learning_rate"):
            value = row.values[name]
            assert value is None or (type(value) is float and math.isfinite(value))


@given(st.lists(OBJECTS | ANY, max_size=6))
def test_any_checkpoint_list_gives_rows_with_distinct_keys(items: list[object]) -> None:
    """Checkpoints get distinct keys; each column fits; exact repeats are dropped."""
    rows = parse_checkpoints(items)
    assert len({r.key for r in rows.rows}) == len(rows.rows)
    assert all(_fits(v) for r in rows.rows for v in r.values.values())


def test_nested_settings_become_columns() -> None:
    """LoRA, scheduler and method settings are flattened to their columns; "max" batch is NULL."""
    row = parse_job(
        {
            "id": "ft-1",
            "status": "running",
            "learning_rate": "0.0001",
            "batch_size": "max",
            "lr_scheduler": {"lr_scheduler_type": "cosine", "lr_scheduler_args": {}},
            "training_type": {"type": "Lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05},
            "training_method": {"method": "dpo", "dpo_beta": 0.1},
            "created_at": "2026-11-01T00:00:00Z",
        },
        "ft-1",
    )
    v = row.values
    assert (v["learning_rate"], v["batch_size"], v["lr_scheduler"]) == (1e-4, None, "cosine")
    assert (v["training_type"], v["lora_r"], v["lora_alpha"]) == ("Lora", 16, 32)
    assert v["training_method"] == "dpo"
    assert v["created_at"].isoformat() == "2026-11-01T00:00:00+00:00"
    assert row.repairs is None


def test_values_that_do_not_fit_are_nulled_and_recorded() -> None:
    """A bad value is NULL in its column, named in repairs, and kept in raw with its spelling."""
    body = (
        b'{"metrics": [{"train/loss": NaN, "train/global_step": 1.5, "eval/loss": 1e400,'
        b' "train/learning_rate": true}]}'
    )
    decoded = decode(body)
    rows = parse_metrics(decoded.value["metrics"])
    (row,) = rows.rows
    assert row.values == {
        "global_step": None,
        "train_loss": None,
        "eval_loss": None,
        "learning_rate": None,
    }
    assert json.loads(row.repairs or "[]") == [
        "raw:number_as_text",
        "global_step:not_an_integer",
        "train_loss:not_a_number",
        "eval_loss:not_a_number",
        "learning_rate:not_a_number",
    ]
    assert json.loads(row.raw)["train/loss"] == "NaN"
    job = parse_job({"n_epochs": 1e30, "status": "run\x00ning", "model": "m" * 600}, "ft-1")
    assert job.values["n_epochs"] is None
    assert job.values["status"] == "run\ufffdning"
    assert len(job.values["model"]) == 512
    assert set(json.loads(job.repairs or "[]")) >= {
        "status:nul_or_surrogate",
        "model:too_long",
    }


def test_a_checkpoint_path_reused_with_other_content_keeps_both() -> None:
    """Two checkpoints claiming one path are both kept; an exact repeat is dropped."""
    first = {"step": 10, "path": "s3://x/10", "created_at": "2026-11-01T00:00:00Z"}
    other = {**first, "step": 11}
    rows = parse_checkpoints([first, first, other])
    assert [r.key for r in rows.rows] == ["p:s3://x/10", f"c:{rows.rows[1].content_hash}"]
    assert rows.repairs == {"duplicate_in_list": 1, "path:reused_with_other_content": 1}
