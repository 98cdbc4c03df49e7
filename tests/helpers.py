"""Helpers shared by the tests: settings for the fake API, one sync pass, write counting."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
from sqlalchemy import Engine, select, text

from eventsync.client import ApiKey, RetryPolicy, TogetherClient, make_http_client
from eventsync.config import Settings
from eventsync.fingerprint import read_body
from eventsync.models import events_table
from eventsync.sync import JobOutcome, PassResult, plan_jobs, run_pass, sync_job
from eventsync.testing import FakeTogether

API_KEY = "test-key-5f1c2e"
# In-process tests retry as eventsync does, but in stamina's testing mode (conftest.py): no
# waits, and this many tries.
ATTEMPTS = 3
# Short waits for eventsync run and sync as subprocesses, where testing mode can't reach.
FAST_RETRY_ENV = {"EVENTSYNC_RETRY_WAIT_INITIAL": "0.01", "EVENTSYNC_RETRY_WAIT_MAX": "0.05"}
REPO = Path(__file__).resolve().parent.parent
# Tests wait for what they can observe, never a fixed time, and these are the ceilings on those
# waits: generous enough that only a hang reaches them, on a machine as busy as it gets.
# EVENTUALLY is for what the README promises no time for (a process starting, a pass ending).
EVENTUALLY = 60.0
# The README promises that a stopping daemon exits within EVENTSYNC_SHUTDOWN_GRACE (8 s); a
# process that outlives its signal by this much has broken that promise.
SHUTDOWN_CEILING = 8.0 + 12.0


def make_settings(fake: FakeTogether, db_url: str, **extra: object) -> Settings:
    values: dict[str, object] = {
        "database_url": db_url,
        "api_key": API_KEY,
        "base_url": fake.base_url,
        **extra,
    }
    return Settings(**values)  # type: ignore[arg-type]


def client_for(http: Any, retry: RetryPolicy | None = None) -> TogetherClient:
    """A client of the fake API, with the test key."""
    return TogetherClient(http, ApiKey(API_KEY), retry or RetryPolicy())


def sync_pass(
    fake: FakeTogether,
    engine: Engine,
    job_ids: list[str] | None = None,
    *,
    all_jobs: bool = False,
    concurrency: int = 4,
    full: bool = False,
    event_hooks: dict[str, list[Callable[..., object]]] | None = None,
    **extra: object,
) -> PassResult:
    """One pass through the same pieces the CLI composes (httpx event hooks to watch it)."""
    settings = make_settings(
        fake, engine.url.render_as_string(hide_password=False), concurrency=concurrency, **extra
    )
    with make_http_client(settings, event_hooks=event_hooks) as http:
        client = TogetherClient.from_settings(http, settings)
        jobs = plan_jobs(
            client, engine, job_ids or [], all_jobs=all_jobs, full=full, history=settings.history
        )
        return run_pass(client, engine, jobs, concurrency=concurrency, history=settings.history)


def sync_in_order(fake: FakeTogether, engine: Engine, job_ids: list[str]) -> list[JobOutcome]:
    """The jobs synced one after another by one client, for what its order decides (which
    request first met a missing endpoint, say); a pass has several under way at once."""
    settings = make_settings(fake, engine.url.render_as_string(hide_password=False))
    with make_http_client(settings) as http:
        client = TogetherClient.from_settings(http, settings)
        plans = plan_jobs(client, engine, job_ids, all_jobs=False, history=settings.history)
        return [sync_job(client, engine, plan, history=settings.history) for plan in plans]


def fetch_events(client: TogetherClient, job_id: str) -> list[Any]:
    """A job's whole event list, decoded, as the client fetches it."""
    body = client.job_events(job_id, lambda content: read_body(content, None, f"job {job_id}"))
    assert body.events is not None
    return body.events


