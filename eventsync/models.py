"""The schema: SQLAlchemy Core tables. Alembic migrations are checked against these.

Core tables rather than ORM classes: eventsync never loads objects, it reads and writes rows,
and importing sqlalchemy.orm (and the Postgres dialect, for JSONB) cost a read command more
time than everything else it does beside importing SQLAlchemy itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
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
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING_CONVENTION)


class RawJSON(TypeDecorator[Any]):
    """JSONB on Postgres (indexable, queryable with ->>), JSON text on SQLite (json_extract
    works); None is SQL NULL, not JSON null. The Postgres type is loaded only when a Postgres
    engine needs it."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB(none_as_null=True))
        return dialect.type_descriptor(JSON(none_as_null=True))


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


# SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY.
RowId = BigInteger().with_variant(Integer(), "sqlite")

# One event of one fine-tuning job, as the API served it. Unique on (job_id, event_key).
events_table = Table(
    "fine_tune_events",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("job_id", String, nullable=False),
    # Order in which events were first seen, per job: ORDER BY job_id, seq replays a timeline.
    Column("seq", Integer, nullable=False),
    # The event's identity within its job (see events.py): h:HASH, hs:SHA256 or c:SHA256.
    Column("event_key", String, nullable=False),
    # FineTuneEvent, under the API's names, as sent (the newer generation has no hash).
    Column("object", String),
    Column("created_at", UTCDateTime()),
    Column("level", String),
    Column("message", Text),
    Column("type", String),
    Column("param_count", BigInteger),
    Column("token_count", BigInteger),
    Column("total_steps", BigInteger),
    Column("wandb_url", Text),
    Column("step", BigInteger),
    Column("checkpoint_path", Text),
    Column("model_path", Text),
    Column("training_offset", BigInteger),
    Column("hash", Text),
    # 2026-08 generation.
    Column("tokenized_dataset_path", Text),
    Column("early_stopping_best_step", BigInteger),
    Column("early_stopping_best_metric_value", Double),
    Column("raw", RawJSON(), nullable=False),
    # sha256 of the canonical JSON of the event as received: the "did it change" test.
    Column("content_hash", String(64), nullable=False),
    # What had to be repaired to store the event (e.g. ["step:int_parsing"]), else NULL.
    Column("repairs", RawJSON()),
    Column("first_seen_at", UTCDateTime(), server_default=func.now(), nullable=False),
    Column("updated_at", UTCDateTime()),
    UniqueConstraint("job_id", "event_key", name="uq_fine_tune_events_job_id_event_key"),
    UniqueConstraint("job_id", "seq", name="uq_fine_tune_events_job_id_seq"),
    Index("ix_fine_tune_events_job_id_created_at", "job_id", "created_at"),
    Index("ix_fine_tune_events_type", "type"),
)

# What eventsync knows about each job it has been asked to follow.
state_table = Table(
    "sync_state",
    metadata,
    Column("job_id", String, primary_key=True),
    Column("status", String),
    Column("model", String),  # base model, from the job listing
    Column("last_synced_at", UTCDateTime()),
    Column("last_attempt_at", UTCDateTime()),
    Column("last_error", Text),
    Column("last_error_kind", String),
    Column("event_count", Integer, server_default="0", nullable=False),  # rows stored
    Column("max_seq", Integer, server_default="0", nullable=False),
    # The fingerprint of the body last stored (eventsync.fingerprint): equal means there is
    # nothing to write.
    Column("fingerprint", String),
    Column("repairs", Integer, server_default="0", nullable=False),
    # Added with `eventsync jobs add`: the daemon follows it whatever its flags say.
    Column("tracked", Boolean, server_default=false(), nullable=False),
    # Set once a job in a terminal status had its last successful fetch; the daemon then
    # stops polling it until the listing shows it running again.
    Column("finished_at", UTCDateTime()),
    Column("created_at", UTCDateTime(), server_default=func.now(), nullable=False),
    # The daemon's schedule (eventsync.schedule): when the job is next due (NULL: now), which
    # daemon holds it and until when, and how many fetches in a row have failed.
    Column("next_due_at", UTCDateTime(), index=True),
    Column("lease_owner", String),
    Column("lease_until", UTCDateTime()),
    Column("failures", Integer, server_default="0", nullable=False),
)

# Work done once an interval by one daemon of all those sharing the database: "listing".
tasks_table = Table(
    "sync_tasks",
    metadata,
    Column("name", String, primary_key=True),
    Column("next_due_at", UTCDateTime()),
    Column("lease_owner", String),
    Column("lease_until", UTCDateTime()),
)

