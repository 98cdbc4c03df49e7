"""One job's history as one self-contained HTML page, readable offline.

The page fetches nothing: its CSS is inline, its loss chart is inline SVG (from
eventsync.plot), it holds no script and no link, and its Content-Security-Policy forbids
loading anything should a value ever get through. Every value in it came from the API, so
each is HTML-escaped, its control characters spelled out, and cut to a bounded length; each
list is cut to its latest rows.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Select, func, or_, select, text

from eventsync import __version__, plot
from eventsync.models import checkpoints_table, events_table, state_table, status_history_table
from eventsync.output import timestamp, visible
from eventsync.views import LIFECYCLE

# Each list on the page shows at most this many rows, the latest ones.
MAX_ROWS = 500
# A value longer than this (an error's traceback, say) is cut.
MAX_TEXT = 2000
# The event types that mark a job's lifecycle: those the views read a status from, and the
# end of training.
LIFECYCLE_TYPES = (*LIFECYCLE, "training_complete")

# The job's record, in the order the page lists it.
HYPERPARAMETERS = (
    "model",
    "status",
    "training_method",
    "training_type",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_trainable_modules",
    "learning_rate",
    "lr_scheduler",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "n_epochs",
    "epochs_completed",
    "batch_size",
    "n_checkpoints",
    "n_evals",
    "training_file",
    "validation_file",
    "suffix",
    "model_output_name",
    "token_count",
    "param_count",
    "total_price",
    "wandb_url",
    "created_at",
    "started_at",
    "updated_at",
)
LOSSES = (
    "final_train_loss",
    "best_train_loss",
    "best_train_step",
    "final_eval_loss",
    "best_eval_loss",
    "best_eval_step",
)


@dataclass(frozen=True)
class Rows:
    """The latest rows of one list, oldest first, and whether older ones were left out."""

    rows: list[dict[str, Any]]
    cut: bool


@dataclass(frozen=True)
class JobReport:
    """What the page shows of one job, as read from the database."""

    curves: plot.Curves
    state: dict[str, Any] | None
    # The fine_tune_runs view's row: final and best loss (None without a job record).
    losses: dict[str, Any] | None
    statuses: Rows
    lifecycle: Rows
    checkpoints: Rows
    errors: Rows

    @property
    def job_id(self) -> str:
        return self.curves.job_id

    @property
    def known(self) -> bool:
        return self.curves.known or bool(self.lifecycle.rows) or bool(self.errors.rows)


def read_report(connection: Connection, job_id: str) -> JobReport:
    """Everything the page shows of the job, each list cut to its latest MAX_ROWS."""
    s = state_table.c
    state = connection.execute(
        select(
            s.status, s.last_synced_at, s.last_attempt_at, s.last_error, s.last_error_kind
        ).where(s.job_id == job_id)
    ).first()
    losses = connection.execute(
        text(f"SELECT {', '.join(LOSSES)} FROM fine_tune_runs WHERE job_id = :job_id"),
        {"job_id": job_id},
    ).first()
    h = status_history_table.c
    e = events_table.c
    c = checkpoints_table.c
    event_columns = (e.seq, e.created_at, e.type, e.level, e.message)
    return JobReport(
        curves=plot.read_curves(connection, job_id),
        state=dict(state._mapping) if state is not None else None,
        losses=dict(losses._mapping) if losses is not None else None,
        statuses=_latest(
            connection,
            select(h.id, h.status, h.seen_at, h.updated_at).where(h.job_id == job_id),
            h.seen_at,
            h.id,
        ),
        lifecycle=_latest(
            connection,
            select(*event_columns).where(
                e.job_id == job_id, func.lower(e.type).in_(LIFECYCLE_TYPES)
            ),
            e.seq,
        ),
        checkpoints=_latest(
            connection,
            select(c.id, c.step, c.created_at, c.checkpoint_type, c.path, c.object_name).where(
                c.job_id == job_id
            ),
            c.step,
            c.created_at,
            c.id,
        ),
        errors=_latest(
            connection,
            select(*event_columns).where(
                e.job_id == job_id,
                or_(func.lower(e.level) == "error", func.lower(e.type) == "job_error"),
            ),
            e.seq,
        ),
    )


def _latest(connection: Connection, query: Select[Any], *order: Any) -> Rows:
    """The query's last MAX_ROWS rows in `order` (NULLs first), oldest first."""
    newest = query.order_by(*(o.desc().nulls_last() for o in order)).limit(MAX_ROWS + 1)
    rows = [dict(r._mapping) for r in connection.execute(newest)]
    return Rows(rows[:MAX_ROWS][::-1], cut=len(rows) > MAX_ROWS)


def render(report: JobReport, *, now: datetime | None = None) -> str:
    """The page, as HTML text. Draws the loss chart: needs the plot extra."""
    job = report.curves.job
    job_id = report.job_id
    status = job.get("status") or (report.state or {}).get("status")
    facts = [f"status {_text(status)}" if status else "status unknown"]
    if job.get("model"):
        facts.append(f"model {_text(job['model'])}")
    generated = timestamp(now or datetime.now(UTC))
    return _PAGE.format(
        title=_text(f"eventsync report: {job_id}"),
        style=_STYLE,
        job_id=_text(job_id),
        facts=" · ".join(facts),
        sections="\n".join(
            (
                _hyperparameters(job),
                _loss(report),
                _timeline(report),
                _checkpoints(report.checkpoints),
                _errors(report),
            )
        ),
        footer=f"Made by eventsync {_text(__version__)} at {generated} from the database "
        "only. Times are ISO 8601, in UTC.",
    )


