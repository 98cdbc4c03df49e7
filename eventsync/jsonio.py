"""JSON in and out: decoding API bodies, the canonical form behind hashes, and JSON column text.

Bodies are decoded by pydantic's parser (jiter) when they hold nothing it can't represent, and
otherwise by the stdlib with hooks (the *careful* path). The careful path never fails on what
JSON allows but Python or the databases can't hold, and never loses its spelling:

- a number out of range (``1e400``, ``-1e400``, ``1e-400``), ``NaN``/``Infinity``, or an
  integer too long for Python to parse becomes a `NumberText`: a string holding the spelling,
  so `raw` stays valid JSON on SQLite and Postgres;
- bytes that aren't UTF-8 inside strings become lone surrogates (``surrogateescape``), which
  the event parser replaces with U+FFFD and records as a repair.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

import orjson
import pydantic_core


class NumberText(str):
    """A JSON number (or NaN/Infinity) no float or int here can hold, kept as its spelling."""

    __slots__ = ()


class Decoded(NamedTuple):
    value: Any
    careful: bool  # decoded by the stdlib path: may hold NumberText or lone surrogates


# A number jiter would silently turn into inf or 0.0: an exponent of three digits or more
# after a number's first digit, or a run of 200 digits (a huge mantissa). It may also match
# inside a string; that only costs the slower path.
_RISKY_NUMBER = re.compile(rb"[:\[,]\s*-?\d+(?:\.\d+)?[eE][+-]?\d{3}|\d{200}")
_BOM = b"\xef\xbb\xbf"


def decode(content: bytes) -> Decoded:
    """The JSON value of `content`; ValueError if it is not JSON at all."""
    if not _RISKY_NUMBER.search(content):
        try:
            return Decoded(pydantic_core.from_json(content, allow_inf_nan=False), careful=False)
        except ValueError:
            pass  # NaN, lone surrogates, bad UTF-8, a BOM, huge integers: the careful path
    text = content.removeprefix(_BOM).decode("utf-8", "surrogateescape")
    value = json.loads(text, parse_float=_float, parse_int=_int, parse_constant=NumberText)
    return Decoded(value, careful=True)


def _float(spelling: str) -> float | NumberText:
    value = float(spelling)
    if not math.isfinite(value):
        return NumberText(spelling)
    if value == 0.0 and spelling.lower().split("e")[0].strip("-+0.") != "":
        return NumberText(spelling)  # underflow: 1e-400 is not 0
    return value


def _int(spelling: str) -> int | NumberText:
    try:
        return int(spelling)
    except ValueError:  # longer than sys.get_int_max_str_digits()
        return NumberText(spelling)


def has_number_text(value: Any) -> bool:
    """True if a carefully decoded value holds a NumberText anywhere."""
    if isinstance(value, NumberText):
        return True
    if isinstance(value, dict):
        return any(has_number_text(v) for v in value.values())
    if isinstance(value, list):
        return any(has_number_text(v) for v in value)
    return False


def canonical(value: Any) -> bytes:
    """Sorted-key compact JSON, the input of derived keys and content digests."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        # orjson refuses integers beyond 64 bits and lone surrogates; json keeps both.
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8", "surrogatepass")


def column_text(value: Any) -> str:
    """JSON text for a JSON column: orjson, or the stdlib for integers beyond 64 bits."""
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, ensure_ascii=False)
