"""Text from the API or the database reaches a terminal or a log as text: never as rich
markup, with control characters spelled out; machine formats keep the data as it is."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pty
import re
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from eventsync.testing import FakeTogether, Override, make_event
from tests.helpers import API_KEY, EVENTSYNC, read_pty, run

MARKUP = "bad [/x] markup"
LINK = "[link=https://evil.example]click[/link]"
# ESC (colour), BEL, backspace, CR, a C1 CSI, DEL, an OSC 8 hyperlink, a bidi override.
CONTROLS = (
    "esc \x1b[31mred\x1b[0m bel\x07 back\x08 cr\rX c1\x9b2J del\x7f "
    "osc \x1b]8;;https://evil.example\x1b\\link bidi\u202eabc"
)
# How they must look to a person.
SPELLED = (
    "esc \\x1b[31mred\\x1b[0m bel\\x07 back\\x08 cr\\rX c1\\x9b2J del\\x7f "
    "osc \\x1b]8;;https://evil.example\\x1b\\link bidi\\u202eabc"
)
# The test's own list of what a terminal acts on: C0 but the line feed, DEL, C1, bidi marks.
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# The API's error message for ft-bad, and how the client passes it on: runs of whitespace
# (the CR among them) collapsed to one space, the other controls kept.
ERROR = f"{MARKUP} {LINK} {CONTROLS}"
PASSED_ON = ERROR.replace("\r", " ")
SPELLED_ON = f"{MARKUP} {LINK} " + SPELLED.replace("cr\\rX", "cr X")


def raw_controls(output: str) -> list[str]:
    return RAW.findall(output)


def fail_once(match: str, status: int, body: bytes) -> Override:
    """A fake API override: the first request whose path holds `match` gets this answer."""
    left = [1]

    def override(path: str) -> tuple[int, bytes, dict[str, str]] | None:
        if match in path and left:
            left.pop()
            return status, body, {}
        return None

    return override


@pytest.fixture
def api_env(fake: FakeTogether) -> dict[str, str]:
    return {"TOGETHER_API_KEY": API_KEY, "TOGETHER_BASE_URL": fake.base_url, "COLUMNS": "400"}


@pytest.fixture
def hostile(fake: FakeTogether) -> None:
    """ft-x has events whose messages are markup and controls; ft-bad fails with them."""
    messages = [MARKUP, LINK, CONTROLS]
    fake.add_job("ft-x", events=[make_event("ft-x", i, message=m) for i, m in enumerate(messages)])
    fake.add_job("ft-bad", events=1)
    body = json.dumps({"error": {"message": ERROR}}).encode()
    fake.override = lambda path: (400, body, {}) if "ft-bad/events" in path else None


def sync(api_env: dict[str, str], db_url: str, tmp_path: Path, *args: str):
    return run(
        "sync",
        "--job-id",
        "ft-x",
        "--job-id",
        "ft-bad",
        "--database-url",
        db_url,
        *args,
        cwd=tmp_path,
        env=api_env,
    )


def on_a_terminal(*args: str, cwd: Path) -> str:
    """stdout of an eventsync command run on a pseudo-terminal, as a person would see it."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    proc = subprocess.Popen(
        [EVENTSYNC, *args],
        cwd=cwd,
        env={**env, "TERM": "xterm-256color", "COLUMNS": "400"},
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    shown = read_pty(master)
    os.close(master)
    assert proc.stderr is not None
    with proc.stderr:
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    return shown.decode()