def fail_inserts_of(engine: Engine, message: str) -> None:
    """Make the database itself reject any event with this message (a mid-job crash)."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(
                text(
                    "CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN "
                    f"IF NEW.message = '{message}' THEN RAISE EXCEPTION 'injected failure'; "
                    "END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER boom BEFORE INSERT ON fine_tune_events "
                    "FOR EACH ROW EXECUTE FUNCTION boom()"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE TRIGGER boom BEFORE INSERT ON fine_tune_events "
                    f"WHEN NEW.message = '{message}' BEGIN SELECT RAISE(ABORT, 'injected'); END"
                )
            )


def wait_until(
    condition: Callable[[], object], timeout: float = EVENTUALLY, step: float = 0.05
) -> float:
    """Poll until condition() is truthy; return the seconds it took, or fail at the timeout."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        time.sleep(step)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def event_counts(engine: Engine) -> dict[str, int]:
    """Stored events per job."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT job_id, count(*) FROM fine_tune_events GROUP BY job_id")
        ).all()
    return {job: n for job, n in rows}


# -- eventsync as a subprocess ---------------------------------------------------------

EVENTSYNC = shutil.which("eventsync", path=str(Path(sys.executable).parent)) or "eventsync"
# The daemon's interval in the tests that run it.
INTERVAL = 1.0


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    return subprocess.run(
        [EVENTSYNC, *args],
        cwd=cwd,
        env={**base, **FAST_RETRY_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class DaemonProcess:
    """An `eventsync run` process, its port, and its captured stderr."""

    def __init__(self, proc: subprocess.Popen[str], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=5)

    def stderr(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, float]:
        """Send the signal; the exit code, and the seconds it took (to report, not to judge:
        the only limit is the README's promise, with room to spare)."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=SHUTDOWN_CEILING)
        return code, time.monotonic() - started


def serving(daemon: DaemonProcess) -> bool:
    """Whether the daemon answers /healthz yet; an AssertionError if it died."""
    if daemon.proc.poll() is not None:
        raise AssertionError(f"daemon exited early:\n{daemon.stderr()}")
    try:
        daemon.get("/healthz")
    except httpx.TransportError:
        return False
    return True


def cookbook() -> list[tuple[str, str]]:
    """(title, SQL) of each cookbook entry, exactly as the README shows them."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Cookbook") : readme.index("### Datasette")]
    found = re.findall(r"\n\d+\. (.*?):\n\n```sql\n(.*?)```", section, flags=re.S)
    return [(title, sql.strip()) for title, sql in found]


def fetches(fake: FakeTogether, job_id: str) -> int:
    """Requests for the job's events that reached the server, answered or not."""
    return sum(1 for _, path in fake.arrivals if path.endswith(f"/{job_id}/events"))


class Lines:
    """A child process's output, read line by line in a thread, so that a test waits for the
    next line with a ceiling instead of hanging on a readline that never returns."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        thread.start()

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._lines.put(line.rstrip("\n"))
        except ValueError:  # the test closed the stream: nothing more to read
            pass

    def next(self, timeout: float = EVENTUALLY) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s") from None


def read_pty(master: int) -> bytes:
    """Everything a child wrote to a pseudo-terminal, until it closed its side."""
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child's side is closed
            break
        if not chunk:
            break
        drawn += chunk
    return drawn


@contextmanager
def events_never_answered(fake: FakeTogether, job_id: str = "") -> Iterator[threading.Event]:
    """Requests for events (of `job_id` only, if given) hang until the block ends, then are
    served as usual. Yields an Event set once the first such request arrived."""
    stuck, answer = threading.Event(), threading.Event()
    suffix = f"/{job_id}/events" if job_id else "/events"

    def never_answer(path: str) -> None:
        if path.endswith(suffix):
            stuck.set()
            answer.wait()

    fake.override = never_answer
    try:
        yield stuck
    finally:
        answer.set()
        wait_until(lambda: fake.in_flight == 0)  # before the fake is reset for the next test


def stored_events(
    engine: Engine, job_id: str, *, skip: frozenset[str] = frozenset()
) -> list[tuple[Any, ...]]:
    """The job's stored rows in seq order, every column but the row id, the arrival times and
    those in `skip`."""
    left_out = {"id", "first_seen_at", "updated_at", *skip}
    columns = [c for c in events_table.c if c.name not in left_out]
    query = select(*columns).where(events_table.c.job_id == job_id).order_by(events_table.c.seq)
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]
