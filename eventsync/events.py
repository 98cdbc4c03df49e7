"""Pure code: a job's raw API events -> the records to store, each under its key. No I/O.

Both event generations are accepted. The 2026-04 events carry `hash` and `training_offset`;
the 2026-08 ones drop them and add `tokenized_dataset_path` and the early-stopping fields.

An event's key (unique per job) depends only on the event and the events before it in the
list, never on what was fetched when, so any sequence of fetches of a growing list stores what
fetching the final list once stores:

- ``h:HASH``: the first event of the list with a given `hash`, when the hash is short, clean
  text;
- ``hs:SHA256``: the same, for a hash too long or too odd to be a key (sha256 of the hash);
- ``c:SHA256``: every other event (no hash, or a hash an earlier event already has), keyed
  by the sha256 of its canonical JSON. An exact repeat of an earlier event is dropped.

The prefixes keep the three apart: a hash sent by the API can never equal a derived key.

Nothing the API sent is dropped: a field that doesn't fit its column is stored as NULL (or
with NULs replaced) and the repair is recorded in the record's `repairs`; `raw` always keeps
the whole event.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Annotated, Any, NamedTuple, get_args, get_type_hints

import orjson
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from eventsync.jsonio import canonical, has_number_text

BigInt = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class ApiEvent(TypedDict, total=False):
    """FineTuneEvent, both generations, every field optional; lax coercion ("12" -> 12).
    The one list of the API's event fields: the store's columns follow it."""

    # NaN and Infinity are not JSON numbers; they arrive as text (see jsonio) and are refused
    # here, so the column is NULL and the repair recorded while raw keeps the spelling.
    __pydantic_config__ = ConfigDict(  # type: ignore[misc]
        coerce_numbers_to_str=True, allow_inf_nan=False
    )

    object: str | None
    created_at: Any  # parsed by parse_created_at
    level: str | None
    message: str | None
    type: str | None
    param_count: BigInt | None
    token_count: BigInt | None
    total_steps: BigInt | None
    wandb_url: str | None
    step: BigInt | None
    checkpoint_path: str | None
    model_path: str | None
    training_offset: BigInt | None
    hash: str | None
    tokenized_dataset_path: str | None
    early_stopping_best_step: BigInt | None
    early_stopping_best_metric_value: float | None


API_FIELDS: tuple[str, ...] = tuple(ApiEvent.__annotations__)
_TEXT_FIELDS = tuple(
    name for name, kind in get_type_hints(ApiEvent).items() if str in get_args(kind)
)
_EMPTY = dict.fromkeys(API_FIELDS)
_values_of = itemgetter(*API_FIELDS)
_INDEX = {name: i for i, name in enumerate(API_FIELDS)}
_TYPE = _INDEX["type"]
_EVENTS = TypeAdapter(list[ApiEvent])
_EVENT = TypeAdapter(ApiEvent)

# Keys are indexed: a hash longer than this (in characters) is keyed by its sha256 instead.
KEY_HASH_LIMIT = 256
# The indexed `type` column is capped well below Postgres' btree limit (~2.7 kB).
_TYPE_LIMIT = 512


class Event(NamedTuple):
    """One event as it is stored, without its job and seq."""

    key: str
    values: tuple[Any, ...]  # the API_FIELDS, in that order; created_at a UTC datetime
    raw: str  # the whole event as JSON text
    content_hash: str  # sha256 of the event's canonical JSON
    repairs: str | None  # JSON list of what was repaired to store it, or None

    @property
    def type(self) -> str | None:
        value: str | None = self.values[_TYPE]
        return value

    def field(self, name: str) -> Any:
        """The value of one of the API_FIELDS."""
        return self.values[_INDEX[name]]


@dataclass
class ParsedEvents:
    """The events of one job's list, in the server's order, and what was repaired."""

    events: list[Event]
    repairs: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0


def parse_created_at(value: Any) -> datetime | None:
    """An aware UTC datetime from the API's string; naive strings are taken as UTC."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 shifted out of range
        return None


_VALIDATE_AT_ONCE = 1000


def _validated(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Any]]:
    """Each event with its validated columns (a new dict, free to change), or None when the
    event has a field that doesn't fit. One pydantic call per thousand events: one call per
    event costs more, and one for a whole list of 50,000 holds a second copy of it. Each
    chunk leaves `objects` as it is taken, so the events parsed so far can be let go."""
    while objects:
        chunk = objects[:_VALIDATE_AT_ONCE]
        del objects[:_VALIDATE_AT_ONCE]
        try:
            yield from zip(chunk, _EVENTS.validate_python(chunk), strict=True)
        except ValidationError:
            yield from ((raw, None) for raw in chunk)  # one at a time, by the caller


def _columns_of(raw: dict[str, Any], repairs: list[str]) -> dict[str, Any]:
    """Validate one event alone, nulling each field that doesn't fit and noting why."""
    return fit_columns(_EVENT, {k: raw[k] for k in API_FIELDS if k in raw}, repairs)


