"""The `eventsync` command. The only place that reads flags and configures logging."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, NoReturn

import httpx
import typer
from pythonjsonlogger.json import JsonFormatter
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from eventsync import __version__, db, output, reads, state
from eventsync.client import RetryPolicy, TogetherClient, make_http_client
from eventsync.config import Settings, load_settings, mask_url
from eventsync.daemon import Daemon, Metrics, Signals, serve_status
from eventsync.errors import ConfigError, EventsyncError, QueryError, QueryRefused, first_line
from eventsync.sync import JobOutcome, plan_jobs, run_pass, tune_gc

log = logging.getLogger("eventsync")

app = typer.Typer(
    help="Mirror Together AI fine-tuning job events into SQLite or Postgres, exactly once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Manage the database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")
jobs_app = typer.Typer(
    help="Manage the jobs the daemon follows (kept in the database).", no_args_is_help=True
)
app.add_typer(jobs_app, name="jobs")

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
LogFormat = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        metavar="FORMAT",
        help="console or json. (env: EVENTSYNC_LOG_FORMAT; default: console)",
        show_default=False,
    ),
]


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, no traceback."""
    say_error(message)
    raise typer.Exit(code)


def say_error(message: str, *, kind: str | None = None, job_id: str | None = None) -> None:
    """`error: ... [kind]` on stderr, controls spelled out; with --log-format json, a JSON
    record like every other line there, so a collector never meets a line it can't parse."""
    if _json_stderr:
        fields = {k: v for k, v in (("kind", kind), ("job_id", job_id)) if v is not None}
        log.error("%s", message, extra=fields)
    else:
        output.echo(f"error: {message}" + (f" [{kind}]" if kind else ""), err=True)


_json_stderr = False  # set by setup_logging


class ConsoleFormatter(logging.Formatter):
    """Console log lines in which messages from outside (an API error, an event) can't forge a
    line, move the cursor or recolour the terminal: controls are spelled out. A traceback
    keeps its line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return output.visible(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return output.visible(super().formatException(ei), keep="\n")

    def formatStack(self, stack_info: str) -> str:
        return output.visible(super().formatStack(stack_info), keep="\n")


class Redacting(logging.Formatter):
    """Belt and braces: whatever a record holds (message, extra fields, traceback), the
    formatted line never carries the API key."""

    def __init__(self, inner: logging.Formatter, secret: str) -> None:
        super().__init__()
        self.inner = inner
        self.secret = secret

    def format(self, record: logging.LogRecord) -> str:
        return self.inner.format(record).replace(self.secret, "***")


def setup_logging(settings: Settings | None = None, *, verbose: bool = False) -> None:
    """Console lines or JSON objects on stderr; never the API key."""
    global _json_stderr
    log_format = settings.log_format if settings is not None else "console"
    _json_stderr = log_format == "json"
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(ConsoleFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    secret = settings.api_key.get_secret_value().strip() if settings and settings.api_key else ""
    if len(secret) >= 8:  # a shorter "key" would garble ordinary words, and is no real key
        handler.setFormatter(Redacting(handler.formatter or logging.Formatter(), secret))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True
    )
    for noisy in ("httpx", "httpcore", "alembic.runtime.migration", "apscheduler", "waitress"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "Task queue depth is N": requests waiting for one of the status server's threads.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    # "maximum number of running instances reached": the daemon catches up by itself.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    logging.getLogger("stamina").setLevel(logging.ERROR)  # eventsync logs its own retry lines


def settings_from(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        fail(str(exc), code=2)


@contextmanager
def open_engine(settings: Settings, *, read_only: bool = False) -> Iterator[Engine]:
    """An engine for the settings' database; open or migration failures are one-line errors.
    `read_only`: one that only reads a database that exists at the newest revision."""
    where = mask_url(settings.database_url)
    try:
        if read_only:
            engine = db.open_reader(settings.database_url)
        else:
            engine = db.make_engine(settings.database_url, pool_size=settings.concurrency)
    except ConfigError as exc:
        fail(str(exc))
    except (SQLAlchemyError, ImportError, OSError) as exc:
        fail(f"database {where}: {first_line(exc)}")
    try:
        yield engine
    except SQLAlchemyError as exc:
        fail(f"database {where}: {first_line(exc)}")
    except ConfigError as exc:
        fail(f"database {where}: {exc}")
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
    settings = settings_from(database_url=database_url)
    setup_logging(settings, verbose=verbose)
    with open_engine(settings) as engine:
        before, after = db.upgrade(engine)
    where = mask_url(settings.database_url)
    if before == after:
        output.echo(f"{where}: already at {after}")
    else:
        output.echo(f"{where}: upgraded {before or 'empty database'} -> {after}")


@db_app.command("current")
def db_current(database_url: DatabaseUrl = None, verbose: Verbose = False) -> None:
    """Show the database's schema revision and the newest one available."""
    settings = settings_from(database_url=database_url)
    setup_logging(settings, verbose=verbose)
    with open_engine(settings) as engine:
        current = db.current_revision(engine)
    head = db.head_revision()
    if current == head:
        state = "up to date"
    elif current is not None and not db.is_known_revision(current):
        state = "the database is newer than this eventsync: upgrade eventsync"
    else:
        state = "needs `eventsync db upgrade` (eventsync sync and run do it by themselves)"
    output.echo(f"current: {current or 'none (empty database)'}")
    output.echo(f"head:    {head}")
    output.echo(state)