def test_events_and_sql_print_messages_as_text(
    hostile: None, api_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """`[/x]` and `[link=...]` in a message print as written; controls are spelled out."""
    assert sync(api_env, db_url, tmp_path).returncode == 1  # ft-bad fails
    for args in (
        ["events", "ft-x"],
        [
            "sql",
            'SELECT message AS "[/x] [link=https://evil.example]m[/link]" FROM fine_tune_events',
        ],
    ):
        result = run(*args, "--database-url", db_url, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert MARKUP in result.stdout
        assert LINK in result.stdout
        assert SPELLED in result.stdout
        assert raw_controls(result.stdout) == []
    assert "[/x] [link=https://evil.example]m[/link]" in result.stdout  # the header too


def test_no_live_link_on_a_terminal(
    hostile: None, api_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """On a terminal (where rich draws colour and links), a message's `[link=...]` is text."""
    assert sync(api_env, db_url, tmp_path).returncode == 1
    for args in (["events", "ft-x"], ["status"], ["jobs", "list"]):
        shown = on_a_terminal(*args, "--database-url", db_url, cwd=tmp_path)
        assert "\x1b]8;" not in shown  # OSC 8: the terminal's hyperlink
        assert "[link=https://evil.example]click[/link]" in shown
        without_colour = re.sub(r"\x1b\[[0-9;]*m", "", shown)
        assert raw_controls(without_colour.replace("\r\n", "\n")) == []


def test_a_stored_error_with_markup_breaks_neither_status_nor_jobs_list(
    hostile: None, api_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """The API's error message, kept in sync_state.last_error, prints as text in tables and
    as the data itself in JSON."""
    assert sync(api_env, db_url, tmp_path).returncode == 1
    for args in (["status"], ["jobs", "list"]):
        result = run(*args, "--database-url", db_url, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"HTTP 400: {SPELLED_ON}" in result.stdout
        assert raw_controls(result.stdout) == []
        machine = run(*args, "--format", "json", "--database-url", db_url, cwd=tmp_path)
        errors = {job["job_id"]: job["last_error"] for job in json.loads(machine.stdout)}
        assert errors["ft-bad"] == f"job ft-bad: HTTP 400: {PASSED_ON}"


def test_machine_formats_keep_the_data(
    hostile: None, api_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """JSON escapes controls by itself; CSV, for programs, carries them as stored."""
    assert sync(api_env, db_url, tmp_path).returncode == 1
    as_json = run("events", "ft-x", "--format", "json", "--database-url", db_url, cwd=tmp_path)
    assert [e["message"] for e in json.loads(as_json.stdout)] == [MARKUP, LINK, CONTROLS]
    assert raw_controls(as_json.stdout) == []
    as_csv = subprocess.run(
        [EVENTSYNC, "events", "ft-x", "--format", "csv", "--database-url", db_url],
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )  # bytes: text mode would turn the CR into a line feed
    rows = csv.DictReader(io.StringIO(as_csv.stdout.decode(), newline=""))
    assert [row["message"] for row in rows] == [MARKUP, LINK, CONTROLS]


def test_error_lines_spell_out_controls(
    hostile: None, api_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """A failed job's `error: ...` line shows the API's message with controls spelled out;
    with --log-format json that line is a JSON record holding the message as sent."""
    result = sync(api_env, db_url, tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["ft-x: 3 new, 3 total"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: job ft-bad: HTTP 400: {SPELLED_ON} [http_status]"]
    assert raw_controls(result.stderr) == []

    as_json = sync(api_env, db_url, tmp_path, "--log-format", "json")
    assert as_json.returncode == 1
    records = [json.loads(line) for line in as_json.stderr.splitlines()]
    (failure,) = [r for r in records if r["level"] == "ERROR"]
    assert failure["message"] == f"job ft-bad: HTTP 400: {PASSED_ON}"
    assert (failure["job_id"], failure["kind"]) == ("ft-bad", "http_status")


def test_cli_fail_spells_out_controls(
    fake: FakeTogether, api_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """The one-line errors of cli.fail, here a job listing the API refused, too."""
    body = json.dumps({"error": {"message": ERROR}}).encode()
    fake.override = lambda path: (400, body, {}) if path == "/v1/fine-tunes" else None
    result = run("sync", "--all-jobs", "--database-url", db_url, cwd=tmp_path, env=api_env)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: listing jobs: HTTP 400: {SPELLED_ON}"]
    assert raw_controls(result.stderr) == []


def test_log_lines_spell_out_controls(
    fake: FakeTogether, api_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """A retried API error is logged with its message's controls spelled out; as JSON, every
    stderr line parses and holds the message as sent."""
    fake.add_job("ft-x", events=2)
    body = json.dumps({"error": {"message": CONTROLS}}).encode()
    for log_format in ("console", "json"):
        fake.override = fail_once("ft-x/events", 503, body)
        result = run(
            "sync",
            "-v",
            "--job-id",
            "ft-x",
            "--log-format",
            log_format,
            "--database-url",
            db_url,
            cwd=tmp_path,
            env=api_env,
        )
        assert result.returncode == 0, result.stderr
        if log_format == "console":
            (retry,) = [line for line in result.stderr.splitlines() if "retrying after" in line]
            assert retry.endswith("HTTP 503: " + SPELLED.replace("cr\\rX", "cr X"))
            assert raw_controls(result.stderr) == []
        else:
            records = [json.loads(line) for line in result.stderr.splitlines()]
            (retry,) = [r for r in records if "retrying after" in r["message"]]
            assert retry["message"].endswith("HTTP 503: " + CONTROLS.replace("\r", " "))


def test_a_log_message_cannot_forge_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A line break in a logged value is spelled out; a traceback keeps its own lines but
    not the controls in its message."""
    from eventsync import logs

    logs.configure()
    log = logging.getLogger("eventsync.test")
    try:
        log.warning("job said %s", "ok\n2026-01-01 00:00:00,000 INFO    eventsync: forged")
        try:
            raise RuntimeError("boom \x1b[2J")
        except RuntimeError:
            log.exception("failed")
    finally:
        logging.getLogger().handlers.clear()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith(r"job said ok\n2026-01-01 00:00:00,000 INFO    eventsync: forged")
    assert lines[1].endswith("failed")
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == r"RuntimeError: boom \x1b[2J"


def test_listed_ids_are_checked_like_given_ones(
    fake: FakeTogether, api_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """An id from GET /fine-tunes that the command line would refuse is skipped with one
    warning: never requested, never stored."""
    bad = ["../../files", "ft-\x1b[31mred", "a b", "ft-" + "x" * 300]
    for job_id in ["ft-ok", *bad]:
        fake.add_job(job_id, events=2)
    result = run("sync", "--all-jobs", "--database-url", db_url, cwd=tmp_path, env=api_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ft-ok: 2 new, 2 total"]
    (warning,) = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert "the job listing holds 4 invalid job id(s), skipped: '../../files'" in warning
    assert raw_controls(result.stderr) == []
    assert "/v1/fine-tunes/ft-ok/events" in fake.requests
    assert [p for p in fake.requests if not p.startswith("/v1/fine-tunes/ft-ok")] == [
        "/v1/fine-tunes"
    ]
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT job_id FROM sync_state")).scalars().all()
            events = conn.execute(text("SELECT DISTINCT job_id FROM fine_tune_events")).all()
    finally:
        engine.dispose()
    assert stored == ["ft-ok"]
    assert events == [("ft-ok",)]
