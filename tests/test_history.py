"""history.py on SQLite and Postgres: records, status history, metrics and checkpoints, stored
once each, fetched only when they can have changed, from a real HTTP fake."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from eventsync.models import (
    checkpoints_table,
    jobs_table,
    metrics_table,
    status_history_table,
)
from eventsync.testing import (
    FakeTogether,
    install_write_counter,
    make_checkpoint,
    make_metrics,
    writes,
)
from tests.helpers import event_counts, run, sync_in_order, sync_pass

HISTORY_TABLES = (
    "fine_tune_jobs",
    "fine_tune_job_status_history",
    "fine_tune_metrics",
    "fine_tune_checkpoints",
    "fine_tune_events",
)


def rows(engine: Engine, table: Any, job_id: str, *columns: str) -> list[tuple[Any, ...]]:
    chosen = [table.c[name] for name in columns]
    order = table.c.id if "id" in table.c else table.c.job_id
    query = select(*chosen).where(table.c.job_id == job_id).order_by(order)
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(query)]


def metric_rows(engine: Engine, job_id: str) -> set[tuple[Any, ...]]:
    return set(
        rows(
            engine, metrics_table, job_id, "global_step", "train_loss", "eval_loss", "content_hash"
        )
    )


def requested(fake: FakeTogether, suffix: str) -> list[str]:
    return [p for p in fake.requests if p.split("?")[0].endswith(suffix)]


def test_a_jobs_history_is_stored(fake: FakeTogether, engine: Engine) -> None:
    """One pass stores the job's record (nested settings as columns), its first status, every
    metrics snapshot and every checkpoint."""
    fake.add_job("ft-1", events=8, learning_rate=3e-5)
    fake.add_metrics("ft-1", 40)
    fake.add_checkpoints("ft-1", [make_checkpoint("ft-1", 20), make_checkpoint("ft-1", 40)])
    assert sync_pass(fake, engine, ["ft-1"]).ok

    (job,) = rows(
        engine,
        jobs_table,
        "ft-1",
        "status",
        "learning_rate",
        "training_type",
        "lora_r",
        "record_fetched_at",
    )
    assert job[:4] == ("running", 3e-5, "Lora", 16)
    assert job[4] is not None  # the full record was fetched
    assert rows(engine, status_history_table, "ft-1", "status") == [("running",)]
    served = fake.jobs["ft-1"].metrics
    assert len(metric_rows(engine, "ft-1")) == len(served)
    assert rows(engine, checkpoints_table, "ft-1", "step") == [(20,), (40,)]


def test_a_repoll_that_finds_nothing_new_writes_nothing(fake: FakeTogether, engine: Engine) -> None:
    """The second pass over an unchanged job writes no row of any history table, and asks
    for neither the record nor the checkpoints again."""
    fake.add_job("ft-1", events=8)
    fake.add_metrics("ft-1", 30)
    fake.add_checkpoints("ft-1", 2)
    assert sync_pass(fake, engine, ["ft-1"]).ok
    install_write_counter(engine, tables=HISTORY_TABLES)
    fake.requests.clear()
    assert sync_pass(fake, engine, ["ft-1"]).ok
    assert writes(engine) == {}
    assert requested(fake, "/fine-tunes/ft-1") == []
    assert requested(fake, "/checkpoints") == []
    assert len(requested(fake, "/metrics")) == 1


def test_metrics_are_fetched_from_the_last_stored_step(fake: FakeTogether, engine: Engine) -> None:
    """Each poll asks for the steps from the last stored one on, and stores only new ones."""
    fake.add_job("ft-1", events=8)
    fake.add_metrics("ft-1", 25)
    assert sync_pass(fake, engine, ["ft-1"]).ok
    fake.add_metrics("ft-1", 10)
    fake.requests.clear()
    result = sync_pass(fake, engine, ["ft-1"])
    assert result.ok
    (asked,) = requested(fake, "/metrics")
    assert asked.endswith("?global_step_from=25")
    assert result.outcomes[0].snapshots == len([m for m in make_metrics("ft-1", 26, 10)])
    assert len(metric_rows(engine, "ft-1")) == len(fake.jobs["ft-1"].metrics)


def test_an_eval_logged_after_the_train_snapshot_of_its_step_is_kept(
    fake: FakeTogether, engine: Engine
) -> None:
    """An eval snapshot that arrives a poll after the train one of the same step is stored:
    the next poll asks from that step, not after it."""
    fake.add_job("ft-1", events=8)
    fake.add_metrics("ft-1", [{"train/loss": 2.0, "train/global_step": 10}])
    assert sync_pass(fake, engine, ["ft-1"]).ok
    fake.add_metrics("ft-1", [{"eval/loss": 2.2, "train/global_step": 10}])
    assert sync_pass(fake, engine, ["ft-1"]).ok
    stored = {(s, t, e) for s, t, e, _ in metric_rows(engine, "ft-1")}
    assert stored == {(10, 2.0, None), (10, None, 2.2)}


def test_a_status_change_is_recorded_and_the_record_fetched_again(
    fake: FakeTogether, engine: Engine
) -> None:
    """A new status in the listing adds a history row and makes the full record due again;
    the checkpoints of a job that ended are fetched once more."""
    fake.add_job("ft-1", events=8, status="queued")
    assert sync_pass(fake, engine, ["ft-1"]).ok
    assert requested(fake, "/metrics") == []  # a queued job has none yet
    fake.set_status("ft-1", "running")
    fake.add_metrics("ft-1", 10)
    assert sync_pass(fake, engine, ["ft-1"]).ok
    fake.set_status("ft-1", "completed")
    fake.add_checkpoints("ft-1", [make_checkpoint("ft-1", 10, final=True)])
    assert sync_pass(fake, engine, ["ft-1"]).ok
    assert rows(engine, status_history_table, "ft-1", "status") == [
        ("queued",),
        ("running",),
        ("completed",),
    ]
    assert len(requested(fake, "/fine-tunes/ft-1")) == 3
    assert rows(engine, checkpoints_table, "ft-1", "step") == [(10,)]


def test_the_listing_feeds_jobs_at_no_extra_request(fake: FakeTogether, engine: Engine) -> None:
    """A job only listed (not followed) gets its row from the listing, without a request."""
    fake.add_job("ft-1", events=3)
    fake.add_job("ft-other", events=3, learning_rate=1e-4)
    assert sync_pass(fake, engine, ["ft-1"]).ok
    (other,) = rows(engine, jobs_table, "ft-other", "learning_rate", "record_fetched_at")
    assert other == (1e-4, None)
    assert fake.requests_for("ft-other") == []


def test_an_api_without_the_metrics_endpoint_is_noted_once(
    fake: FakeTogether, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A 404 on /metrics (an older deployment) is logged once, asked once per process, and
    the job's events, record and checkpoints are still stored."""
    fake.metrics_endpoint = False
    for job_id in ("ft-1", "ft-2", "ft-3"):
        fake.add_job(job_id, events=5)
        fake.add_checkpoints(job_id, 1)
    with caplog.at_level(logging.INFO, logger="eventsync"):
        outcomes = sync_in_order(fake, engine, ["ft-1", "ft-2", "ft-3"])
    assert all(o.ok for o in outcomes)
    assert len(requested(fake, "/metrics")) == 1
    said = [r for r in caplog.records if "no metrics endpoint" in r.getMessage()]
    assert len(said) == 1
    assert said[0].levelno == logging.INFO
    for job_id in ("ft-1", "ft-2", "ft-3"):
        assert len(rows(engine, checkpoints_table, job_id, "step")) == 1


