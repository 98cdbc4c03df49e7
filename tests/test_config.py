"""config.py: flags over environment, job id lists, URL checks, masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventsync.config import Settings, load_settings, mask_url
from eventsync.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in (
        "EVENTSYNC_DATABASE_URL",
        "EVENTSYNC_JOB_IDS",
        "EVENTSYNC_CONCURRENCY",
        "TOGETHER_API_KEY",
        "TOGETHER_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    """With nothing set: SQLite in the working folder, the public API, concurrency 8."""
    settings = load_settings()
    assert settings.database_url == "sqlite:///eventsync.db"
    assert settings.api_root == "https://api.together.ai/v1"
    assert settings.concurrency == 8
    assert settings.job_ids == ()
    assert settings.api_key is None


def test_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """EVENTSYNC_JOB_IDS is comma-separated; a flag value beats the variable."""
    monkeypatch.setenv("EVENTSYNC_JOB_IDS", "ft-a, ft-b,,ft-c")
    monkeypatch.setenv("EVENTSYNC_CONCURRENCY", "3")
    monkeypatch.setenv("TOGETHER_BASE_URL", "http://127.0.0.1:8765/v1")
    monkeypatch.setenv("TOGETHER_API_KEY", "k")
    settings = load_settings(concurrency=5)
    assert settings.job_ids == ("ft-a", "ft-b", "ft-c")
    assert settings.concurrency == 5
    assert settings.api_root == "http://127.0.0.1:8765/v1"
    assert settings.require_api_key() == "k"


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    """A .env in the working folder supplies the key, as it would for docker compose."""
    (tmp_path / ".env").write_text("TOGETHER_API_KEY=from-dotenv\n")
    assert load_settings().require_api_key() == "from-dotenv"


def test_missing_key_is_a_config_error() -> None:
    """No key: a ConfigError that says which variable to set."""
    with pytest.raises(ConfigError, match="TOGETHER_API_KEY"):
        Settings().require_api_key()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"concurrency": 0}, "EVENTSYNC_CONCURRENCY: must be at least 1, not 0"),
        ({"concurrency": "many"}, "EVENTSYNC_CONCURRENCY: must be a whole number, not 'many'"),
        ({"log_format": "xml"}, "EVENTSYNC_LOG_FORMAT: must be 'console' or 'json', not 'xml'"),
        ({"base_url": "api.together.ai"}, "TOGETHER_BASE_URL: must be an http"),
        ({"database_url": "mysql://x/y"}, "not supported"),
        ({"database_url": "not a url"}, "not a database URL"),
        ({"job_ids": ["ok", "../etc"]}, "invalid job id"),
        ({"max_body_mb": 0}, "EVENTSYNC_MAX_BODY_MB: must be at least 1"),
        ({"max_body_mb": 4096}, "EVENTSYNC_MAX_BODY_MB: must be at most 1024"),
        ({"request_deadline": 0}, "EVENTSYNC_REQUEST_DEADLINE: must be more than 0"),
        ({"request_deadline": 86400}, "EVENTSYNC_REQUEST_DEADLINE: must be at most 3600"),
    ],
)
def test_invalid_settings_are_one_clear_error(overrides: dict[str, object], message: str) -> None:
    """Each bad value gives a ConfigError naming its variable and what it must be, in words
    for people rather than pydantic's."""
    with pytest.raises(ConfigError, match=message):
        load_settings(**overrides)


def test_postgres_urls_use_psycopg_and_passwords_are_masked() -> None:
    """postgresql:// is taken to mean psycopg 3; mask_url hides the password."""
    settings = load_settings(database_url="postgresql://u:s3cret@db:5432/events")
    assert settings.database_url == "postgresql+psycopg://u:s3cret@db:5432/events"
    assert mask_url(settings.database_url) == "postgresql+psycopg://u:***@db:5432/events"


def test_passwords_in_the_query_string_are_masked() -> None:
    """libpq also takes `password` and `sslpassword` from the query: both become ***, the
    other parameters stay readable."""
    url = "postgresql://u@db/events?sslmode=require&password=s3cret&sslpassword=k3y%21"
    masked = mask_url(load_settings(database_url=url).database_url)
    assert masked == "postgresql+psycopg://u@db/events?password=***&sslmode=require&sslpassword=***"


def test_generic_api_key_and_base_url_variables_are_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only TOGETHER_API_KEY / TOGETHER_BASE_URL count: API_KEY or BASE_URL meant for another
    tool must never redirect the key."""
    monkeypatch.setenv("API_KEY", "someone-elses-secret")
    monkeypatch.setenv("BASE_URL", "http://evil.example")
    (tmp_path / ".env").write_text("api_key=also-not-ours\nbase_url=http://evil.example\n")
    monkeypatch.setenv("TOGETHER_API_KEY", "ours-123456")
    settings = load_settings()
    assert settings.require_api_key() == "ours-123456"
    assert settings.api_root == "https://api.together.ai/v1"


@pytest.mark.parametrize("key", ["line1\nline2", "k\u00e9y-1234", "has space"])
def test_keys_that_cannot_be_sent_are_refused_without_echo(key: str) -> None:
    """A key with line breaks, spaces or non-ASCII is a ConfigError that doesn't quote it."""
    with pytest.raises(ConfigError) as caught:
        load_settings(api_key=key).require_api_key()
    assert key not in str(caught.value)
    assert "TOGETHER_API_KEY" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql+asyncpg://u@h/db", "not supported"),
        ("sqlite://", "must name a SQLite file"),
        ("sqlite:///:memory:", "must name a SQLite file"),
    ],
)
def test_database_urls_eventsync_cannot_use(url: str, message: str) -> None:
    """Drivers that aren't installed, and in-memory SQLite, are refused up front."""
    with pytest.raises(ConfigError, match=message):
        load_settings(database_url=url)


def test_psycopg2_urls_are_served_by_psycopg3() -> None:
    """The common postgresql+psycopg2:// spelling works with the driver we install."""
    url = load_settings(database_url="postgresql+psycopg2://u@h/db").database_url
    assert url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize("url", ["http://127.0.0.1:notaport", "http://[::1", "ftp://x"])
def test_bad_base_urls(url: str) -> None:
    """Base URLs httpx can't use are a ConfigError, not a traceback later."""
    with pytest.raises(ConfigError, match="TOGETHER_BASE_URL"):
        load_settings(base_url=url)
