"""The `eventsync` command: flags in, the pieces composed, answers out.

Every command gets its settings, logging and database from one `Setup`, made by the root
group's callback. Nothing heavy is imported before a command needs it: `eventsync status`
starts without httpx, Alembic, pydantic, rich or the daemon's libraries. The commands are
click's (Typer, built on it, imports pydantic at every start to coerce its parameters).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import click

from eventsync import __version__, output
from eventsync.errors import ConfigError, EventsyncError, QueryError, QueryRefused, first_line

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from eventsync.config import Settings
    from eventsync.sync import JobOutcome

# Options shared by several commands.
database_url_option = click.option(
    "--database-url",
    metavar="URL",
    help="SQLAlchemy URL of the database. (env: EVENTSYNC_DATABASE_URL; "
    "default: sqlite:///eventsync.db)",
)
base_url_option = click.option(
    "--base-url",
    metavar="URL",
    help="Together API base URL, with or without /v1. (env: TOGETHER_BASE_URL; "
    "default: https://api.together.ai)",
)
job_id_option = click.option(
    "--job-id",
    "job_ids",
    metavar="ID",
    multiple=True,
    help="A fine-tuning job to sync; repeat for several. (env: EVENTSYNC_JOB_IDS, comma-separated)",
)
all_jobs_option = click.option(
    "--all-jobs",
    is_flag=True,
    help="Also sync every job that GET /v1/fine-tunes lists. (env: EVENTSYNC_ALL_JOBS)",
)
concurrency_option = click.option(
    "--concurrency",
    metavar="N",
    type=int,
    help="Requests to the API at once; twice as many jobs are under way. "
    "(env: EVENTSYNC_CONCURRENCY; default: 8)",
)
verbose_option = click.option(
    "--verbose", "-v", is_flag=True, help="Also log eventsync's debug lines."
)
log_format_option = click.option(
    "--log-format",
    metavar="FORMAT",
    help="console or json. (env: EVENTSYNC_LOG_FORMAT; default: console)",
)


def format_option(*choices: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(choices),
        default=choices[0],
        show_default=True,
        help="How to print the answer.",
    )


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, no traceback."""
    say_error(message)
    sys.exit(code)


def say_error(message: str, *, kind: str | None = None, job_id: str | None = None) -> None:
    """`error: ... [kind]` on stderr, controls spelled out; with --log-format json, a JSON
    record like every other line there, so a collector never meets a line it can't parse."""
    from eventsync import logs

    if logs.json_logging():
        import logging

        fields = {k: v for k, v in (("kind", kind), ("job_id", job_id)) if v is not None}
        logging.getLogger("eventsync").error("%s", message, extra=fields)
    else:
        output.echo(f"error: {message}" + (f" [{kind}]" if kind else ""), err=True)


class Setup:
    """What every command needs, built the same way for each: the settings (flags over the
    environment over `.env`), logging to match them, and the database."""

    def __init__(self, *, verbose: bool = False) -> None:
        self.verbose = verbose

    def settings(self, *, verbose: bool = False, **flags: object) -> Settings:
        """Settings from the flags given (None: not given); a bad one is a one-line error,
        exit 2. Logging is configured from them."""
        from eventsync import logs
        from eventsync.config import load_settings

        try:
            settings = load_settings(**flags)
        except ConfigError as exc:
            fail(str(exc), code=2)
        key = settings.api_key.get_secret_value().strip() if settings.api_key else ""
        logs.configure(settings.log_format, verbose=verbose or self.verbose, secret=key)
        return settings

    @contextmanager
    def database(
        self, settings: Settings, *, read_only: bool = False, migrate: bool = True
    ) -> Iterator[Engine]:
        """An engine on the settings' database, disposed at the end. Writers migrate an empty
        or older schema first (unless not `migrate`); readers (`read_only`) never create,
        migrate or change it, and with `migrate` False open a database at any revision. A
        database that can't be opened or used is a one-line error naming it, password masked."""
        from sqlalchemy.exc import SQLAlchemyError

        from eventsync import db
        from eventsync.config import mask_url

        where = mask_url(settings.database_url)
        try:
            if read_only:
                engine = db.open_reader(settings.database_url, any_revision=not migrate)
            else:
                engine = db.make_engine(settings.database_url, pool_size=settings.workers)
        except ConfigError as exc:
            fail(str(exc))
        except (SQLAlchemyError, ImportError, OSError) as exc:
            fail(f"database {where}: {first_line(exc)}")
        try:
            # A database at the newest revision is used as is: Alembic is imported (0.2 s)
            # only to migrate.
            if migrate and not read_only and db.current_revision(engine) != db.HEAD:
                from eventsync import migrate as schema

                schema.ensure_schema(engine)
            yield engine
        except (SQLAlchemyError, ImportError, OSError) as exc:
            fail(f"database {where}: {first_line(exc)}")
        except ConfigError as exc:
            fail(f"database {where}: {exc}")
        finally:
            engine.dispose()


