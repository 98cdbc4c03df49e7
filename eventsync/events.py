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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

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
_EMPTY_ROW = dict.fromkeys(EVENT_FIELDS)


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


_EVENTS = TypeAdapter(list[_EventColumns])
# Indexed text columns, capped well below Postgres' btree limit (~2.7 kB per entry).
_INDEXED_LIMITS = {"hash": 512, "type": 512}
_EVENT = TypeAdapter(_EventColumns)


@dataclass
class ParsedEvents:
    """The rows of one job's event list, in the server's order, and what was repaired."""

    rows: list[dict[str, Any]]
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
    try:
        validated: list[dict[str, Any]] | None = [dict(v) for v in _EVENTS.validate_python(objects)]
    except ValidationError:
        validated = None  # slow path below, one event at a time

    seen: dict[str, str] = {}  # hash -> content digest of the event stored under it
    for index, raw in enumerate(objects):
        repairs: list[str] = []
        columns = validated[index] if validated is not None else _columns_of(raw, repairs)
        canonical = canonical_json(raw)
        digest = hashlib.sha256(canonical).hexdigest()
        # Text that Postgres can't hold shows in the canonical form: an escaped NUL, or (only
        # on the stdlib fallback path) bytes that aren't UTF-8. Most events have neither.
        dirty = b"\\u0000" in canonical or _needs_escape(canonical)

        created_at = parse_created_at(columns.get("created_at"))
        if created_at is None and raw.get("created_at") is not None:
            repairs.append("created_at:unparseable")
        columns["created_at"] = created_at

        for name in TEXT_FIELDS if dirty else ():
            value = columns.get(name)
            if value is not None:
                cleaned = _clean_text(value)
                if cleaned != value:
                    repairs.append(f"{name}:nul_or_surrogate")
                    columns[name] = cleaned

        if not columns.get("hash"):
            columns["hash"] = digest
        previous = seen.get(columns["hash"])
        if previous == digest:
            result.duplicates += 1
            result.repairs["duplicate_in_list"] += 1
            continue
        if previous is not None:
            # Same hash, other content: kept under a hash of its own, never dropped.
            columns["hash"] = f"{columns['hash']}~{digest[:16]}"
            repairs.append("hash:reused_with_other_content")
        seen[columns["hash"]] = digest
        for name, limit in _INDEXED_LIMITS.items():
            value = columns.get(name)
            if value is not None and len(value) > limit:
                # Postgres can't index a value this long; raw keeps the original.
                columns[name] = f"{value[: limit - 72]}~sha256:{_sha256(value)}"
                repairs.append(f"{name}:too_long")

        stored_raw = raw
        if dirty:
            stored_raw = _escape_raw(raw)
            if stored_raw != raw:
                repairs.append("raw:escaped")
        if repairs:
            result.repairs.update(repairs)
        row = {**_EMPTY_ROW, **columns}
        row["raw"] = stored_raw
        # The canonical text is the raw event as JSON already: stored as is, not encoded again.
        row["raw_text"] = None if stored_raw is not raw else canonical.decode()
        row["content_hash"] = digest
        row["repairs"] = repairs or None
        result.rows.append(row)
    return result


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _needs_escape(canonical: bytes) -> bool:
    """True for the surrogates that only the stdlib fallback of canonical_json lets through."""
    if canonical.isascii():
        return False
    try:
        canonical.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
