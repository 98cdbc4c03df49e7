"""`eventsync plot` and `eventsync report`, run as the command: the files they write, every
stored point drawn, nothing fetched from outside, hostile text kept as text, and the errors."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert

from eventsync.models import (
    checkpoints_table,
    events_table,
    jobs_table,
    metrics_table,
    state_table,
    status_history_table,
)
from tests.helpers import run

SVG = "{http://www.w3.org/2000/svg}"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
NO_MATPLOTLIB = (
    "error: drawing needs matplotlib, which is not installed: pip install 'eventsync[plot]'"
)


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def add_job(engine: Engine, job_id: str, *, steps: int = 0, **record: Any) -> tuple[int, int]:
    """A job record and `steps` metrics snapshots (eval every 5th step), plus one snapshot
    without a step and one with a non-finite loss, which are not drawn. Returns the
    (train, eval) points a chart must show."""
    values = {
        "learning_rate": 3e-5,
        "n_epochs": 3,
        "batch_size": 16,
        "training_type": "Lora",
        "lora_r": 8,
        "model": "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference",
        "status": "completed",
        "created_at": T0,
        "raw": {},
        "content_hash": "0" * 64,
        **record,
    }
    snapshots = [
        {
            "global_step": step,
            "train_loss": 2.0 / step,
            "eval_loss": 2.1 / step if step % 5 == 0 else None,
        }
        for step in range(1, steps + 1)
    ]
    if steps:
        snapshots += [
            {"global_step": None, "train_loss": 1.0, "eval_loss": 1.0},
            {"global_step": steps + 1, "train_loss": float("inf"), "eval_loss": None},
        ]
    with engine.begin() as connection:
        connection.execute(insert(jobs_table).values(job_id=job_id, **values))
        for seq, snapshot in enumerate(snapshots, start=1):
            connection.execute(
                insert(metrics_table).values(
                    job_id=job_id, seq=seq, raw={}, content_hash=f"{seq:064d}", **snapshot
                )
            )
    return steps, steps // 5


def add_history(engine: Engine, job_id: str, *, error: str = "HTTP 503: try later") -> None:
    """The rest of a job's history: status history, events, checkpoints, a sync error."""
    events = [
        ("job_pending", "info", "Fine tune request created"),
        ("job_start", "info", "Job started"),
        ("checkpoint_save", "info", "Checkpoint saved at step 10"),
        ("job_error", "error", "The job failed: out of memory"),
    ]
    with engine.begin() as connection:
        for n, status in enumerate(("pending", "running", "error")):
            connection.execute(
                insert(status_history_table).values(
                    job_id=job_id, status=status, seen_at=T0 + timedelta(minutes=10 * n)
                )
            )
        for seq, (kind, level, message) in enumerate(events, start=1):
            connection.execute(
                insert(events_table).values(
                    job_id=job_id,
                    seq=seq,
                    event_key=f"k{seq}",
                    created_at=T0 + timedelta(minutes=3 * seq),
                    type=kind,
                    level=level,
                    message=message,
                    raw={},
                    content_hash="0" * 64,
                )
            )
        for step in (10, 20):
            connection.execute(
                insert(checkpoints_table).values(
                    job_id=job_id,
                    checkpoint_key=f"c{step}",
                    step=step,
                    created_at=T0 + timedelta(minutes=step),
                    path=f"s3://bucket/{job_id}/checkpoint-{step}",
                    checkpoint_type="Intermediate",
                    raw={},
                    content_hash="0" * 64,
                )
            )
        connection.execute(
            insert(state_table).values(
                job_id=job_id, last_error=error, last_error_kind="http_status", last_attempt_at=T0
            )
        )


def vertices(root: ET.Element, gid: str) -> int:
    """The points of the line matplotlib drew with this id: its path's M and L commands."""
    group = next(g for g in root.iter(f"{SVG}g") if g.get("id") == gid)
    path = next(group.iter(f"{SVG}path"))
    return len(re.findall(r"[ML]", path.get("d", "")))


def markers(root: ET.Element, gid: str) -> int:
    group = next(g for g in root.iter(f"{SVG}g") if g.get("id") == gid)
    return sum(1 for _ in group.iter(f"{SVG}use"))