@app.command()
def sync(
    job_id: JobIds = None,
    all_jobs: AllJobs = False,
    database_url: DatabaseUrl = None,
    base_url: BaseUrl = None,
    concurrency: Concurrency = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Compare every fetched event with what is stored, even when a job's events "
            "look unchanged since the last sync (finds and stores again rows deleted by hand).",
        ),
    ] = False,
    log_format: LogFormat = None,
    verbose: Verbose = False,
) -> None:
    """Make one pass over the configured jobs, store their new events, and exit.

    Jobs: --job-id, EVENTSYNC_JOB_IDS, the jobs added with `eventsync jobs add`, and with
    --all-jobs every job the API lists. Prints one line per job (new events, total). Exits 1
    if any job failed, naming each failure and its cause on stderr. The API key comes from
    TOGETHER_API_KEY (or .env).
    """
    settings = settings_from(
        job_ids=job_id or None,
        all_jobs=all_jobs or None,
        database_url=database_url,
        base_url=base_url,
        concurrency=concurrency,
        log_format=log_format,
    )
    setup_logging(settings, verbose=verbose)
    http = _http_client(settings)
    with http, open_engine(settings) as engine:
        db.ensure_schema(engine)
        client = TogetherClient(http, RetryPolicy.from_settings(settings))
        try:
            jobs = plan_jobs(
                client, engine, settings.job_ids, all_jobs=settings.all_jobs, full=full
            )
        except EventsyncError as exc:
            fail(f"could not list jobs: {exc}")
        if not jobs:
            fail(
                "no jobs to sync: pass --job-id ID (repeatable), set EVENTSYNC_JOB_IDS, "
                "add some with `eventsync jobs add`, or use --all-jobs",
                code=2,
            )
        with _progress(settings, len(jobs)) as advance:

            def done(outcome: JobOutcome) -> None:
                _print_outcome(outcome)
                advance()

            result = run_pass(client, engine, jobs, concurrency=settings.concurrency, on_done=done)
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


