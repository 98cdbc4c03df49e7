"""A job's whole history: fine_tune_jobs, its status history, metrics and checkpoints.

The events-based view fine_tune_checkpoints becomes fine_tune_checkpoint_events: the name now
belongs to the table of the API's checkpoints. New views: fine_tune_runs,
fine_tune_job_times, fine_tune_latest_checkpoints.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECKPOINT_EVENTS_SQL = """
CREATE VIEW fine_tune_checkpoint_events AS
SELECT job_id, step, checkpoint_path, created_at
FROM fine_tune_events
WHERE lower(type) = 'checkpoint_save'
"""

RUNS_SQL = """
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
    (SELECT m.train_loss FROM fine_tune_metrics m WHERE m.job_id = j.job_id AND m.train_loss IS NOT NULL ORDER BY m.global_step DESC NULLS LAST, m.seq DESC LIMIT 1) AS final_train_loss,
    (SELECT m.train_loss FROM fine_tune_metrics m WHERE m.job_id = j.job_id AND m.train_loss IS NOT NULL ORDER BY m.train_loss ASC, m.global_step ASC NULLS LAST LIMIT 1) AS best_train_loss,
    (SELECT m.global_step FROM fine_tune_metrics m WHERE m.job_id = j.job_id AND m.train_loss IS NOT NULL ORDER BY m.train_loss ASC, m.global_step ASC NULLS LAST LIMIT 1)
        AS best_train_step,
    (SELECT m.eval_loss FROM fine_tune_metrics m WHERE m.job_id = j.job_id AND m.eval_loss IS NOT NULL ORDER BY m.global_step DESC NULLS LAST, m.seq DESC LIMIT 1) AS final_eval_loss,
    (SELECT m.eval_loss FROM fine_tune_metrics m WHERE m.job_id = j.job_id AND m.eval_loss IS NOT NULL ORDER BY m.eval_loss ASC, m.global_step ASC NULLS LAST LIMIT 1) AS best_eval_loss,
    (SELECT m.global_step FROM fine_tune_metrics m WHERE m.job_id = j.job_id AND m.eval_loss IS NOT NULL ORDER BY m.eval_loss ASC, m.global_step ASC NULLS LAST LIMIT 1)
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

JOB_TIMES_SQL = {
    "sqlite": """
CREATE VIEW fine_tune_job_times AS
SELECT
    t.*,
    ((julianday(t.running_at) - julianday(t.created_at)) * 86400.0) AS queued_seconds,
    ((julianday(t.ended_at) - julianday(t.running_at)) * 86400.0) AS training_seconds
FROM (
    SELECT
        j.job_id,
        j.status,
        j.created_at,
        COALESCE(j.started_at, (SELECT MIN(COALESCE(h.updated_at, h.seen_at)) FROM fine_tune_job_status_history h WHERE h.job_id = j.job_id AND h.status = 'running')) AS running_at,
        (SELECT MIN(COALESCE(h.updated_at, h.seen_at)) FROM fine_tune_job_status_history h WHERE h.job_id = j.job_id AND h.status IN ('completed', 'cancelled', 'error', 'user_error')) AS ended_at
    FROM fine_tune_jobs j
) t
""",
    "postgresql": """
CREATE VIEW fine_tune_job_times AS
SELECT
    t.*,
    EXTRACT(EPOCH FROM (t.running_at - t.created_at)) AS queued_seconds,
    EXTRACT(EPOCH FROM (t.ended_at - t.running_at)) AS training_seconds
FROM (
    SELECT
        j.job_id,
        j.status,
        j.created_at,
        COALESCE(j.started_at, (SELECT MIN(COALESCE(h.updated_at, h.seen_at)) FROM fine_tune_job_status_history h WHERE h.job_id = j.job_id AND h.status = 'running')) AS running_at,
        (SELECT MIN(COALESCE(h.updated_at, h.seen_at)) FROM fine_tune_job_status_history h WHERE h.job_id = j.job_id AND h.status IN ('completed', 'cancelled', 'error', 'user_error')) AS ended_at
    FROM fine_tune_jobs j
) t
""",
}

LATEST_CHECKPOINTS_SQL = """
CREATE VIEW fine_tune_latest_checkpoints AS
SELECT c.job_id, c.step, c.created_at, c.path, c.checkpoint_type, c.checkpoint, c.object_name
FROM fine_tune_checkpoints c
WHERE c.id = (
    SELECT x.id FROM fine_tune_checkpoints x WHERE x.job_id = c.job_id
    ORDER BY x.step DESC NULLS LAST, x.created_at DESC NULLS LAST, x.id DESC LIMIT 1
)
"""

OLD_CHECKPOINTS_SQL = """
CREATE VIEW fine_tune_checkpoints AS
SELECT job_id, step, checkpoint_path, created_at
FROM fine_tune_events
WHERE lower(type) = 'checkpoint_save'
"""


def _json() -> sa.types.TypeEngine[object]:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _row_id() -> sa.Column[int]:
    return sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        autoincrement=True,
        nullable=False,
    )


