"""jsonio.py: any JSON body decodes, keeping what Python or the databases can't hold as text."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from eventsync.jsonio import NumberText, decode

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: beyond 64 bits too
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


@given(JSON_VALUES)
@example({"step": 123456789012345678901234567890, "token_count": -(2**64) - 1, "x": 1e308})
@example({"tiny": 5e-324, "big": 1.7976931348623157e308, "e": 1e100})
def test_the_fast_decoder_gives_the_stdlib_values(value: object) -> None:
    """Whatever the decoder, any JSON reads as the stdlib reads it, big integers included."""
    body = json.dumps(value).encode()
    # Compared as JSON text, so an integer read back as a float (1e+29) counts as a change.
    assert json.dumps(decode(body).value) == json.dumps(json.loads(body))


@pytest.mark.parametrize(
    "spelling",
    [
        "1e400",
        "-1e400",
        "1E+999",
        "1" + "0" * 400 + ".5",
        "NaN",
        "Infinity",
        "-Infinity",
        "9" * 5000,
    ],
)
def test_numbers_nothing_can_hold_are_kept_as_their_spelling(spelling: str) -> None:
    """Out of range, not finite, or too long to parse: a NumberText with the exact spelling."""
    decoded = decode(f'{{"data": [{{"x": {spelling}, "y": 1.5}}]}}'.encode())
    value = decoded.value["data"][0]
    assert decoded.careful
    assert isinstance(value["x"], NumberText)
    assert value["x"] == spelling
    assert value["y"] == 1.5


def test_a_number_too_small_for_a_double_reads_as_zero() -> None:
    """1e-400 is 0 to every JSON parser, on either path: one rule, not one per path."""
    assert decode(b'{"x": 1e-400}') == (({"x": 0.0}), False)
    assert decode(b'{"x": 1e-400, "y": NaN}').value["x"] == 0.0


def test_bytes_that_are_not_utf8_become_surrogates_not_an_error() -> None:
    """Invalid UTF-8 inside a string decodes (the event parser repairs it), not a failure."""
    decoded = decode(b'{"data": [{"message": "ok \xff\xfe bad"}], "x": "\xc3\xa9"}')
    assert decoded.careful
    assert decoded.value["data"][0]["message"] == "ok \udcff\udcfe bad"
    assert decoded.value["x"] == "\u00e9"


def test_a_byte_order_mark_is_skipped() -> None:
    """A body that starts with a UTF-8 byte-order mark still decodes."""
    assert decode(b'\xef\xbb\xbf{"data": []}').value == {"data": []}


def test_what_is_not_json_is_a_value_error() -> None:
    """HTML from a proxy, or a body cut short, is a JSONDecodeError for the caller."""
    for body in (b"<html>502</html>", b'{"data": [{"a": 1', b""):
        with pytest.raises(json.JSONDecodeError):
            decode(body)


def test_json_nested_past_the_parsers_depth_is_a_value_error() -> None:
    """A hostile body of 100,000 open brackets fails its job like any body that isn't JSON."""
    for body in (b"[" * 100_000, b'{"a":' * 50_000):
        with pytest.raises(ValueError, match="nested too deeply"):
            decode(body)


def test_only_integers_past_64_bits_leave_the_fast_path() -> None:
    """A long digit run in a string, or an integer of 18 digits, stays on the fast decoder; an
    integer of 19 digits or more, in an object or a list, takes the careful one and keeps its
    value."""
    assert not decode(b'{"hash": "1234567890123456789012", "n": 123456789012345678}').careful
    for body in (b'{"n": -98765432109876543210}', b"[1, 98765432109876543210]"):
        decoded = decode(body)
        assert decoded.careful
        assert decoded.value == json.loads(body)
