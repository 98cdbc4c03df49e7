"""Bounds a broken or hostile server can't get past (eventsync/transport.py): the size of a
body after decompression, and the deadline of a request, against real servers on loopback."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from eventsync.client import RetryPolicy, TogetherClient, make_http_client
from eventsync.config import Settings
from eventsync.errors import ApiStatusError, PayloadError, RefusedBodyError, TransportError
from eventsync.models import state_table
from eventsync.sync import PassResult, plan_jobs, run_pass
from eventsync.testing import FakeTogether, make_event
from eventsync.transport import (
    BodyTooLarge,
    DeadlineBackend,
    DeadlineTransport,
    read_body,
)
from tests.helpers import (
    API_KEY,
    ATTEMPTS,
    client_for,
    event_counts,
    fetch_events,
    fetches,
    make_settings,
    sync_pass,
    wait_until,
)
from tests.hostile import (
    MIB,
    Handler,
    RawServer,
    bomb,
    drip_body,
    drip_headers,
    endless,
    gzip_zeros,
    measure,
    reply,
    route,
)


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], RawServer]]:
    """Start raw servers for this test; all are stopped after it."""
    servers: list[RawServer] = []

    def start(handler: Handler) -> RawServer:
        servers.append(RawServer(handler).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def raw_settings(url: str, *, db_url: str = "sqlite:///unused.db", **extra: object) -> Settings:
    values: dict[str, object] = {
        "database_url": db_url,
        "api_key": API_KEY,
        "base_url": url,
        "retry_attempts": ATTEMPTS,
        **extra,
    }
    return Settings(**values)  # type: ignore[arg-type]


@contextmanager
def raw_client(url: str, **extra: object) -> Iterator[TogetherClient]:
    settings = raw_settings(url, **extra)
    with make_http_client(settings) as http:
        yield TogetherClient.from_settings(http, settings)


def raw_pass(url: str, engine: Engine, job_ids: list[str], **extra: object) -> PassResult:
    """One pass against a raw server, which serves the listing and events only."""
    extra.setdefault("history", False)
    settings = raw_settings(url, db_url=engine.url.render_as_string(hide_password=False), **extra)
    with make_http_client(settings) as http:
        client = TogetherClient.from_settings(http, settings)
        jobs = plan_jobs(client, engine, job_ids, all_jobs=False)
        return run_pass(client, engine, jobs, concurrency=4, history=settings.history)


def events_body(job_id: str, n: int) -> bytes:
    return json.dumps({"data": [make_event(job_id, i) for i in range(n)]}).encode()


# -- size -----------------------------------------------------------------------------------


def test_a_body_over_the_cap_fails_its_job_alone(fake: FakeTogether, engine: Engine) -> None:
    """A body past EVENTSYNC_MAX_BODY_MB fails its job at once, with one line naming the
    setting and no retry; the other jobs are stored."""
    fake.add_job("ft-big", events=4000)  # 1.5 MB
    fake.add_job("ft-ok", events=5)
    result = sync_pass(fake, engine, ["ft-big", "ft-ok"], max_body_mb=1)
    big, ok = result.outcomes
    assert big.error is not None
    assert str(big.error) == (
        "job ft-big: bad payload: response body over 1 MB (EVENTSYNC_MAX_BODY_MB)"
    )
    assert big.error.kind == "payload"
    assert ok.ok
    assert event_counts(engine) == {"ft-ok": 5}
    assert fetches(fake, "ft-big") == 1


@pytest.mark.parametrize(
    "headers", [{}, {"Content_Length": 100 * 1024 * MIB}], ids=["unannounced", "announced"]
)
def test_reading_stops_at_the_cap(
    serve: Callable[[Handler], RawServer], headers: dict[str, str | int]
) -> None:
    """A body that never ends, or announces 100 GiB, is refused at the cap: the connection is
    closed there, so the server gets out little more than the cap (plus socket buffers)."""
    server = serve(endless(b"x" * 65536, limit=256 * MIB, **headers))
    with (
        raw_client(server.base_url, max_body_mb=1) as client,
        pytest.raises(RefusedBodyError, match=r"over 1 MB \(EVENTSYNC_MAX_BODY_MB\)"),
    ):
        fetch_events(client, "ft-big")
    assert len(server.heads) == 1
    assert server.sent < 32 * MIB
    # What eventsync asks for is only what it inflates with a bound.
    assert b"\r\naccept-encoding: gzip, deflate\r\n" in server.heads[0].lower()


def test_a_gzip_bomb_fails_its_job_not_the_process(fake: FakeTogether) -> None:
    """1 MB of gzip that inflates to 1 GiB is refused at the cap, unretried."""
    fake.override = lambda path: (200, gzip_zeros(1024), {"Content-Encoding": "gzip"})
    settings = make_settings(fake, "sqlite:///unused.db", max_body_mb=8)
    with make_http_client(settings) as http:
        client = TogetherClient.from_settings(http, settings)
        with pytest.raises(RefusedBodyError, match=r"over 8 MB \(EVENTSYNC_MAX_BODY_MB\)"):
            fetch_events(client, "ft-1")
    assert fetches(fake, "ft-1") == 1


def test_a_failed_request_keeps_nothing_of_its_body(fake: FakeTogether) -> None:
    """The error of a failed request, which the job's outcome keeps for the rest of the pass,
    holds no context and no frame below the client's, so none of the body in their locals."""
    fake.override = lambda path: (200, b'{"data": [{"a": 1},' + b" " * 1000, {})
    settings = make_settings(fake, "sqlite:///unused.db")
    with make_http_client(settings) as http, pytest.raises(PayloadError) as caught:
        fetch_events(client_for(http), "ft-1")
    assert caught.value.__context__ is None
    frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(caught.value.__traceback__)]
    assert frames[-1] == "_get_in_slot"


