"""Bounded HTTP under the API client: a deadline no server can stretch, and bodies read no
further than a cap, counted after decompression."""

from __future__ import annotations

import io
import socket
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

# Only what read_body inflates with a bound. httpx's own decoders (and its default header,
# which adds br and zstd when those packages are installed) inflate a chunk without limit.
ACCEPT_ENCODING = "gzip, deflate"
# Decoded bytes per zlib call, whatever the compression ratio.
STEP = 64 * 1024

_local = threading.local()


@contextmanager
def deadline(at: float) -> Iterator[None]:
    """Within the block, every socket operation of this thread ends by `at` (time.monotonic)."""
    previous = getattr(_local, "at", None)
    _local.at = at
    try:
        yield
    finally:
        _local.at = previous


def overdue() -> bool:
    """Whether this thread's deadline has passed (so a timeout just seen was the deadline's)."""
    at: float | None = getattr(_local, "at", None)
    # A socket timeout ends at or after the deadline it was given; 10 ms covers rounding.
    return at is not None and time.monotonic() >= at - 0.01


def clamped(timeout: httpx.Timeout) -> httpx.Timeout:
    """`timeout` with its wait for a free pooled connection cut to the time left: that wait is
    no socket operation, so the backend can't bound it."""
    at: float | None = getattr(_local, "at", None)
    if at is None:
        return timeout
    left = max(at - time.monotonic(), 0.001)
    pool = left if timeout.pool is None else min(timeout.pool, left)
    return httpx.Timeout(connect=timeout.connect, read=timeout.read, write=timeout.write, pool=pool)


def _left(timeout: float | None, expired: type[Exception]) -> float | None:
    """`timeout`, shortened to what is left before this thread's deadline."""
    at: float | None = getattr(_local, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("the request deadline has passed")
    return left if timeout is None else min(timeout, left)


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read, write and TLS handshake ends by the deadline: a server
    that sends a byte at a time, headers included, can't make it wait any longer."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        wait = _left(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, wait))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, with connections that end by the deadline, and the host name
    looked up within the connect timeout (the stdlib's lookup has none)."""

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = _resolve(host, port, _left(timeout, httpcore.ConnectTimeout))
        failure: Exception | None = None
        # One address after another, as socket.create_connection does, but each try gets only
        # the time that is left rather than a whole timeout of its own.
        for address in addresses:
            wait = _left(timeout, httpcore.ConnectTimeout)
            try:
                stream = self._inner.connect_tcp(
                    address, port, wait, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
                continue
            return DeadlineStream(stream)
        assert failure is not None, "getaddrinfo returns an address or raises"
        raise failure

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        wait = _left(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._inner.connect_unix_socket(path, wait, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _resolve(host: str, port: int, timeout: float | None) -> list[str]:
    """The addresses of `host`. The lookup runs in a thread of its own so that a resolver that
    hangs costs `timeout`, not the resolver's own minutes; the thread ends when it gives up."""
    found: list[Any] = []
    failed: list[OSError] = []

    def lookup() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            failed.append(exc)

    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        pass
    else:
        return [host]  # already an address: nothing to look up
    thread = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise httpcore.ConnectTimeout(f"looking up {host} took over {timeout:g}s")
    if failed:
        raise httpcore.ConnectError(str(failed[0]))
    return list(dict.fromkeys(str(info[4][0]) for info in found))


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport (pool, TLS, proxy), over the DeadlineBackend."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # httpx builds its httpcore pool here and takes no network backend for it, which the
        # pool keeps in one attribute. Checked, so that an httpx that changes this stops
        # eventsync at start instead of dropping the deadline (tests/test_transport.py).
        pool = getattr(self, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if not isinstance(backend, httpcore.NetworkBackend):
            raise RuntimeError(
                f"httpx {httpx.__version__} / httpcore {httpcore.__version__}: no network "
                "backend where eventsync installs the request deadline"
            )
        pool._network_backend = DeadlineBackend(backend)  # type: ignore[union-attr]


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTPS_PROXY, ALL_PROXY, NO_PROXY...), as
    httpx would use had it built the transport itself."""
    target = httpx.URL(url)
    proxies = urllib.request.getproxies()
    if not proxies or urllib.request.proxy_bypass(target.host):
        return None
    return proxies.get(target.scheme) or proxies.get("all")


class BodyError(Exception):
    """A body that can't be read as sent."""


class BodyRefused(BodyError):
    """A body not to read at all: retrying can't help."""


class BodyTooLarge(BodyRefused):
    """Past the cap, after decompression."""


def read_body(response: httpx.Response, limit: int, *, cut: bool = False) -> bytes:
    """The decoded body, holding no more than `limit` bytes of it: past that, BodyTooLarge, or
    with `cut` the first `limit` bytes. Reading stops there and the rest is never fetched."""
    coding = _content_coding(response.headers)
    if coding == "identity" and not cut:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(limit)
    # BytesIO grows in place and hands its buffer over at the end: the body is in memory once,
    # not once in pieces and again joined.
    body = io.BytesIO()
    for piece in _decoded(response.iter_raw(), coding):
        if body.tell() + len(piece) > limit:
            if not cut:
                # Freed now: the exception's traceback keeps this frame, and the error the job
                # reports keeps the exception.
                body.close()
                raise BodyTooLarge(limit)
            body.write(piece[: limit - body.tell()])
            break
        body.write(piece)
    return body.getvalue()


def _content_coding(headers: httpx.Headers) -> str:
    codings = [
        c.strip().lower()
        for value in headers.get_list("content-encoding")
        for c in value.split(",")
        if c.strip().lower() not in ("", "identity")
    ]
    if not codings:
        return "identity"
    if codings in (["gzip"], ["x-gzip"]):
        return "gzip"
    if codings == ["deflate"]:
        return "deflate"
    raise BodyRefused(
        f"Content-Encoding {', '.join(codings)!r} was not asked for ({ACCEPT_ENCODING} only)"
    )


def _decoded(chunks: Iterable[bytes], coding: str) -> Iterator[bytes]:
    """The body as sent, inflated at most STEP bytes at a time, so a few kB that inflate to
    gigabytes never come out in one piece."""
    if coding == "identity":
        yield from chunks
        return
    inflater: Any = zlib.decompressobj(zlib.MAX_WBITS | 16) if coding == "gzip" else None
    head = b""
    try:
        for chunk in chunks:
            data = chunk
            if inflater is None:
                # deflate is zlib-wrapped by the RFC, but some servers send it raw.
                head += data
                if len(head) < 2:
                    continue
                data, head = head, b""
                inflater = zlib.decompressobj(zlib.MAX_WBITS if _is_zlib(data) else -zlib.MAX_WBITS)
            while data and not inflater.eof:
                yield inflater.decompress(data, STEP)
                data = inflater.unconsumed_tail
            if inflater.eof and (data or inflater.unused_data):
                raise BodyError(f"data after the end of the {coding} body")
        # Whatever zlib still holds once all input is in.
        while inflater is not None and not inflater.eof:
            rest = inflater.decompress(b"", STEP)
            if not rest:
                break
            yield rest
    except zlib.error as exc:
        raise BodyError(f"{coding} body does not inflate ({exc})") from None
    if inflater is None or not inflater.eof:
        raise BodyError(f"{coding} body is cut short")


def _is_zlib(data: bytes) -> bool:
    return data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
