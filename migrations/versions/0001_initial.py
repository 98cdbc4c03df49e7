"""Create fine_tune_events and sync_state.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fine_tune_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("job_id", sa.String(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("object", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("level", sa.String(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("type", sa.String(), nullable=True),
        sa.Column("param_count", sa.BigInteger(), nullable=True),
        sa.Column("token_count", sa.BigInteger(), nullable=True),
        sa.Column("total_steps", sa.BigInteger(), nullable=True),
        sa.Column("wandb_url", sa.Text(), nullable=True),
        sa.Column("step", sa.BigInteger(), nullable=True),
        sa.Column("checkpoint_path", sa.Text(), nullable=True),
        sa.Column("model_path", sa.Text(), nullable=True),
        sa.Column("training_offset", sa.BigInteger(), nullable=True),
        sa.Column("hash", sa.String(), nullable=False),
        sa.Column("tokenized_dataset_path", sa.Text(), nullable=True),
        sa.Column("early_stopping_best_step", sa.BigInteger(), nullable=True),
        sa.Column("early_stopping_best_metric_value", sa.Double(), nullable=True),
        sa.Column(
            "raw",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "repairs",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "first_seen_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fine_tune_events")),
        sa.UniqueConstraint("job_id", "hash", name="uq_fine_tune_events_job_id_hash"),
        sa.UniqueConstraint("job_id", "seq", name="uq_fine_tune_events_job_id_seq"),
    )
    with op.batch_alter_table("fine_tune_events", schema=None) as batch_op:
        batch_op.create_index(
            "ix_fine_tune_events_job_id_created_at", ["job_id", "created_at"], unique=False
        )
        batch_op.create_index("ix_fine_tune_events_type", ["type"], unique=False)

    op.create_table(
        "sync_state",
        sa.Column("job_id", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=True),
        sa.Column("last_synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_kind", sa.String(), nullable=True),
        sa.Column("event_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_seq", sa.Integer(), server_default="0", nullable=False),
        sa.Column("fingerprint", sa.String(), nullable=True),
        sa.Column("repairs", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_sync_state")),
    )


def downgrade() -> None:
    op.drop_table("sync_state")
    with op.batch_alter_table("fine_tune_events", schema=None) as batch_op:
        batch_op.drop_index("ix_fine_tune_events_type")
        batch_op.drop_index("ix_fine_tune_events_job_id_created_at")

    op.drop_table("fine_tune_events")
