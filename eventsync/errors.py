"""One exception tree for eventsync.

    EventsyncError                 root; ``kind`` names the cause in one word
    ├── ConfigError                bad or missing setting (no API key, bad URL, bad job id)
    ├── ApiError                   the API answered, but not with what we asked for
    │   ├── AuthError              401/403: the key is missing or was rejected
    │   ├── NotFoundError          404: the job does not exist (for this key)
    │   └── ApiStatusError         any other non-2xx status
    ├── TransportError             no usable answer: connect error, timeout, cut-off body
    │   └── UnreachableError       no connection at all: DNS failure, refused, unreachable
    ├── PayloadError               a 2xx answer whose body is not the JSON shape we expect
    │   └── RefusedBodyError       a body not read at all: over the size cap, unasked encoding
    ├── StoreError                 the database failed while storing
    └── QueryError                 a query of `eventsync sql` failed (or timed out)
        └── QueryRefused           ... or was refused before it ran: not one read statement

Messages are safe to print: they never contain the API key.
"""

from __future__ import annotations


class EventsyncError(Exception):
    """Root of every error eventsync raises on purpose."""

    kind = "error"


class ConfigError(EventsyncError):
    """A setting is missing or invalid; the user can fix it."""

    kind = "config"


class ApiError(EventsyncError):
    """The API answered with an error status."""

    kind = "api"

    def __init__(self, message: str, *, status_code: int, api_message: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.api_message = api_message


class AuthError(ApiError):
    """401 or 403."""

    kind = "auth"


class NotFoundError(ApiError):
    """404: unknown job."""

    kind = "not_found"


class ApiStatusError(ApiError):
    """Any other error status (429, 5xx, ...)."""

    kind = "http_status"
    retry_after: float | None = None  # seconds, from Retry-After / retry-after-ms


class TransportError(EventsyncError):
    """The request did not get a complete answer."""

    kind = "network"


class UnreachableError(TransportError):
    """No connection could be made: the host name doesn't resolve, or nothing listens."""


class PayloadError(EventsyncError):
    """The answer was not the JSON shape the API documents."""

    kind = "payload"


class RefusedBodyError(PayloadError):
    """A body eventsync won't read (too large, or compressed in a way it didn't ask for):
    the same request would get the same answer."""


class StoreError(EventsyncError):
    """The database failed while storing a job."""

    kind = "database"


class QueryError(EventsyncError):
    """A query of `eventsync sql` failed in the database, or ran past its timeout."""

    kind = "query"


class QueryRefused(QueryError):
    """A query of `eventsync sql` that is not one read-only statement; the user can fix it."""

    kind = "refused"


def first_line(exc: BaseException) -> str:
    """A driver error's first line, without SQLAlchemy's SQL and parameter dump."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__