def _when(name: str, **kwargs: object) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), **kwargs)  # type: ignore[arg-type]


def _first_seen() -> sa.Column[object]:
    return _when("first_seen_at", server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS fine_tune_checkpoints")
    op.execute(CHECKPOINT_EVENTS_SQL)
    op.create_table(
        "fine_tune_jobs",
        sa.Column("job_id", sa.String(), nullable=False),
        sa.Column("status", sa.String()),
        sa.Column("model", sa.String()),
        _when("created_at"),
        _when("updated_at"),
        _when("started_at"),
        sa.Column("training_file", sa.Text()),
        sa.Column("validation_file", sa.Text()),
        sa.Column("n_epochs", sa.BigInteger()),
        sa.Column("n_checkpoints", sa.BigInteger()),
        sa.Column("n_evals", sa.BigInteger()),
        sa.Column("batch_size", sa.BigInteger()),
        sa.Column("learning_rate", sa.Double()),
        sa.Column("lr_scheduler", sa.String()),
        sa.Column("warmup_ratio", sa.Double()),
        sa.Column("max_grad_norm", sa.Double()),
        sa.Column("weight_decay", sa.Double()),
        sa.Column("training_type", sa.String()),
        sa.Column("lora_r", sa.BigInteger()),
        sa.Column("lora_alpha", sa.BigInteger()),
        sa.Column("lora_dropout", sa.Double()),
        sa.Column("lora_trainable_modules", sa.Text()),
        sa.Column("training_method", sa.String()),
        sa.Column("suffix", sa.Text()),
        sa.Column("model_output_name", sa.Text()),
        sa.Column("token_count", sa.BigInteger()),
        sa.Column("param_count", sa.BigInteger()),
        sa.Column("total_price", sa.BigInteger()),
        sa.Column("epochs_completed", sa.BigInteger()),
        sa.Column("wandb_url", sa.Text()),
        sa.Column("raw", _json(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("repairs", _json()),
        _when("record_fetched_at"),
        sa.Column("checkpoints_events", sa.Integer()),
        _first_seen(),
        _when("stored_at"),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_fine_tune_jobs")),
    )
    op.create_index("ix_fine_tune_jobs_status", "fine_tune_jobs", ["status"])
    op.create_index("ix_fine_tune_jobs_model", "fine_tune_jobs", ["model"])
    op.create_table(
        "fine_tune_job_status_history",
        _row_id(),
        sa.Column("job_id", sa.String(), nullable=False),
        sa.Column("status", sa.String()),
        _when("seen_at", nullable=False),
        _when("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fine_tune_job_status_history")),
    )
    op.create_index(
        "ix_fine_tune_job_status_history_job_id_seen_at",
        "fine_tune_job_status_history",
        ["job_id", "seen_at"],
    )
    op.create_table(
        "fine_tune_metrics",
        _row_id(),
        sa.Column("job_id", sa.String(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("global_step", sa.BigInteger()),
        sa.Column("train_loss", sa.Double()),
        sa.Column("eval_loss", sa.Double()),
        sa.Column("learning_rate", sa.Double()),
        sa.Column("raw", _json(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("repairs", _json()),
        _first_seen(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fine_tune_metrics")),
        sa.UniqueConstraint(
            "job_id", "content_hash", name="uq_fine_tune_metrics_job_id_content_hash"
        ),
    )
    op.create_index(
        "ix_fine_tune_metrics_job_id_global_step", "fine_tune_metrics", ["job_id", "global_step"]
    )
    op.create_table(
        "fine_tune_checkpoints",
        _row_id(),
        sa.Column("job_id", sa.String(), nullable=False),
        sa.Column("checkpoint_key", sa.String(), nullable=False),
        sa.Column("step", sa.BigInteger()),
        _when("created_at"),
        sa.Column("path", sa.Text()),
        sa.Column("checkpoint_type", sa.Text()),
        sa.Column("checkpoint", sa.String()),
        sa.Column("object_id", sa.Text()),
        sa.Column("object_name", sa.Text()),
        sa.Column("object_revision_id", sa.Text()),
        sa.Column("raw", _json(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("repairs", _json()),
        _first_seen(),
        _when("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fine_tune_checkpoints")),
        sa.UniqueConstraint(
            "job_id", "checkpoint_key", name="uq_fine_tune_checkpoints_job_id_checkpoint_key"
        ),
    )
    op.execute(RUNS_SQL)
    op.execute(JOB_TIMES_SQL[op.get_bind().dialect.name])
    op.execute(LATEST_CHECKPOINTS_SQL)


def downgrade() -> None:
    for view in (
        "fine_tune_latest_checkpoints",
        "fine_tune_job_times",
        "fine_tune_runs",
        "fine_tune_checkpoint_events",
    ):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    for table in (
        "fine_tune_checkpoints",
        "fine_tune_metrics",
        "fine_tune_job_status_history",
        "fine_tune_jobs",
    ):
        op.drop_table(table)
    op.execute(OLD_CHECKPOINTS_SQL)
