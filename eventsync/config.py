"""The one Settings object: read from flags, the environment and `.env`, validated at start."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from eventsync.errors import ConfigError

DEFAULT_BASE_URL = "https://api.together.ai"
DEFAULT_DATABASE_URL = "sqlite:///eventsync.db"

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
    """A database URL with its password replaced by ***, for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


class Settings(BaseSettings):
    """Every knob eventsync has. Flags override the environment, which overrides `.env`."""

    model_config = SettingsConfigDict(
        env_prefix="EVENTSYNC_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
    )

    database_url: str = DEFAULT_DATABASE_URL
    api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("api_key", "TOGETHER_API_KEY")
    )
    base_url: str = Field(
        default=DEFAULT_BASE_URL, validation_alias=AliasChoices("base_url", "TOGETHER_BASE_URL")
    )
    job_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)
    all_jobs: bool = False
    concurrency: int = Field(default=8, ge=1, le=256)
    timeout: float = Field(default=30.0, gt=0, description="seconds per HTTP read")
    connect_timeout: float = Field(default=10.0, gt=0)

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
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("is not a database URL (try sqlite:///eventsync.db)") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(f"backend {url.get_backend_name()!r} is not supported")
        if url.get_backend_name() == "postgresql" and url.drivername == "postgresql":
            # psycopg 3 is what we install; plain postgresql:// would look for psycopg2.
            value = url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return value

    @property
    def api_root(self) -> str:
        return api_root(self.base_url)

    def require_api_key(self) -> str:
        if self.api_key is None or not self.api_key.get_secret_value().strip():
            raise ConfigError("no API key: set TOGETHER_API_KEY in the environment or in .env")
        return self.api_key.get_secret_value().strip()


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