def test_peak_memory_under_a_gzip_bomb_stays_near_the_cap() -> None:
    """A whole `eventsync sync` against a 1 GiB gzip bomb, cap 8 MB: the job fails with the
    cap's error and the process never holds anything like the bomb (ceiling 300 MiB)."""
    with RawServer(bomb(1024)) as server:
        rss, _, outcome = measure(server.base_url, ["ft-1"], {"EVENTSYNC_MAX_BODY_MB": "8"})
    assert outcome == (
        "error: job ft-1: bad payload: response body over 8 MB (EVENTSYNC_MAX_BODY_MB) [payload]"
    )
    assert rss < 300


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, gzip"])
def test_encodings_not_asked_for_are_refused(fake: FakeTogether, coding: str) -> None:
    """A Content-Encoding other than gzip or deflate is refused, once, with a clear error:
    httpx would decode brotli or zstd (when installed) with no bound, or pass it on as JSON."""
    fake.override = lambda path: (200, b"(\xb5/\xfd compressed", {"Content-Encoding": coding})
    settings = make_settings(fake, "sqlite:///unused.db")
    with (
        make_http_client(settings) as http,
        pytest.raises(RefusedBodyError, match=f"Content-Encoding '{coding}' was not asked"),
    ):
        fetch_events(client_for(http), "ft-1")
    assert fetches(fake, "ft-1") == 1


@pytest.mark.parametrize("wbits", [31, 15, -15], ids=["gzip", "deflate", "raw deflate"])
def test_compressed_bodies_are_read(fake: FakeTogether, wbits: int) -> None:
    """gzip, deflate and the raw deflate some servers send read as the plain body would."""
    fake.add_job("ft-1", events=300)
    body = fake.jobs["ft-1"].events_body()
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    packed = packer.compress(body) + packer.flush()
    coding = "gzip" if wbits == 31 else "deflate"
    fake.override = lambda path: (200, packed, {"Content-Encoding": coding})
    settings = make_settings(fake, "sqlite:///unused.db")
    with make_http_client(settings) as http:
        events = fetch_events(client_for(http), "ft-1")
    assert events == fake.jobs["ft-1"].events


