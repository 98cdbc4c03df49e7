"""Events are unique on (job_id, event_key); `hash` holds what the API sent, or NULL.

Until now `hash` was both the API's field and the key: a derived sha256 for events without
one, `HASH~DIGEST16` for a reused hash, and a shortened `...~sha256:` form for a long one.
A hash sent by the API could equal one of those derived forms. The key now lives in its own
column, in prefixed forms that never meet:

- ``h:HASH``     the first event of a list with that hash (hash of at most 256 characters);
- ``hs:SHA256``  the same, for a longer hash (sha256 of it);
- ``c:SHA256``   any other event, by the sha256 of its content (= content_hash).

Existing rows get their key from what was stored, and every job's fingerprint is cleared so
that the next pass compares each event with what is stored.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_HASH_LIMIT = 256
_PLAIN = re.compile(r"[^\x00\ud800-\udfff]*")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _hash_key(literal: str) -> str:
    if len(literal) <= KEY_HASH_LIMIT and _PLAIN.fullmatch(literal):
        return f"h:{literal}"
    return f"hs:{_sha256(literal)}"


def _literal_hash(raw: Any) -> str | None:
    if isinstance(raw, str):
        raw = json.loads(raw)
    value = raw.get("hash") if isinstance(raw, dict) else None
    if value is None or isinstance(value, bool | dict | list):
        return None
    return str(value) or None


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("fine_tune_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("event_key", sa.String(), nullable=True))

    # Events without a hash: their hash was the content digest.
    op.execute(
        "UPDATE fine_tune_events SET event_key = 'c:' || content_hash, hash = NULL "
        "WHERE hash = content_hash"
    )
    # Reused and shortened hashes (the only stored forms with a '~'), and long ones: from raw.
    odd = bind.execute(
        sa.text(
            "SELECT id, hash, content_hash, raw FROM fine_tune_events "
            "WHERE event_key IS NULL AND (hash LIKE '%~%' OR length(hash) > :limit)"
        ),
        {"limit": KEY_HASH_LIMIT},
    ).all()
    for row_id, stored, content_hash, raw in odd:
        literal = _literal_hash(raw) or stored
        if stored == f"{literal}~{content_hash[:16]}":
            key = f"c:{content_hash}"  # a hash an earlier event of the list already had
        else:
            key = _hash_key(literal)
        bind.execute(
            sa.text("UPDATE fine_tune_events SET event_key = :key, hash = :hash WHERE id = :id"),
            {"key": key, "hash": literal, "id": row_id},
        )
    op.execute("UPDATE fine_tune_events SET event_key = 'h:' || hash WHERE event_key IS NULL")
    op.execute("UPDATE sync_state SET fingerprint = NULL")

    _with_views_kept(bind, _swap_constraints)


def _swap_constraints() -> None:
    with op.batch_alter_table("fine_tune_events", schema=None) as batch_op:
        batch_op.alter_column("event_key", existing_type=sa.String(), nullable=False)
        batch_op.alter_column("hash", existing_type=sa.String(), type_=sa.Text(), nullable=True)
        batch_op.drop_constraint("uq_fine_tune_events_job_id_hash", type_="unique")
        batch_op.create_unique_constraint(
            "uq_fine_tune_events_job_id_event_key", ["job_id", "event_key"]
        )


def _with_views_kept(bind: sa.Connection, change: Any) -> None:
    """SQLite's batch mode copies the table and renames the copy; a rename checks the views
    that name the table, which fail while it is gone. The legacy rename leaves them be."""
    if bind.dialect.name != "sqlite":
        change()
        return
    bind.exec_driver_sql("PRAGMA legacy_alter_table = ON")
    try:
        change()
    finally:
        bind.exec_driver_sql("PRAGMA legacy_alter_table = OFF")


def downgrade() -> None:
    bind = op.get_bind()
    op.execute("UPDATE fine_tune_events SET hash = content_hash WHERE hash IS NULL")
    rows = bind.execute(
        sa.text(
            "SELECT id, hash, content_hash, event_key FROM fine_tune_events "
            "WHERE event_key NOT LIKE 'h:%' AND hash <> content_hash"
        )
    ).all()
    for row_id, literal, content_hash, key in rows:
        if key.startswith("c:"):
            stored = f"{literal}~{content_hash[:16]}"
        else:
            stored = f"{literal[:440]}~sha256:{_sha256(literal)}"
        bind.execute(
            sa.text("UPDATE fine_tune_events SET hash = :hash WHERE id = :id"),
            {"hash": stored, "id": row_id},
        )
    op.execute("UPDATE sync_state SET fingerprint = NULL")

    def restore() -> None:
        with op.batch_alter_table("fine_tune_events", schema=None) as batch_op:
            batch_op.drop_constraint("uq_fine_tune_events_job_id_event_key", type_="unique")
            batch_op.create_unique_constraint("uq_fine_tune_events_job_id_hash", ["job_id", "hash"])
            batch_op.alter_column(
                "hash", existing_type=sa.Text(), type_=sa.String(), nullable=False
            )
            batch_op.drop_column("event_key")

    _with_views_kept(bind, restore)
