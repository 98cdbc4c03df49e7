"""fingerprint.py: a body against the one stored last, over bodies the fake API really serves."""

from __future__ import annotations

import httpx

from eventsync.client import TogetherClient
from eventsync.fingerprint import Body, Fingerprint, read_body
from eventsync.testing import FakeTogether
from tests.helpers import client_for


def fetch(client: TogetherClient, known: Fingerprint | None) -> Body:
    return client.job_events("ft-1", lambda content: read_body(content, known, "job ft-1"))


def test_an_unchanged_body_is_not_decoded(fake: FakeTogether, http_client: httpx.Client) -> None:
    """The same body again is recognised by its fingerprint: no events are decoded."""
    fake.add_job("ft-1", events=3)
    client = client_for(http_client)
    first = fetch(client, None)
    assert first.events == fake.jobs["ft-1"].events
    again = fetch(client, first.fingerprint)
    assert (again.events, again.fingerprint) == (None, first.fingerprint)


def test_only_the_appended_tail_is_decoded(fake: FakeTogether, http_client: httpx.Client) -> None:
    """A body that extends the stored one yields just the new events; any other change
    (an edit in the middle, a removal) yields the whole list again."""
    fake.add_job("ft-1", events=5)
    client = client_for(http_client)
    first = fetch(client, None)
    fake.add_events("ft-1", 2)
    grown = fetch(client, first.fingerprint)
    assert grown.appended
    assert grown.events == fake.jobs["ft-1"].events[5:]
    events = list(fake.jobs["ft-1"].events)
    events[1] = dict(events[1], message="edited")
    fake.set_events("ft-1", events)
    edited = fetch(client, grown.fingerprint)
    assert not edited.appended
    assert edited.events == events
    fake.set_events("ft-1", events[:3])
    shrunk = fetch(client, edited.fingerprint)
    assert (shrunk.appended, shrunk.events) == (False, events[:3])


def test_the_stored_text_round_trips_and_other_formats_are_ignored() -> None:
    """A fingerprint reads back from its text; any other text means 'nothing is known'."""
    fingerprint = read_body(b'{"data": [{"a": 1}]}', None, "x").fingerprint
    assert Fingerprint.parse(str(fingerprint)) == fingerprint
    for other in (None, "", "3:abc", "v2 a 1 b", "v1 a x b", "v1 a 1"):
        assert Fingerprint.parse(other) is None
