"""Pure code: raw API events -> rows to store. No I/O.

Both event generations are accepted. The 2026-04 events carry `hash` and `training_offset`;
the 2026-08 ones drop them and add `tokenized_dataset_path` and the early-stopping fields. An
event without a hash gets one derived from its content, so re-polls dedupe.

Nothing the API sent is dropped: a field that doesn't fit its column is stored as NULL (or
with NULs replaced) and the repair is recorded in the row's `repairs` and counted; `raw` always
keeps the whole event.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Annotated, Any, NamedTuple

import orjson
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

BigInt = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]

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
FLOAT_FIELDS = ("early_stopping_best_metric_value",)
EVENT_FIELDS = (*TEXT_FIELDS, *INT_FIELDS, *FLOAT_FIELDS, "created_at")
_VALUE_FIELDS = (*TEXT_FIELDS, *INT_FIELDS, *FLOAT_FIELDS)
_EMPTY_VALUES = dict.fromkeys(_VALUE_FIELDS)
_values_of = itemgetter(*_VALUE_FIELDS)


class EventRow(NamedTuple):
    """One event as it is stored, without job_id and seq. A tuple in the column order the
    store sends to the driver, so that building the driver's rows costs no per-field work."""

    object: str | None
    level: str | None
    message: str | None
    type: str | None
    wandb_url: str | None
    checkpoint_path: str | None
    model_path: str | None
    hash: str
    tokenized_dataset_path: str | None
    param_count: int | None
    token_count: int | None
    total_steps: int | None
    step: int | None
    training_offset: int | None
    early_stopping_best_step: int | None
    early_stopping_best_metric_value: float | None
    raw: str  # the whole event as JSON text
    content_hash: str  # sha256 of the event's canonical JSON
    repairs: str | None  # JSON list of what was repaired to store it, or None
    created_at: datetime | None  # last: the one value whose form differs by database


ROW_COLUMNS = EventRow._fields
assert ROW_COLUMNS[: len(_VALUE_FIELDS)] == _VALUE_FIELDS


class _EventColumns(TypedDict, total=False):
    """FineTuneEvent, both generations, every field optional; lax coercion ("12" -> 12)."""

    # NaN and Infinity are not JSON; they arrive as strings (see client.py) and are refused
    # here, so the column is NULL and the repair recorded while raw keeps the spelling.
    __pydantic_config__ = ConfigDict(  # type: ignore[misc]
        coerce_numbers_to_str=True, allow_inf_nan=False
    )

    object: str | None
    level: str | None
    message: str | None
    type: str | None
    wandb_url: str | None
    checkpoint_path: str | None
    model_path: str | None
    hash: str | None
    tokenized_dataset_path: str | None
    param_count: BigInt | None
    token_count: BigInt | None
    total_steps: BigInt | None
    step: BigInt | None
    training_offset: BigInt | None
    early_stopping_best_step: BigInt | None
    early_stopping_best_metric_value: float | None
    created_at: Any


assert tuple(_EventColumns.__annotations__) == EVENT_FIELDS  # one field list, two typings
_EVENTS = TypeAdapter(list[_EventColumns])
# Indexed text columns (hash, type) are capped well below Postgres' btree limit (~2.7 kB).
_INDEX_LIMIT = 512
_EVENT = TypeAdapter(_EventColumns)


@dataclass
class ParsedEvents:
    """The rows of one job's event list, in the server's order, and what was repaired."""

    rows: list[EventRow]
    repairs: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0


def canonical_json(value: Any) -> bytes:
    """Sorted-key compact JSON, the input of derived hashes and content digests."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        # orjson refuses integers beyond 64 bits and lone surrogates; json keeps both.
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8", "surrogatepass")


def json_text(value: Any) -> str:
    """JSON text for a JSON column: orjson, or the stdlib for integers beyond 64 bits."""
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, ensure_ascii=False)


def parse_created_at(value: Any) -> datetime | None:
    """An aware UTC datetime from the API's string; naive strings are taken as UTC."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 shifted out of range
        return None


def _clean_text(value: str) -> str:
    """Postgres text can hold neither NUL nor lone surrogates."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _escape_raw(value: Any) -> Any:
    """`raw` with NULs kept as the visible escape `\\u0000` and lone surrogates replaced."""
    if isinstance(value, str):
        return _clean_text(value.replace("\x00", "\\u0000"))
    if isinstance(value, dict):
        return {_escape_raw(k): _escape_raw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_raw(v) for v in value]
    return value


def _columns_of(raw: dict[str, Any], repairs: list[str]) -> dict[str, Any]:
    """Validate one event alone, nulling each field that doesn't fit and noting why."""
    candidate = {k: raw[k] for k in EVENT_FIELDS if k in raw}
    while True:
        try:
            return dict(_EVENT.validate_python(candidate))
        except ValidationError as exc:
            for err in exc.errors():
                name = str(err["loc"][0])
                if candidate.pop(name, None) is not None:
                    repairs.append(f"{name}:{err['type']}")


