"""The Together fine-tuning API over a passed-in httpx client. Knows nothing of the database."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from eventsync import __version__
from eventsync.config import Settings, validate_job_id
from eventsync.errors import (
    ApiError,
    ApiStatusError,
    AuthError,
    EventsyncError,
    NotFoundError,
    PayloadError,
    TransportError,
)

log = logging.getLogger(__name__)

TERMINAL_STATUSES = frozenset({"completed", "cancelled", "error", "user_error"})


class _EventList(BaseModel):
    data: list[Any]


class _Job(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    status: str | None = None


class _JobList(BaseModel):
    data: list[_Job]


@dataclass(frozen=True)
class Job:
    id: str
    status: str | None


def make_http_client(settings: Settings, **kwargs: Any) -> httpx.Client:
    """One pooled client for the whole run; keep-alive sized to the concurrency."""
    key = settings.require_api_key()
    return httpx.Client(
        base_url=settings.api_root,
        headers={
            "Authorization": f"Bearer {key}",
            "Accept": "application/json",
            "User-Agent": f"eventsync/{__version__}",
        },
        timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
        limits=httpx.Limits(
            max_connections=settings.concurrency + 2,
            max_keepalive_connections=settings.concurrency + 2,
        ),
        **kwargs,
    )


class TogetherClient:
    """`GET /fine-tunes`, `/fine-tunes/{id}` and `/fine-tunes/{id}/events`, with errors mapped."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        # The API might echo the key back in an error message; never pass it on.
        self._secret = http.headers.get("authorization", "").removeprefix("Bearer ").strip()

    def list_jobs(self) -> list[Job]:
        body = self._get_json("/fine-tunes", what="job list")
        try:
            listing = _JobList.model_validate(body)
        except ValidationError as exc:
            raise PayloadError(
                f"job list: bad payload: unexpected shape ({_first_problem(exc)})"
            ) from None
        return [Job(id=j.id, status=j.status) for j in listing.data]

    def get_job(self, job_id: str) -> Job:
        body = self._get_json(f"/fine-tunes/{_path_id(job_id)}", what=f"job {job_id}")
        try:
            job = _Job.model_validate(body)
        except ValidationError as exc:
            raise PayloadError(
                f"job {job_id}: bad payload: unexpected shape ({_first_problem(exc)})"
            ) from None
        return Job(id=job.id, status=job.status)

    def job_events(self, job_id: str) -> list[Any]:
        """The job's whole event list, as decoded JSON objects, in the server's order."""
        body = self._get_json(f"/fine-tunes/{_path_id(job_id)}/events", what=f"job {job_id}")
        try:
            return _EventList.model_validate(body).data
        except ValidationError as exc:
            raise PayloadError(
                f"job {job_id}: bad payload: not a {{'data': [...]}} list ({_first_problem(exc)})"
            ) from None

    def _get_json(self, path: str, *, what: str) -> Any:
        try:
            return self._fetch_json(path, what=what)
        except EventsyncError as error:
            raise self._masked(error) from None

    def _masked(self, error: EventsyncError) -> EventsyncError:
        """The error with the key replaced by ***, should any layer have quoted it."""
        if self._secret and self._secret in str(error):
            error.args = (str(error).replace(self._secret, "***"),)
            if isinstance(error, ApiError) and error.api_message:
                error.api_message = error.api_message.replace(self._secret, "***")
        return error

    def _fetch_json(self, path: str, *, what: str) -> Any:
        try:
            response = self.http.get(path)
        except httpx.TimeoutException as exc:
            raise TransportError(
                f"{what}: network error: timed out ({type(exc).__name__})"
            ) from None
        except httpx.HTTPError as exc:
            raise TransportError(f"{what}: network error: {type(exc).__name__}: {exc}") from None
        if response.is_redirect:
            location = response.headers.get("location", "?")
            raise ApiStatusError(
                f"{what}: HTTP {response.status_code} redirect to {location}; "
                "check TOGETHER_BASE_URL (https://api.together.ai)",
                status_code=response.status_code,
            )
        if response.status_code >= 400:
            raise _status_error(response, what)
        try:
            return json.loads(response.content)
        except ValueError as exc:
            ctype = response.headers.get("content-type", "?")
            raise PayloadError(f"{what}: bad payload: body is not JSON ({ctype}; {exc})") from None


def _path_id(job_id: str) -> str:
    return quote(validate_job_id(job_id), safe="")


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{loc}: {err['msg']}"


def _api_message(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return " ".join(str(error["message"]).split())[:300]
        if isinstance(body.get("message"), str):
            return " ".join(str(body["message"]).split())[:300]
    return None


def _status_error(response: httpx.Response, what: str) -> ApiError:
    status = response.status_code
    message = _api_message(response)
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
    return ApiStatusError(f"{what}: {detail}", status_code=status, api_message=message)
