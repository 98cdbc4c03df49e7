"""client.py against the fake API over real HTTP: success, error mapping, URL handling."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from eventsync.client import TogetherClient, loads, make_http_client
from eventsync.config import api_root
from eventsync.errors import (
    ApiStatusError,
    AuthError,
    ConfigError,
    NotFoundError,
    PayloadError,
    TransportError,
)
from eventsync.fakeapi import FakeTogether
from tests.helpers import FAST_RETRY, make_settings


def test_lists_jobs_and_fetches_events(fake: FakeTogether, http_client: httpx.Client) -> None:
    """The listing gives ids and statuses; events come back in the server's order."""
    fake.add_job("ft-1", events=3, status="running")
    fake.add_job("ft-2", events=1, status="completed", generation="2026-08")
    client = TogetherClient(http_client, FAST_RETRY)
    assert [(j.id, j.status) for j in client.list_jobs()] == [
        ("ft-1", "running"),
        ("ft-2", "completed"),
    ]
    assert client.get_job("ft-2").status == "completed"
    fetched = client.job_events("ft-1")
    assert fetched.events == fake.jobs["ft-1"].events
    # The same body again is recognised by its fingerprint and not decoded.
    assert client.job_events("ft-1", known=fetched.fingerprint).events is None


def test_only_the_appended_tail_is_decoded(fake: FakeTogether, http_client: httpx.Client) -> None:
    """A body that extends the stored one yields just the new events; any other change
    (an edit in the middle, a removal) yields the whole list again."""
    fake.add_job("ft-1", events=5)
    client = TogetherClient(http_client, FAST_RETRY)
    first = client.job_events("ft-1")
    fake.add_events("ft-1", 2)
    grown = client.job_events("ft-1", known=first.fingerprint)
    assert grown.appended
    assert grown.events == fake.jobs["ft-1"].events[5:]
    events = list(fake.jobs["ft-1"].events)
    events[1] = dict(events[1], message="edited")
    fake.set_events("ft-1", events)
    edited = client.job_events("ft-1", known=grown.fingerprint)
    assert not edited.appended
    assert edited.events == events
    fake.set_events("ft-1", events[:3])
    shrunk = client.job_events("ft-1", known=edited.fingerprint)
    assert (shrunk.appended, shrunk.events) == (False, events[:3])


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_base_url_with_or_without_v1(fake: FakeTogether, suffix: str) -> None:
    """TOGETHER_BASE_URL works like the SDK's: /v1 is added unless it is already there."""
    fake.add_job("ft-1", events=2)
    settings = make_settings(fake, "sqlite:///x.db", base_url=fake.base_url + suffix)
    with make_http_client(settings) as http:
        assert len(TogetherClient(http, FAST_RETRY).job_events("ft-1").events or []) == 2
    assert api_root("https://api.together.ai") == "https://api.together.ai/v1"


def test_rejected_key_is_an_auth_error(fake: FakeTogether) -> None:
    """401 maps to AuthError with the API's message and no key in the text."""
    fake.add_job("ft-1")
    settings = make_settings(fake, "sqlite:///x.db", api_key="wrong-key-123")
    with make_http_client(settings) as http, pytest.raises(AuthError) as caught:
        TogetherClient(http, FAST_RETRY).job_events("ft-1")
    assert "missing or was rejected" in str(caught.value)
    assert "Invalid API key" in str(caught.value)
    assert "wrong-key-123" not in str(caught.value)


def test_an_echoed_key_is_masked(fake: FakeTogether, http_client: httpx.Client) -> None:
    """If the API quotes the key back in an error, it is replaced by ***."""
    body = {"error": {"message": "key test-key-5f1c2e is suspended", "type": "auth"}}
    fake.override = lambda path: (403, json.dumps(body).encode(), {})
    with pytest.raises(AuthError) as caught:
        TogetherClient(http_client, FAST_RETRY).job_events("ft-1")
    assert "test-key-5f1c2e" not in str(caught.value)
    assert "key *** is suspended" in str(caught.value)