pass_setup = click.make_pass_decorator(Setup)


@click.group(
    help="Mirror Together AI fine-tuning job events into SQLite or Postgres, exactly once.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(
    __version__, "--version", prog_name="eventsync", message="%(prog)s %(version)s"
)
@verbose_option
@click.pass_context
def app(ctx: click.Context, verbose: bool) -> None:
    ctx.obj = Setup(verbose=verbose)


@app.group("db")
def db_app() -> None:
    """Manage the database schema (Alembic migrations)."""


@app.group("jobs")
def jobs_app() -> None:
    """Manage the jobs the daemon follows (kept in the database)."""


# -- the schema ----------------------------------------------------------------------------


@db_app.command("upgrade")
@database_url_option
@verbose_option
@pass_setup
def db_upgrade(setup: Setup, database_url: str | None, verbose: bool) -> None:
    """Upgrade the database schema to the newest revision (creates it when empty)."""
    from eventsync import migrate
    from eventsync.config import mask_url

    settings = setup.settings(database_url=database_url, verbose=verbose)
    with setup.database(settings, migrate=False) as engine:
        before, after = migrate.upgrade(engine)
    where = mask_url(settings.database_url)
    if before == after:
        output.echo(f"{where}: already at {after}")
    else:
        output.echo(f"{where}: upgraded {before or 'empty database'} -> {after}")


@db_app.command("current")
@database_url_option
@verbose_option
@pass_setup
def db_current(setup: Setup, database_url: str | None, verbose: bool) -> None:
    """Show the database's schema revision and the newest one available. Reads only."""
    from eventsync import db

    settings = setup.settings(database_url=database_url, verbose=verbose)
    with setup.database(settings, read_only=True, migrate=False) as engine:
        current = db.current_revision(engine)
    if current == db.HEAD:
        verdict = "up to date"
    elif current is not None and current not in db.REVISIONS:
        verdict = "the database is newer than this eventsync: upgrade eventsync"
    else:
        verdict = "needs `eventsync db upgrade` (eventsync sync and run do it by themselves)"
    output.echo(f"current: {current or 'none (empty database)'}")
    output.echo(f"head:    {db.HEAD}")
    output.echo(verdict)


# -- syncing -------------------------------------------------------------------------------


@app.command()
@job_id_option
@all_jobs_option
@database_url_option
@base_url_option
@concurrency_option
@click.option(
    "--full",
    is_flag=True,
    help="Compare every fetched event with what is stored, even when a job's events look "
    "unchanged since the last sync (finds and stores again rows deleted by hand).",
)
@log_format_option
@verbose_option
@pass_setup
def sync(
    setup: Setup,
    job_ids: tuple[str, ...],
    all_jobs: bool,
    database_url: str | None,
    base_url: str | None,
    concurrency: int | None,
    full: bool,
    log_format: str | None,
    verbose: bool,
) -> None:
    """Make one pass over the configured jobs, store their new events, and exit.

    Jobs: --job-id, EVENTSYNC_JOB_IDS, the jobs added with `eventsync jobs add`, and with
    --all-jobs every job the API lists. Prints one line per job (new events, total). Exits 1
    if any job failed, naming each failure and its cause on stderr. The API key comes from
    TOGETHER_API_KEY (or .env).
    """
    import logging

    from eventsync import logs
    from eventsync.client import TogetherClient, make_http_client
    from eventsync.sync import plan_jobs, run_pass, tune_gc, tune_malloc

    tune_malloc()  # before any thread

    settings = setup.settings(
        job_ids=job_ids or None,
        all_jobs=all_jobs or None,
        database_url=database_url,
        base_url=base_url,
        concurrency=concurrency,
        log_format=log_format,
        verbose=verbose,
    )
    try:
        http = make_http_client(settings)
        client = TogetherClient.from_settings(http, settings)
    except ConfigError as exc:
        fail(str(exc))
    with http, setup.database(settings) as engine:
        try:
            plans = plan_jobs(
                client,
                engine,
                settings.job_ids,
                all_jobs=settings.all_jobs,
                full=full,
                history=settings.history,
            )
        except EventsyncError as exc:
            fail(str(exc))
        if not plans:
            fail(
                "no jobs to sync: pass --job-id ID (repeatable), set EVENTSYNC_JOB_IDS, "
                "add some with `eventsync jobs add`, or use --all-jobs",
                code=2,
            )
        tune_gc()
        with _progress(len(plans), quiet=logs.json_logging()) as advance:

            def done(outcome: JobOutcome) -> None:
                _print_outcome(outcome)
                advance()

            result = run_pass(
                client,
                engine,
                plans,
                concurrency=settings.concurrency,
                on_done=done,
                history=settings.history,
            )
    failed = [o for o in result.outcomes if not o.ok]
    logging.getLogger("eventsync").info(
        "pass done: %d job(s), %d new event(s), %d failed, %.2fs",
        len(result.outcomes),
        result.new,
        len(failed),
        result.seconds,
    )
    if failed:
        sys.exit(1)