def test_history_off_fetches_events_only(fake: FakeTogether, engine: Engine) -> None:
    """EVENTSYNC_HISTORY=false: one request per job, for its events, and the listing feeds
    no history table either."""
    fake.add_job("ft-1", events=5)
    fake.add_job("ft-2", events=2)
    fake.add_metrics("ft-1", 5)
    assert sync_pass(fake, engine, ["ft-1"], all_jobs=True, history=False).ok
    assert fake.requests_for("ft-1") == ["/v1/fine-tunes/ft-1/events"]
    assert event_counts(engine) == {"ft-1": 5, "ft-2": 2}
    for table in (jobs_table, status_history_table, metrics_table, checkpoints_table):
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 0


def test_hostile_history_values_are_repaired_and_recorded(
    fake: FakeTogether, engine: Engine
) -> None:
    """Values that fit no column are NULL, named in repairs, and kept in raw."""
    fake.add_job("ft-1", events=3, record={"n_epochs": "three", "learning_rate": 1e400})
    fake.add_metrics(
        "ft-1",
        [
            {"train/loss": "low", "train/global_step": 2**70},
            {"train/loss": 1.5, "train/global_step": 3, "note": "a\u0000b"},
        ],
    )
    fake.add_checkpoints("ft-1", [{"step": "x", "path": "s3://p\u0000q", "created_at": "soon"}])
    result = sync_pass(fake, engine, ["ft-1"])
    assert result.ok
    repairs = result.outcomes[0].repairs
    assert repairs["n_epochs:int_parsing"] == 1
    assert repairs["train_loss:not_a_number"] == 1
    assert repairs["global_step:out_of_range"] == 1
    assert repairs["created_at:unparseable"] == 1
    (job,) = rows(engine, jobs_table, "ft-1", "n_epochs", "learning_rate", "raw")
    raw = job[2] if isinstance(job[2], dict) else json.loads(job[2])
    assert (job[0], job[1], raw["n_epochs"]) == (None, None, "three")
    (checkpoint,) = rows(engine, checkpoints_table, "ft-1", "step", "path", "created_at")
    assert checkpoint == (None, "s3://p\ufffdq", None)


