"""The Together fine-tuning API over a passed-in httpx client. Knows nothing of the database."""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import stamina
from pydantic import BaseModel, ConfigDict, ValidationError

from eventsync import __version__, transport
from eventsync.config import Settings, validate_job_id
from eventsync.errors import (
    ApiError,
    ApiStatusError,
    AuthError,
    EventsyncError,
    NotFoundError,
    PayloadError,
    RefusedBodyError,
    TransportError,
    UnreachableError,
)
from eventsync.jsonio import decode

log = logging.getLogger(__name__)

TERMINAL_STATUSES = frozenset({"completed", "cancelled", "error", "user_error"})


class _Job(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    status: str | None = None
    model: str | None = None


class _JobList(BaseModel):
    data: list[_Job]


Shape = TypeVar("Shape", bound=BaseModel)
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    id: str
    status: str | None
    model: str | None = None
    # The listing's entry for the job, as sent (fine_tune_jobs is fed from it).
    record: dict[str, Any] | None = field(default=None, compare=False, repr=False)


MIB = 1024 * 1024
# How much of an error body is read: room for the API's JSON message, and no more.
ERROR_BODY_MAX = 4096


class ApiKey(httpx.Auth):
    """The API key: sent as a bearer token, and what no error message may show."""

    def __init__(self, key: str) -> None:
        self._key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = f"Bearer {self._key}"
        yield request

    def mask(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def make_http_client(settings: Settings, **kwargs: Any) -> httpx.Client:
    """One pooled client for the whole run; keep-alive sized to the concurrency, and every
    socket operation bounded by the deadline TogetherClient sets (eventsync.transport). It
    holds no key: TogetherClient is given that."""
    limits = httpx.Limits(
        max_connections=settings.concurrency + 2,
        max_keepalive_connections=settings.concurrency + 2,
    )
    return httpx.Client(
        base_url=settings.api_root,
        headers={
            "Accept": "application/json",
            "Accept-Encoding": transport.ACCEPT_ENCODING,
            "User-Agent": f"eventsync/{__version__}",
        },
        timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
        # A client given a transport no longer reads the proxy variables: env_proxy does.
        transport=transport.DeadlineTransport(
            limits=limits, proxy=transport.env_proxy(settings.api_root)
        ),
        **kwargs,
    )


@dataclass(frozen=True)
class RetryPolicy:
    """How a request is retried and bounded: exponential backoff with jitter, as the official
    SDK does (about 1 s doubling to 10 s, 5 tries), every try and wait within `deadline`
    seconds, and a body of at most `max_body` bytes."""

    attempts: int = 5
    wait_initial: float = 1.0
    wait_max: float = 10.0
    wait_jitter: float = 1.0
    retry_after_max: float = 60.0
    deadline: float = 120.0
    max_body: int = 64 * MIB

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            attempts=settings.retry_attempts,
            wait_initial=settings.retry_wait_initial,
            wait_max=settings.retry_wait_max,
            wait_jitter=min(settings.retry_wait_initial, 1.0),
            deadline=settings.request_deadline,
            max_body=settings.max_body_mb * MIB,
        )


# Worth another try: the server or a proxy may answer differently in a moment.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class Endpoints:
    """Which optional endpoints the API lacks, learnt once per process (thread-safe). A 404
    from an endpoint that has never answered in this process means the deployment lacks it
    (an older one); after one answer, a 404 concerns that job alone."""

    def __init__(self) -> None:
        self._missing: set[str] = set()
        self._answered: set[str] = set()
        self._lock = threading.Lock()

    def missing(self, name: str) -> bool:
        return name in self._missing

    def answered(self, name: str) -> None:
        if name not in self._answered:
            with self._lock:
                self._answered.add(name)

    def not_found(self, name: str, job_id: str) -> None:
        """Note a 404 from the endpoint for this job, and say so once."""
        with self._lock:
            if name in self._answered:
                log.info(
                    "job %s: no %s (HTTP 404); none stored this poll",
                    job_id,
                    name,
                    extra={"job_id": job_id, "endpoint": name},
                )
                return
            if name in self._missing:
                return
            self._missing.add(name)
        log.info(
            "the API has no %s endpoint (HTTP 404, as an older deployment answers); job %s "
            "are not stored until eventsync restarts",
            name,
            name,
            extra={"endpoint": name, "status_code": 404},
        )


class TogetherClient:
    """`GET /fine-tunes`, `/fine-tunes/{id}` and its `/events`, `/metrics` and `/checkpoints`,
    with errors mapped and transient failures retried. Thread-safe: one client serves every
    worker."""

    def __init__(
        self,
        http: httpx.Client,
        key: ApiKey,
        retry: RetryPolicy | None = None,
        *,
        in_flight: int = 8,
    ) -> None:
        self.http = http
        self.key = key
        self.retry = retry or RetryPolicy()
        # At most `in_flight` requests under way at once, each with its retries and waits.
        self._slots = threading.BoundedSemaphore(max(1, in_flight))
        # A 429 pauses every worker, not just the one that got it.
        self._gate = threading.Lock()
        self._paused_until = 0.0
        # Whether the server has answered anything yet; until it has, a failed connect means a
        # wrong URL or no network, which no retry fixes.
        self._answered = False
        self.endpoints = Endpoints()

    @classmethod
    def from_settings(cls, http: httpx.Client, settings: Settings) -> TogetherClient:
        """The client the settings describe; ConfigError if the key is missing or unusable."""
        return cls(
            http,
            ApiKey(settings.require_api_key()),
            RetryPolicy.from_settings(settings),
            in_flight=settings.concurrency,
        )

    def list_jobs(self) -> list[Job]:
        try:
            listing, entries = self._get("/fine-tunes", _listing, what="listing jobs")
        except NotFoundError as exc:
            # No listing at all means the base URL is wrong, not that a job is unknown.
            raise ApiStatusError(
                f"listing jobs: HTTP 404 at {self.http.base_url}fine-tunes: "
                "check TOGETHER_BASE_URL (https://api.together.ai)",
                status_code=404,
                api_message=exc.api_message,
            ) from None
        return [
            Job(id=j.id, status=j.status, model=j.model, record=entry)
            for j, entry in zip(listing.data, entries, strict=True)
        ]

    def get_job(self, job_id: str) -> Job:
        job = self._parsed(f"/fine-tunes/{_path_id(job_id)}", _Job, what=f"job {job_id}")
        return Job(id=job.id, status=job.status, model=job.model)

    def job_record(self, job_id: str) -> Any:
        """The job's full record (FinetuneResponse), decoded, as sent."""
        what = f"job {job_id} record"
        return self._get(f"/fine-tunes/{_path_id(job_id)}", lambda c: _json(c, what), what=what)

    def job_metrics(self, job_id: str, *, global_step_from: int | None = None) -> Any:
        """The job's metrics snapshots (the `metrics` list), from `global_step_from` on."""
        what = f"job {job_id} metrics"
        query = "" if global_step_from is None else f"?global_step_from={global_step_from}"
        path = f"/fine-tunes/{_path_id(job_id)}/metrics{query}"
        return self._get(path, lambda c: _member(c, "metrics", what), what=what)

    def job_checkpoints(self, job_id: str) -> Any:
        """The job's checkpoints (the `data` list)."""
        what = f"job {job_id} checkpoints"
        path = f"/fine-tunes/{_path_id(job_id)}/checkpoints"
        return self._get(path, lambda c: _member(c, "data", what), what=what)

    def job_events(self, job_id: str, read: Callable[[bytes], T]) -> T:
        """The job's events body, as `read` reads it. A PayloadError from `read` (a body
        that isn't the JSON it should be) counts as a failed try, like a network error."""
        return self._get(f"/fine-tunes/{_path_id(job_id)}/events", read, what=f"job {job_id}")

    def _parsed(self, path: str, shape: type[Shape], *, what: str) -> Shape:
        return self._get(path, lambda content: _validated(shape, content, what), what=what)

    def _get(self, path: str, read: Callable[[bytes], T], *, what: str) -> T:
        """GET and read the body, retrying transient failures (a body that can't be read
        included), all within the request deadline; errors come out with the key masked."""
        with self._slots:  # waiting for a slot is not the request's time: its deadline starts now
            return self._get_in_slot(path, read, what=what)

    def _get_in_slot(self, path: str, read: Callable[[bytes], T], *, what: str) -> T:
        policy = self.retry
        at = time.monotonic() + policy.deadline
        # Why retrying stopped short, if the deadline stopped it: said in the error.
        cut_short: list[str] = []
        tries = 0

        def retry_on(exc: Exception) -> bool | float:
            """stamina's hook: no retry, stamina's own backoff, or the server's wait."""
            decision = self._decide(exc)
            cut_short.clear()
            asked = None if isinstance(decision, bool) else decision
            if asked is not None and asked >= at - time.monotonic():
                cut_short.append(f"the server asked to wait {asked:g} s, past")
                return False
            if decision is not False:
                cut_short.append("no time is left for another try within")
                log.warning("retrying after: %s", self._described(exc))
            return decision

        try:
            with transport.deadline(at):
                for attempt in stamina.retry_context(
                    on=retry_on,
                    attempts=policy.attempts,
                    # No backoff of stamina's (wait_max at most) may end past the deadline.
                    timeout=max(policy.deadline - policy.wait_max, policy.deadline / 2),
                    wait_initial=policy.wait_initial,
                    wait_max=policy.wait_max,
                    wait_jitter=policy.wait_jitter,
                ):
                    with attempt:
                        tries = attempt.num
                        self._wait_for_gate(at)
                        return read(self._fetch(path, what=what))
        except EventsyncError as error:
            if cut_short and tries < policy.attempts:
                error.args = (
                    f"{error} (not retried: {cut_short[0]} the request deadline, "
                    f"{policy.deadline:g} s, EVENTSYNC_REQUEST_DEADLINE)",
                )
            # The error outlives the request (the job's outcome keeps it), and its traceback and
            # context would keep the frames they passed through, the body among their locals.
            error.__context__ = None
            raise self._masked(error).with_traceback(None) from None
        raise AssertionError("unreachable: stamina either returns or raises")

    def _described(self, exc: Exception) -> object:
        return self._masked(exc) if isinstance(exc, EventsyncError) else type(exc).__name__

    def _decide(self, exc: Exception) -> bool | float:
        """Whether a failure is worth another try, and how long the server asks us to wait."""
        if isinstance(exc, UnreachableError):
            return self._answered
        if isinstance(exc, RefusedBodyError):
            return False
        if isinstance(exc, TransportError | PayloadError):
            return True
        if isinstance(exc, ApiStatusError) and exc.status_code in RETRY_STATUSES:
            if exc.retry_after is None:
                if exc.status_code == 429:
                    self._pause(self.retry.wait_initial)
                return True
            wait = min(exc.retry_after, self.retry.retry_after_max)
            if exc.status_code == 429:
                self._pause(wait)
            return wait
        return False

    def _pause(self, seconds: float) -> None:
        with self._gate:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        log.warning("rate limited (HTTP 429): pausing all requests for %.1fs", seconds)

    def _wait_for_gate(self, at: float) -> None:
        """Sit out a 429 pause, though not past the request deadline `at`."""
        with self._gate:
            now = time.monotonic()
            wait = min(self._paused_until, at) - now
        if wait > 0:
            time.sleep(wait)

    def _masked(self, error: EventsyncError) -> EventsyncError:
        """The error with the key replaced by ***, should any layer have quoted it."""
        masked = self.key.mask(str(error))
        if masked != str(error):
            error.args = (masked,)
        if isinstance(error, ApiError) and error.api_message:
            error.api_message = self.key.mask(error.api_message)
        return error

    def _fetch(self, path: str, *, what: str) -> bytes:
        """GET the body, decoded, within the size cap (eventsync.transport.read_body). It is
        streamed and gathered here rather than kept on the Response: httpx 0.28 holds every
        Response in a reference cycle with its stream (encode/httpx PR 3733), so a body stored
        on it lives until the cyclic collector runs; with 400 jobs that was 36 MB more at peak.
        A body left unread when the block ends closes its connection instead of being drained.
        """
        try:
            timeout = transport.clamped(self.http.timeout)
            with self.http.stream("GET", path, timeout=timeout, auth=self.key) as response:
                self._answered = True
                if response.is_redirect:
                    location = response.headers.get("location", "?")
                    raise ApiStatusError(
                        f"{what}: HTTP {response.status_code} redirect to {location}; "
                        "check TOGETHER_BASE_URL (https://api.together.ai)",
                        status_code=response.status_code,
                    )
                if response.status_code >= 400:
                    raise _status_error(response, _error_body(response), what)
                return transport.read_body(response, self.retry.max_body)
        except transport.BodyTooLarge:
            raise RefusedBodyError(
                f"{what}: bad payload: response body over {self.retry.max_body / MIB:g} MB "
                "(EVENTSYNC_MAX_BODY_MB)"
            ) from None
        except transport.BodyRefused as exc:
            raise RefusedBodyError(f"{what}: bad payload: {exc}") from None
        except transport.BodyError as exc:
            raise PayloadError(f"{what}: bad payload: {exc}") from None
        except httpx.ConnectError as exc:
            raise UnreachableError(f"{what}: network error: {type(exc).__name__}: {exc}") from None
        except httpx.TimeoutException as exc:
            if transport.overdue():
                raise TransportError(
                    f"{what}: network error: no complete answer within the request deadline "
                    f"({self.retry.deadline:g} s, EVENTSYNC_REQUEST_DEADLINE)"
                ) from None
            raise TransportError(
                f"{what}: network error: timed out ({type(exc).__name__})"
            ) from None
        except httpx.HTTPError as exc:
            raise TransportError(f"{what}: network error: {type(exc).__name__}: {exc}") from None


def _error_body(response: httpx.Response) -> bytes:
    """The start of an error body, for its message; the rest is never fetched."""
    try:
        return transport.read_body(response, ERROR_BODY_MAX, cut=True)
    except transport.BodyError:
        return b""  # no message to be had from it; the status says enough


def _validated(shape: type[Shape], content: bytes, what: str) -> Shape:
    return _shaped(shape, _json(content, what), what)


def _shaped(shape: type[Shape], value: Any, what: str) -> Shape:
    try:
        return shape.model_validate(value)
    except ValidationError as exc:
        raise PayloadError(
            f"{what}: bad payload: unexpected shape ({_first_problem(exc)})"
        ) from None


def _json(content: bytes, what: str) -> Any:
    try:
        return decode(content).value
    except ValueError as exc:
        raise PayloadError(f"{what}: bad payload: body is not JSON ({exc})") from None


def _member(content: bytes, name: str, what: str) -> Any:
    """The list under `name` in a JSON object body; PayloadError for any other shape."""
    body = _json(content, what)
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, list):
        raise PayloadError(f"{what}: bad payload: unexpected shape ({name}: not a list)")
    return value