def test_unknown_job_is_not_found(fake: FakeTogether, http_client: httpx.Client) -> None:
    """404 maps to NotFoundError naming the job."""
    with pytest.raises(NotFoundError, match="ft-nope: unknown job"):
        TogetherClient(http_client, FAST_RETRY).job_events("ft-nope")


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
        TogetherClient(http_client, FAST_RETRY).job_events("ft-1")


def test_connection_refused_is_a_transport_error(fake: FakeTogether) -> None:
    """No server at the base URL: TransportError, a network failure."""
    settings = make_settings(fake, "sqlite:///x.db", base_url="http://127.0.0.1:9")
    with make_http_client(settings) as http, pytest.raises(TransportError, match="network"):
        TogetherClient(http, FAST_RETRY).job_events("ft-1")


@pytest.mark.parametrize("job_id", ["../../files", "ft-1/../../files", "a b", "", ".."])
def test_job_ids_that_could_reach_other_endpoints_are_refused(
    fake: FakeTogether, http_client: httpx.Client, job_id: str
) -> None:
    """Path tricks in a job id never become a request."""
    with pytest.raises(ConfigError, match="invalid job id"):
        TogetherClient(http_client, FAST_RETRY).job_events(job_id)
    assert fake.requests == []


def test_redirects_are_reported_as_such(fake: FakeTogether, http_client: httpx.Client) -> None:
    """A 301 (e.g. http:// instead of https://) says where it points, not 'not JSON'."""
    fake.override = lambda path: (301, b"", {"Location": "https://api.together.ai/v1/x"})
    with pytest.raises(ApiStatusError, match=re.escape("redirect to https://api.together.ai/v1/x")):
        TogetherClient(http_client, FAST_RETRY).job_events("ft-1")


def test_multi_line_api_messages_become_one_line(
    fake: FakeTogether, http_client: httpx.Client
) -> None:
    """An API error message with line breaks is folded, so each failure is one stderr line."""
    body = json.dumps({"error": {"message": "upstream\nfailed\n  badly"}}).encode()
    fake.override = lambda path: (500, body, {})
    with pytest.raises(ApiStatusError) as caught:
        TogetherClient(http_client, FAST_RETRY).job_events("ft-1")
    assert "\n" not in str(caught.value)
    assert "upstream failed badly" in str(caught.value)


def test_nan_in_a_payload_is_kept_as_text(fake: FakeTogether, http_client: httpx.Client) -> None:
    """NaN and Infinity (not JSON, but Python servers send them) decode to their spelling."""
    body = b'{"data": [{"object": "fine-tune-event", "early_stopping_best_metric_value": NaN}]}'
    fake.override = lambda path: (200, body, {})
    events = TogetherClient(http_client, FAST_RETRY).job_events("ft-1").events
    assert events is not None
    assert events[0]["early_stopping_best_metric_value"] == "NaN"


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: beyond 64 bits too
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


@given(JSON_VALUES)
@example({"step": 123456789012345678901234567890, "token_count": -(2**64) - 1, "x": 1e308})
def test_the_fast_decoder_gives_the_stdlib_values(value: object) -> None:
    """Whatever the decoder, any JSON reads as the stdlib reads it, big integers included."""
    body = json.dumps(value).encode()
    # Compared as JSON text, so an integer read back as a float (1e+29) counts as a change.
    assert json.dumps(loads(body)) == json.dumps(json.loads(body))


def test_a_listing_404_means_a_wrong_base_url(fake: FakeTogether) -> None:
    """No /fine-tunes at all is reported as a base-URL problem, not as an unknown job."""
    settings = make_settings(fake, "sqlite:///x.db", base_url=fake.base_url + "/wrongprefix")
    with make_http_client(settings) as http, pytest.raises(ApiStatusError) as caught:
        TogetherClient(http, FAST_RETRY).list_jobs()
    assert "check TOGETHER_BASE_URL" in str(caught.value)
    assert "unknown job" not in str(caught.value)