@contextmanager
def _progress(total: int, *, quiet: bool) -> Iterator[Callable[[], None]]:
    """A progress bar on an interactive terminal; nothing when piped or logging JSON."""
    if quiet or not sys.stderr.isatty() or total < 2:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

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
    stored = [(outcome.snapshots, "metrics"), (outcome.checkpoints, "checkpoints")]
    history = "".join(f"; {what} +{count}" for count, what in stored if count)
    output.echo(f"{outcome.job_id}: {outcome.new} new{updated}, {outcome.total} total{history}")


@app.command()
@job_id_option
@all_jobs_option
@click.option(
    "--interval",
    metavar="SECONDS",
    type=float,
    help="Seconds between passes. (env: EVENTSYNC_INTERVAL; default: 60)",
)
@click.option(
    "--metrics-port",
    metavar="PORT",
    type=int,
    help="Port for /healthz and /metrics; 0 disables. (env: EVENTSYNC_METRICS_PORT; default: 9464)",
)
@click.option(
    "--metrics-host",
    metavar="HOST",
    help="Address for /healthz and /metrics. (env: EVENTSYNC_METRICS_HOST; default: 127.0.0.1)",
)
@database_url_option
@base_url_option
@concurrency_option
@log_format_option
@verbose_option
@pass_setup
def run(
    setup: Setup,
    job_ids: tuple[str, ...],
    all_jobs: bool,
    interval: float | None,
    metrics_port: int | None,
    metrics_host: str | None,
    database_url: str | None,
    base_url: str | None,
    concurrency: int | None,
    log_format: str | None,
    verbose: bool,
) -> None:
    """Run as a service: a sync pass now, then one every --interval seconds.

    Follows --job-id, EVENTSYNC_JOB_IDS, the jobs added with `eventsync jobs add` (read again
    every pass) and with --all-jobs every job the API lists. A job that ended gets one last
    successful fetch and is then no longer polled. SIGTERM or Ctrl-C stops after the jobs
    under way (a second one exits at once).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from eventsync import daemon
    from eventsync.config import mask_url

    settings = setup.settings(
        job_ids=job_ids or None,
        all_jobs=all_jobs or None,
        interval=interval,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        database_url=database_url,
        base_url=base_url,
        concurrency=concurrency,
        log_format=log_format,
        verbose=verbose,
    )
    try:
        code = daemon.serve(settings)
    except ConfigError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(f"database {mask_url(settings.database_url)}: {first_line(exc)}")
    sys.exit(code)


# -- the jobs followed ---------------------------------------------------------------------


@jobs_app.command("add")
@click.argument("job_ids", metavar="ID...", nargs=-1, required=True)
@database_url_option
@pass_setup
def jobs_add(setup: Setup, job_ids: tuple[str, ...], database_url: str | None) -> None:
    """Follow these jobs: `eventsync run` and `sync` pick them up at their next pass."""
    _set_tracked(setup, job_ids, database_url, tracked=True, said=("added", "already followed"))


@jobs_app.command("remove")
@click.argument("job_ids", metavar="ID...", nargs=-1, required=True)
@database_url_option
@pass_setup
def jobs_remove(setup: Setup, job_ids: tuple[str, ...], database_url: str | None) -> None:
    """Stop following these jobs. Their stored events are kept."""
    _set_tracked(setup, job_ids, database_url, tracked=False, said=("removed", "was not followed"))


def _set_tracked(
    setup: Setup,
    job_ids: tuple[str, ...],
    database_url: str | None,
    *,
    tracked: bool,
    said: tuple[str, str],
) -> None:
    from eventsync import state

    settings = setup.settings(database_url=database_url, job_ids=job_ids)
    with setup.database(settings) as engine, engine.begin() as connection:
        changed = state.set_tracked(connection, settings.job_ids, tracked=tracked)
    for job in settings.job_ids:
        output.echo(f"{job}: {said[0] if job in changed else said[1]}")


@jobs_app.command("list")
@database_url_option
@format_option("table", "json")
@pass_setup
def jobs_list(setup: Setup, database_url: str | None, fmt: str) -> None:
    """Every job eventsync knows: status, events, last sync, last error."""
    from eventsync import state

    settings = setup.settings(database_url=database_url)
    with setup.database(settings, read_only=True) as engine, engine.connect() as connection:
        rows = state.job_states(connection)
    records = [
        {
            "job_id": r.job_id,
            "followed": bool(r.tracked),
            "status": r.status,
            "finished": r.finished_at is not None,
            "events": r.event_count,
            "last_sync": r.last_synced_at,
            "last_error": r.last_error,
        }
        for r in rows
    ]
    if fmt == "json":
        output.emit(records, list(records[0]) if records else [], "json")
        return
    if not records:
        output.echo("no jobs yet: add some with `eventsync jobs add ID`, or run `eventsync sync`")
        return
    shown = [
        {
            "job": r["job_id"],
            "followed": "yes" if r["followed"] else "",
            "status": f"{r['status'] or '?'}{' (finished)' if r['finished'] else ''}",
            "events": r["events"],
            "last sync": output.ago(r["last_sync"]),
            "last error": r["last_error"],
        }
        for r in records
    ]
    output.table(shown, list(shown[0]))


@jobs_app.command("show")
@click.argument("job_id", metavar="JOB")
@database_url_option
@format_option("table", "json")
@pass_setup
def jobs_show(setup: Setup, job_id: str, database_url: str | None, fmt: str) -> None:
    """One job's whole record: model, hyperparameters, files, price, status history, latest
    loss and checkpoint, and what is stored of it. --format json adds the API's record as
    sent (raw). Reads the database only."""
    from eventsync import reads

    settings = setup.settings(database_url=database_url, job_ids=[job_id])
    with setup.database(settings, read_only=True) as engine, engine.connect() as connection:
        found = reads.job_record(connection, job_id)
    if found is None:
        fail(
            f"job {job_id} is not in the database: sync it first (eventsync sync --job-id {job_id})"
        )
    if fmt == "json":
        found["status_history"] = [
            {k: output.plain(v) for k, v in h.items()} for h in found["status_history"]
        ]
        output.emit([found], list(found), "json")
        return
    history = found.pop("status_history")
    found.pop("raw", None)
    found.pop("content_hash", None)
    output.table(
        [{"field": name, "value": value} for name, value in found.items() if value is not None],
        ["field", "value"],
    )
    if history:
        output.echo("")
        output.table(
            [
                {
                    "status": h["status"],
                    "seen": output.cell(h["seen_at"]),
                    "record updated": output.cell(h["updated_at"]),
                }
                for h in history
            ],
            ["status", "seen", "record updated"],
        )


# -- reading the history: these commands read the database and never the API -------------


@app.command()
@database_url_option
@format_option("table", "json")
@pass_setup
def status(setup: Setup, database_url: str | None, fmt: str) -> None:
    """Every job: status, step/total and progress, last event and how long ago, last sync,
    last error. Reads the database only."""
    from eventsync import reads

    settings = setup.settings(database_url=database_url)
    with setup.database(settings, read_only=True) as engine, engine.connect() as connection:
        rows = reads.job_summaries(connection)
    if fmt == "json":
        output.emit(rows, reads.SUMMARY_COLUMNS, "json")
        return
    if not rows:
        output.echo("no jobs yet: run `eventsync sync --job-id ID` or `eventsync jobs add ID`")
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
            "loss": _loss(r["train_loss"], r["eval_loss"]),
            "last sync": output.ago(r["last_synced_at"]),
            "last error": r["last_error"],
        }
        for r in rows
    ]
    output.table(shown, list(shown[0]))


def _loss(train: float | None, evaluation: float | None) -> str:
    """The latest train loss, and the eval loss beside it when there is one."""
    shown = f"{train:.4g}" if train is not None else ""
    if evaluation is not None:
        shown += f" (eval {evaluation:.4g})"
    return shown.strip()


@app.command()
@click.argument("job_id", metavar="JOB")
@click.option(
    "--type",
    "event_type",
    metavar="TYPE",
    help="Only this event type (any case: job_start matches JOB_START).",
)
@click.option("--since", metavar="WHEN", help="Only events since 30m, 1h, 2d... ago, or a date.")
@click.option("--limit", metavar="N", type=click.IntRange(min=1), help="Only the latest N.")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep printing new events as they are stored, like tail -f; Ctrl-C stops.",
)
@database_url_option
@format_option(*output.FORMATS)
@pass_setup
def events(
    setup: Setup,
    job_id: str,
    event_type: str | None,
    since: str | None,
    limit: int | None,
    follow: bool,
    database_url: str | None,
    fmt: str,
) -> None:
    """A job's timeline, in the order the server served it. Reads the database only."""
    from eventsync import reads

    try:
        since_at = output.parse_since(since) if since else None
    except ValueError as exc:
        fail(str(exc), code=2)
    settings = setup.settings(database_url=database_url, job_ids=[job_id])
    columns = reads.TIMELINE_COLUMNS
    with setup.database(settings, read_only=True) as engine:
        with engine.connect() as connection:
            rows = reads.job_timeline(
                connection, job_id, event_type=event_type, since=since_at, limit=limit
            )
            if not rows and not follow and not reads.job_known(connection, job_id):
                fail(
                    f"no events stored for job {job_id}: sync it first "
                    f"(eventsync sync --job-id {job_id})"
                )
        if not follow:
            output.emit(rows, columns, fmt)
            return
        # A stream: JSON as one object a line, and a table whose later rows line up.
        aligned = output.Aligned(columns, rows) if fmt == "table" else None
        _emit_more(rows, columns, fmt, aligned, header=True)
        after = rows[-1]["seq"] if rows else 0
        with _stopped_by_signals() as stop:
            for batch in reads.follow(
                engine, job_id, after_seq=after, stop=stop, event_type=event_type, since=since_at
            ):
                _emit_more(batch, columns, fmt, aligned, header=False)