def _listing(content: bytes) -> tuple[_JobList, list[Any]]:
    """The listing validated for what the sync needs, and its entries as sent."""
    body = _json(content, "listing jobs")
    return _shaped(_JobList, body, "listing jobs"), list(body["data"])


def _path_id(job_id: str) -> str:
    return quote(validate_job_id(job_id), safe="")


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{loc}: {err['msg']}"


def _api_message(content: bytes) -> str | None:
    try:
        body = decode(content).value
    except ValueError:
        return None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return " ".join(str(error["message"]).split())[:300]
        if isinstance(body.get("message"), str):
            return " ".join(str(body["message"]).split())[:300]
    return None


def _status_error(response: httpx.Response, content: bytes, what: str) -> ApiError:
    status = response.status_code
    message = _api_message(content)
    detail = f"HTTP {status}" + (f": {message}" if message else "")
    if status in (401, 403):
        return AuthError(
            f"{what}: the API key is missing or was rejected ({detail})",
            status_code=status,
            api_message=message,
        )
    if status == 404:
        return NotFoundError(
            f"{what}: unknown job, the API has no such job for this key ({detail})",
            status_code=status,
            api_message=message,
        )
    error = ApiStatusError(f"{what}: {detail}", status_code=status, api_message=message)
    error.retry_after = retry_after(response.headers)
    return error


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, or `Retry-After` as seconds or as
    an HTTP date. None if absent or unreadable."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
