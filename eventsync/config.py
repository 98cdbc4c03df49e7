"""The one Settings object: read from flags, the environment and `.env`, validated at start."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import httpx
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
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


class Settings(BaseSettings):
    """Every knob eventsync has. Flags override the environment, which overrides `.env`."""

    model_config = SettingsConfigDict(
        env_prefix="EVENTSYNC_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
    )

    database_url: str = DEFAULT_DATABASE_URL
    # Only the TOGETHER_* names: a generic API_KEY or BASE_URL in the environment must never
    # replace them (that would send the key elsewhere). Tests pass api_key= by field name.
    api_key: SecretStr | None = Field(default=None, validation_alias="TOGETHER_API_KEY")
    base_url: str = Field(default=DEFAULT_BASE_URL, validation_alias="TOGETHER_BASE_URL")
    job_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)
    all_jobs: bool = False
    concurrency: int = Field(default=8, ge=1, le=256)
    timeout: float = Field(default=30.0, gt=0, description="seconds per HTTP read")
    connect_timeout: float = Field(default=10.0, gt=0)
    retry_attempts: int = Field(default=5, ge=1, le=20, description="tries per request")
    retry_wait_initial: float = Field(default=1.0, ge=0, description="first backoff, seconds")
    retry_wait_max: float = Field(default=10.0, ge=0, description="longest backoff, seconds")
    # Bounds on what a broken or hostile server can cost (README: Security and limits).
    request_deadline: float = Field(
        default=120.0, gt=0, le=3600, description="seconds per request, tries and waits included"
    )
    max_body_mb: int = Field(
        default=64, ge=1, le=1024, description="largest response body, MiB after decompression"
    )
    # The daemon (`eventsync run`).
    interval: float = Field(default=60.0, ge=0.1, description="seconds between passes")
    metrics_port: int = Field(default=9464, ge=0, le=65535, description="0 disables")
    metrics_host: str = "127.0.0.1"
    shutdown_grace: float = Field(default=8.0, ge=0, description="seconds to finish a pass")
    log_format: Literal["console", "json"] = "console"

    @field_validator("job_ids", mode="before")
    @classmethod
    def _split_job_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return [validate_job_id(v) for v in value if str(v).strip()]
        return value

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        value = value.strip()
        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ValueError(f"is not a URL ({exc}): {value!r}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        try:
            url = make_url(value)
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


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment plus the given overrides (None means 'not given')."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{field} {msg}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