def test_both_api_generations(fake: FakeTogether, engine: Engine) -> None:
    """A 2026-04 job and a 2026-08 job both get their record, metrics and checkpoints."""
    fake.add_job("ft-old", events=5, generation="2026-04")
    fake.add_job("ft-new", events=5, generation="2026-08")
    for job_id in ("ft-old", "ft-new"):
        fake.add_metrics(job_id, 12)
        fake.add_checkpoints(job_id, 1)
    assert sync_pass(fake, engine, ["ft-old", "ft-new"]).ok
    for job_id in ("ft-old", "ft-new"):
        assert rows(engine, jobs_table, job_id, "status") == [("running",)]
        assert len(metric_rows(engine, job_id)) == len(fake.jobs[job_id].metrics)
        assert len(rows(engine, checkpoints_table, job_id, "step")) == 1


# Snapshots as an API might serve them: steps that repeat, evals on a train step, repeats of
# a whole snapshot, values no column holds.
SNAPSHOTS = st.lists(
    st.fixed_dictionaries(
        {"train/global_step": st.integers(0, 6)},
        optional={
            "train/loss": st.floats(0, 5) | st.text(max_size=3) | st.booleans(),
            "eval/loss": st.floats(0, 5),
            "note": st.text(max_size=3),
        },
    ),
    max_size=14,
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(snapshots=SNAPSHOTS, cuts=st.lists(st.integers(0, 14), max_size=3))
def test_incremental_metrics_store_what_one_fetch_stores(
    fake: FakeTogether, engine: Engine, snapshots: list[dict[str, Any]], cuts: list[int]
) -> None:
    """Snapshots served a few at a time over several polls (each asking from the last stored
    step) are stored exactly as one poll of the final list stores them."""
    ordered = sorted(snapshots, key=lambda m: m["train/global_step"])  # the API's order
    fake.reset()
    fake.add_job("ft-split", events=3)
    fake.add_job("ft-whole", events=3)
    start = 0
    for cut in [*sorted(cuts), len(ordered)]:
        fake.add_metrics("ft-split", ordered[start : max(start, cut)])
        start = max(start, cut)
        assert sync_pass(fake, engine, ["ft-split"]).ok
    fake.add_metrics("ft-whole", ordered)
    assert sync_pass(fake, engine, ["ft-whole"]).ok
    columns = ("seq", "global_step", "train_loss", "eval_loss", "content_hash", "repairs")
    assert rows(engine, metrics_table, "ft-split", *columns) == rows(
        engine, metrics_table, "ft-whole", *columns
    )
    with engine.begin() as connection:  # the next example starts empty
        for table in (metrics_table, jobs_table, status_history_table):
            connection.execute(table.delete())


def test_status_shows_the_loss_and_jobs_show_the_whole_record(
    fake: FakeTogether, engine: Engine, api_env: dict[str, str], tmp_path: Path
) -> None:
    """`eventsync status` has the latest train and eval loss; `eventsync jobs show` gives the
    job's record, its stored history and its status history, as a table and as JSON."""
    url = engine.url.render_as_string(hide_password=False)
    fake.add_job("ft-1", events=4, learning_rate=3e-5, status="queued")
    assert (
        run("sync", "--job-id", "ft-1", "--database-url", url, cwd=tmp_path, env=api_env).returncode
        == 0
    )
    fake.set_status("ft-1", "running")
    fake.add_metrics("ft-1", [{"train/loss": 1.25, "train/global_step": 10}])
    fake.add_metrics("ft-1", [{"eval/loss": 1.5, "train/global_step": 10}])
    fake.add_checkpoints("ft-1", [make_checkpoint("ft-1", 10)])
    done = run("sync", "--job-id", "ft-1", "--database-url", url, cwd=tmp_path, env=api_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["ft-1: 0 new, 4 total; metrics +2; checkpoints +1"]
    status = run("status", "--database-url", url, cwd=tmp_path)
    assert "1.25 (eval 1.5)" in status.stdout
    shown = run("jobs", "show", "ft-1", "--database-url", url, "--format", "json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    (record,) = json.loads(shown.stdout)
    assert (record["learning_rate"], record["snapshots"], record["checkpoints"]) == (3e-5, 2, 1)
    assert (record["train_loss"], record["eval_loss"], record["last_step"]) == (1.25, 1.5, 10)
    assert [h["status"] for h in record["status_history"]] == ["queued", "running"]
    assert record["latest_checkpoint"] == "s3://together-ft/ft-1/checkpoint-10"
    table = run("jobs", "show", "ft-1", "--database-url", url, cwd=tmp_path)
    assert "learning_rate" in table.stdout
    assert "queued" in table.stdout
    missing = run("jobs", "show", "ft-nope", "--database-url", url, cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "error: job ft-nope is not in the database: sync it first (eventsync sync --job-id ft-nope)"
    )


def test_a_404_for_one_job_after_the_endpoint_answered_concerns_that_job_alone(
    fake: FakeTogether, engine: Engine
) -> None:
    """Once /metrics has answered, a 404 for one job (deleted meanwhile, say) skips that
    job's metrics this poll and leaves the endpoint on for the others."""
    for job_id in ("ft-a", "ft-b", "ft-c"):
        fake.add_job(job_id, events=3)
        fake.add_metrics(job_id, 5)
    fake.inject("status", match="/ft-b/metrics", status=404)
    outcomes = sync_in_order(fake, engine, ["ft-a", "ft-b", "ft-c"])
    assert all(o.ok for o in outcomes)
    assert [o.snapshots for o in outcomes] == [
        len(fake.jobs["ft-a"].metrics),
        0,
        len(fake.jobs["ft-c"].metrics),
    ]
    assert sync_pass(fake, engine, ["ft-b"]).outcomes[0].snapshots == len(fake.jobs["ft-b"].metrics)


def test_a_listing_older_than_the_stored_record_changes_nothing(
    fake: FakeTogether, engine: Engine
) -> None:
    """A listing read before a worker stored a newer full record (the daemon reads it, then
    writes it) neither sets the status back nor adds a status row."""
    from datetime import UTC, datetime

    from eventsync.client import Job
    from eventsync.db import write_transaction
    from eventsync.history import note_listing

    fake.add_job("ft-1", events=3)
    stale = Job("ft-1", "running", record=fake.jobs["ft-1"].listed())
    fake.set_status("ft-1", "completed")
    assert sync_pass(fake, engine, ["ft-1"]).ok
    install_write_counter(engine, tables=HISTORY_TABLES)
    with write_transaction(engine) as connection:
        assert note_listing(connection, [stale], now=datetime.now(UTC)) == 0
    assert writes(engine) == {}
    assert rows(engine, status_history_table, "ft-1", "status") == [("completed",)]


def test_the_final_loss_is_the_last_steps_on_both_databases(
    fake: FakeTogether, engine: Engine
) -> None:
    """A snapshot without a step is never the "final" one, and the newest checkpoint is the
    highest step, on SQLite and Postgres alike (NULLs sort differently by default)."""
    from sqlalchemy import text

    fake.add_job("ft-1", events=3)
    fake.add_metrics(
        "ft-1",
        [
            {"train/loss": 1.0, "train/global_step": 10},
            {"train/loss": 0.5, "note": "no step"},
            {"train/loss": 0.9, "train/global_step": 20},
        ],
    )
    fake.add_checkpoints(
        "ft-1",
        [
            make_checkpoint("ft-1", 20),
            {"path": "s3://x/final", "created_at": "2026-11-01T00:00:00Z"},
        ],
    )
    assert sync_pass(fake, engine, ["ft-1"]).ok
    with engine.connect() as connection:
        final = connection.execute(
            text("SELECT final_train_loss, best_train_loss FROM fine_tune_runs")
        ).one()
        newest = connection.execute(text("SELECT step FROM fine_tune_latest_checkpoints")).one()
    assert tuple(final) == (0.9, 0.5)
    assert tuple(newest) == (20,)


def test_raw_and_repairs_are_json_the_database_can_query(
    fake: FakeTogether, engine: Engine
) -> None:
    """`raw` holds each object (and `repairs` a list) as JSON, not as a string of JSON, so
    json_extract and ->> reach into it on both databases."""
    from sqlalchemy import text

    fake.add_job("ft-1", events=3, record={"n_epochs": "three"})
    fake.add_metrics("ft-1", [{"train/loss": "low", "train/global_step": 1}])
    fake.add_checkpoints("ft-1", 1)
    assert sync_pass(fake, engine, ["ft-1"]).ok
    kind = "jsonb_typeof" if engine.dialect.name == "postgresql" else "json_type"
    with engine.connect() as connection:
        for table in ("fine_tune_jobs", "fine_tune_metrics", "fine_tune_checkpoints"):
            found = connection.execute(text(f"SELECT DISTINCT {kind}(raw) FROM {table}")).all()
            assert found == [("object",)], table
        for table in ("fine_tune_jobs", "fine_tune_metrics"):
            found = connection.execute(text(f"SELECT {kind}(repairs) FROM {table}")).all()
            assert found == [("array",)], table
        # Nothing to repair is SQL NULL, as for events, not JSON null.
        clean = text("SELECT count(*) FROM fine_tune_checkpoints WHERE repairs IS NULL")
        assert connection.execute(clean).scalar() == 1
