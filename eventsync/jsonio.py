"""JSON in and out: decoding API bodies, the canonical form behind hashes, and JSON column text.

Bodies are decoded by orjson when they hold nothing it can't represent, and otherwise by the
stdlib with hooks (the *careful* path). The careful path never fails on what
JSON allows but Python or the databases can't hold, and never loses its spelling:

- a number out of a double's range (``1e400``, ``-1e400``), ``NaN``/``Infinity``, or an
  integer too long for Python to parse becomes a `NumberText`: a string holding the spelling,
  so `raw` stays valid JSON on SQLite and Postgres (a number too small for a double, such as
  ``1e-400``, reads as 0 on both paths, as every JSON parser reads it);
- bytes that aren't UTF-8 inside strings become lone surrogates (``surrogateescape``), which
  the event parser replaces with U+FFFD and records as a repair.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import orjson


class NumberText(str):
    """A JSON number (or NaN/Infinity) no float or int here can hold, kept as its spelling."""

    __slots__ = ()


class Decoded(NamedTuple):
    value: Any
    careful: bool  # decoded by the stdlib path: may hold NumberText or lone surrogates


_BOM = b"\xef\xbb\xbf"


def decode(content: bytes) -> Decoded:
    """The JSON value of `content`; ValueError if it is not JSON at all."""
    try:
        # orjson refuses what it can't hold (NaN, 1e400, bad UTF-8, lone surrogates, a BOM),
        # except integers past 64 bits, which it reads as floats: those take the careful path.
        value = orjson.loads(content)
        if not _may_hold_a_long_integer(content):
            return Decoded(value, careful=False)
    except orjson.JSONDecodeError:
        pass
    text = content.removeprefix(_BOM).decode("utf-8", "surrogateescape")
    try:
        value = json.loads(text, parse_float=_float, parse_int=_int, parse_constant=NumberText)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
    return Decoded(value, careful=True)


# Digits -> "0", the bytes a value follows -> ":", "-" kept, whitespace dropped, the rest "x":
# a number of 19 digits or more then shows as ":" and a run of "0"s. A string that looks the
# same (": 1234567890123456789" in a message) only costs the careful path.
_SHAPES = bytearray(b"x" * 256)
_SHAPES[ord("0") : ord("9") + 1] = b"0" * 10
_SHAPES[ord(":")] = _SHAPES[ord(",")] = _SHAPES[ord("[")] = ord(":")
_SHAPES[ord("-")] = ord("-")
_WHITESPACE = b" \t\n\r"
_LONG = b"0" * 19


def _may_hold_a_long_integer(content: bytes) -> bool:
    shapes = content.translate(_SHAPES, _WHITESPACE)
    return b":" + _LONG in shapes or b":-" + _LONG in shapes


def _float(spelling: str) -> float | NumberText:
    value = float(spelling)
    return value if math.isfinite(value) else NumberText(spelling)


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


class JSONText(str):
    """Text that is JSON already (a row's raw or repairs): stored in a JSON column as is."""

    __slots__ = ()


def column_text(value: Any) -> str:
    """JSON text for a JSON column: JSONText as it is, else orjson, or the stdlib for
    integers beyond 64 bits."""
    if isinstance(value, JSONText):
        return str.__str__(value)
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, ensure_ascii=False)
