"""Printing rows for people and for programs: table, json, jsonl, csv.

Tables follow the terminal: rich's colour and width on a TTY, plain aligned text when piped
(rich is only imported then). What people read is text from outside (the API, the database),
so it is printed as text: never as rich markup, and with control characters spelled out
(`visible`). Programs get the data as stored: JSON escapes controls itself, CSV keeps them.
Every timestamp, for people and programs alike, is ISO 8601 in UTC: 2026-12-02T09:22:17Z.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import click

FORMATS = ("table", "json", "jsonl", "csv")

# What a terminal would act on rather than show: C0 and C1 controls and DEL (cursor moves,
# colour, OSC hyperlinks and window titles, carriage returns that overwrite a line), the
# Unicode marks that reorder or break lines (bidi overrides, isolates, LS/PS), and lone
# surrogates, which can't even be encoded for the terminal.
_UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_SPELLED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text: str, *, keep: str = "") -> str:
    """Text from outside made safe for a terminal or a log line: each control character (but
    those in `keep`) is spelled out as an escape, `\\x1b`, `\\n`, `\\u202e`."""
    if not _UNSAFE.search(text):
        return text

    def spell(match: re.Match[str]) -> str:
        char = match.group()
        if char in keep:
            return char
        code = ord(char)
        return _SPELLED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")

    return _UNSAFE.sub(spell, text)


def echo(text: str, *, err: bool = False) -> None:
    """One line for people, on stdout or stderr, with control characters spelled out."""
    click.echo(visible(text), err=err)


def timestamp(value: datetime | str) -> str:
    """The one way a time is shown: ISO 8601, UTC, to the second."""
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def plain(value: Any) -> Any:
    """A JSON-friendly value: datetimes as `timestamp`, decimals as numbers."""
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def as_utc(value: datetime | str) -> datetime:
    """Views hand SQLite timestamps back as text; either way, an aware UTC datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def ago(value: datetime | str | None, now: datetime | None = None) -> str:
    """How long ago, rounded to its largest unit: `3h ago`."""
    if value is None:
        return "never"
    seconds = max(0, int(((now or datetime.now(UTC)) - as_utc(value)).total_seconds()))
    return f"{duration(seconds)} ago"


def duration(seconds: float | None) -> str:
    """A span rounded to its largest unit, for people: `45s`, `12m`, `3h`, `2d`."""
    if seconds is None:
        return ""
    whole = round(float(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def progress_bar(progress: float | None, width: int = 10) -> str:
    if progress is None:
        return ""
    filled = round(float(progress) * width)
    return "█" * filled + "░" * (width - filled) + f" {float(progress) * 100:3.0f}%"


def emit(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str, *, header: bool = True
) -> None:
    """Print rows in the chosen format on stdout (json turns into jsonl without a header:
    a stream of rows can't be one array)."""
    if fmt == "json" and not header:
        fmt = "jsonl"
    if fmt == "json":
        print(json.dumps([{c: plain(r.get(c)) for c in columns} for r in rows], indent=2))
    elif fmt == "jsonl":
        for r in rows:
            print(json.dumps({c: plain(r.get(c)) for c in columns}))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        if header:
            writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else plain(r.get(c)) for c in columns])
    else:
        table(rows, columns, header=header)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, header: bool = True) -> None:
    """Rows as an aligned table: rich's on a terminal (its width, bold headers), plain text
    when piped. Every cell is text, never rich markup, controls spelled out."""
    if not sys.stdout.isatty():
        Aligned(columns, rows).print(rows, header=header)
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    grid = Table(box=None, pad_edge=False, show_header=header, header_style="bold")
    for column in columns:
        grid.add_column(Text(cell(column)), overflow="fold")
    for r in rows:
        grid.add_row(*(Text(cell(r.get(c))) for c in columns))
    console.print(grid)


class Aligned:
    """Plain-text columns, as wide as the header and the first rows need, which later rows
    keep (`events --follow` adds rows that line up with the first ones; a value wider than
    its column pushes the rest of its own row only). The last column is never padded, so no
    line ends in spaces."""

    def __init__(self, columns: Sequence[str], first: Sequence[dict[str, Any]] = ()) -> None:
        self.columns = list(columns)
        self.widths = [max([len(c), *(len(cell(r.get(c))) for r in first)]) for c in self.columns]

    def print(self, rows: Sequence[dict[str, Any]], *, header: bool = False) -> None:
        if header:
            click.echo(self._line(self.columns))
        for r in rows:
            click.echo(self._line([cell(r.get(c)) for c in self.columns]))

    def _line(self, cells: Sequence[str]) -> str:
        padded = [text.ljust(width) for text, width in zip(cells[:-1], self.widths, strict=False)]
        return "  ".join([*padded, cells[-1]])


def cell(value: Any) -> str:
    """A table cell: the value as plain text, controls spelled out."""
    return "" if value is None else visible(str(plain(value)))


_SPAN = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`1h`, `30m`, `2d`, `1w` ago, or an ISO date or datetime (UTC unless it says)."""
    match = _SPAN.match(text.strip().lower())
    if match:
        span = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        return (now or datetime.now(UTC)) - span
    try:
        return as_utc(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: use a span like 30m, 1h, 2d, or a date like 2026-11-01"
        ) from None
