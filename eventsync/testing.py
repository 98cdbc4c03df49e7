"""A fake Together fine-tuning API on loopback: eventsync's own test double, public on purpose.

Use it to test code that runs eventsync, the way httpx ships MockTransport and stamina a
testing mode: a real HTTP server (stdlib, keep-alive) in a thread of your process, whose
state you change directly.

    from eventsync.testing import FakeTogether, make_event

    fake = FakeTogether(api_key="test-key")
    base_url = fake.start()                   # http://127.0.0.1:PORT, serving /v1/...
    fake.add_job("ft-1", events=20)           # 20 plausible events, 2026-04 generation
    fake.add_events("ft-1", [make_event("ft-1", 20, type="checkpoint_save")])
    fake.set_status("ft-1", "completed")
    fake.inject("status", match="/events", status=503, times=2)   # fail the next 2 fetches
    fake.stop()

It serves `GET /v1/fine-tunes`, `/v1/fine-tunes/{id}` and `/v1/fine-tunes/{id}/events`, with
either event generation ("2026-04": `hash` and `training_offset`; "2026-08": neither, plus
`tokenized_dataset_path` and the early-stopping fields), checks the bearer key, and can fail
on purpose (`FAULT_KINDS`: resets, stalls, error statuses, HTML, cut or short bodies, the
wrong shape). `requests`, `arrivals` and `max_in_flight` record what it was asked.
`install_write_counter` and `writes` count the rows a database was written, by triggers.

Standalone, it serves the offline demo (eventsync.demo):

    python -m eventsync.testing [--port 8765] [--key demo-key]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from eventsync.demo import Demo

if TYPE_CHECKING:
    from sqlalchemy import Engine

GENERATIONS = ("2026-04", "2026-08")
LIFECYCLE = [
    ("job_pending", "Fine tune request created"),
    ("job_start", "Job started"),
    ("model_downloading", "Downloading model"),
    ("model_download_complete", "Model downloaded"),
    ("training_start", "Training started"),
]
EPOCH = datetime(2026, 11, 1, tzinfo=UTC)


def make_event(
    job_id: str,
    index: int,
    *,
    generation: str = "2026-04",
    type: str | None = None,
    message: str | None = None,
    total_steps: int = 1000,
    **extra: Any,
) -> dict[str, Any]:
    """The `index`-th event of a plausible job timeline, in the chosen generation's shape."""
    if type is None:
        type = LIFECYCLE[index][0] if index < len(LIFECYCLE) else "checkpoint_save"
    if message is None:
        message = LIFECYCLE[index][1] if index < len(LIFECYCLE) else f"Step {index} done"
    step = max(0, index - len(LIFECYCLE) + 1)
    created = EPOCH + timedelta(seconds=index * 7)
    event: dict[str, Any] = {
        "object": "fine-tune-event",
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "level": "info",
        "message": message,
        "type": type,
        "param_count": 8_030_261_248,
        "token_count": 1000 * step,
        "total_steps": total_steps,
        "wandb_url": "",
        "step": step,
        "checkpoint_path": f"s3://ckpt/{job_id}/step-{step}" if type == "checkpoint_save" else "",
        "model_path": "",
    }
    if generation == "2026-04":
        event["training_offset"] = 0
        event["hash"] = hashlib.sha1(f"{job_id}/{index}".encode()).hexdigest()  # noqa: S324
    else:
        event["tokenized_dataset_path"] = ""
        event["early_stopping_best_step"] = None
        event["early_stopping_best_metric_value"] = None
    event.update(extra)
    return event


@dataclass
class FakeJob:
    id: str
    status: str = "running"
    generation: str = "2026-04"
    model: str = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
    events: list[dict[str, Any]] = field(default_factory=list)
    _body: bytes | None = None  # the serialised events, cached until they change

    def events_body(self) -> bytes:
        if self._body is None:
            self._body = json.dumps({"data": self.events}).encode()
        return self._body


FAULT_KINDS = (
    "reset",  # close the connection without an answer
    "stall",  # answer only after `seconds` (longer than the client's timeout)
    "status",  # an error status: 503 by default, or `status` (429 with Retry-After, ...)
    "html",  # 200 with a proxy's HTML error page
    "truncated",  # 200 with JSON cut off mid-way (Content-Length honest)
    "short",  # 200 announcing more bytes than it sends, then closing
    "wrong_shape",  # 200 with {"data": {...}}
)


@dataclass
class Fault:
    """One injected failure, for requests whose path contains `match`, `times` times."""

    kind: str
    match: str = ""
    times: int = 1
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 2.0
    message: str | None = None  # the error body's message (default: "injected STATUS")


# A handler returns (status, body bytes, headers) or None to serve the request normally.
Reply = tuple[int, bytes, dict[str, str]]
Override = Callable[[str], "Reply | None"]


