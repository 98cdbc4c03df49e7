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

from eventsync.views import CHECKPOINTS_SQL, job_summary_sql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sync_state", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model", sa.String(), nullable=True))
    op.execute(job_summary_sql(op.get_bind().dialect.name))
    op.execute(CHECKPOINTS_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS fine_tune_checkpoints")
    op.execute("DROP VIEW IF EXISTS fine_tune_job_summary")
    with op.batch_alter_table("sync_state", schema=None) as batch_op:
        batch_op.drop_column("model")
