"""Hostile HTTP servers on loopback, below what http.server lets a handler do: replies that
drip a byte at a time (headers included), lie about their length, never end, or inflate to
gigabytes. Run as `python -m tests.hostile` it measures eventsync's peak memory against each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

MIB = 1024 * 1024

# A handler gets the connection, the server and the request's head (already read), and answers.
Handler = Callable[[socket.socket, "RawServer", bytes], None]


class RawServer:
    """A TCP server on loopback that reads each request's head and lets `handler` answer on the
    raw socket; one request per connection. It counts what it sent and records what came in."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.heads: list[bytes] = []
        self.sent = 0  # body bytes the handlers got out, all connections together
        self.closed = threading.Event()  # set when a client hung up while a handler sent
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> RawServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        # shutdown, unlike close, wakes the threads blocked in accept() or send() on them.
        for sock in [self._listener, *self._conns]:
            with contextlib.suppress(OSError):  # already closed by the client
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> RawServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def send(self, conn: socket.socket, data: bytes) -> None:
        """Send body bytes, counted."""
        conn.sendall(data)
        with self.lock:
            self.sent += len(data)

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self.lock:
                self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            with self.lock:
                self.heads.append(head)
            self.handler(conn, self, head)
        except OSError:
            self.closed.set()
        finally:
            conn.close()