@contextmanager
def _progress(settings: Settings, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar on an interactive terminal; nothing when piped or logging JSON."""
    if settings.log_format == "json" or not sys.stderr.isatty() or total < 2:
        yield lambda: None
        return
    columns = (
        TextColumn("syncing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("jobs"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("sync", total=total)
        yield lambda: bar.advance(task)


def _print_outcome(outcome: JobOutcome) -> None:
    if outcome.error is not None:
        say_error(str(outcome.error), kind=outcome.error.kind, job_id=outcome.job_id)
        return
    updated = f", {outcome.updated} updated" if outcome.updated else ""
    output.echo(f"{outcome.job_id}: {outcome.new} new{updated}, {outcome.total} total")


def _http_client(settings: Settings, **kwargs: Any) -> httpx.Client:
    try:
        return make_http_client(settings, **kwargs)
    except ConfigError as exc:
        fail(str(exc))


@app.command()
def run(
    job_id: JobIds = None,
    all_jobs: AllJobs = False,
    interval: Annotated[
        float | None,
        typer.Option(
            "--interval",
            metavar="SECONDS",
            help="Seconds between passes. (env: EVENTSYNC_INTERVAL; default: 60)",
            show_default=False,
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            metavar="PORT",
            help="Port for /healthz and /metrics; 0 disables. "
            "(env: EVENTSYNC_METRICS_PORT; default: 9464)",
            show_default=False,
        ),
    ] = None,
    metrics_host: Annotated[
        str | None,
        typer.Option(
            "--metrics-host",
            metavar="HOST",
            help="Address for /healthz and /metrics. "
            "(env: EVENTSYNC_METRICS_HOST; default: 127.0.0.1)",
            show_default=False,
        ),
    ] = None,
    database_url: DatabaseUrl = None,
    base_url: BaseUrl = None,
    concurrency: Concurrency = None,
    log_format: LogFormat = None,
    verbose: Verbose = False,
) -> None:
    """Run as a service: a sync pass now, then one every --interval seconds.

    Follows --job-id, EVENTSYNC_JOB_IDS, the jobs added with `eventsync jobs add` (read again
    every pass) and with --all-jobs every job the API lists. A job that ended gets one last
    successful fetch and is then no longer polled. SIGTERM or Ctrl-C stops after the jobs
    under way (a second one exits at once).
    """
    settings = settings_from(
        job_ids=job_id or None,
        all_jobs=all_jobs or None,
        interval=interval,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        database_url=database_url,
        base_url=base_url,
        concurrency=concurrency,
        log_format=log_format,
    )
    setup_logging(settings, verbose=verbose)
    signals = Signals()  # a signal exits at once until the daemon serves, then stops it
    metrics = Metrics()
    http = _http_client(settings, event_hooks={"response": [metrics.on_response]})
    with http, open_engine(settings) as engine:
        db.ensure_schema(engine)
        daemon = Daemon(settings, engine=engine, http=http, metrics=metrics)
        server = None
        if settings.metrics_port:
            try:
                server = serve_status(
                    settings.metrics_host, settings.metrics_port, daemon.health, metrics
                )
            except OSError as exc:
                fail(
                    f"cannot serve /healthz and /metrics on "
                    f"{settings.metrics_host}:{settings.metrics_port}: {exc.strerror or exc}"
                    " (choose another --metrics-port, or 0 to disable)"
                )
            log.info(
                "serving /healthz and /metrics on http://%s:%d",
                settings.metrics_host,
                settings.metrics_port,
            )
        try:
            code = daemon.serve(signals)  # returns once no pass is under way, or exits
        finally:
            if server is not None:
                server.close()
    raise typer.Exit(code)


@jobs_app.command("add")
def jobs_add(
    job_ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Job ids to follow.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Follow these jobs: `eventsync run` and `sync` pick them up at their next pass."""
    _set_tracked(job_ids, database_url, tracked=True, said=("added", "already followed"))


@jobs_app.command("remove")
def jobs_remove(
    job_ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Job ids to drop.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Stop following these jobs. Their stored events are kept."""
    _set_tracked(job_ids, database_url, tracked=False, said=("removed", "was not followed"))


def _set_tracked(
    job_ids: list[str], database_url: str | None, *, tracked: bool, said: tuple[str, str]
) -> None:
    settings = settings_from(database_url=database_url, job_ids=job_ids)
    setup_logging(settings)
    with open_engine(settings) as engine:
        db.ensure_schema(engine)
        with engine.begin() as connection:
            changed = state.set_tracked(connection, settings.job_ids, tracked=tracked)
    for job in settings.job_ids:
        typer.echo(f"{job}: {said[0] if job in changed else said[1]}")


@jobs_app.command("list")
def jobs_list(
    database_url: DatabaseUrl = None,
    fmt: Annotated[
        str, typer.Option("--format", help="table or json.", metavar="FORMAT")
    ] = "table",
) -> None:
    """Every job eventsync knows: status, events, last sync, last error."""
    settings = settings_from(database_url=database_url)
    setup_logging(settings)
    if fmt not in ("table", "json"):
        fail(f"--format must be table or json, not {fmt!r}", code=2)
    with open_engine(settings, read_only=True) as engine, engine.connect() as connection:
        rows = state.job_states(connection)
    records = [
        {
            "job_id": r.job_id,
            "followed": bool(r.tracked),
            "status": r.status,
            "finished": r.finished_at is not None,
            "events": r.event_count,
            "last_sync": _iso(r.last_synced_at),
            "last_error": r.last_error,
        }
        for r in rows
    ]
    if fmt == "json":
        typer.echo(json.dumps(records, indent=2))
        return
    if not records:
        typer.echo("no jobs yet: add some with `eventsync jobs add ID`, or run `eventsync sync`")
        return
    shown = [
        {
            "job": r["job_id"],
            "followed": "yes" if r["followed"] else "",
            "status": f"{r['status'] or '?'}{' (finished)' if r['finished'] else ''}",
            "events": r["events"],
            "last sync": r["last_sync"] or "never",
            "last error": r["last_error"],
        }
        for r in records
    ]
    output.table(shown, list(shown[0]))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


# -- reading the history: these commands read the database and never the API -------------

Format = Annotated[
    str,
    typer.Option("--format", metavar="FORMAT", help="table, json, jsonl or csv."),
]


def _check_format(fmt: str, allowed: tuple[str, ...] = output.FORMATS) -> None:
    if fmt not in allowed:
        fail(f"--format must be one of {', '.join(allowed)}, not {fmt!r}", code=2)


@app.command()
def status(database_url: DatabaseUrl = None, fmt: Format = "table") -> None:
    """Every job: status, step/total and progress, last event and how long ago, last sync,
    last error. Reads the database only."""
    _check_format(fmt, ("table", "json"))
    settings = settings_from(database_url=database_url)
    setup_logging(settings)
    with open_engine(settings, read_only=True) as engine, engine.connect() as connection:
        rows = reads.job_summaries(connection)
    if fmt == "json":
        output.emit(rows, reads.SUMMARY_COLUMNS, "json")
        return
    if not rows:
        typer.echo("no jobs yet: run `eventsync sync --job-id ID` or `eventsync jobs add ID`")
        return
    shown = [
        {
            "job": r["job_id"],
            "status": r["status"] or "?",
            "step": f"{r['step']}/{r['total_steps']}" if r["total_steps"] else r["step"],
            "progress": output.progress_bar(r["progress"]),
            "last event": f"{r['last_event_type'] or ''} {output.ago(r['last_event_at'])}"
            if r["last_event_at"]
            else "",
            "last sync": output.ago(r["last_synced_at"]),
            "last error": r["last_error"],
        }
        for r in rows
    ]
    output.table(shown, list(shown[0]))


@app.command()
def events(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The fine-tuning job id.")],
    event_type: Annotated[
        str | None,
        typer.Option(
            "--type",
            metavar="TYPE",
            help="Only this event type (any case: job_start matches JOB_START).",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", metavar="WHEN", help="Only events since 30m, 1h, 2d... ago, or a date."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", metavar="N", min=1, help="Only the latest N.")
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Keep printing new events as they are stored, like tail -f; Ctrl-C stops.",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
    fmt: Format = "table",
) -> None:
    """A job's timeline, in the order the server served it. Reads the database only."""
    _check_format(fmt)
    try:
        since_at = output.parse_since(since) if since else None
    except ValueError as exc:
        fail(str(exc), code=2)
    settings = settings_from(database_url=database_url, job_ids=[job_id])
    setup_logging(settings)
    with open_engine(settings, read_only=True) as engine:
        with engine.connect() as connection:
            rows = reads.job_timeline(
                connection, job_id, event_type=event_type, since=since_at, limit=limit
            )
        if not rows and not follow:
            with engine.connect() as connection:
                known = any(r.job_id == job_id for r in state.job_states(connection))
            if not known:
                fail(
                    f"no events stored for job {job_id}: sync it first "
                    f"(eventsync sync --job-id {job_id})"
                )
        columns = reads.TIMELINE_COLUMNS
        output.emit(rows, columns, "jsonl" if follow and fmt == "json" else fmt)
        if not follow:
            return
        sys.stdout.flush()
        last = rows[-1]["seq"] if rows else 0
        try:
            while True:
                time.sleep(1.0)
                with engine.connect() as connection:
                    new = reads.job_timeline(
                        connection, job_id, event_type=event_type, since=since_at, after_seq=last
                    )
                if new:
                    output.emit(new, columns, fmt, header=False)
                    sys.stdout.flush()
                    last = new[-1]["seq"]
        except KeyboardInterrupt:
            return


@app.command("sql", context_settings={"ignore_unknown_options": True})
def sql_command(
    query: Annotated[str, typer.Argument(metavar="QUERY", help="One read-only SQL query.")],
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            min=0.001,
            max=86_400,
            help="Stop the query after this many seconds.",
        ),
    ] = 30,
    max_rows: Annotated[
        int,
        typer.Option("--max-rows", metavar="N", min=1, help="Print at most N rows."),
    ] = 10_000,
    database_url: DatabaseUrl = None,
    fmt: Format = "table",
) -> None:
    """Run one read-only SQL query and print the answer, for those without sqlite3 or psql.
    Anything that could write is refused, and so is a second statement."""
    _check_format(fmt)
    settings = settings_from(database_url=database_url)
    setup_logging(settings)
    with open_engine(settings, read_only=True) as engine:
        try:
            result = reads.read_only_query(engine, query, timeout=timeout, max_rows=max_rows)
        except QueryRefused as exc:
            fail(str(exc), code=2)
        except QueryError as exc:
            fail(f"query failed: {exc}")
    columns = result.columns
    output.emit([dict(zip(columns, row, strict=True)) for row in result.rows], columns, fmt)
    if result.cut:
        typer.echo(
            f"note: showing the first {max_rows:,} rows; more were cut: use --max-rows",
            err=True,
        )


def main() -> None:
    tune_gc()
    app()
