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


CHECKPOINT_EVENTS_SQL = """
CREATE VIEW fine_tune_checkpoint_events AS
SELECT job_id, step, checkpoint_path, created_at
FROM fine_tune_events
WHERE lower(type) = 'checkpoint_save'
"""

TERMINAL = "'completed', 'cancelled', 'error', 'user_error'"


def _metric(column: str, *, order: str, value: str | None = None) -> str:
    """One value of the job's metrics: `value` of the snapshot first in `order` among those
    with `column` set."""
    return (
        f"(SELECT m.{value or column} FROM fine_tune_metrics m WHERE m.job_id = j.job_id "
        f"AND m.{column} IS NOT NULL ORDER BY {order} LIMIT 1)"
    )


def runs_sql(dialect: str) -> str:
    """One row per job: its settings beside its final and best loss, and its cost."""
    last = "m.global_step DESC NULLS LAST, m.seq DESC"
    best_train = "m.train_loss ASC, m.global_step ASC NULLS LAST"
    best_eval = "m.eval_loss ASC, m.global_step ASC NULLS LAST"
    return f"""
CREATE VIEW fine_tune_runs AS
SELECT
    j.job_id,
    j.model,
    j.status,
    j.learning_rate,
    j.n_epochs,
    j.batch_size,
    j.training_type,
    j.lora_r,
    j.lr_scheduler,
    j.created_at,
    {_metric("train_loss", order=last)} AS final_train_loss,
    {_metric("train_loss", order=best_train)} AS best_train_loss,
    {_metric("train_loss", order=best_train, value="global_step")}
        AS best_train_step,
    {_metric("eval_loss", order=last)} AS final_eval_loss,
    {_metric("eval_loss", order=best_eval)} AS best_eval_loss,
    {_metric("eval_loss", order=best_eval, value="global_step")}
        AS best_eval_step,
    (SELECT MAX(m.global_step) FROM fine_tune_metrics m WHERE m.job_id = j.job_id) AS last_step,
    (SELECT MAX(m.global_step) FROM fine_tune_metrics m
        WHERE m.job_id = j.job_id AND m.eval_loss IS NOT NULL) AS last_eval_step,
    (SELECT COUNT(*) FROM fine_tune_metrics m WHERE m.job_id = j.job_id) AS snapshots,
    j.token_count,
    j.total_price,
    CASE WHEN j.token_count > 0
        THEN CAST(j.total_price AS DOUBLE PRECISION) / j.token_count END AS price_per_token,
    (SELECT COUNT(*) FROM fine_tune_checkpoints c WHERE c.job_id = j.job_id) AS checkpoints
FROM fine_tune_jobs j
"""


def _first_seen(where: str) -> str:
    return (
        "(SELECT MIN(COALESCE(h.updated_at, h.seen_at)) FROM fine_tune_job_status_history h "
        f"WHERE h.job_id = j.job_id AND {where})"
    )


def job_times_sql(dialect: str) -> str:
    """When each job was created, started running (the record's started_at, else when its
    status was first seen running) and ended (when a final status was first seen, by the
    record's updated_at), and the seconds between."""
    seen_running = _first_seen("h.status = 'running'")
    between = _seconds_between
    return f"""
CREATE VIEW fine_tune_job_times AS
SELECT
    t.*,
    {between(dialect, "t.created_at", "t.running_at")} AS queued_seconds,
    {between(dialect, "t.running_at", "t.ended_at")} AS training_seconds
FROM (
    SELECT
        j.job_id,
        j.status,
        j.created_at,
        COALESCE(j.started_at, {seen_running}) AS running_at,
        {_first_seen(f"h.status IN ({TERMINAL})")} AS ended_at
    FROM fine_tune_jobs j
) t
"""


LATEST_CHECKPOINTS_SQL = """
CREATE VIEW fine_tune_latest_checkpoints AS
SELECT c.job_id, c.step, c.created_at, c.path, c.checkpoint_type, c.checkpoint, c.object_name
FROM fine_tune_checkpoints c
WHERE c.id = (
    SELECT x.id FROM fine_tune_checkpoints x WHERE x.job_id = c.job_id
    ORDER BY x.step DESC NULLS LAST, x.created_at DESC NULLS LAST, x.id DESC LIMIT 1
)
"""


def definitions(dialect: str) -> dict[str, str]:
    """Each view's name and its current CREATE VIEW statement, for a dialect."""
    return {
        "fine_tune_job_summary": job_summary_sql(dialect),
        "fine_tune_checkpoint_events": CHECKPOINT_EVENTS_SQL,
        "fine_tune_runs": runs_sql(dialect),
        "fine_tune_job_times": job_times_sql(dialect),
        "fine_tune_latest_checkpoints": LATEST_CHECKPOINTS_SQL,
    }
