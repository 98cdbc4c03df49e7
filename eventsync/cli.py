"""The `eventsync` command. The only place that reads flags and configures logging."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from eventsync import __version__, db
from eventsync.client import TogetherClient, make_http_client
from eventsync.config import Settings, load_settings, mask_url
from eventsync.errors import ConfigError, EventsyncError
from eventsync.sync import JobOutcome, run_pass, select_jobs

log = logging.getLogger("eventsync")

app = typer.Typer(
    help="Mirror Together AI fine-tuning job events into SQLite or Postgres, exactly once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Manage the database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        metavar="URL",
        help="SQLAlchemy URL of the database. (env: EVENTSYNC_DATABASE_URL; "
        "default: sqlite:///eventsync.db)",
        show_default=False,
    ),
]
BaseUrl = Annotated[
    str | None,
    typer.Option(
        "--base-url",
        metavar="URL",
        help="Together API base URL, with or without /v1. (env: TOGETHER_BASE_URL; "
        "default: https://api.together.ai)",
        show_default=False,
    ),
]
JobIds = Annotated[
    list[str] | None,
    typer.Option(
        "--job-id",
        metavar="ID",
        help="A fine-tuning job to sync; repeat for several. "
        "(env: EVENTSYNC_JOB_IDS, comma-separated)",
        show_default=False,
    ),
]
AllJobs = Annotated[
    bool,
    typer.Option(
        "--all-jobs",
        help="Also sync every job that GET /v1/fine-tunes lists. (env: EVENTSYNC_ALL_JOBS)",
    ),
]
Concurrency = Annotated[
    int | None,
    typer.Option(
        "--concurrency",
        metavar="N",
        help="Jobs fetched at once. (env: EVENTSYNC_CONCURRENCY; default: 8)",
        show_default=False,
    ),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("httpx", "httpcore", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def settings_from(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        fail(str(exc), code=2)


@contextmanager
def open_engine(settings: Settings) -> Iterator[Engine]:
    """An engine for the settings' database; open or migration failures are one-line errors."""
    engine = db.make_engine(settings.database_url, pool_size=settings.concurrency)
    try:
        yield engine
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        fail(f"database {mask_url(settings.database_url)}: {first}")
    finally:
        engine.dispose()


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"eventsync {__version__}")
        raise typer.Exit()


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseUrl = None, verbose: Verbose = False) -> None:
    """Upgrade the database schema to the newest revision (creates it when empty)."""
    setup_logging(verbose)
    settings = settings_from(database_url=database_url)
    with open_engine(settings) as engine:
        before, after = db.upgrade(engine)
    if before == after:
        typer.echo(f"{mask_url(settings.database_url)}: already at {after}")
    else:
        typer.echo(
            f"{mask_url(settings.database_url)}: upgraded {before or 'empty database'} -> {after}"
        )


@db_app.command("current")
def db_current(database_url: DatabaseUrl = None, verbose: Verbose = False) -> None:
    """Show the database's schema revision and the newest one available."""
    setup_logging(verbose)
    settings = settings_from(database_url=database_url)
    with open_engine(settings) as engine:
        current = db.current_revision(engine)
    head = db.head_revision()
    state = "up to date" if current == head else "needs `eventsync db upgrade`"
    typer.echo(f"current: {current or 'none (empty database)'}\nhead:    {head}\n{state}")


@app.command()
def sync(
    job_id: JobIds = None,
    all_jobs: AllJobs = False,
    database_url: DatabaseUrl = None,
    base_url: BaseUrl = None,
    concurrency: Concurrency = None,
    verbose: Verbose = False,
) -> None:
    """Make one pass over the configured jobs, store their new events, and exit.

    Prints one line per job (new events, total). Exits 1 if any job failed, naming each
    failure and its cause on stderr. The API key comes from TOGETHER_API_KEY (or .env).
    """
    setup_logging(verbose)
    settings = settings_from(
        job_ids=job_id or None,
        all_jobs=all_jobs or None,
        database_url=database_url,
        base_url=base_url,
        concurrency=concurrency,
    )
    if not settings.job_ids and not settings.all_jobs:
        fail(
            "no jobs to sync: pass --job-id ID (repeatable), set EVENTSYNC_JOB_IDS, "
            "or use --all-jobs",
            code=2,
        )
    try:
        http = make_http_client(settings)
    except ConfigError as exc:
        fail(str(exc))
    with http, open_engine(settings) as engine:
        db.ensure_schema(engine)
        client = TogetherClient(http)
        try:
            jobs = select_jobs(client, settings.job_ids, all_jobs=settings.all_jobs)
        except EventsyncError as exc:
            fail(f"could not list jobs: {exc}")
        result = run_pass(
            client, engine, jobs, concurrency=settings.concurrency, on_done=_print_outcome
        )
    failed = [o for o in result.outcomes if not o.ok]
    log.info(
        "pass done: %d job(s), %d new event(s), %d failed, %.2fs",
        len(result.outcomes),
        result.new,
        len(failed),
        result.seconds,
    )
    if failed:
        raise typer.Exit(1)


def _print_outcome(outcome: JobOutcome) -> None:
    if outcome.error is not None:
        typer.echo(f"error: {outcome.error} [{outcome.error.kind}]", err=True)
        return
    updated = f", {outcome.updated} updated" if outcome.updated else ""
    typer.echo(f"{outcome.job_id}: {outcome.new} new{updated}, {outcome.total} total")


def main() -> None:
    app()