@contextmanager
def _stopped_by_signals() -> Iterator[threading.Event]:
    """An Event that Ctrl-C or SIGTERM sets, to be looked at between steps, so that a signal
    never lands inside the database driver or the connection pool, whose locks a
    KeyboardInterrupt could leave held (a follow then hung at exit on a busy machine). A
    second signal interrupts at once."""
    stop = threading.Event()

    def handle(_signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    except KeyboardInterrupt:
        return
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _emit_more(
    rows: list[dict[str, Any]],
    columns: tuple[str, ...],
    fmt: str,
    aligned: output.Aligned | None,
    *,
    header: bool,
) -> None:
    if aligned is not None:
        aligned.print(rows, header=header)
    else:
        output.emit(rows, columns, "jsonl" if fmt == "json" else fmt, header=header)
    sys.stdout.flush()


@app.command("sql", context_settings={"ignore_unknown_options": True})
@click.argument("query", metavar="QUERY")
@click.option(
    "--timeout",
    metavar="SECONDS",
    type=click.FloatRange(0.001, 86_400),
    default=30.0,
    show_default=True,
    help="Stop the query after this many seconds.",
)
@click.option(
    "--max-rows",
    metavar="N",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Print at most N rows.",
)
@database_url_option
@format_option(*output.FORMATS)
@pass_setup
def sql_command(
    setup: Setup,
    query: str,
    timeout: float,
    max_rows: int,
    database_url: str | None,
    fmt: str,
) -> None:
    """Run one read-only SQL QUERY and print the answer, for those without sqlite3 or psql.
    Anything that could write is refused, and so is a second statement."""
    from eventsync import reads

    settings = setup.settings(database_url=database_url)
    with setup.database(settings, read_only=True) as engine:
        try:
            result = reads.read_only_query(engine, query, timeout=timeout, max_rows=max_rows)
        except QueryRefused as exc:
            fail(str(exc), code=2)
        except QueryError as exc:
            fail(f"query failed: {exc}")
    columns = result.columns
    output.emit([dict(zip(columns, row, strict=True)) for row in result.rows], columns, fmt)
    if result.cut:
        output.echo(
            f"note: showing the first {max_rows:,} rows; more were cut: use --max-rows",
            err=True,
        )


# -- pictures: these read the database only, and draw with the plot extra (matplotlib) ----


def _output_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--output",
        "-o",
        "output_file",
        metavar="FILE",
        required=True,
        type=click.Path(dir_okay=False),
        help=help,
    )