def head(status: int = 200, **headers: str | int) -> bytes:
    """A response's status line and headers; header_names_like_this become Header-Names."""
    lines = [f"HTTP/1.1 {status} X"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def reply(body: bytes, status: int = 200, **headers: str | int) -> Handler:
    """An ordinary answer."""

    def handler(conn: socket.socket, server: RawServer, request: bytes) -> None:
        conn.sendall(head(status, Content_Length=len(body), Connection="close", **headers))
        server.send(conn, body)

    return handler


def route(routes: dict[str, Handler], default: Handler) -> Handler:
    """The handler of the first key found in the request line, else `default`."""

    def handler(conn: socket.socket, server: RawServer, request: bytes) -> None:
        line = request.split(b"\r\n", 1)[0].decode()
        chosen = next((h for key, h in routes.items() if key in line), default)
        chosen(conn, server, request)

    return handler


def endless(
    piece: bytes,
    *,
    status: int = 200,
    first: bytes = b"",
    limit: int = 4096 * MIB,
    **headers: str | int,
) -> Handler:
    """A body of `first`, then `piece` again and again until the client hangs up (or `limit`
    bytes)."""

    def handler(conn: socket.socket, server: RawServer, request: bytes) -> None:
        conn.sendall(head(status, Content_Type="application/json", Connection="close", **headers))
        server.send(conn, first)
        sent = 0
        while sent < limit and not server.stopping.is_set():
            server.send(conn, piece)
            sent += len(piece)

    return handler


def drip(prefix: bytes, *, every: float, byte: bytes = b" ", seconds: float = 60.0) -> Handler:
    """Send `prefix`, then one byte every `every` seconds, for at most `seconds`."""

    def handler(conn: socket.socket, server: RawServer, request: bytes) -> None:
        conn.sendall(prefix)
        ends = time.monotonic() + seconds
        while time.monotonic() < ends and not server.stopping.wait(every):
            server.send(conn, byte)

    return handler


def drip_headers(every: float) -> Handler:
    """Headers that never end: a status line, then a header one byte at a time."""
    return drip(b"HTTP/1.1 200 OK\r\nX-Slow: ", every=every, byte=b"a")


def drip_body(every: float) -> Handler:
    """Headers at once, then a body one byte at a time."""
    return drip(head(200, Content_Length=10 * MIB, Content_Type="application/json"), every=every)


@cache
def gzip_zeros(mib: int) -> bytes:
    """A valid gzip body that inflates to `mib` MiB of zeros (about 1 kB per MiB). Each MiB is
    compressed after a full flush, so all are the same bytes: one is made, then repeated."""
    block = bytes(MIB)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    piece = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    end = deflate.flush()
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(block, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = crc.to_bytes(4, "little") + (mib * MIB % 2**32).to_bytes(4, "little")
    return header + piece * mib + end + trailer


def bomb(mib: int) -> Handler:
    """A 200 whose gzip body inflates to `mib` MiB of zeros."""
    body = gzip_zeros(mib)

    def handler(conn: socket.socket, server: RawServer, request: bytes) -> None:
        conn.sendall(
            head(200, Content_Encoding="gzip", Content_Length=len(body), Connection="close")
        )
        server.send(conn, body)

    return handler


# -- measuring peak memory: python -m tests.hostile ------------------------------------------

# One `eventsync sync` in this process, then its peak RSS on stderr's last line: VmHWM, this
# process's own. ru_maxrss would not do: Linux carries the parent's peak over a vfork and exec,
# so a child of a large pytest would report pytest's memory.
CHILD = """
import sys
from eventsync.cli import main
sys.argv = ["eventsync", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
with open("/proc/self/status") as status:
    peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
print("maxrss_kib", peak, file=sys.stderr)
"""


def measure(base_url: str, job_ids: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(peak RSS in MiB, seconds, last error line) of one `eventsync sync` pass."""
    with tempfile.TemporaryDirectory() as folder:
        args = [sys.executable, "-c", CHILD, "sync", "--database-url", f"sqlite:///{folder}/e.db"]
        for job_id in job_ids:
            args += ["--job-id", job_id]
        clean = {
            k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))
        }
        started = time.monotonic()
        done = subprocess.run(
            args,
            env={
                **clean,
                "TOGETHER_API_KEY": "k3y-for-tests",
                "TOGETHER_BASE_URL": base_url,
                **env,
            },
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            cwd=folder,
        )
        seconds = time.monotonic() - started
    lines = done.stderr.strip().splitlines()
    rss = int(lines[-1].split()[1]) / 1024
    errors = [line for line in lines if line.startswith("error:")]
    return rss, seconds, errors[-1] if errors else "ok"


@contextmanager
def fake_with_job(events: int) -> Iterator[str]:
    from eventsync.testing import FakeTogether

    fake = FakeTogether(api_key="k3y-for-tests")
    fake.add_job("ft-big", events=events)
    fake.start()
    try:
        yield fake.base_url
    finally:
        fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Peak RSS of eventsync sync against hostile servers."
    )
    parser.add_argument("--bomb-gib", type=int, default=10)
    parser.add_argument("--drip-deadline", type=float, default=20.0)
    args = parser.parse_args()
    results = []
    with fake_with_job(50_000) as url:
        results.append(("a normal large job (50,000 events, 22 MB)", *measure(url, ["ft-big"], {})))
    with fake_with_job(0) as url:
        results.append(("a job with no events (the baseline)", *measure(url, ["ft-big"], {})))
    with RawServer(endless(b"x" * 65536)) as server:
        results.append(
            ("an endless body, no Content-Length", *measure(server.base_url, ["ft-big"], {}))
        )
    with RawServer(endless(b"x" * 65536)) as server:
        jobs = [f"ft-{i}" for i in range(8)]
        label = "8 jobs at once (the default concurrency), each an endless body"
        results.append((label, *measure(server.base_url, jobs, {})))
    with RawServer(endless(b"x" * 65536, Content_Length=100 * 1024 * MIB)) as server:
        results.append(("a body declaring 100 GiB", *measure(server.base_url, ["ft-big"], {})))
    with RawServer(bomb(args.bomb_gib * 1024)) as server:
        size = len(gzip_zeros(args.bomb_gib * 1024)) // MIB
        label = f"a gzip bomb ({size} MiB inflating to {args.bomb_gib} GiB)"
        results.append((label, *measure(server.base_url, ["ft-big"], {})))
    with RawServer(drip_body(every=0.5)) as server:
        env = {"EVENTSYNC_REQUEST_DEADLINE": str(args.drip_deadline), "EVENTSYNC_TIMEOUT": "5"}
        results.append(
            ("a body dripping a byte every 0.5 s", *measure(server.base_url, ["ft-big"], env))
        )
    with RawServer(drip_headers(every=0.5)) as server:
        env = {"EVENTSYNC_REQUEST_DEADLINE": str(args.drip_deadline), "EVENTSYNC_TIMEOUT": "5"}
        results.append(
            ("headers dripping a byte every 0.5 s", *measure(server.base_url, ["ft-big"], env))
        )
    print("| server | peak RSS | time | outcome |")
    print("|---|---|---|---|")
    for label, rss, seconds, outcome in results:
        print(f"| {label} | {rss:.0f} MiB | {seconds:.1f} s | {json.dumps(outcome)[1:-1]} |")


if __name__ == "__main__":
    main()
