"""The one Settings object: read from flags, the environment and `.env`, validated at start.

A frozen dataclass whose fields carry their variable, type and bounds. Not pydantic-settings:
importing it (asyncio, argparse, pydantic's dataclasses) made every command start about 0.25 s
later, more than all the rest of `eventsync status` beside SQLAlchemy. `.env` is read by
python-dotenv.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from eventsync.errors import ConfigError

DEFAULT_BASE_URL = "https://api.together.ai"
DEFAULT_DATABASE_URL = "sqlite:///eventsync.db"
SUPPORTED_DRIVERS = ("sqlite", "sqlite+pysqlite", "postgresql+psycopg")

# Together job ids look like ``ft-01234567-89ab-...``. Anything with a slash, a dot-segment or
# whitespace could address another endpoint, so it is refused before any request.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")


def validate_job_id(job_id: str) -> str:
    """Return the stripped id, or raise ConfigError if it can't be a fine-tune job id."""
    job_id = job_id.strip()
    if not JOB_ID_RE.match(job_id) or ".." in job_id:
        raise ConfigError(
            f"invalid job id {job_id!r}: expected letters, digits, '-', '_', '.' or ':' "
            "(for example ft-01234567-89ab-cdef-0123-456789abcdef)"
        )
    return job_id


def api_root(base_url: str) -> str:
    """The URL that `/fine-tunes` hangs off: `base` + `/v1`, unless base already ends in `/v1`."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def mask_url(url: str) -> str:
    """A database URL with its passwords replaced by ***, for logs and errors: the one in the
    user part, and libpq's `password` and `sslpassword` in the query string."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "<unparseable URL>"
    secret = {key: "***" for key in parsed.query if "password" in key.lower()}
    rendered = parsed.update_query_dict(secret).render_as_string(hide_password=True)
    return rendered.replace("=%2A%2A%2A", "=***")  # the query's *** comes back URL-encoded


class Secret:
    """A value that is never printed: its repr is stars."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _setting(
    default: Any,
    kind: Callable[[Any], Any],
    *,
    env: str | None = None,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
) -> Any:
    """A field of Settings: its default, how a value is read (`kind`, which raises
    ValueError with what it must be), its bounds, and its variable if not EVENTSYNC_NAME."""
    meta = {"kind": kind, "env": env, "low": low, "high": high, "above": above}
    return field(default=default, metadata=meta)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be a whole number")
    try:
        return int(value)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None


_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n", ""}


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError("must be true or false")


def _text(value: Any) -> str:
    return str(value).strip()


def _secret(value: Any) -> Secret | None:
    if value is None or isinstance(value, Secret):
        return value
    return Secret(str(value))


def _log_format(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ("console", "json"):
        raise ValueError("must be 'console' or 'json'")
    return text


def _job_ids(value: Any) -> tuple[str, ...]:
    """Comma-separated, or a list; a bad id is a ConfigError of its own, naming it."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(validate_job_id(str(v)) for v in items if str(v).strip())


def _base_url(value: Any) -> str:
    text = str(value).strip()
    try:
        url = urlsplit(text)
        url.port  # noqa: B018  (raises on a port that isn't a number)
    except ValueError as exc:
        raise ValueError(f"is not a URL ({exc}): {text!r}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {text!r}")
    return text


def _database_url(value: Any) -> str:
    try:
        url = make_url(str(value).strip())
    except ArgumentError:
        raise ValueError("is not a database URL (try sqlite:///eventsync.db)") from None
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        # psycopg 3 is what we install; postgresql:// would look for psycopg2.
        url = url.set(drivername="postgresql+psycopg")
    if url.drivername not in SUPPORTED_DRIVERS:
        raise ValueError(
            f"driver {url.drivername!r} is not supported: use sqlite:///PATH "
            "or postgresql://USER:PASSWORD@HOST/DB"
        )
    if url.drivername.startswith("sqlite") and url.database in (None, "", ":memory:"):
        raise ValueError("must name a SQLite file (sqlite:///eventsync.db), not memory")
    return url.render_as_string(hide_password=False)