_VALIDATE_AT_ONCE = 1000


def _validated(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Any]]:
    """Each event with its validated columns (a new dict, free to change), or None when the
    event has a field that doesn't fit. One pydantic call per thousand events: one call per
    event costs more, and one for a whole list of 50,000 holds a second copy of it."""
    for start in range(0, len(objects), _VALIDATE_AT_ONCE):
        chunk = objects[start : start + _VALIDATE_AT_ONCE]
        try:
            yield from zip(chunk, _EVENTS.validate_python(chunk), strict=True)
        except ValidationError:
            yield from ((raw, None) for raw in chunk)  # one at a time, by the caller


def parse_events(data: list[Any]) -> ParsedEvents:
    """Turn one job's `data` list into rows (without job_id or seq), deduped by hash."""
    result = ParsedEvents(rows=[])
    objects: list[dict[str, Any]] = []
    for item in data:
        if isinstance(item, dict):
            objects.append(item)
        else:
            # Not an event at all; kept as the raw of an otherwise empty row.
            objects.append({"_not_an_object": item})
            result.repairs["not_an_object"] += 1
    seen: dict[str, str] = {}  # hash -> content digest of the event stored under it
    rows = result.rows
    make_row = EventRow._make
    sha256 = hashlib.sha256
    for raw, valid in _validated(objects):
        repairs: list[str] = []
        columns = valid if valid is not None else _columns_of(raw, repairs)
        canonical = canonical_json(raw)
        digest = sha256(canonical).hexdigest()

        created_at = parse_created_at(columns.get("created_at"))
        if created_at is None and raw.get("created_at") is not None:
            repairs.append("created_at:unparseable")
        # Text that Postgres can't hold shows in the canonical form: an escaped NUL, or (only
        # on the stdlib fallback path) bytes that aren't UTF-8. Most events have neither.
        dirty = b"\\u0000" in canonical or (not canonical.isascii() and _needs_escape(canonical))
        if dirty:
            _clean_columns(columns, repairs)

        hash_ = columns.get("hash") or digest
        previous = seen.get(hash_)
        if previous is not None:
            if previous == digest:
                result.duplicates += 1
                result.repairs["duplicate_in_list"] += 1
                continue
            # Same hash, other content: kept under a hash of its own, never dropped.
            hash_ = f"{hash_}~{digest[:16]}"
            repairs.append("hash:reused_with_other_content")
        seen[hash_] = digest
        columns["hash"] = hash_
        if len(hash_) > _INDEX_LIMIT or len(columns.get("type") or "") > _INDEX_LIMIT:
            _cap_indexed(columns, repairs)

        # The canonical text is the event as JSON already: stored as is, unless escaped.
        raw_text = (dirty and _escaped_raw_text(raw, repairs)) or canonical.decode()
        repairs_text = None
        if repairs:
            result.repairs.update(repairs)
            repairs_text = orjson.dumps(repairs).decode()
        values = _values_of({**_EMPTY_VALUES, **columns})
        rows.append(make_row((*values, raw_text, digest, repairs_text, created_at)))
    return result


def _clean_columns(columns: dict[str, Any], repairs: list[str]) -> None:
    """Replace NULs and lone surrogates in the text columns."""
    for name in TEXT_FIELDS:
        value = columns.get(name)
        if value is not None:
            cleaned = _clean_text(value)
            if cleaned != value:
                repairs.append(f"{name}:nul_or_surrogate")
                columns[name] = cleaned


def _escaped_raw_text(raw: dict[str, Any], repairs: list[str]) -> str | None:
    """The raw event's JSON text with NULs and lone surrogates escaped; None if it has none."""
    escaped = _escape_raw(raw)
    if escaped == raw:
        return None
    repairs.append("raw:escaped")
    return canonical_json(escaped).decode()


def _cap_indexed(columns: dict[str, Any], repairs: list[str]) -> None:
    """Postgres can't index a value this long: shorten it stably. raw keeps the original."""
    for name in ("hash", "type"):
        value = columns.get(name)
        if value is not None and len(value) > _INDEX_LIMIT:
            columns[name] = f"{value[: _INDEX_LIMIT - 72]}~sha256:{_sha256(value)}"
            repairs.append(f"{name}:too_long")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _needs_escape(canonical: bytes) -> bool:
    """True for the surrogates that only the stdlib fallback of canonical_json lets through.
    The caller has ruled out ASCII text, which has none."""
    try:
        canonical.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