class FakeTogether:
    """The fake's state. Mutate it from tests; the server thread reads it under a lock."""

    def __init__(self, api_key: str = "test-key", *, latency: float = 0.0) -> None:
        self.api_key = self._initial_key = api_key
        self.latency = latency
        self.jobs: dict[str, FakeJob] = {}
        self.requests: list[str] = []
        self.arrivals: list[tuple[float, str]] = []  # (monotonic time, path) as received
        self.in_flight = 0
        self.max_in_flight = 0
        self.client_ports: set[int] = set()  # one per TCP connection: shows keep-alive reuse
        self.override: Override | None = None
        self.faults: list[Fault] = []
        self.fault_rate = 0.0  # standalone chaos mode: this share of requests fails at random
        self.injected: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- state ---------------------------------------------------------------------------
    def add_job(
        self,
        job_id: str,
        *,
        events: int | list[dict[str, Any]] = 0,
        status: str = "running",
        generation: str = "2026-04",
        model: str | None = None,
    ) -> FakeJob:
        with self.lock:
            job = FakeJob(id=job_id, status=status, generation=generation)
            if model is not None:
                job.model = model
            self.jobs[job_id] = job
        self.add_events(job_id, events)
        return job

    def add_events(self, job_id: str, events: int | list[dict[str, Any]]) -> None:
        with self.lock:
            job = self.jobs[job_id]
            if isinstance(events, int):
                start = len(job.events)
                events = [
                    make_event(job_id, start + i, generation=job.generation) for i in range(events)
                ]
            job.events.extend(events)
            job._body = None

    def set_events(self, job_id: str, events: list[dict[str, Any]]) -> None:
        with self.lock:
            self.jobs[job_id].events = list(events)
            self.jobs[job_id]._body = None

    def set_status(self, job_id: str, status: str) -> None:
        with self.lock:
            self.jobs[job_id].status = status

    def reset(self) -> None:
        with self.lock:
            self.jobs.clear()
            self.requests.clear()
            self.arrivals.clear()
            self.in_flight = self.max_in_flight = 0
            self.client_ports.clear()
            self.override = None
            self.faults.clear()
            self.fault_rate = 0.0
            self.injected.clear()
            self.latency = 0.0
            self.api_key = self._initial_key

    def inject(self, kind: str, *, match: str = "", times: int = 1, **params: Any) -> None:
        """Fail the next `times` requests whose path contains `match` in the given way."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(FAULT_KINDS)}")
        with self.lock:
            self.faults.append(Fault(kind=kind, match=match, times=times, **params))

    def take_fault(self, path: str) -> Fault | None:
        """The fault this request should suffer, if any, counted by kind."""
        with self.lock:
            for fault in self.faults:
                if fault.match in path and fault.times > 0:
                    fault.times -= 1
                    if fault.times == 0:
                        self.faults.remove(fault)
                    self.injected[fault.kind] += 1
                    return fault
            if self.fault_rate and random.random() < self.fault_rate:
                kind = random.choice([k for k in FAULT_KINDS if k != "stall"])
                self.injected[kind] += 1
                return Fault(
                    kind=kind,
                    status=random.choice([429, 500, 502, 503, 504]),
                    headers={"Retry-After": "1"},
                )
            return None

    def requests_for(self, job_id: str) -> list[str]:
        with self.lock:
            return [p for p in self.requests if f"/fine-tunes/{job_id}" in p]

    # -- serving -------------------------------------------------------------------------
    def respond(
        self, method: str, path: str, auth: str | None
    ) -> tuple[int, bytes, dict[str, str]]:
        with self.lock:
            self.requests.append(path)
            override = self.override
        if override is not None:
            forced = override(path)
            if forced is not None:
                return forced
        if method != "GET":
            return _error(405, "method not allowed", "invalid_request_error")
        if auth != f"Bearer {self.api_key}":
            return _error(401, "Invalid API key provided.", "invalid_api_key")
        parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
        if parts[:2] != ["v1", "fine-tunes"]:
            return _error(404, f"no route for {path}", "not_found")
        with self.lock:
            if len(parts) == 2:
                data = [_job_json(j) for j in self.jobs.values()]
                return 200, json.dumps({"data": data}).encode(), {}
            job = self.jobs.get(parts[2])
            if job is None or len(parts) > 4 or (len(parts) == 4 and parts[3] != "events"):
                return _error(404, f"Fine-tune job {parts[2]!r} not found", "not_found")
            if len(parts) == 3:
                return 200, json.dumps(_job_json(job)).encode(), {}
            return 200, job.events_body(), {}

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in a daemon thread; returns the base URL (without /v1)."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; with Nagle on, each answer would wait
            # for the client's delayed ACK (~40 ms).
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                with fake.lock:
                    fake.arrivals.append((time.monotonic(), self.path))
                    fake.client_ports.add(self.client_address[1])
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    if fake.latency:
                        time.sleep(fake.latency)
                    fault = fake.take_fault(self.path)
                    if fault is not None and self._suffer(fault):
                        return
                    auth = self.headers.get("Authorization")
                    status, body, headers = fake.respond("GET", self.path, auth)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1
                self.send_response(status)
                headers = {"Content-Type": "application/json", **headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _suffer(self, fault: Fault) -> bool:
                """Play out a fault. True when the request is fully handled by it."""
                if fault.kind == "reset":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return True
                if fault.kind == "stall":
                    time.sleep(fault.seconds)
                    return False
                if fault.kind == "short":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b'{"data": [{"object": "fine-tune-event", "mess')
                    self.close_connection = True
                    return True
                status, body, content_type = _fault_reply(fault)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                for name, value in fault.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hung up mid-answer (timeouts, kill -9) is not news

        self._server = Server((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.base_url

    @property
    def base_url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _fault_reply(fault: Fault) -> tuple[int, bytes, str]:
    if fault.kind == "html":
        page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
        return 200, page, "text/html"
    if fault.kind == "truncated":
        return (
            200,
            b'{"data": [{"object": "fine-tune-event", "created_at": "2026-',
            "application/json",
        )
    if fault.kind == "wrong_shape":
        return 200, b'{"data": {"object": "fine-tune-event"}}', "application/json"
    body = {
        "error": {
            "message": fault.message or f"injected {fault.status}",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    return fault.status, json.dumps(body).encode(), "application/json"


def _job_json(job: FakeJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "created_at": EPOCH.isoformat(),
        "updated_at": EPOCH.isoformat(),
        "model": job.model,
    }


def _error(status: int, message: str, code: str) -> tuple[int, bytes, dict[str, str]]:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return status, json.dumps(body).encode(), {}


def install_write_counter(engine: Engine) -> None:
    """Count every row written to fine_tune_events, by triggers inside the database: the
    proof that a pass which found nothing new wrote nothing."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE write_log (op TEXT NOT NULL)"))
        if engine.dialect.name == "postgresql":
            conn.execute(
                text(
                    "CREATE FUNCTION log_write() RETURNS trigger AS $$ BEGIN "
                    "INSERT INTO write_log VALUES (TG_OP); RETURN NULL; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER count_writes AFTER INSERT OR UPDATE OR DELETE "
                    "ON fine_tune_events FOR EACH ROW EXECUTE FUNCTION log_write()"
                )
            )
        else:
            for op in ("INSERT", "UPDATE", "DELETE"):
                conn.execute(
                    text(
                        f"CREATE TRIGGER count_{op.lower()} AFTER {op} ON fine_tune_events "
                        f"BEGIN INSERT INTO write_log VALUES ('{op}'); END"
                    )
                )