@app.command("plot")
@click.argument("job_ids", metavar="JOB...", nargs=-1, required=True)
@_output_option("Where to write the chart; its extension picks the format: .png or .svg.")
@database_url_option
@pass_setup
def plot_command(
    setup: Setup, job_ids: tuple[str, ...], output_file: str, database_url: str | None
) -> None:
    """Draw the train and eval loss of up to 10 jobs on one chart, a PNG or an SVG.

    \b
    Examples:
      eventsync plot ft-1a2b -o loss.png
      eventsync plot ft-1a2b ft-3c4d ft-5e6f -o sweep.svg

    x is the global step. One colour per job, named by its id, learning rate, epochs, LoRA
    rank (LoRA jobs) and batch size; train loss solid, eval loss dashed with markers. Every
    stored point is drawn. Reads the database only.

    \b
    Needs matplotlib, the plot extra:
      pip install 'eventsync[plot]'
    """
    from pathlib import Path

    from eventsync import plot

    fmt = Path(output_file).suffix.lower().removeprefix(".")
    if fmt not in plot.FORMATS:
        fail(f"-o {output_file}: the name must end in .png or .svg, which picks the format", code=2)
    jobs = list(dict.fromkeys(job_ids))
    if len(jobs) > plot.MAX_JOBS:
        fail(f"{len(jobs)} jobs: one chart draws at most {plot.MAX_JOBS}", code=2)
    _require_matplotlib()
    settings = setup.settings(database_url=database_url)
    with setup.database(settings, read_only=True) as engine, engine.connect() as connection:
        curves = [plot.read_curves(connection, job) for job in jobs]
    for job in curves:
        if not job.known:
            fail(_unknown_job(job.job_id))
        if not job.points:
            fail(f"no training metrics stored for job {job.job_id}: nothing to draw yet")
    _write(output_file, plot.draw(curves, fmt=fmt))
    points = sum(job.points for job in curves)
    output.echo(f"{output_file}: the loss of {len(curves)} job(s), {points:,} points")


