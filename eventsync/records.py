"""Pure code: a job's record, metrics snapshots and checkpoints, as the API sent them -> the
rows to store. No I/O.

The rules are the events' (eventsync.events): nothing the API sent is dropped. A field that
doesn't fit its column is stored as NULL, the repair is recorded in the row's `repairs`, and
`raw` keeps the whole object (NULs and bytes that aren't UTF-8 escaped, as for events).

- A job record (FinetuneResponse, or the listing's truncated entry) gives one row per job;
  nested settings (lr_scheduler, training_type, training_method) are flattened to columns.
- A metrics snapshot is a flat dictionary of numbers; the common keys get columns. A
  snapshot's identity is its content: an exact repeat (the same snapshot served again) is
  the same row.
- A checkpoint's identity is its path; one without a usable path, or one whose path an
  earlier checkpoint of the list already has with other content, is keyed by its content.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
from pydantic import ConfigDict, Field, TypeAdapter
from typing_extensions import TypedDict

from eventsync.events import (
    clean_text,
    escaped_raw_text,
    fit_columns,
    is_utf8,
    parse_created_at,
)
from eventsync.jsonio import JSONText, canonical, has_number_text

BigInt = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
# Indexed text columns (status, model) are cut well below Postgres' btree limit (~2.7 kB).
_INDEXED_LIMIT = 512
KEY_PATH_LIMIT = 512


class ApiJob(TypedDict, total=False):
    """The columns of fine_tune_jobs, under the API's names; lax coercion, as for events.
    Nested settings arrive flattened (see _flatten)."""

    __pydantic_config__ = ConfigDict(  # type: ignore[misc]
        coerce_numbers_to_str=True, allow_inf_nan=False
    )

    status: str | None
    model: str | None
    created_at: Any  # parsed by parse_created_at
    updated_at: Any
    started_at: Any
    training_file: str | None
    validation_file: str | None
    n_epochs: BigInt | None
    n_checkpoints: BigInt | None
    n_evals: BigInt | None
    batch_size: BigInt | None
    learning_rate: float | None
    lr_scheduler: str | None
    warmup_ratio: float | None
    max_grad_norm: float | None
    weight_decay: float | None
    training_type: str | None
    lora_r: BigInt | None
    lora_alpha: BigInt | None
    lora_dropout: float | None
    lora_trainable_modules: str | None
    training_method: str | None
    suffix: str | None
    model_output_name: str | None
    token_count: BigInt | None
    param_count: BigInt | None
    total_price: BigInt | None
    epochs_completed: BigInt | None
    wandb_url: str | None


JOB_FIELDS: tuple[str, ...] = tuple(ApiJob.__annotations__)
_JOB = TypeAdapter(ApiJob)
_TIMES = ("created_at", "updated_at", "started_at")
# (column, object, key): a column read from inside a nested object of the record.
_NESTED = (
    ("lr_scheduler", "lr_scheduler", "lr_scheduler_type"),
    ("training_type", "training_type", "type"),
    ("lora_r", "training_type", "lora_r"),
    ("lora_alpha", "training_type", "lora_alpha"),
    ("lora_dropout", "training_type", "lora_dropout"),
    ("lora_trainable_modules", "training_type", "lora_trainable_modules"),
    ("training_method", "training_method", "method"),
)


class ApiCheckpoint(TypedDict, total=False):
    """FineTuneCheckpoint's fields, every one optional."""

    __pydantic_config__ = ConfigDict(coerce_numbers_to_str=True)  # type: ignore[misc]

    step: BigInt | None
    created_at: Any
    path: str | None
    checkpoint_type: str | None
    checkpoint: str | None
    object_id: str | None
    object_name: str | None
    object_revision_id: str | None


CHECKPOINT_FIELDS: tuple[str, ...] = tuple(ApiCheckpoint.__annotations__)
_CHECKPOINT = TypeAdapter(ApiCheckpoint)

# Metrics columns and the snapshot keys they are read from, first present wins.
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    # The key global_step_from filters on (train/global_step in the API's example).
    "global_step": ("train/global_step", "global_step"),
    "train_loss": ("train/loss", "loss", "train_loss"),
    "eval_loss": ("eval/loss", "eval_loss", "validation/loss"),
    "learning_rate": ("train/learning_rate", "learning_rate", "lr"),
}


@dataclass(frozen=True)
class Row:
    """One object as it is stored: its columns, its whole JSON, its digest and repairs."""

    key: str  # identity within the job: the job id, a content digest, or a checkpoint key
    values: dict[str, Any]
    raw: str
    content_hash: str
    problems: tuple[str, ...] = ()  # what was repaired to store it

    @property
    def repairs(self) -> str | None:
        """The repairs as the `repairs` column holds them: a JSON list, or None."""
        return JSONText(orjson.dumps(self.problems).decode()) if self.problems else None

    def columns(self) -> dict[str, Any]:
        """The values of every column the object fills, `raw` and its digest included."""
        return {
            **self.values,
            "raw": self.raw,
            "content_hash": self.content_hash,
            "repairs": self.repairs,
        }


@dataclass
class Rows:
    """The rows of one body, in the server's order, and how often each repair was made."""

    rows: list[Row] = field(default_factory=list)
    repairs: Counter[str] = field(default_factory=Counter)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.repairs.update(row.problems)