class Page(HTMLParser):
    """An HTML page's start tags with their attributes, and its text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def names(self) -> set[str]:
        return {tag for tag, _ in self.tags}


def assert_offline(html: str) -> Page:
    """The page parses, holds no script, and nothing in it loads anything: no src, and the
    only links are to the page's own ids."""
    page = Page(html)
    assert page.names().isdisjoint({"script", "link", "img", "iframe", "object", "embed"})
    for _, attrs in page.tags:
        assert "src" not in attrs
        for name, value in attrs.items():
            if name.endswith("href"):
                assert (value or "").startswith("#"), (name, value)
            assert "http://" not in (value or "") or name.startswith("xmlns"), (name, value)
            assert "https://" not in (value or ""), (name, value)
    return page


def svg_root(svg: str) -> ET.Element:
    """An SVG parsed as XML: one eventsync wrote, which is why the stdlib parser will do."""
    return ET.fromstring(svg)  # noqa: S314


def inline_svg(html: str) -> ET.Element:
    return svg_root(html[html.index("<svg") : html.index("</svg>") + len("</svg>")])


def test_plot_svg_draws_every_stored_point(engine: Engine, tmp_path: Path) -> None:
    """Each job's train and eval lines have exactly one vertex per stored snapshot with that
    loss and a step (and one marker per eval point); a valid SVG, jobs in the order given."""
    expected = {
        "ft-a": add_job(engine, "ft-a", steps=40, learning_rate=1e-5),
        "ft-b": add_job(engine, "ft-b", steps=23, learning_rate=1e-4, training_type="Full"),
        "ft-c": add_job(engine, "ft-c", steps=7, batch_size=None, raw={"batch_size": "max"}),
    }
    result = run(
        "plot", *expected, "-o", "loss.svg", "--database-url", url_of(engine), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "loss.svg: the loss of 3 job(s), 83 points\n"
    root = svg_root((tmp_path / "loss.svg").read_text())
    assert root.tag == f"{SVG}svg"
    for index, (train, evals) in enumerate(expected.values()):
        assert (train, evals, evals) == (
            vertices(root, f"train-{index}"),
            vertices(root, f"eval-{index}"),
            markers(root, f"eval-{index}"),
        )


def test_plot_png_is_a_png(engine: Engine, tmp_path: Path) -> None:
    """-o NAME.png writes a PNG: the signature, an IHDR chunk first, and Pillow reads it."""
    from PIL import Image

    add_job(engine, "ft-a", steps=30)
    add_job(engine, "ft-b", steps=30, learning_rate=1e-4)
    result = run(
        "plot", "ft-a", "ft-b", "-o", "loss.PNG", "--database-url", url_of(engine), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    data = (tmp_path / "loss.PNG").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, chunk, width, height = struct.unpack(">I4sII", data[8:24])
    assert (length, chunk) == (13, b"IHDR")
    with Image.open(tmp_path / "loss.PNG") as image:
        image.verify()
        assert (image.format, image.size) == ("PNG", (width, height))
    assert width == 1500  # 10 inches at 150 dpi


@pytest.mark.parametrize("name", ["loss.jpg", "loss", "loss.html"])
def test_plot_refuses_other_formats(name: str, tmp_path: Path) -> None:
    """An -o name that ends in neither .png nor .svg is a one-line usage error, before any
    database is opened, and no file is written."""
    result = run("plot", "ft-a", "-o", name, "--database-url", "sqlite:///none.db", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: -o {name}: the name must end in .png or .svg, which picks the format\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_plot_refuses_more_jobs_than_colours(tmp_path: Path) -> None:
    """Eleven jobs on one chart would share colours: a one-line usage error."""
    jobs = [f"ft-{n}" for n in range(11)]
    result = run("plot", *jobs, "-o", "l.png", "--database-url", "sqlite:///none.db", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "error: 11 jobs: one chart draws at most 10\n")


def test_a_file_that_cant_be_written_is_one_line(engine: Engine, tmp_path: Path) -> None:
    """-o into a folder that doesn't exist: one line naming the file and why."""
    add_job(engine, "ft-a", steps=5)
    result = run("plot", "ft-a", "-o", "no/l.png", "--database-url", url_of(engine), cwd=tmp_path)
    assert result.returncode == 1
    # The last line: on a new machine matplotlib logs once that it built its font cache.
    assert (
        result.stderr.splitlines()[-1] == "error: can't write no/l.png: No such file or directory"
    )
    assert "Traceback" not in result.stderr


def test_report_refuses_other_formats(tmp_path: Path) -> None:
    """report -o wants an .html name."""
    result = run("report", "ft-a", "-o", "r.pdf", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (
        2,
        "error: -o r.pdf: the name must end in .html\n",
    )


@pytest.mark.parametrize("command", ["plot", "report"])
def test_unknown_job_is_one_line_naming_it(command: str, engine: Engine, tmp_path: Path) -> None:
    """A job nothing is stored for: exit 1, one line naming it, no traceback, no file."""
    add_job(engine, "ft-a", steps=5)
    name = "out.svg" if command == "plot" else "out.html"
    args = ["ft-a", "ft-gone"] if command == "plot" else ["ft-gone"]
    result = run(command, *args, "-o", name, "--database-url", url_of(engine), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "error: unknown job ft-gone: nothing is stored for it "
        "(eventsync sync --job-id ID stores it)\n"
    )
    assert not (tmp_path / name).exists()


def test_plot_of_a_job_without_metrics_names_it(engine: Engine, tmp_path: Path) -> None:
    """A job whose record is stored but no metrics: a one-line error naming it."""
    add_job(engine, "ft-a", steps=5)
    add_job(engine, "ft-new")
    result = run(
        "plot", "ft-a", "ft-new", "-o", "l.png", "--database-url", url_of(engine), cwd=tmp_path
    )
    assert result.returncode == 1
    assert (
        result.stderr == "error: no training metrics stored for job ft-new: nothing to draw yet\n"
    )


def test_report_is_one_offline_page(engine: Engine, tmp_path: Path) -> None:
    """The page holds the hyperparameters, the status timeline, a loss chart with every point,
    the checkpoints and the errors, times in ISO 8601 UTC, and loads nothing from outside."""
    train, evals = add_job(engine, "ft-a", steps=30, lr_scheduler="cosine", suffix="sweep-1")
    add_history(engine, "ft-a")
    result = run(
        "report", "ft-a", "-o", "ft-a.html", "--database-url", url_of(engine), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ft-a.html: the report of job ft-a\n"
    html = (tmp_path / "ft-a.html").read_text()
    page = assert_offline(html)
    assert [a.get("id") for t, a in page.tags if t == "section"] == [
        "hyperparameters",
        "loss",
        "timeline",
        "checkpoints",
        "errors",
    ]
    text = "".join(page.text)
    for shown in (
        "cosine",
        "sweep-1",
        "3e-05",  # the learning rate
        "Job started",  # a lifecycle event
        "2026-11-02T09:20:00Z",  # when the status error was seen
        "s3://bucket/ft-a/checkpoint-20",
        "The job failed: out of memory",
        "HTTP 503: try later",
    ):
        assert shown in text
    assert "Checkpoint saved" not in text  # an event, but not a lifecycle one
    chart = inline_svg(html)
    assert (train, evals) == (vertices(chart, "train-0"), vertices(chart, "eval-0"))


def test_report_without_metrics_says_so(engine: Engine, tmp_path: Path) -> None:
    """A job with no metrics still gets its page, which says there is no chart to show."""
    add_job(engine, "ft-a")
    add_history(engine, "ft-a")
    result = run("report", "ft-a", "-o", "r.html", "--database-url", url_of(engine), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "r.html").read_text()
    page = assert_offline(html)
    assert "No training metrics are stored for this job yet." in "".join(page.text)
    assert "svg" not in page.names()


def test_report_bounds_its_lists_and_values(engine: Engine, tmp_path: Path) -> None:
    """Past 500 rows a list keeps its latest 500 and says so; a value past 2,000 characters
    is cut: the page's size has a bound whatever the API sent."""
    add_job(engine, "ft-a", steps=3)
    long = "x" * 5000
    with engine.begin() as connection:
        connection.execute(
            insert(events_table),
            [
                {
                    "job_id": "ft-a",
                    "seq": seq,
                    "event_key": f"k{seq}",
                    "created_at": T0 + timedelta(seconds=seq),
                    "type": "job_error",
                    "level": "error",
                    "message": f"failure {seq} {long if seq == 600 else ''}",
                    "raw": {},
                    "content_hash": "0" * 64,
                }
                for seq in range(1, 601)
            ],
        )
    result = run("report", "ft-a", "-o", "r.html", "--database-url", url_of(engine), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = "".join(assert_offline((tmp_path / "r.html").read_text()).text)
    assert "Only the latest 500 are shown." in text
    assert "failure 101 " in text
    assert "failure 100 " not in text
    assert "x" * 1980 + "…" in text
    assert "x" * 2000 not in text


HOSTILE_ID = "ft-$x^2$-<script>alert(1)</script>"
HOSTILE = {
    # Each would break mathtext ($\nocommand$ raises), or run as markup in a page.
    "model": r"$\nocommand{x}$ <img src=https://evil.example/x.png>",
    "suffix": "--><script>alert(2)</script>",
    "lr_scheduler": "\x1b[31m\u202e$\\frac{1}{0}$",
    "batch_size": None,
    "raw": {"batch_size": "$^$"},
}


def test_hostile_text_is_drawn_as_text_and_escaped(engine: Engine, tmp_path: Path) -> None:
    """Job ids and hyperparameters with $...$, markup and control characters: the chart draws
    them as plain text (never mathtext), and the page escapes them (no script, no img)."""
    train, evals = add_job(engine, HOSTILE_ID, steps=12, **HOSTILE)
    add_history(engine, HOSTILE_ID, error="<script>alert(3)</script>")
    url = url_of(engine)
    for name in ("h.png", "h.svg"):
        result = run("plot", HOSTILE_ID, "-o", name, "--database-url", url, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    svg = (tmp_path / "h.svg").read_text()
    # mathtext would draw x in DejaVu Sans Oblique; as plain text every glyph is upright.
    assert "Oblique" not in svg
    root = svg_root(svg)
    assert (train, evals) == (vertices(root, "train-0"), vertices(root, "eval-0"))

    result = run("report", HOSTILE_ID, "-o", "h.html", "--database-url", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "h.html").read_text()
    page = assert_offline(html)
    text = "".join(page.text)
    for shown in (HOSTILE_ID, HOSTILE["model"], HOSTILE["suffix"], "$^$", "<script>alert(3)"):
        assert shown in text
    assert "\\x1b[31m\\u202e$\\frac{1}{0}$" in text  # controls spelled out
    assert "<h1>ft-$x^2$-&lt;script&gt;alert(1)&lt;/script&gt;</h1>" in html
    assert "Oblique" not in html


def without_matplotlib(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The eventsync command in a Python where `import matplotlib` fails."""
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"
        "from eventsync.cli import main\n"
        f"sys.argv = ['eventsync', *{list(args)!r}]\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTSYNC_", "TOGETHER_"))}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("command", "name"), [("plot", "l.png"), ("report", "r.html")])
def test_without_matplotlib_the_error_names_the_extra(
    command: str, name: str, engine: Engine, tmp_path: Path
) -> None:
    """Without matplotlib, both commands say in one line which extra to install."""
    add_job(engine, "ft-a", steps=5)
    result = without_matplotlib(
        command, "ft-a", "-o", name, "--database-url", url_of(engine), cwd=tmp_path
    )
    assert (result.returncode, result.stderr) == (1, NO_MATPLOTLIB + "\n")
    assert not (tmp_path / name).exists()


def test_status_does_not_import_matplotlib(engine: Engine, tmp_path: Path) -> None:
    """matplotlib is imported by the picture commands only: `eventsync status` never pays
    for it."""
    code = (
        "import sys\n"
        "from eventsync.cli import app\n"
        f"app(['status', '--database-url', {url_of(engine)!r}], standalone_mode=False)\n"
        "print('matplotlib' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"


@pytest.mark.parametrize(
    ("command", "example"),
    [
        ("plot", "eventsync plot ft-1a2b ft-3c4d ft-5e6f -o sweep.svg"),
        ("report", "-o ft-1a2b.html"),
    ],
)
def test_help_has_examples(command: str, example: str, tmp_path: Path) -> None:
    """Each picture command's --help shows an example and names the extra it needs."""
    result = run(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert example in result.stdout
    assert "pip install 'eventsync[plot]'" in result.stdout