def writes(engine: Engine, *, reset: bool = False) -> dict[str, int]:
    """Rows written to fine_tune_events since install_write_counter (or the last reset), by
    operation: {"INSERT": 3}."""
    from sqlalchemy import text

    with engine.begin() as conn:
        rows = conn.execute(text("SELECT op, count(*) FROM write_log GROUP BY op")).all()
        if reset:
            conn.execute(text("DELETE FROM write_log"))
    return {op: n for op, n in rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eventsync.testing",
        description="Serve a fake Together fine-tuning API on loopback: the demo's jobs "
        "(completed, failed, cancelled, queued, and three still training, which gain events "
        "as time passes), plus any synthetic jobs asked for.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--key", default="demo-key", help="the API key clients must send")
    parser.add_argument(
        "--no-demo", action="store_true", help="leave out the demo's jobs (synthetic ones only)"
    )
    parser.add_argument("--jobs", type=int, default=0, help="synthetic jobs to add, for load")
    parser.add_argument("--events", type=int, default=20, help="events per synthetic job")
    parser.add_argument(
        "--tick", type=float, default=0.0, help="add an event to each synthetic job every N s"
    )
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        help="share of requests (0-1) that fail at random: resets, 5xx, 429, HTML, cut bodies",
    )
    args = parser.parse_args(argv)
    fake = FakeTogether(api_key=args.key)
    fake.fault_rate = args.fault_rate
    demo = Demo()
    if not args.no_demo:
        demo.install(fake)
        demo.keep_current(fake)
    synthetic = [f"ft-load-{i:04d}" for i in range(args.jobs)]
    for i, job_id in enumerate(synthetic):
        fake.add_job(job_id, events=args.events, generation=GENERATIONS[i % 2])
    url = fake.start(args.host, args.port)
    print(
        f"fake Together API on {url} (key {args.key!r}); jobs: {', '.join(fake.jobs)}", flush=True
    )
    try:
        while True:
            time.sleep(args.tick or 3600)
            for job_id in synthetic if args.tick else ():
                fake.add_events(job_id, 1)
    except KeyboardInterrupt:
        demo.stop()
        fake.stop()


if __name__ == "__main__":
    main()