def fit_columns(
    adapter: TypeAdapter[Any], candidate: dict[str, Any], repairs: list[str]
) -> dict[str, Any]:
    """`candidate` validated by `adapter` (a TypedDict's), each field that doesn't fit
    dropped and noted in `repairs` as FIELD:WHY."""
    while True:
        try:
            return dict(adapter.validate_python(candidate))
        except ValidationError as exc:
            for err in exc.errors():
                name = str(err["loc"][0])
                if candidate.pop(name, None) is not None:
                    repairs.append(f"{name}:{err['type']}")


def parse_events(data: list[Any], *, careful: bool = False, consume: bool = False) -> ParsedEvents:
    """One job's `data` list as records, keyed as the module docstring says. `careful` says
    the list came from jsonio's careful path, which may have kept numbers as text. With
    `consume`, `data` is emptied, so that the decoded events are let go as they are parsed
    and a large job is not held twice."""
    result = ParsedEvents(events=[])
    objects: list[dict[str, Any]] = []
    for item in data:
        if isinstance(item, dict):
            objects.append(item)
        else:
            # Not an event at all; kept as the raw of an otherwise empty record.
            objects.append({"_not_an_object": item})
            result.repairs["not_an_object"] += 1
    if consume:
        data.clear()
    first_of_hash: dict[str, str] = {}  # hash -> content digest of its first event
    keys: set[str] = set()
    events = result.events
    sha256 = hashlib.sha256
    for raw, valid in _validated(objects):
        repairs: list[str] = []
        columns = valid if valid is not None else _columns_of(raw, repairs)
        text = canonical(raw)
        digest = sha256(text).hexdigest()
        created_at = columns["created_at"] = parse_created_at(columns.get("created_at"))
        if created_at is None and raw.get("created_at") is not None:
            repairs.append("created_at:unparseable")
        if careful and has_number_text(raw):
            repairs.append("raw:number_as_text")
        hash_ = columns.get("hash") or None
        # Text that Postgres can't hold shows in the canonical form: an escaped NUL, or (only
        # on jsonio's careful path) bytes that aren't UTF-8. Most events have neither.
        dirty = b"\\u0000" in text or (not text.isascii() and not is_utf8(text))
        if dirty:
            _clean_columns(columns, repairs)

        if hash_ is not None and hash_ not in first_of_hash:
            first_of_hash[hash_] = digest
            key = _hash_key(hash_)
        elif hash_ is not None and first_of_hash[hash_] == digest:
            key = ""  # an exact repeat of the event that has this hash
        else:
            key = f"c:{digest}"
            if hash_ is not None:
                repairs.append("hash:reused_with_other_content")
        if not key or key in keys:
            result.duplicates += 1
            result.repairs["duplicate_in_list"] += 1
            continue
        keys.add(key)
        kind = columns.get("type")
        if kind is not None and len(kind) > _TYPE_LIMIT:
            columns["type"] = f"{kind[: _TYPE_LIMIT - 72]}~sha256:{_sha256(kind)}"
            repairs.append("type:too_long")

        # The canonical text is the event as JSON already: stored as is, unless escaped.
        raw_text = (dirty and escaped_raw_text(raw, repairs)) or text.decode()
        repairs_text = None
        if repairs:
            result.repairs.update(repairs)
            repairs_text = orjson.dumps(repairs).decode()
        values = _values_of({**_EMPTY, **columns})
        events.append(Event(key, values, raw_text, digest, repairs_text))
    return result


_PLAIN_HASH = re.compile(r"[^\x00\ud800-\udfff]*")


def _hash_key(hash_: str) -> str:
    """The key of the first event with this hash: the hash itself when it can be indexed."""
    if len(hash_) <= KEY_HASH_LIMIT and (
        (hash_.isascii() and "\x00" not in hash_) or _PLAIN_HASH.fullmatch(hash_)
    ):
        return f"h:{hash_}"
    return f"hs:{_sha256(hash_)}"


def clean_text(value: str) -> str:
    """Postgres text can hold neither NUL nor lone surrogates: both become U+FFFD."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not _is_utf8_text(value):
        value = _SURROGATE.sub("\ufffd", value)
    return value


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _escape_raw(value: Any) -> Any:
    """`raw` with NULs kept as the visible escape `\\u0000` and lone surrogates replaced."""
    if isinstance(value, str):
        return clean_text(value.replace("\x00", "\\u0000"))
    if isinstance(value, dict):
        return {_escape_raw(k): _escape_raw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_raw(v) for v in value]
    return value


def _clean_columns(columns: dict[str, Any], repairs: list[str]) -> None:
    """Replace NULs and lone surrogates in the text columns."""
    for name in _TEXT_FIELDS:
        value = columns.get(name)
        if value is not None:
            cleaned = clean_text(value)
            if cleaned != value:
                repairs.append(f"{name}:nul_or_surrogate")
                columns[name] = cleaned


def escaped_raw_text(raw: dict[str, Any], repairs: list[str]) -> str | None:
    """The raw event's JSON text with NULs and lone surrogates escaped; None if it has none."""
    escaped = _escape_raw(raw)
    if escaped == raw:
        return None
    repairs.append("raw:escaped")
    return canonical(escaped).decode()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_utf8_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
