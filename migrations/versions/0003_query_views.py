"""Views for the common questions: fine_tune_job_summary and fine_tune_checkpoints; the
model of each job in sync_state.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The SQL this revision ran, as it ran it: a migration holds its own history and imports no
# live code (eventsync/views.py has the current definitions; a test keeps the two in step).
JOB_SUMMARY_SQL = {
    "postgresql": """
CREATE VIEW fine_tune_job_summary AS
SELECT
    j.job_id,
    COALESCE(
        CASE lower((SELECT x.type FROM fine_tune_events x WHERE x.job_id = j.job_id AND lower(x.type) IN ('job_pending', 'job_start', 'training_start', 'job_restarted', 'model_compressing', 'model_uploading', 'cancel_requested', 'job_stopped', 'job_complete', 'job_error') ORDER BY x.seq DESC LIMIT 1)) WHEN 'job_pending' THEN 'pending' WHEN 'job_start' THEN 'running' WHEN 'training_start' THEN 'running' WHEN 'job_restarted' THEN 'running' WHEN 'model_compressing' THEN 'compressing' WHEN 'model_uploading' THEN 'uploading' WHEN 'cancel_requested' THEN 'cancel_requested' WHEN 'job_stopped' THEN 'cancelled' WHEN 'job_complete' THEN 'completed' WHEN 'job_error' THEN 'error' END,
        s.status
    ) AS status,
    s.model,
    j.first_event_at,
    j.last_event_at,
    (SELECT x.type FROM fine_tune_events x WHERE x.job_id = j.job_id AND TRUE ORDER BY x.seq DESC LIMIT 1) AS last_event_type,
    (SELECT x.message FROM fine_tune_events x WHERE x.job_id = j.job_id AND TRUE ORDER BY x.seq DESC LIMIT 1) AS last_message,
    (SELECT x.step FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.step IS NOT NULL ORDER BY x.seq DESC LIMIT 1) AS step,
    (SELECT x.total_steps FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.total_steps IS NOT NULL ORDER BY x.seq DESC LIMIT 1) AS total_steps,
    CASE
        WHEN (SELECT x.total_steps FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.total_steps > 0 ORDER BY x.seq DESC LIMIT 1) IS NULL THEN NULL
        WHEN CAST((SELECT x.step FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.step IS NOT NULL ORDER BY x.seq DESC LIMIT 1) AS DOUBLE PRECISION)
             / (SELECT x.total_steps FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.total_steps > 0 ORDER BY x.seq DESC LIMIT 1) > 1 THEN 1.0
        ELSE CAST((SELECT x.step FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.step IS NOT NULL ORDER BY x.seq DESC LIMIT 1) AS DOUBLE PRECISION)
             / (SELECT x.total_steps FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.total_steps > 0 ORDER BY x.seq DESC LIMIT 1)
    END AS progress,
    EXTRACT(EPOCH FROM ((SELECT x.created_at FROM fine_tune_events x WHERE x.job_id = j.job_id AND lower(x.type) = 'job_start' ORDER BY x.seq ASC LIMIT 1) - (SELECT x.created_at FROM fine_tune_events x WHERE x.job_id = j.job_id AND lower(x.type) = 'job_pending' ORDER BY x.seq ASC LIMIT 1))) AS queued_seconds,
    EXTRACT(EPOCH FROM ((SELECT x.created_at FROM fine_tune_events x WHERE x.job_id = j.job_id AND lower(x.type) = 'training_complete' ORDER BY x.seq DESC LIMIT 1) - (SELECT x.created_at FROM fine_tune_events x WHERE x.job_id = j.job_id AND lower(x.type) = 'training_start' ORDER BY x.seq ASC LIMIT 1)))
        AS training_seconds,
    EXTRACT(EPOCH FROM (j.last_event_at - j.first_event_at)) AS total_seconds,
    (SELECT x.message FROM fine_tune_events x WHERE x.job_id = j.job_id AND (lower(x.type) = 'job_error' OR lower(x.level) = 'error') ORDER BY x.seq DESC LIMIT 1)
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
""",
    "sqlite": """