class Chunks(httpx.SyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks


@given(
    data=st.binary(max_size=3000) | st.just(bytes(300_000)),
    wbits=st.sampled_from([None, 31, 15, -15]),
    cuts=st.lists(st.integers(min_value=0, max_value=400_000), max_size=6),
    limit=st.integers(min_value=0, max_value=400_000),
)
def test_read_body_gives_the_bytes_sent_whatever_the_chunking(
    data: bytes, wbits: int | None, cuts: list[int], limit: int
) -> None:
    """Whatever the encoding and however the body arrives in pieces, read_body gives the
    original bytes, refuses past the limit, or with cut=True gives the first `limit` bytes."""
    headers = {}
    sent = data
    if wbits is not None:
        packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
        sent = packer.compress(data) + packer.flush()
        headers["Content-Encoding"] = "gzip" if wbits == 31 else "deflate"
    bounds = sorted({0, len(sent), *(c for c in cuts if c < len(sent))})
    chunks = [sent[a:b] for a, b in itertools.pairwise(bounds)]

    def response() -> httpx.Response:
        return httpx.Response(200, headers=headers, stream=Chunks(chunks))

    assert read_body(response(), limit, cut=True) == data[:limit]
    if len(data) <= limit:
        assert read_body(response(), limit) == data
    else:
        with pytest.raises(BodyTooLarge):
            read_body(response(), limit)


@pytest.mark.parametrize(
    ("body", "coding"),
    [
        (b"\x1f\x8b\x08\x00garbage", "gzip"),
        (gzip_zeros(1)[:-20], "gzip"),  # cut short
        (gzip_zeros(1) + b"trailing", "gzip"),
    ],
    ids=["corrupt", "cut short", "trailing data"],
)
def test_broken_compression_is_a_bad_payload(fake: FakeTogether, body: bytes, coding: str) -> None:
    """gzip that doesn't inflate cleanly is a payload error (and retried like one)."""
    fake.override = lambda path: (200, body, {"Content-Encoding": coding})
    settings = make_settings(fake, "sqlite:///unused.db")
    with make_http_client(settings) as http, pytest.raises(PayloadError, match="gzip body"):
        fetch_events(client_for(http), "ft-1")
    assert fetches(fake, "ft-1") == ATTEMPTS


def test_error_bodies_are_read_no_further_than_4_kib(
    serve: Callable[[Handler], RawServer],
) -> None:
    """A 503 with an endless body: its JSON message is read from the first 4 KiB, the rest is
    never fetched (the connection is closed, not drained), and each retry does the same."""
    message = json.dumps({"error": {"message": "overloaded, try later"}}).encode()
    server = serve(endless(b" " * 65536, status=503, first=message, limit=256 * MIB))
    with (
        raw_client(server.base_url) as client,
        pytest.raises(ApiStatusError, match="HTTP 503: overloaded, try later"),
    ):
        fetch_events(client, "ft-1")
    assert len(server.heads) == ATTEMPTS
    assert server.sent < ATTEMPTS * 32 * MIB


# -- time -----------------------------------------------------------------------------------

DEADLINE_ERROR = r"request deadline \(1 s, EVENTSYNC_REQUEST_DEADLINE\)"


@pytest.mark.parametrize("handler", [drip_headers(0.05), drip_body(0.05)], ids=["headers", "body"])
def test_a_dripping_server_cannot_hold_a_request_past_its_deadline(
    serve: Callable[[Handler], RawServer], handler: Handler
) -> None:
    """A byte every 50 ms never trips the 5 s read timeout, headers or body; the 1 s deadline
    ends the request all the same, with a network error naming the setting."""
    server = serve(handler)
    started = time.monotonic()
    with (
        raw_client(server.base_url, request_deadline=1, timeout=5) as client,
        pytest.raises(TransportError, match=DEADLINE_ERROR),
    ):
        fetch_events(client, "ft-1")
    # The server drips for 60 s; a generous ceiling, far from it.
    assert time.monotonic() - started < 30


def test_a_request_past_its_deadline_fails_its_job_and_the_next_pass_retries(
    serve: Callable[[Handler], RawServer], engine: Engine
) -> None:
    """A job whose server drips its headers fails this pass with the deadline's error,
    recorded; the other job is stored; the next pass stores it once the server answers."""
    listing = reply(b'{"data": []}')
    dripping = {"/fine-tunes ": listing, "ft-ok/events": reply(events_body("ft-ok", 3))}
    server = serve(route(dripping, drip_headers(0.05)))
    result = raw_pass(server.base_url, engine, ["ft-slow", "ft-ok"], request_deadline=1)
    slow, ok = result.outcomes
    assert slow.error is not None
    assert slow.error.kind == "network"
    assert "EVENTSYNC_REQUEST_DEADLINE" in str(slow.error)
    assert ok.ok
    with engine.connect() as conn:
        state = conn.execute(select(state_table).where(state_table.c.job_id == "ft-slow")).one()
    assert "EVENTSYNC_REQUEST_DEADLINE" in state.last_error
    server.handler = route({"/fine-tunes ": listing}, reply(events_body("ft-slow", 4)))
    assert raw_pass(server.base_url, engine, ["ft-slow"], request_deadline=1).ok
    assert event_counts(engine) == {"ft-ok": 3, "ft-slow": 4}


def test_waiting_for_a_free_connection_ends_at_the_deadline(
    serve: Callable[[Handler], RawServer],
) -> None:
    """With every pooled connection held by a request the server drips to, a new request's
    wait for one ends at its own deadline, not at the (longer) pool timeout."""
    server = serve(drip_headers(0.05))
    settings = raw_settings(server.base_url, concurrency=1, timeout=60, request_deadline=90)
    pool_size = settings.concurrency + 2
    with make_http_client(settings) as http:

        def hold_a_connection() -> None:
            with contextlib.suppress(TransportError):
                # A client of its own: one from these settings sends one request at a time.
                client_for(http, RetryPolicy.from_settings(settings)).list_jobs()

        hogs = [threading.Thread(target=hold_a_connection) for _ in range(pool_size)]
        for hog in hogs:
            hog.start()
        wait_until(lambda: len(server.heads) == pool_size, 30)
        quick = client_for(http, replace(RetryPolicy.from_settings(settings), deadline=1))
        started = time.monotonic()
        with pytest.raises(TransportError, match=DEADLINE_ERROR):
            fetch_events(quick, "ft-1")
        # A generous ceiling, far from the pool timeout of 60 s.
        assert time.monotonic() - started < 30
        server.stop()  # lets the hogs go
        for hog in hogs:
            hog.join(timeout=30)


@pytest.mark.usefixtures("real_retries")
def test_retries_stop_at_the_deadline(fake: FakeTogether) -> None:
    """The deadline covers every try and every wait: a server that keeps answering 503 with
    Retry-After gets only the tries that fit, and the error says why retrying stopped."""
    fake.inject("status", match="/events", times=50, status=503, headers={"Retry-After": "0.6"})
    settings = make_settings(fake, "sqlite:///unused.db", request_deadline=2, retry_attempts=10)
    with make_http_client(settings) as http:
        client = TogetherClient.from_settings(http, settings)
        with pytest.raises(ApiStatusError, match=r"not retried: .* the request deadline, 2 s"):
            fetch_events(client, "ft-1")
    assert 2 <= fetches(fake, "ft-1") <= 4


def test_the_deadline_backend_sits_in_httpx() -> None:
    """Pins the one httpx internal eventsync relies on: DeadlineTransport finds the network
    backend of httpx's pool and wraps it (an httpx that moves it fails here and at start)."""
    transport = DeadlineTransport()
    assert isinstance(transport._pool._network_backend, DeadlineBackend)


def test_proxy_variables_are_still_honoured(
    fake: FakeTogether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """eventsync builds its own transport, which turns off httpx's reading of HTTP_PROXY and
    friends; it reads them itself, so a proxy set in the environment is still used."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", fake.base_url)
    fake.add_job("ft-1", events=2)
    settings = make_settings(fake, "sqlite:///unused.db", base_url="http://api.example.invalid")
    with make_http_client(settings) as http:
        assert len(fetch_events(client_for(http), "ft-1")) == 2
    assert fake.requests == ["http://api.example.invalid/v1/fine-tunes/ft-1/events"]