# One fine-tuning job's record (FinetuneResponse): the listing's truncated entry at first, the
# full record (`GET /fine-tunes/{id}`) once fetched; columns for what users filter on, `raw`
# for the rest. Every job the listing shows has a row; the followed ones get the full record.
jobs_table = Table(
    "fine_tune_jobs",
    metadata,
    Column("job_id", String, primary_key=True),
    Column("status", String),
    Column("model", String),
    Column("created_at", UTCDateTime()),
    Column("updated_at", UTCDateTime()),
    Column("started_at", UTCDateTime()),
    Column("training_file", Text),
    Column("validation_file", Text),
    Column("n_epochs", BigInteger),
    Column("n_checkpoints", BigInteger),
    Column("n_evals", BigInteger),
    Column("batch_size", BigInteger),  # NULL for the API's "max" (raw keeps it)
    Column("learning_rate", Double),
    Column("lr_scheduler", String),  # lr_scheduler.lr_scheduler_type
    Column("warmup_ratio", Double),
    Column("max_grad_norm", Double),
    Column("weight_decay", Double),
    Column("training_type", String),  # training_type.type: Full or Lora
    Column("lora_r", BigInteger),
    Column("lora_alpha", BigInteger),
    Column("lora_dropout", Double),
    Column("lora_trainable_modules", Text),
    Column("training_method", String),  # training_method.method: sft or dpo
    Column("suffix", Text),
    Column("model_output_name", Text),
    Column("token_count", BigInteger),
    Column("param_count", BigInteger),
    Column("total_price", BigInteger),
    Column("epochs_completed", BigInteger),
    Column("wandb_url", Text),
    Column("raw", RawJSON(), nullable=False),
    # sha256 of the canonical JSON of the record as received: equal means nothing to write.
    Column("content_hash", String(64), nullable=False),
    Column("repairs", RawJSON()),
    # When the full record was last fetched; NULL while only the listing's entry is known, or
    # once the listing shows a new status or updated_at (the record is then fetched again).
    Column("record_fetched_at", UTCDateTime()),
    # The job's event count when its checkpoints were last fetched: fetched again once it moves.
    Column("checkpoints_events", Integer),
    Column("first_seen_at", UTCDateTime(), server_default=func.now(), nullable=False),
    Column("stored_at", UTCDateTime()),
    Index("ix_fine_tune_jobs_status", "status"),
    Index("ix_fine_tune_jobs_model", "model"),
)

# Each status a job was seen in, when eventsync first saw it: queue and training times.
status_history_table = Table(
    "fine_tune_job_status_history",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("job_id", String, nullable=False),
    Column("status", String),
    Column("seen_at", UTCDateTime(), nullable=False),  # eventsync's clock
    Column("updated_at", UTCDateTime()),  # the record's updated_at when the status was seen
    Index("ix_fine_tune_job_status_history_job_id_seen_at", "job_id", "seen_at"),
)

# One training-metrics snapshot (`GET /fine-tunes/{id}/metrics`), unique per job by content.
metrics_table = Table(
    "fine_tune_metrics",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("job_id", String, nullable=False),
    Column("seq", Integer, nullable=False),  # order first seen, per job
    Column("global_step", BigInteger),
    Column("train_loss", Double),
    Column("eval_loss", Double),
    Column("learning_rate", Double),
    Column("raw", RawJSON(), nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("repairs", RawJSON()),
    Column("first_seen_at", UTCDateTime(), server_default=func.now(), nullable=False),
    UniqueConstraint("job_id", "content_hash", name="uq_fine_tune_metrics_job_id_content_hash"),
    Index("ix_fine_tune_metrics_job_id_global_step", "job_id", "global_step"),
)

# One checkpoint (`GET /fine-tunes/{id}/checkpoints`, FineTuneCheckpoint), unique per job by
# its path (or, without a usable path, its content).
checkpoints_table = Table(
    "fine_tune_checkpoints",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("job_id", String, nullable=False),
    Column("checkpoint_key", String, nullable=False),
    Column("step", BigInteger),
    Column("created_at", UTCDateTime()),
    Column("path", Text),
    Column("checkpoint_type", Text),
    Column("checkpoint", String),
    Column("object_id", Text),
    Column("object_name", Text),
    Column("object_revision_id", Text),
    Column("raw", RawJSON(), nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("repairs", RawJSON()),
    Column("first_seen_at", UTCDateTime(), server_default=func.now(), nullable=False),
    Column("updated_at", UTCDateTime()),
    UniqueConstraint(
        "job_id", "checkpoint_key", name="uq_fine_tune_checkpoints_job_id_checkpoint_key"
    ),
)
