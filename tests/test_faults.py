"""HTTP faults and hostile events: retried or reported, never a crash, never a partial write."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select

from eventsync.client import TogetherClient, make_http_client, retry_after
from eventsync.errors import ApiStatusError, UnreachableError
from eventsync.models import events_table, state_table
from eventsync.testing import FAULT_KINDS, FakeTogether, make_event
from tests.helpers import (
    API_KEY,
    ATTEMPTS,
    client_for,
    event_counts,
    fetch_events,
    fetches,
    free_port,
    make_settings,
    run,
    sync_pass,
)

# How each fault kind surfaces when it outlasts the retries.
SURFACES_AS = {
    "reset": "network",
    "stall": "network",
    "status": "http_status",
    "html": "payload",
    "truncated": "payload",
    "short": "network",
    "wrong_shape": "payload",
}

# The client's read timeout: far above what the fake takes to answer however busy the machine,
# so that only a stalled answer (twice as long) times out.
READ_TIMEOUT = 1.0
STALL = 2 * READ_TIMEOUT


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_a_passing_fault_is_retried_and_nothing_is_lost(
    fake: FakeTogether, engine: Engine, kind: str
) -> None:
    """One fault of each kind on a job's events: the retry stores every event, exactly once."""
    fake.add_job("ft-1", events=30)
    fake.add_job("ft-2", events=10)
    fake.inject(kind, match="ft-1/events", seconds=STALL)
    result = sync_pass(fake, engine, ["ft-1", "ft-2"], timeout=READ_TIMEOUT)
    assert result.ok, [str(o.error) for o in result.outcomes]
    assert event_counts(engine) == {"ft-1": 30, "ft-2": 10}
    assert fake.injected == {kind: 1}


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_a_lasting_fault_fails_the_job_cleanly(
    fake: FakeTogether, engine: Engine, kind: str
) -> None:
    """A fault that outlasts the retries fails that job alone, writes none of it, and the
    next pass, with the fault gone, stores everything."""
    fake.add_job("ft-1", events=5)
    sync_pass(fake, engine, ["ft-1"])
    fake.add_events("ft-1", 20)
    fake.add_job("ft-2", events=7)
    fake.inject(kind, match="ft-1/events", times=ATTEMPTS, seconds=STALL)
    result = sync_pass(fake, engine, ["ft-1", "ft-2"], timeout=READ_TIMEOUT)
    failed, ok = result.outcomes
    assert failed.error is not None
    assert failed.error.kind == SURFACES_AS[kind]
    assert ok.ok
    assert event_counts(engine) == {"ft-1": 5, "ft-2": 7}
    with engine.connect() as conn:
        state = conn.execute(select(state_table).where(state_table.c.job_id == "ft-1")).one()
    assert state.last_error_kind == SURFACES_AS[kind]
    assert fetches(fake, "ft-1") == 1 + ATTEMPTS
    assert sync_pass(fake, engine, ["ft-1"]).ok
    assert event_counts(engine) == {"ft-1": 25, "ft-2": 7}


def test_rejected_key_is_not_retried(fake: FakeTogether, engine: Engine) -> None:
    """401 is final for this pass: one request per job, an auth error, no retry loop."""
    fake.add_job("ft-1", events=3)
    fake.api_key = "another-key"
    result = sync_pass(fake, engine, ["ft-1"])
    assert result.outcomes[0].error is not None
    assert result.outcomes[0].error.kind == "auth"
    assert fetches(fake, "ft-1") == 1


@pytest.mark.usefixtures("real_retries")
def test_retry_after_is_honoured(fake: FakeTogether, http_client: httpx.Client) -> None:
    """503 with Retry-After: the next try waits that long, not the (tiny) backoff."""
    fake.add_job("ft-1", events=2)
    fake.inject("status", match="/events", status=503, headers={"Retry-After": "0.4"})
    client = client_for(http_client)
    assert len(fetch_events(client, "ft-1")) == 2
    first, second = (t for t, path in fake.arrivals if path.endswith("/events"))
    assert second - first >= 0.4


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_forms(headers: dict[str, str], expected: float | None) -> None:
    """Seconds, milliseconds (preferred), or nothing usable."""
    assert retry_after(httpx.Headers(headers)) == expected