def _stored(raw: Any, repairs: list[str]) -> tuple[dict[str, Any], str, str]:
    """The object (non-objects wrapped), its raw JSON text, and its content digest."""
    if not isinstance(raw, dict):
        raw = {"_not_an_object": raw}
        repairs.append("not_an_object")
    text = canonical(raw)
    digest = hashlib.sha256(text).hexdigest()
    dirty = b"\\u0000" in text or (not text.isascii() and not is_utf8(text))
    raw_text = JSONText(
        (dirty and escaped_raw_text(raw, repairs)) or text.decode("utf-8", "replace")
    )
    if has_number_text(raw):
        repairs.append("raw:number_as_text")
    return raw, raw_text, digest


def _cleaned(columns: dict[str, Any], repairs: list[str]) -> dict[str, Any]:
    """Text columns without NULs or lone surrogates, indexed ones cut to length."""
    for name, value in columns.items():
        if isinstance(value, str):
            cleaned = clean_text(value)
            if cleaned != value:
                repairs.append(f"{name}:nul_or_surrogate")
                columns[name] = value = cleaned
            if name in ("status", "model", "checkpoint") and len(value) > _INDEXED_LIMIT:
                columns[name] = value[:_INDEXED_LIMIT]
                repairs.append(f"{name}:too_long")
    return columns


def _times(
    columns: dict[str, Any], names: tuple[str, ...], raw: dict[str, Any], repairs: list[str]
) -> None:
    for name in names:
        value = parse_created_at(columns.get(name))
        if value is None and raw.get(name) is not None:
            repairs.append(f"{name}:unparseable")
        columns[name] = value


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    candidate = {k: raw[k] for k in JOB_FIELDS if k in raw}
    for column, outer, key in _NESTED:
        nested = raw.get(outer)
        if isinstance(nested, dict):
            candidate[column] = nested.get(key)
        elif column == outer and nested is not None:
            candidate[column] = nested  # a plain value where an object was expected
        elif column != outer:
            candidate.pop(column, None)
    if raw.get("batch_size") == "max":
        candidate["batch_size"] = None  # "as large as fits": valid, and kept in raw
    return candidate


def parse_job(raw: Any, job_id: str) -> Row:
    """A job record (full or truncated) as the fine_tune_jobs row of `job_id`."""
    repairs: list[str] = []
    obj, raw_text, digest = _stored(raw, repairs)
    columns = fit_columns(_JOB, _flatten(obj), repairs)
    _times(columns, _TIMES, obj, repairs)
    columns = _cleaned(columns, repairs)
    values = {name: columns.get(name) for name in JOB_FIELDS}
    return Row(job_id, values, raw_text, digest, tuple(repairs))


def listed_fields(raw: Any) -> frozenset[str]:
    """The columns a (truncated) record actually sends: those the listing may update."""
    if not isinstance(raw, dict):
        return frozenset()
    present = {k for k in JOB_FIELDS if k in raw}
    present |= {column for column, outer, _ in _NESTED if isinstance(raw.get(outer), dict)}
    return frozenset(present)


def parse_checkpoints(data: Any) -> Rows:
    """A checkpoints list (`data`) as rows, keyed as the module docstring says; an exact
    repeat of an earlier checkpoint is dropped."""
    result = Rows()
    items = data if isinstance(data, list) else [data]
    path_digest: dict[str, str] = {}
    seen: set[str] = set()
    for item in items:
        repairs: list[str] = []
        obj, raw_text, digest = _stored(item, repairs)
        columns = fit_columns(
            _CHECKPOINT, {k: obj[k] for k in CHECKPOINT_FIELDS if k in obj}, repairs
        )
        _times(columns, ("created_at",), obj, repairs)
        columns = _cleaned(columns, repairs)
        path = columns.get("path")
        if not (isinstance(path, str) and 0 < len(path) <= KEY_PATH_LIMIT):
            key = f"c:{digest}"
        elif path not in path_digest:
            path_digest[path] = digest
            key = f"p:{path}"
        elif path_digest[path] == digest:
            key = ""  # an exact repeat
        else:
            key = f"c:{digest}"
            repairs.append("path:reused_with_other_content")
        if not key or key in seen:
            result.repairs["duplicate_in_list"] += 1
            continue
        seen.add(key)
        values = {name: columns.get(name) for name in CHECKPOINT_FIELDS}
        result.add(Row(key, values, raw_text, digest, tuple(repairs)))
    return result


def parse_metrics(data: Any) -> Rows:
    """A metrics list as rows, one per distinct snapshot, in the server's order."""
    result = Rows()
    items = data if isinstance(data, list) else [data]
    seen: set[str] = set()
    for item in items:
        repairs: list[str] = []
        obj, raw_text, digest = _stored(item, repairs)
        if digest in seen:
            result.repairs["duplicate_in_list"] += 1
            continue
        seen.add(digest)
        values: dict[str, Any] = {}
        for column, keys in METRIC_KEYS.items():
            name = next((k for k in keys if k in obj), None)
            values[column] = None if name is None else _number(column, obj[name], repairs)
        result.add(Row(digest, values, raw_text, digest, tuple(repairs)))
    return result


def _number(column: str, value: Any, repairs: list[str]) -> float | int | None:
    """A metric's value for its column: a finite number (an integer for the step)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        repairs.append(f"{column}:not_a_number")
        return None
    if column == "global_step":
        if isinstance(value, float) and not value.is_integer():
            repairs.append(f"{column}:not_an_integer")
            return None
        step = int(value)
        if not -(2**63) <= step < 2**63:
            repairs.append(f"{column}:out_of_range")
            return None
        return step
    try:
        number = float(value)
    except OverflowError:  # an integer past a double's range
        number = math.inf
    if not math.isfinite(number):
        repairs.append(f"{column}:out_of_range")
        return None
    return number
