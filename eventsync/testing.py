"""A fake Together fine-tuning API on loopback: eventsync's own test double, public on purpose.

Use it to test code that runs eventsync, the way httpx ships MockTransport and stamina a
testing mode: a real HTTP server (stdlib, keep-alive) in a thread of your process, whose
state you change directly.

    from eventsync.testing import FakeTogether, make_event

    fake = FakeTogether(api_key="test-key")
    base_url = fake.start()                   # http://127.0.0.1:PORT, serving /v1/...
    fake.add_job("ft-1", events=20)           # 20 plausible events, 2026-04 generation
    fake.add_events("ft-1", [make_event("ft-1", 20, type="checkpoint_save")])
    fake.set_status("ft-1", "completed")      # a change of status bumps updated_at
    fake.inject("status", match="/events", status=503, times=2)   # fail the next 2 fetches
    fake.stop()

It serves `GET /v1/fine-tunes`, `/v1/fine-tunes/{id}` and `/v1/fine-tunes/{id}/events`, with
either event generation ("2026-04": `hash` and `training_offset`; "2026-08": neither, plus
`tokenized_dataset_path` and the early-stopping fields), checks the bearer key, and can fail
on purpose (`FAULT_KINDS`: resets, stalls, error statuses, HTML, cut or short bodies, the
wrong shape). `requests`, `arrivals` and `max_in_flight` record what it was asked.
`install_write_counter` and `writes` count the rows a database was written, by triggers.

Each job has a record as well as events: the listing shows its truncated entry
(FinetuneResponseTruncated: `LISTED_FIELDS`), `/v1/fine-tunes/{id}` the whole of it
(FinetuneResponse), and both agree on `status` and `updated_at`. It also serves the job's
training metrics and checkpoints:

    fake.add_job("ft-2", learning_rate=3e-5, record={"batch_size": "max"}, metrics=100)
    fake.set_record("ft-2", token_count=409_600)   # changes fields, bumps updated_at
    fake.add_metrics("ft-2", 50)                    # steps 101-150 of the same curve
    fake.add_checkpoints("ft-2", 2)                 # intermediate checkpoints, then:
    fake.add_checkpoints("ft-2", [make_checkpoint("ft-2", 150, final=True)])
    fake.metrics_endpoint = False                   # /metrics 404s, as before the route

- `GET /v1/fine-tunes/{id}/metrics` answers `{"metrics": [...]}`, in order, with
  `global_step_from` and `global_step_to` (inclusive) filtering on `train/global_step`; a
  bound that is not an integer is a 400.
- `GET /v1/fine-tunes/{id}/checkpoints` answers `{"data": [...]}` (FineTuneCheckpoint).

The generators behind them live in eventsync.payloads, are re-exported here, and are
deterministic:

- `make_record(job_id, *, model, status, **fields)`: a record's fields beyond id, status,
  model and updated_at, with plausible defaults (LoRA, SFT, cosine schedule, lr 1e-5, ...).
- `make_metrics(job_id, start_step, count, *, learning_rate, eval_every, total_steps)`: a
  train snapshot per step (`train/loss`, `train/learning_rate`, `train/global_step`,
  `train/grad_norm`), and an eval snapshot (`eval/loss`) right after every `eval_every`-th.
  The learning rate warms up, then follows a cosine; the loss falls roughly exponentially
  toward a floor, faster for higher learning rates, with noise seeded by job and step. From
  about 1e-4 on the floor is higher, the noise larger and the eval loss creeps back up; at
  3e-4 and above the loss plateaus early and spikes: the curve of a rate set too high.
- `make_checkpoint(job_id, step, *, final=False)`: an intermediate checkpoint (a LoRA
  adapter) or the final model.

Standalone, it serves the offline demo (eventsync.demo), whose jobs' records, metrics and
checkpoints move with the clock as their events do:

    python -m eventsync.testing [--port 8765] [--key demo-key]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from eventsync.payloads import (
    CHECKPOINT_EVERY,
    DEFAULT_MODEL,
    EPOCH,
    GENERATIONS,
    LIFECYCLE,
    LISTED_FIELDS,
    NOT_STARTED,
    PARAM_COUNTS,
    make_checkpoint,
    make_event,
    make_metrics,
    make_record,
    price,
    stamp,
)

__all__ = [
    "CHECKPOINT_EVERY",
    "DEFAULT_MODEL",
    "EPOCH",
    "FAULT_KINDS",
    "GENERATIONS",
    "LIFECYCLE",
    "LISTED_FIELDS",
    "NOT_STARTED",
    "PARAM_COUNTS",
    "FakeJob",
    "FakeTogether",
    "Fault",
    "Override",
    "install_write_counter",
    "make_checkpoint",
    "make_event",
    "make_metrics",
    "make_record",
    "price",
    "stamp",
    "writes",
]

if TYPE_CHECKING:
    from sqlalchemy import Engine


@dataclass
class FakeJob:
    """One job as the fake serves it. Change it through FakeTogether's methods, which keep
    the serialised bodies and updated_at current."""

    id: str
    status: str = "running"
    generation: str = "2026-04"
    model: str = DEFAULT_MODEL
    events: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)  # the fields beyond the four here
    metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    updated_at: datetime = EPOCH
    _bodies: dict[str, bytes] = field(default_factory=dict)  # serialised, until they change

    def events_body(self) -> bytes:
        if "events" not in self._bodies:
            self._bodies["events"] = json.dumps({"data": self.events}).encode()
        return self._bodies["events"]

    def metrics_body(self, first: int | None = None, last: int | None = None) -> bytes:
        """The snapshots whose train/global_step is within [first, last] (either open)."""
        if first is None and last is None:
            if "metrics" not in self._bodies:
                self._bodies["metrics"] = json.dumps({"metrics": self.metrics}).encode()
            return self._bodies["metrics"]
        low = -math.inf if first is None else first
        high = math.inf if last is None else last
        chosen = [
            m
            for m in self.metrics
            if isinstance(step := m.get("train/global_step"), int | float) and low <= step <= high
        ]
        return json.dumps({"metrics": chosen}).encode()

    def checkpoints_body(self) -> bytes:
        if "checkpoints" not in self._bodies:
            self._bodies["checkpoints"] = json.dumps({"data": self.checkpoints}).encode()
        return self._bodies["checkpoints"]

    def full_record(self) -> dict[str, Any]:
        """The job as `GET /fine-tunes/{id}` shows it (FinetuneResponse)."""
        return {
            "id": self.id,
            "status": self.status,
            "model": self.model,
            "updated_at": stamp(self.updated_at),
            **self.record,
            "events": [],
        }

    def listed(self) -> dict[str, Any]:
        """The job as the listing shows it (FinetuneResponseTruncated)."""
        full = self.full_record()
        return {**{k: full[k] for k in LISTED_FIELDS if k in full}, "events": []}

    def last_step(self) -> int:
        """The last train/global_step among the metrics, 0 with none."""
        steps = (m.get("train/global_step") for m in reversed(self.metrics))
        return next((int(s) for s in steps if isinstance(s, int | float)), 0)


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
        # False: /metrics answers 404, as a deployment from before the route would.
        self.metrics_endpoint = True
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
        record: dict[str, Any] | None = None,
        learning_rate: float | None = None,
        metrics: int | list[dict[str, Any]] = 0,
        checkpoints: int | list[dict[str, Any]] = 0,
    ) -> FakeJob:
        """Add a job: `record` is merged over make_record's defaults, and its updated_at
        (default: started_at, or created_at) is the job's."""
        fields = dict(record or {})
        if learning_rate is not None:
            fields["learning_rate"] = learning_rate
        model = fields.pop("model", model) or DEFAULT_MODEL
        status = fields.pop("status", status)
        updated_at = fields.pop("updated_at", None)
        with self.lock:
            job = FakeJob(id=job_id, status=status, generation=generation, model=model)
            job.record = make_record(job_id, model=model, status=status, **fields)
            job.updated_at = _moment(
                updated_at or job.record.get("started_at") or job.record["created_at"]
            )
            self.jobs[job_id] = job
        self.add_events(job_id, events)
        self.add_metrics(job_id, metrics)
        self.add_checkpoints(job_id, checkpoints)
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
            job._bodies.pop("events", None)

    def set_events(self, job_id: str, events: list[dict[str, Any]]) -> None:
        with self.lock:
            self.jobs[job_id].events = list(events)
            self.jobs[job_id]._bodies.pop("events", None)

    def add_metrics(self, job_id: str, steps: int | list[dict[str, Any]]) -> None:
        """Append snapshots: these, or make_metrics' next `steps` steps after the last one,
        at the job's learning rate."""
        with self.lock:
            job = self.jobs[job_id]
            if isinstance(steps, int):
                rate = job.record.get("learning_rate")
                if not isinstance(rate, float) or not 0 < rate < math.inf:
                    rate = 1e-5  # a record made hostile on purpose still gets a curve
                steps = make_metrics(job_id, job.last_step() + 1, steps, learning_rate=rate)
            job.metrics.extend(steps)
            job._bodies.pop("metrics", None)

    def set_metrics(self, job_id: str, metrics: list[dict[str, Any]]) -> None:
        with self.lock:
            self.jobs[job_id].metrics = list(metrics)
            self.jobs[job_id]._bodies.pop("metrics", None)

    def add_checkpoints(self, job_id: str, checkpoints: int | list[dict[str, Any]]) -> None:
        """Append checkpoints: these, or `checkpoints` intermediate ones, CHECKPOINT_EVERY
        steps apart, after the last."""
        with self.lock:
            job = self.jobs[job_id]
            if isinstance(checkpoints, int):
                last = max((int(c.get("step") or 0) for c in job.checkpoints), default=0)
                lora = job.record.get("training_type", {}).get("type") == "Lora"
                checkpoints = [
                    make_checkpoint(job_id, last + CHECKPOINT_EVERY * (i + 1), lora=lora)
                    for i in range(checkpoints)
                ]
            job.checkpoints.extend(checkpoints)
            job._bodies.pop("checkpoints", None)

    def set_checkpoints(self, job_id: str, checkpoints: list[dict[str, Any]]) -> None:
        with self.lock:
            self.jobs[job_id].checkpoints = list(checkpoints)
            self.jobs[job_id]._bodies.pop("checkpoints", None)

    def set_status(self, job_id: str, status: str, *, updated_at: datetime | None = None) -> None:
        """Change a job's status. A change bumps updated_at (to `updated_at` if given, else
        now); setting the status it already has changes nothing, as on the real service."""
        with self.lock:
            job = self.jobs[job_id]
            if status == job.status and updated_at is None:
                return
            job.status = status
            _touch(job, updated_at)

    def set_record(self, job_id: str, **fields: Any) -> None:
        """Change fields of a job's record (status and model too) and bump its updated_at,
        to `updated_at=` if given, else now. With no fields, only bump it."""
        with self.lock:
            job = self.jobs[job_id]
            updated_at = fields.pop("updated_at", None)
            if "id" in fields:
                raise ValueError("a job's id can't change")
            job.status = fields.pop("status", job.status)
            job.model = fields.pop("model", job.model)
            for name, value in fields.items():
                job.record[name] = stamp(value) if isinstance(value, datetime) else value
            _touch(job, None if updated_at is None else _moment(updated_at))

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
            self.metrics_endpoint = True

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
        url = urlsplit(path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] != ["v1", "fine-tunes"]:
            return _error(404, f"no route for {path}", "not_found")
        route = parts[3] if len(parts) == 4 else None
        with self.lock:
            if len(parts) == 2:
                data = [j.listed() for j in self.jobs.values()]
                return 200, json.dumps({"data": data}).encode(), {}
            if route == "metrics" and not self.metrics_endpoint:
                return _error(404, "Not Found", "not_found")
            job = self.jobs.get(parts[2])
            if job is None or len(parts) > 4 or route not in ROUTES:
                return _error(404, f"Fine-tune job {parts[2]!r} not found", "not_found")
            if route is None:
                return 200, json.dumps(job.full_record()).encode(), {}
            if route == "events":
                return 200, job.events_body(), {}
            if route == "checkpoints":
                return 200, job.checkpoints_body(), {}
            query = parse_qs(url.query, keep_blank_values=True)
            bounds: list[int | None] = []
            for name in ("global_step_from", "global_step_to"):
                value = query.get(name, [None])[-1]
                if value is not None and not INTEGER.fullmatch(value):
                    message = f"{name} must be an integer, got {value!r}"
                    return _error(400, message, "invalid_parameter", param=name)
                bounds.append(None if value is None else int(value))
            return 200, job.metrics_body(*bounds), {}

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


