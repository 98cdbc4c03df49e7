"""Per-job scheduling: each job's next due time and lease, and the listing's, for replicas.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN on both databases: nullable, or NOT NULL with a default.
    op.add_column("sync_state", sa.Column("next_due_at", sa.DateTime(timezone=True)))
    op.add_column("sync_state", sa.Column("lease_owner", sa.String()))
    op.add_column("sync_state", sa.Column("lease_until", sa.DateTime(timezone=True)))
    op.add_column(
        "sync_state", sa.Column("failures", sa.Integer(), server_default="0", nullable=False)
    )
    op.create_index("ix_sync_state_next_due_at", "sync_state", ["next_due_at"])
    op.create_table(
        "sync_tasks",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("next_due_at", sa.DateTime(timezone=True)),
        sa.Column("lease_owner", sa.String()),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_sync_tasks")),
    )


def downgrade() -> None:
    op.drop_table("sync_tasks")
    op.drop_index("ix_sync_state_next_due_at", table_name="sync_state")
    # Plain DROP COLUMN (SQLite 3.35+): a batch copy of the table would break the views
    # that name it.
    for name in ("failures", "lease_until", "lease_owner", "next_due_at"):
        op.drop_column("sync_state", name)