def workers_for(concurrency: int) -> int:
    """Jobs under way at once for `concurrency` requests in flight: twice as many, so that
    while a job is parsed and stored, its request slot already fetches another job. The
    client holds the requests to `concurrency` (TogetherClient's `in_flight`)."""
    return 2 * max(1, concurrency)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every knob eventsync has. Flags override the environment, which overrides `.env`.

    Made directly (`Settings(concurrency=4)`, as tests do) or from the environment with
    `load_settings`; either way every value is converted and checked, and a bad one is a
    ConfigError naming its variable.
    """

    database_url: str = _setting(DEFAULT_DATABASE_URL, _database_url)
    # Only the TOGETHER_* names: a generic API_KEY or BASE_URL in the environment must never
    # replace them (that would send the key elsewhere).
    api_key: Secret | None = _setting(None, _secret, env="TOGETHER_API_KEY")
    base_url: str = _setting(DEFAULT_BASE_URL, _base_url, env="TOGETHER_BASE_URL")
    job_ids: tuple[str, ...] = _setting((), _job_ids)
    all_jobs: bool = _setting(False, _boolean)
    # Each job's record, metrics and checkpoints beside its events (eventsync.history).
    history: bool = _setting(True, _boolean)
    concurrency: int = _setting(8, _integer, low=1, high=256)
    timeout: float = _setting(30.0, _number, above=0)  # seconds per HTTP read
    connect_timeout: float = _setting(10.0, _number, above=0)
    retry_attempts: int = _setting(5, _integer, low=1, high=20)  # tries per request
    retry_wait_initial: float = _setting(1.0, _number, low=0)  # first backoff, seconds
    retry_wait_max: float = _setting(10.0, _number, low=0)  # longest backoff, seconds
    # Bounds on what a broken or hostile server can cost (README: Security and limits).
    request_deadline: float = _setting(120.0, _number, above=0, high=3600)
    max_body_mb: int = _setting(64, _integer, low=1, high=1024)  # MiB after decompression
    # The daemon (`eventsync run`).
    interval: float = _setting(60.0, _number, low=0.1)  # seconds between a running job's polls
    # Seconds between polls of a queued or pending job; None: 5 x interval.
    queued_interval: float | None = _setting(None, _number, low=0.1)
    backoff_max: float = _setting(600.0, _number, low=0.1)  # longest wait after failures
    metrics_port: int = _setting(9464, _integer, low=0, high=65535)  # 0 disables
    metrics_host: str = _setting("127.0.0.1", _text)
    shutdown_grace: float = _setting(8.0, _number, low=0)  # seconds to finish a pass
    log_format: Literal["console", "json"] = _setting("console", _log_format)

    def __post_init__(self) -> None:
        problems = []
        for spec in fields(self):
            value = getattr(self, spec.name)
            try:
                object.__setattr__(self, spec.name, _checked(spec.metadata, value))
            except ValueError as exc:
                shown = f", not {value!r}" if spec.metadata["kind"] in _SHOWN else ""
                problems.append(f"{variable(spec.name)}: {exc}{shown}")
        if problems:
            raise ConfigError("invalid setting " + "; ".join(problems))

    @property
    def workers(self) -> int:
        """Jobs under way at once (see workers_for)."""
        return workers_for(self.concurrency)

    @property
    def queued_every(self) -> float:
        return self.queued_interval if self.queued_interval is not None else 5 * self.interval

    @property
    def api_root(self) -> str:
        return api_root(self.base_url)

    def require_api_key(self) -> str:
        key = self.api_key.get_secret_value().strip() if self.api_key else ""
        if not key:
            raise ConfigError("no API key: set TOGETHER_API_KEY in the environment or in .env")
        if not all(33 <= ord(c) <= 126 for c in key):
            # It could not travel in a header; and never echo it to say why.
            raise ConfigError(
                "TOGETHER_API_KEY holds spaces, line breaks or non-ASCII characters; "
                "check how it was pasted"
            )
        return key


def _checked(meta: Mapping[str, Any], value: Any) -> Any:
    if value is None:
        return None
    value = meta["kind"](value)
    low, high, above = meta["low"], meta["high"], meta["above"]
    if low is not None and value < low:
        raise ValueError(f"must be at least {low:g}")
    if above is not None and value <= above:
        raise ValueError(f"must be more than {above:g}")
    if high is not None and value > high:
        raise ValueError(f"must be at most {high:g}")
    return value


# Settings whose bad value is worth showing: plain words and numbers, never the key (the
# URLs' messages show theirs).
_SHOWN = (_integer, _number, _boolean, _log_format)


def variable(name: str) -> str:
    """The environment variable of a Settings field."""
    spec = next(f for f in fields(Settings) if f.name == name)
    return str(spec.metadata["env"] or f"EVENTSYNC_{name.upper()}")


def load_settings(**overrides: Any) -> Settings:
    """Settings from the given overrides (None means 'not given': flags), the environment
    and a `.env` file in the working folder, in that order. Names are not case-sensitive."""
    from dotenv import dotenv_values

    sources = [
        {k.upper(): v for k, v in dotenv_values(".env").items() if v is not None},
        {k.upper(): v for k, v in os.environ.items()},
    ]
    values: dict[str, Any] = {}
    for spec in fields(Settings):
        for source in sources:
            if variable(spec.name) in source:
                values[spec.name] = source[variable(spec.name)]
        if overrides.get(spec.name) is not None:
            values[spec.name] = overrides[spec.name]
    return Settings(**values)
