"""client.py against the fake API over real HTTP: success, error mapping, URL handling."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from eventsync.client import TogetherClient, make_http_client
from eventsync.config import api_root
from eventsync.errors import (
    ApiStatusError,
    AuthError,
    ConfigError,
    NotFoundError,
    PayloadError,
    TransportError,
)
from eventsync.testing import FakeTogether
from tests.helpers import client_for, fetch_events, make_settings


def test_lists_jobs_and_fetches_events(fake: FakeTogether, http_client: httpx.Client) -> None:
    """The listing gives ids and statuses; events come back in the server's order."""
    fake.add_job("ft-1", events=3, status="running")
    fake.add_job("ft-2", events=1, status="completed", generation="2026-08")
    client = client_for(http_client)
    assert [(j.id, j.status) for j in client.list_jobs()] == [
        ("ft-1", "running"),
        ("ft-2", "completed"),
    ]
    assert client.get_job("ft-2").status == "completed"
    assert fetch_events(client, "ft-1") == fake.jobs["ft-1"].events


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_base_url_with_or_without_v1(fake: FakeTogether, suffix: str) -> None:
    """TOGETHER_BASE_URL works like the SDK's: /v1 is added unless it is already there."""
    fake.add_job("ft-1", events=2)
    settings = make_settings(fake, "sqlite:///x.db", base_url=fake.base_url + suffix)
    with make_http_client(settings) as http:
        assert len(fetch_events(client_for(http), "ft-1")) == 2
    assert api_root("https://api.together.ai") == "https://api.together.ai/v1"


def test_rejected_key_is_an_auth_error(fake: FakeTogether) -> None:
    """401 maps to AuthError with the API's message and no key in the text."""
    fake.add_job("ft-1")
    settings = make_settings(fake, "sqlite:///x.db", api_key="wrong-key-123")
    with make_http_client(settings) as http, pytest.raises(AuthError) as caught:
        fetch_events(TogetherClient.from_settings(http, settings), "ft-1")
    assert "missing or was rejected" in str(caught.value)
    assert "Invalid API key" in str(caught.value)
    assert "wrong-key-123" not in str(caught.value)


def test_an_echoed_key_is_masked(fake: FakeTogether, http_client: httpx.Client) -> None:
    """If the API quotes the key back in an error, it is replaced by ***."""
    body = {"error": {"message": "key test-key-5f1c2e is suspended", "type": "auth"}}
    fake.override = lambda path: (403, json.dumps(body).encode(), {})
    with pytest.raises(AuthError) as caught:
        fetch_events(client_for(http_client), "ft-1")
    assert "test-key-5f1c2e" not in str(caught.value)
    assert "key *** is suspended" in str(caught.value)


def test_unknown_job_is_not_found(fake: FakeTogether, http_client: httpx.Client) -> None:
    """404 maps to NotFoundError naming the job."""
    with pytest.raises(NotFoundError, match="ft-nope: unknown job"):
        fetch_events(client_for(http_client), "ft-nope")


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html><body>502 Bad Gateway</body></html>", "text/html"),
        (b'{"data": [{"a": 1}', "application/json"),
        (b'{"data": {"a": 1}}', "application/json"),
        (b"[]", "application/json"),
    ],
)
def test_bad_payloads_are_payload_errors(
    fake: FakeTogether, http_client: httpx.Client, body: bytes, content_type: str
) -> None:
    """HTML, cut-short JSON and the wrong shape are PayloadErrors, not crashes."""
    fake.override = lambda path: (200, body, {"Content-Type": content_type})
    with pytest.raises(PayloadError, match="bad payload"):
        fetch_events(client_for(http_client), "ft-1")


def test_connection_refused_is_a_transport_error(fake: FakeTogether) -> None:
    """No server at the base URL: TransportError, a network failure."""
    settings = make_settings(fake, "sqlite:///x.db", base_url="http://127.0.0.1:9")
    with make_http_client(settings) as http, pytest.raises(TransportError, match="network"):
        fetch_events(client_for(http), "ft-1")


@pytest.mark.parametrize("job_id", ["../../files", "ft-1/../../files", "a b", "", ".."])
def test_job_ids_that_could_reach_other_endpoints_are_refused(
    fake: FakeTogether, http_client: httpx.Client, job_id: str
) -> None:
    """Path tricks in a job id never become a request."""
    with pytest.raises(ConfigError, match="invalid job id"):
        fetch_events(client_for(http_client), job_id)
    assert fake.requests == []


def test_redirects_are_reported_as_such(fake: FakeTogether, http_client: httpx.Client) -> None:
    """A 301 (e.g. http:// instead of https://) says where it points, not 'not JSON'."""
    fake.override = lambda path: (301, b"", {"Location": "https://api.together.ai/v1/x"})
    with pytest.raises(ApiStatusError, match=re.escape("redirect to https://api.together.ai/v1/x")):
        fetch_events(client_for(http_client), "ft-1")


def test_multi_line_api_messages_become_one_line(
    fake: FakeTogether, http_client: httpx.Client
) -> None:
    """An API error message with line breaks is folded, so each failure is one stderr line."""
    body = json.dumps({"error": {"message": "upstream\nfailed\n  badly"}}).encode()
    fake.override = lambda path: (500, body, {})
    with pytest.raises(ApiStatusError) as caught:
        fetch_events(client_for(http_client), "ft-1")
    assert "\n" not in str(caught.value)
    assert "upstream failed badly" in str(caught.value)


def test_a_listing_404_means_a_wrong_base_url(fake: FakeTogether) -> None:
    """No /fine-tunes at all is reported as a base-URL problem, not as an unknown job."""
    settings = make_settings(fake, "sqlite:///x.db", base_url=fake.base_url + "/wrongprefix")
    with make_http_client(settings) as http, pytest.raises(ApiStatusError) as caught:
        client_for(http).list_jobs()
    assert "check TOGETHER_BASE_URL" in str(caught.value)
    assert "unknown job" not in str(caught.value)
