"""The SQL of the views that answer the common questions, for SQLite and Postgres alike.

These are the current definitions. Each migration that creates or changes a view holds a copy
of the SQL it ran (a revision never imports live code); tests/test_migrations.py checks that
a freshly migrated database has exactly these views.
"""

from __future__ import annotations

# Lifecycle event types -> the job status they announce; matched without regard to case, so
# both API generations (job_start and JOB_START) give the same answers.
LIFECYCLE = {
    "job_pending": "pending",
    "job_start": "running",
    "training_start": "running",
    "job_restarted": "running",
    "model_compressing": "compressing",
    "model_uploading": "uploading",
    "cancel_requested": "cancel_requested",
    "job_stopped": "cancelled",
    "job_complete": "completed",
    "job_error": "error",
}


def _seconds_between(dialect: str, start: str, end: str) -> str:
    if dialect == "postgresql":
        return f"EXTRACT(EPOCH FROM ({end} - {start}))"
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


def _first(kind: str, column: str = "created_at", *, last: bool = False) -> str:
    order = "DESC" if last else "ASC"
    return (
        f"(SELECT x.{column} FROM fine_tune_events x WHERE x.job_id = j.job_id "
        f"AND lower(x.type) = '{kind}' ORDER BY x.seq {order} LIMIT 1)"
    )


def _latest(column: str, where: str = "TRUE") -> str:
    return (
        f"(SELECT x.{column} FROM fine_tune_events x WHERE x.job_id = j.job_id AND {where} "
        f"ORDER BY x.seq DESC LIMIT 1)"
    )


def job_summary_sql(dialect: str) -> str:
    status_case = " ".join(f"WHEN '{t}' THEN '{s}'" for t, s in LIFECYCLE.items())
    lifecycle = ", ".join(f"'{t}'" for t in LIFECYCLE)
    between = _seconds_between
    true = "TRUE" if dialect == "postgresql" else "1"
    return f"""
CREATE VIEW fine_tune_job_summary AS
SELECT
    j.job_id,
    COALESCE(
        CASE lower({_latest("type", f"lower(x.type) IN ({lifecycle})")}) {status_case} END,
        s.status
    ) AS status,
    s.model,
    j.first_event_at,
    j.last_event_at,
    {_latest("type").replace("TRUE", true)} AS last_event_type,
    {_latest("message").replace("TRUE", true)} AS last_message,
    {_latest("step", "x.step IS NOT NULL")} AS step,
    {_latest("total_steps", "x.total_steps IS NOT NULL")} AS total_steps,
    CASE
        WHEN {_latest("total_steps", "x.total_steps > 0")} IS NULL THEN NULL
        WHEN CAST({_latest("step", "x.step IS NOT NULL")} AS DOUBLE PRECISION)
             / {_latest("total_steps", "x.total_steps > 0")} > 1 THEN 1.0
        ELSE CAST({_latest("step", "x.step IS NOT NULL")} AS DOUBLE PRECISION)
             / {_latest("total_steps", "x.total_steps > 0")}
    END AS progress,
    {between(dialect, _first("job_pending"), _first("job_start"))} AS queued_seconds,
    {between(dialect, _first("training_start"), _first("training_complete", last=True))}
        AS training_seconds,
    {between(dialect, "j.first_event_at", "j.last_event_at")} AS total_seconds,
    {_latest("message", "(lower(x.type) = 'job_error' OR lower(x.level) = 'error')")}
        AS error_message,
    j.checkpoints,
    j.events
FROM (
    SELECT
        job_id,
        MIN(created_at) AS first_event_at,
        MAX(created_at) AS last_event_at,
        SUM(CASE WHEN lower(type) = 'checkpoint_save' THEN 1 ELSE 0 END) AS checkpoints,
        COUNT(*) AS events
    FROM fine_tune_events
    GROUP BY job_id
) j
LEFT JOIN sync_state s ON s.job_id = j.job_id
"""


CHECKPOINTS_SQL = """
CREATE VIEW fine_tune_checkpoints AS
SELECT job_id, step, checkpoint_path, created_at
FROM fine_tune_events
WHERE lower(type) = 'checkpoint_save'
"""


def definitions(dialect: str) -> dict[str, str]:
    """Each view's name and its current CREATE VIEW statement, for a dialect."""
    return {
        "fine_tune_job_summary": job_summary_sql(dialect),
        "fine_tune_checkpoints": CHECKPOINTS_SQL,
    }
