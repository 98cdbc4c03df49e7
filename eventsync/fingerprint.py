"""A job's events body against the one stored last: the same, the same plus new events, or new.

The API has no cursor, so each poll downloads the whole list again. The fingerprint kept in
`sync_state` lets a poll skip what it has already stored: a body identical to the last one is
not decoded at all, and a body that only appends to it has just its new tail decoded. Whatever
the shortcut, the caller stores exactly what decoding the whole body would store (see
`sync.sync_job`, which falls back to the whole body whenever the tail can't be trusted).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from eventsync.errors import PayloadError
from eventsync.jsonio import decode

_VERSION = "v1"


@dataclass(frozen=True)
class Fingerprint:
    """The sha256 of a body, the offset of its list's closing bracket, and the sha256 of the
    bytes before that bracket. Stored as text: ``v1 DIGEST END HEAD``."""

    digest: str
    end: int
    head: str

    def __str__(self) -> str:
        return f"{_VERSION} {self.digest} {self.end} {self.head}"

    @classmethod
    def parse(cls, text: str | None) -> Fingerprint | None:
        """The stored text as a Fingerprint; None for anything else (nothing is skipped)."""
        parts = (text or "").split(" ")
        if len(parts) != 4 or parts[0] != _VERSION or not parts[2].isdigit():
            return None
        return cls(digest=parts[1], end=int(parts[2]), head=parts[3])


@dataclass(frozen=True)
class Body:
    """What a fetched body holds that the last stored one didn't."""

    fingerprint: Fingerprint
    events: list[Any] | None  # None: the body is the one stored last
    appended: bool = False  # events holds only what follows the stored events
    careful: bool = False  # decoded by jsonio's careful path


def read_body(content: bytes, known: Fingerprint | None, what: str) -> Body:
    """The events of `content`, decoding no more of it than `known` doesn't cover."""
    end = max(content.rfind(b"]"), 0)
    hasher = hashlib.sha256()
    covered = 0  # bytes known to be those of the stored body
    if known is not None and 0 < known.end <= end:
        hasher.update(content[: known.end])
        if hasher.hexdigest() == known.head:
            covered = known.end
        else:
            hasher = hashlib.sha256()
    hasher.update(content[covered:end])
    head = hasher.hexdigest()
    hasher.update(content[end:])
    fingerprint = Fingerprint(digest=hasher.hexdigest(), end=end, head=head)
    if known is not None and fingerprint.digest == known.digest:
        return Body(fingerprint, events=None)
    if covered:
        tail = _tail(content[covered:])
        if tail is not None:
            return Body(fingerprint, events=tail[0], appended=True, careful=tail[1])
    return whole_body(content, fingerprint, what)


def whole_body(content: bytes, fingerprint: Fingerprint, what: str) -> Body:
    """Every event of `content`; PayloadError unless it is ``{"data": [...]}``."""
    try:
        value, careful = decode(content)
    except ValueError as exc:
        raise PayloadError(f"{what}: bad payload: body is not JSON ({exc})") from None
    data = value.get("data") if isinstance(value, dict) else None
    if not isinstance(data, list):
        found = type(data).__name__ if isinstance(value, dict) else type(value).__name__
        raise PayloadError(f"{what}: bad payload: expected {{'data': [...]}}, got {found}")
    return Body(fingerprint, events=data, careful=careful)


def _tail(rest: bytes) -> tuple[list[Any], bool] | None:
    """The events in `, {...}, {...}]}`: what follows the last stored event. None if that
    isn't what it looks like (the caller then reads the whole body)."""
    rest = rest.strip()
    if not (rest.startswith(b",") and rest.endswith(b"]}")):
        return None
    try:
        items, careful = decode(b"[" + rest[1:-1])
    except ValueError:
        return None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        return None
    return items, careful
