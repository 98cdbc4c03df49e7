"""The schema: SQLAlchemy 2 typed models. Alembic migrations are checked against these."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on Postgres (indexable, queryable with ->>), JSON text on SQLite (json_extract works).
RawJSON = JSON().with_variant(JSONB(), "postgresql")
# SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY.
RowId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both databases. SQLite keeps no offset, so values are converted
    to UTC before they are stored and marked UTC when read back."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class FineTuneEvent(Base):
    """One event of one fine-tuning job, as the API served it. Unique on (job_id, event_key)."""

    __tablename__ = "fine_tune_events"
    __table_args__ = (
        UniqueConstraint("job_id", "event_key", name="uq_fine_tune_events_job_id_event_key"),
        UniqueConstraint("job_id", "seq", name="uq_fine_tune_events_job_id_seq"),
        Index("ix_fine_tune_events_job_id_created_at", "job_id", "created_at"),
        Index("ix_fine_tune_events_type", "type"),
    )

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String)
    # Order in which events were first seen, per job: ORDER BY job_id, seq replays a timeline.
    seq: Mapped[int] = mapped_column(Integer)
    # The event's identity within its job (see events.py): h:HASH, hs:SHA256 or c:SHA256.
    event_key: Mapped[str] = mapped_column(String)

    # FineTuneEvent, under the API's names, as sent (the newer generation has no hash).
    object: Mapped[str | None] = mapped_column(String)
    created_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    level: Mapped[str | None] = mapped_column(String)
    message: Mapped[str | None] = mapped_column(Text)
    type: Mapped[str | None] = mapped_column(String)
    param_count: Mapped[int | None] = mapped_column(BigInteger)
    token_count: Mapped[int | None] = mapped_column(BigInteger)
    total_steps: Mapped[int | None] = mapped_column(BigInteger)
    wandb_url: Mapped[str | None] = mapped_column(Text)
    step: Mapped[int | None] = mapped_column(BigInteger)
    checkpoint_path: Mapped[str | None] = mapped_column(Text)
    model_path: Mapped[str | None] = mapped_column(Text)
    training_offset: Mapped[int | None] = mapped_column(BigInteger)
    hash: Mapped[str | None] = mapped_column(Text)
    # 2026-08 generation.
    tokenized_dataset_path: Mapped[str | None] = mapped_column(Text)
    early_stopping_best_step: Mapped[int | None] = mapped_column(BigInteger)
    early_stopping_best_metric_value: Mapped[float | None] = mapped_column(Double)

    raw: Mapped[dict[str, Any]] = mapped_column(RawJSON)
    # sha256 of the canonical JSON of the event as received: the "did it change" test.
    content_hash: Mapped[str] = mapped_column(String(64))
    # What had to be repaired to store the event (e.g. ["step:int_parsing"]), else NULL.
    repairs: Mapped[list[str] | None] = mapped_column(RawJSON)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class SyncState(Base):
    """Per-job sync state: what eventsync knows about each job it has been asked to follow."""

    __tablename__ = "sync_state"

    job_id: Mapped[str] = mapped_column(String, primary_key=True)
    status: Mapped[str | None] = mapped_column(String)
    model: Mapped[str | None] = mapped_column(String)  # base model, from the job listing
    last_synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_kind: Mapped[str | None] = mapped_column(String)
    event_count: Mapped[int] = mapped_column(Integer, server_default="0")
    max_seq: Mapped[int] = mapped_column(Integer, server_default="0")
    # Event count and a digest of every event's content, as last stored: equal means the
    # list is unchanged and there is nothing to write.
    fingerprint: Mapped[str | None] = mapped_column(String)
    repairs: Mapped[int] = mapped_column(Integer, server_default="0")
    # Added with `eventsync jobs add`: the daemon follows it whatever its flags say.
    tracked: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # Set once a job in a terminal status had its last successful fetch; the daemon then
    # stops polling it until the listing shows it running again.
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())


events_table: Table = FineTuneEvent.__table__  # type: ignore[assignment]
state_table: Table = SyncState.__table__  # type: ignore[assignment]