def test_retry_after_as_an_http_date() -> None:
    """An HTTP date is turned into the seconds until then."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    seconds = retry_after(httpx.Headers({"Retry-After": when}))
    assert seconds is not None
    assert 27 <= seconds <= 30


def test_waits_asked_for_are_capped_at_60s(http_client: httpx.Client) -> None:
    """A server asking for an hour gets 60 s at most."""
    error = ApiStatusError("slow down", status_code=503)
    error.retry_after = 3600
    assert client_for(http_client)._decide(error) == 60


def test_429_pauses_every_worker(
    fake: FakeTogether, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """After a 429 with Retry-After, no worker starts a request until the pause is over (each
    may have one already on its way): told by who sent what, not by when requests landed."""
    for i in range(12):
        fake.add_job(f"ft-{i}", events=2)
    fake.latency = 0.1
    fake.inject("status", match="ft-0/events", status=429, headers={"Retry-After": "0.6"})
    sent: list[tuple[float, int]] = []

    def on_request(_request: httpx.Request) -> None:
        sent.append((time.time(), threading.get_ident()))

    caplog.set_level("WARNING", logger="eventsync.client")
    result = sync_pass(
        fake, engine, all_jobs=True, concurrency=4, event_hooks={"request": [on_request]}
    )
    assert result.ok
    (paused,) = [r.created for r in caplog.records if r.getMessage().startswith("rate limited")]
    # Logged just after the pause is set, so its first half lies inside the pause. Unpaused,
    # each worker would send about three requests in it.
    senders = Counter(thread for at, thread in sent if paused < at < paused + 0.3)
    assert max(senders.values(), default=0) <= 1, senders
    arrivals = sorted(fake.arrivals)
    limited = next(t for t, path in arrivals if path.endswith("ft-0/events"))
    assert any(t - limited >= 0.6 for t, _ in arrivals)
    assert event_counts(engine) == {f"ft-{i}": 2 for i in range(12)}


HOSTILE = [
    make_event("ft-h", 0, message="x" * 100_000),
    make_event("ft-h", 1, message="nul\x00inside", checkpoint_path="\x00"),
    make_event("ft-h", 2, step="twelve", total_steps=None, token_count=12.5),
    make_event("ft-h", 3, created_at="not a date"),
    make_event("ft-h", 4, type="NEW_TYPE_FROM_THE_FUTURE", level="Info", brand_new_field=[1]),
    make_event("ft-h", 5, param_count=2**70, training_offset=-1),
    {"object": "fine-tune-event", "hash": "only-a-hash"},
    make_event("ft-h", 7, message=None, hash=None, type=123),
    make_event("ft-h", 8, message="\u202eright-to-left \U0001f680 \u0301 combining"),
]


def test_hostile_events_are_all_stored(fake: FakeTogether, engine: Engine) -> None:
    """Every hostile event gets its row, raw intact, repairs recorded; the other jobs go on."""
    events = [*HOSTILE, HOSTILE[0]]  # and the same event twice in one list
    fake.add_job("ft-h", events=events)
    fake.add_job("ft-twin", events=[HOSTILE[0]])  # the same hash in another job
    result = sync_pass(fake, engine, ["ft-h", "ft-twin"])
    assert result.ok
    hostile = result.outcomes[0]
    assert (hostile.new, hostile.total) == (len(HOSTILE), len(HOSTILE))
    assert hostile.repairs["duplicate_in_list"] == 1
    assert hostile.repairs["step:int_parsing"] == 1
    assert hostile.repairs["created_at:unparseable"] == 1
    assert event_counts(engine) == {"ft-h": len(HOSTILE), "ft-twin": 1}
    with engine.connect() as conn:
        rows = conn.execute(
            select(events_table).where(events_table.c.job_id == "ft-h").order_by("seq")
        ).all()
    assert len(rows[0].message) == 100_000
    assert rows[1].message == "nul\ufffdinside"
    assert rows[1].raw["message"] == "nul\\u0000inside"
    assert (rows[2].step, rows[2].total_steps, rows[2].token_count) == (None, None, None)
    assert rows[3].created_at is None
    assert rows[4].type == "NEW_TYPE_FROM_THE_FUTURE"
    assert rows[4].raw["brand_new_field"] == [1]
    assert rows[5].param_count is None
    assert rows[5].raw["param_count"] == 2**70
    assert rows[6].hash == "only-a-hash"
    assert rows[7].type == "123"
    assert rows[8].message == HOSTILE[8]["message"]
    assert all(row.raw is not None for row in rows)
    assert [i for i, row in enumerate(rows) if row.repairs] == [1, 2, 3, 5]


@pytest.mark.usefixtures("real_retries")
def test_settings_knobs_reach_the_client(fake: FakeTogether) -> None:
    """retry_attempts from settings is what the client uses."""
    settings = make_settings(
        fake, "sqlite:///x.db", retry_attempts=2, retry_wait_initial=0.01, retry_wait_max=0.05
    )
    fake.inject("status", match="/events", times=5, status=500)
    with make_http_client(settings) as http:
        client = TogetherClient.from_settings(http, settings)
        with pytest.raises(ApiStatusError):
            fetch_events(client, "ft-1")
    assert fetches(fake, "ft-1") == 2


# Connection attempts and name lookups, seen through the interpreter's audit events (below
# httpx and eventsync alike) while a test counts them.
_SOCKET_CALLS: list[tuple[str, object]] = []
_COUNTING = threading.Event()


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _COUNTING.is_set() and event in ("socket.connect", "socket.getaddrinfo"):
        _SOCKET_CALLS.append((event, args[1] if event == "socket.connect" else args[0]))


@pytest.fixture(scope="session")
def _audit_hook() -> None:
    sys.addaudithook(_audit)  # for the rest of the process: audit hooks can't be removed


@pytest.fixture
def socket_calls(_audit_hook: None) -> Iterator[list[tuple[str, object]]]:
    """("socket.connect", address) and ("socket.getaddrinfo", host) made during the test."""
    _SOCKET_CALLS.clear()
    _COUNTING.set()
    yield _SOCKET_CALLS
    _COUNTING.clear()


def test_a_refused_connection_is_not_retried_before_any_answer(
    fake: FakeTogether, socket_calls: list[tuple[str, object]]
) -> None:
    """Nothing listens at the base URL and the server never answered: one connection
    attempt, then a network error; retrying a wrong URL only delays the error."""
    port = free_port()
    settings = make_settings(fake, "sqlite:///x.db", base_url=f"http://127.0.0.1:{port}")
    with make_http_client(settings) as http, pytest.raises(UnreachableError, match="refused"):
        fetch_events(TogetherClient.from_settings(http, settings), "ft-1")
    assert socket_calls.count(("socket.connect", ("127.0.0.1", port))) == 1


def test_a_name_that_does_not_resolve_is_not_retried(
    fake: FakeTogether, socket_calls: list[tuple[str, object]]
) -> None:
    """A base URL whose host has no address: one lookup, then a network error."""
    settings = make_settings(fake, "sqlite:///x.db", base_url="http://nonexistent.invalid")
    with make_http_client(settings) as http, pytest.raises(UnreachableError, match="network"):
        fetch_events(TogetherClient.from_settings(http, settings), "ft-1")
    assert socket_calls.count(("socket.getaddrinfo", "nonexistent.invalid")) == 1


def test_sync_with_nothing_at_the_base_url_fails_at_once(tmp_path: Path) -> None:
    """`eventsync sync --base-url` pointing at a closed port: one error line for the job, no
    retry loop (it took five tries and 18 s per request)."""

    url = f"http://127.0.0.1:{free_port()}"
    env = {"TOGETHER_API_KEY": API_KEY}
    done = run("sync", "--job-id", "ft-a", "--base-url", url, cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert "retrying" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        "error: job ft-a: network error: ConnectError: [Errno 111] Connection refused [network]"
    ]


def test_a_refused_connection_after_an_answer_is_retried() -> None:
    """Once the server has answered, a refused connection (a server restarting under the
    daemon) is retried like any transport error, and goes through once it is back."""
    server = FakeTogether(api_key=API_KEY)
    server.add_job("ft-1", events=2)
    server.start()
    port = int(server.base_url.rsplit(":", 1)[1])

    class RestartOnRetry(logging.Handler):
        """Brings the server back when the client says it will retry a failed connect."""

        def emit(self, record: logging.LogRecord) -> None:
            if "ConnectError" in record.getMessage() and server._server is None:
                server.start(port=port)

    restart = RestartOnRetry()
    logger = logging.getLogger("eventsync.client")
    settings = make_settings(server, "sqlite:///x.db")
    try:
        with make_http_client(settings) as http:
            client = TogetherClient.from_settings(http, settings)
            # The answer closes its connection, so the next request must connect anew.
            server.override = lambda path: (200, b'{"data": []}', {"Connection": "close"})
            assert client.list_jobs() == []
            server.override = None
            server.stop()
            logger.addHandler(restart)
            assert len(fetch_events(client, "ft-1")) == 2
    finally:
        logger.removeHandler(restart)
        server.stop()
    assert server.requests == ["/v1/fine-tunes", "/v1/fine-tunes/ft-1/events"]