@app.command("report")
@click.argument("job_id", metavar="JOB")
@_output_option("Where to write the page: a name ending in .html.")
@database_url_option
@pass_setup
def report_command(setup: Setup, job_id: str, output_file: str, database_url: str | None) -> None:
    """Write one job's history as one HTML page that opens offline.

    \b
    Example:
      eventsync report ft-1a2b -o ft-1a2b.html

    The page holds the job's hyperparameters, its status timeline (the statuses eventsync
    saw, and the lifecycle events), the loss curve, the checkpoints, and the errors (error
    events and the last sync's error). It loads nothing from anywhere: inline CSS and SVG,
    no script. Every value is escaped, long lists keep their latest 500 rows. Reads the
    database only.

    \b
    Needs matplotlib, the plot extra:
      pip install 'eventsync[plot]'
    """
    from pathlib import Path

    from eventsync import report

    if Path(output_file).suffix.lower() not in (".html", ".htm"):
        fail(f"-o {output_file}: the name must end in .html", code=2)
    _require_matplotlib()
    settings = setup.settings(database_url=database_url)
    with setup.database(settings, read_only=True) as engine, engine.connect() as connection:
        found = report.read_report(connection, job_id)
    if not found.known:
        fail(_unknown_job(job_id))
    _write(output_file, report.render(found).encode())
    output.echo(f"{output_file}: the report of job {job_id}")


def _require_matplotlib() -> None:
    from eventsync import plot

    try:
        plot.require_matplotlib()
    except ConfigError as exc:
        fail(str(exc))


def _unknown_job(job_id: str) -> str:
    return f"unknown job {job_id}: nothing is stored for it (eventsync sync --job-id ID stores it)"


def _write(name: str, data: bytes) -> None:
    from pathlib import Path

    try:
        Path(name).write_bytes(data)
    except OSError as exc:
        fail(f"can't write {name}: {exc.strerror or exc}")


def main() -> None:
    app(prog_name="eventsync")