def _hyperparameters(job: dict[str, Any]) -> str:
    if not job:
        body = "<p class=none>No record of this job is stored (it has only events).</p>"
    else:
        values = {**job, "batch_size": plot.batch_size(job)}
        body = _pairs([(name, values.get(name)) for name in HYPERPARAMETERS])
    return _section("hyperparameters", "Hyperparameters", body)


def _loss(report: JobReport) -> str:
    curves = report.curves
    if not curves.points:
        body = "<p class=none>No training metrics are stored for this job yet.</p>"
        return _section("loss", "Loss", body)
    counts = (
        f"<p>{len(curves.train):,} train-loss and {len(curves.eval):,} eval-loss points, "
        "by global step: train solid, eval dashed with markers.</p>"
    )
    losses = _pairs(list(report.losses.items())) if report.losses else ""
    chart = plot.draw([curves], fmt="svg").decode()
    # The document's own prologue (XML declaration, DOCTYPE) has no place inside HTML.
    chart = chart[chart.index("<svg") :]
    return _section("loss", "Loss", f"{counts}{losses}<figure>{chart}</figure>")


def _timeline(report: JobReport) -> str:
    rows = [
        (
            r["updated_at"] or r["seen_at"],
            "status",
            r["status"],
            f"seen by eventsync at {timestamp(r['seen_at'])}" if r["updated_at"] else "",
        )
        for r in report.statuses.rows
    ] + [(r["created_at"], "event", r["type"], r["message"]) for r in report.lifecycle.rows]
    rows.sort(key=lambda r: (r[0] is None, r[0] or datetime.min.replace(tzinfo=UTC)))
    note = _cut_note(report.statuses.cut or report.lifecycle.cut)
    body = (
        _table(("time", "from", "status or event", "detail"), rows)
        if rows
        else "<p class=none>No status history or lifecycle events are stored.</p>"
    )
    return _section("timeline", "Status timeline", note + body)


def _checkpoints(checkpoints: Rows) -> str:
    rows = [
        (r["step"], r["created_at"], r["checkpoint_type"], r["path"], r["object_name"])
        for r in checkpoints.rows
    ]
    body = (
        _table(("step", "created", "type", "path", "name"), rows)
        if rows
        else "<p class=none>No checkpoints are stored.</p>"
    )
    return _section("checkpoints", "Checkpoints", _cut_note(checkpoints.cut) + body)


def _errors(report: JobReport) -> str:
    parts = []
    state = report.state or {}
    if state.get("last_error"):
        kind = f" [{_text(state['last_error_kind'])}]" if state.get("last_error_kind") else ""
        at = _value(state.get("last_attempt_at"))
        parts.append(
            f"<p>The last sync, at {at}, failed{kind}:</p>"
            f"<pre class=message>{_text(state['last_error'])}</pre>"
        )
    rows = [(r["created_at"], r["type"], r["level"], r["message"]) for r in report.errors.rows]
    if rows:
        parts.append(_cut_note(report.errors.cut))
        parts.append(_table(("time", "type", "level", "message"), rows))
    if not parts:
        parts.append("<p class=none>No errors are stored.</p>")
    return _section("errors", "Errors", "".join(parts))


def _section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{heading}</h2>{body}</section>'


def _pairs(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_text(k)}</th><td>{_value(v)}</td></tr>" for k, v in pairs)
    return f"<table class=pairs>{rows}</table>"


def _table(headings: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(f"<td>{_value(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cut_note(cut: bool) -> str:
    return f"<p class=note>Only the latest {MAX_ROWS:,} are shown.</p>" if cut else ""


def _value(value: Any) -> str:
    """A stored value as HTML: times in ISO 8601 UTC, numbers in full, text escaped."""
    if value is None or value == "":
        return "<span class=none>-</span>"
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return _text(value)


def _text(value: Any) -> str:
    """Text from outside, safe in an element or an attribute: controls spelled out (but line
    breaks), cut to MAX_TEXT characters, HTML-escaped."""
    shown = visible(str(value), keep="\n")
    if len(shown) > MAX_TEXT:
        shown = shown[: MAX_TEXT - 1] + "…"
    return html.escape(shown, quote=True)


_STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  max-width: 1100px; margin: 2rem auto; padding: 0 1rem; color: #1d1d1f; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; overflow-wrap: anywhere; }
h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
.facts, footer, .note, .none { color: #666; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { text-align: left; vertical-align: top; padding: 0.25rem 0.6rem;
  border-bottom: 1px solid #eee; overflow-wrap: anywhere; white-space: pre-wrap; }
thead th { border-bottom: 2px solid #ccc; }
table.pairs th { width: 14rem; font-weight: 600; }
td { font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; }
figure svg { max-width: 100%; height: auto; }
pre.message { white-space: pre-wrap; overflow-wrap: anywhere; background: #fbf2f2;
  padding: 0.6rem; border-left: 3px solid #c33; }
footer { margin-top: 3rem; font-size: 0.85rem; }
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{job_id}</h1>
<p class=facts>{facts}</p>
{sections}
<footer>{footer}</footer>
</body>
</html>
"""