CREATE VIEW fine_tune_job_summary AS
SELECT
    j.job_id,
    COALESCE(
        CASE lower((SELECT x.type FROM fine_tune_events x WHERE x.job_id = j.job_id AND lower(x.type) IN ('job_pending', 'job_start', 'training_start', 'job_restarted', 'model_compressing', 'model_uploading', 'cancel_requested', 'job_stopped', 'job_complete', 'job_error') ORDER BY x.seq DESC LIMIT 1)) WHEN 'job_pending' THEN 'pending' WHEN 'job_start' THEN 'running' WHEN 'training_start' THEN 'running' WHEN 'job_restarted' THEN 'running' WHEN 'model_compressing' THEN 'compressing' WHEN 'model_uploading' THEN 'uploading' WHEN 'cancel_requested' THEN 'cancel_requested' WHEN 'job_stopped' THEN 'cancelled' WHEN 'job_complete' THEN 'completed' WHEN 'job_error' THEN 'error' END,
        s.status
    ) AS status,
    s.model,
    j.first_event_at,
    j.last_event_at,
    (SELECT x.type FROM fine_tune_events x WHERE x.job_id = j.job_id AND 1 ORDER BY x.seq DESC LIMIT 1) AS last_event_type,
    (SELECT x.message FROM fine_tune_events x WHERE x.job_id = j.job_id AND 1 ORDER BY x.seq DESC LIMIT 1) AS last_message,
    (SELECT x.step FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.step IS NOT NULL ORDER BY x.seq DESC LIMIT 1) AS step,
    (SELECT x.total_steps FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.total_steps IS NOT NULL ORDER BY x.seq DESC LIMIT 1) AS total_steps,
    CASE
        WHEN (SELECT x.total_steps FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.total_steps > 0 ORDER BY x.seq DESC LIMIT 1) IS NULL THEN NULL
        WHEN CAST((SELECT x.step FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.step IS NOT NULL ORDER BY x.seq DESC LIMIT 1) AS DOUBLE PRECISION)
             / (SELECT x.total_steps FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.total_steps > 0 ORDER BY x.seq DESC LIMIT 1) > 1 THEN 1.0
        ELSE CAST((SELECT x.step FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.step IS NOT NULL ORDER BY x.seq DESC LIMIT 1) AS DOUBLE PRECISION)
             / (SELECT x.total_steps FROM fine_tune_events x WHERE x.job_id = j.job_id AND x.total_steps > 0 ORDER BY x.seq DESC LIMIT 1)
    END AS progress,
    ((julianday((SELECT x.created_at FROM fine_tune_events x WHERE x.job_id = j.job_id AND lower(x.type) = 'job_start' ORDER BY x.seq ASC LIMIT 1)) - julianday((SELECT x.created_at FROM fine_tune_events x WHERE x.job_id = j.job_id AND lower(x.type) = 'job_pending' ORDER BY x.seq ASC LIMIT 1))) * 86400.0) AS queued_seconds,
    ((julianday((SELECT x.created_at FROM fine_tune_events x WHERE x.job_id = j.job_id AND lower(x.type) = 'training_complete' ORDER BY x.seq DESC LIMIT 1)) - julianday((SELECT x.created_at FROM fine_tune_events x WHERE x.job_id = j.job_id AND lower(x.type) = 'training_start' ORDER BY x.seq ASC LIMIT 1))) * 86400.0)
        AS training_seconds,
    ((julianday(j.last_event_at) - julianday(j.first_event_at)) * 86400.0) AS total_seconds,
    (SELECT x.message FROM fine_tune_events x WHERE x.job_id = j.job_id AND (lower(x.type) = 'job_error' OR lower(x.level) = 'error') ORDER BY x.seq DESC LIMIT 1)
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
""",
}

CHECKPOINTS_SQL = """
CREATE VIEW fine_tune_checkpoints AS
SELECT job_id, step, checkpoint_path, created_at
FROM fine_tune_events
WHERE lower(type) = 'checkpoint_save'
"""


def upgrade() -> None:
    with op.batch_alter_table("sync_state", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model", sa.String(), nullable=True))
    op.execute(JOB_SUMMARY_SQL[op.get_bind().dialect.name])
    op.execute(CHECKPOINTS_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS fine_tune_checkpoints")
    op.execute("DROP VIEW IF EXISTS fine_tune_job_summary")
    with op.batch_alter_table("sync_state", schema=None) as batch_op:
        batch_op.drop_column("model")