ROUTES = (None, "events", "metrics", "checkpoints")  # under /v1/fine-tunes/{id}
INTEGER = re.compile(r"[+-]?[0-9]+")


def _moment(value: datetime | str) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def _touch(job: FakeJob, at: datetime | None) -> None:
    """Set updated_at to `at`, or now (and always later than before, by the millisecond the
    API's timestamps show); a job leaving the queue gets its started_at."""
    if at is None:
        now = datetime.now(UTC)
        now -= timedelta(microseconds=now.microsecond % 1000)
        at = max(now, job.updated_at + timedelta(milliseconds=1))
    job.updated_at = at
    if job.status not in NOT_STARTED and "started_at" not in job.record:
        job.record["started_at"] = stamp(at)


def _error(
    status: int, message: str, code: str, *, param: str | None = None
) -> tuple[int, bytes, dict[str, str]]:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return status, json.dumps(body).encode(), {}


def install_write_counter(engine: Engine, tables: Sequence[str] = ("fine_tune_events",)) -> None:
    """Count every row written to `tables` (fine_tune_events unless told), by triggers inside
    the database: the proof that a pass which found nothing new wrote nothing."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE write_log (op TEXT NOT NULL)"))
        if engine.dialect.name == "postgresql":
            conn.execute(
                text(
                    "CREATE FUNCTION log_write() RETURNS trigger AS $$ BEGIN "
                    "INSERT INTO write_log VALUES (TG_TABLE_NAME || ':' || TG_OP); RETURN NULL; "
                    "END $$ LANGUAGE plpgsql"
                )
            )
        for table in tables:
            if engine.dialect.name == "postgresql":
                conn.execute(
                    text(
                        f"CREATE TRIGGER count_writes AFTER INSERT OR UPDATE OR DELETE "
                        f"ON {table} FOR EACH ROW EXECUTE FUNCTION log_write()"
                    )
                )
                continue
            for op in ("INSERT", "UPDATE", "DELETE"):
                conn.execute(
                    text(
                        f"CREATE TRIGGER count_{op.lower()}_{table} AFTER {op} ON {table} "
                        f"BEGIN INSERT INTO write_log VALUES ('{table}:{op}'); END"
                    )
                )


def writes(engine: Engine, *, reset: bool = False) -> dict[str, int]:
    """Rows written since install_write_counter (or the last reset), by operation:
    {"INSERT": 3}, or {"fine_tune_metrics:INSERT": 3} when more than one table is counted."""
    from sqlalchemy import text

    with engine.begin() as conn:
        rows = conn.execute(text("SELECT op, count(*) FROM write_log GROUP BY op")).all()
        if reset:
            conn.execute(text("DELETE FROM write_log"))
    counts: dict[str, int] = {op: n for op, n in rows}
    if len({op.split(":")[0] for op in counts}) <= 1:  # one table: by operation alone
        merged: dict[str, int] = {}
        for op, n in counts.items():
            merged[op.split(":")[-1]] = merged.get(op.split(":")[-1], 0) + n
        return merged
    return counts


def main(argv: list[str] | None = None) -> None:
    from eventsync.demo import Demo  # the demo builds on this module's generators

    parser = argparse.ArgumentParser(
        prog="python -m eventsync.testing",
        description="Serve a fake Together fine-tuning API on loopback: the demo's jobs "
        "(completed, failed, cancelled, queued, and three still training at different learning "
        "rates, which gain events, metrics and checkpoints as time passes), plus any synthetic "
        "jobs asked for.",
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
