"""The fake API's job records, metrics and checkpoints, and the demo's, over real HTTP."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from eventsync.demo import Demo
from eventsync.testing import LISTED_FIELDS, FakeTogether, make_checkpoint, make_metrics

START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LR_RUNS = ("ft-lr-1e-5", "ft-lr-3e-5", "ft-lr-1e-4")
# What a record says about how a job trains; three runs that differ only in their learning
# rate agree on all of these.
SETTINGS = (
    "n_epochs",
    "batch_size",
    "lr_scheduler",
    "warmup_ratio",
    "max_grad_norm",
    "weight_decay",
    "training_type",
    "training_method",
    "training_file",
)


@pytest.fixture
def api(fake: FakeTogether) -> Iterator[httpx.Client]:
    """An HTTP client of the fake's /v1, with its key."""
    headers = {"Authorization": f"Bearer {fake.api_key}"}
    with httpx.Client(base_url=f"{fake.base_url}/v1", headers=headers) as client:
        yield client


def get(api: httpx.Client, path: str, **params: Any) -> Any:
    response = api.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def listed(api: httpx.Client, job_id: str) -> dict[str, Any]:
    entries = {entry["id"]: entry for entry in get(api, "/fine-tunes")["data"]}
    return entries[job_id]  # type: ignore[no-any-return]


def steps(snapshots: list[dict[str, Any]]) -> list[int]:
    return [s["train/global_step"] for s in snapshots]


def train_losses(snapshots: list[dict[str, Any]]) -> list[float]:
    return [s["train/loss"] for s in snapshots if "train/loss" in s]


def test_listing_is_truncated_and_the_record_is_whole(
    fake: FakeTogether, api: httpx.Client
) -> None:
    """The listing's entries hold exactly FinetuneResponseTruncated's fields; the job's own
    record holds those, with the same values, and the rest of FinetuneResponse."""
    fake.add_job("ft-1", events=3)
    entry = listed(api, "ft-1")
    record = get(api, "/fine-tunes/ft-1")
    assert set(entry) == {*LISTED_FIELDS, "events"}
    assert entry["events"] == []
    assert {k: record[k] for k in LISTED_FIELDS} == {k: entry[k] for k in LISTED_FIELDS}
    more = {"param_count", "epochs_completed", "wandb_url", "model_output_path", "progress"}
    assert more | {"trainingfile_numlines", "trainingfile_size"} <= set(record) - set(entry)
    assert isinstance(record["total_price"], int)
    assert record["training_type"]["type"] == "Lora"


def test_record_overrides_merge_over_the_defaults(fake: FakeTogether, api: httpx.Client) -> None:
    """add_job's record= replaces only the fields it names, learning_rate= sets the rate,
    and total_price follows a given token_count."""
    fake.add_job(
        "ft-1",
        learning_rate=3e-5,
        record={"batch_size": "max", "token_count": 1_000_000, "suffix": "mine"},
    )
    record = get(api, "/fine-tunes/ft-1")
    expected = {"learning_rate": 3e-5, "batch_size": "max", "suffix": "mine", "n_epochs": 3}
    assert expected == {k: record[k] for k in expected}
    assert record["total_price"] > 0
    assert record["lr_scheduler"]["lr_scheduler_type"] == "cosine"


def test_status_and_updated_at_agree_and_a_new_status_bumps_it(
    fake: FakeTogether, api: httpx.Client
) -> None:
    """The listing and the record show the same status and updated_at; a change of status
    moves updated_at later in both, and setting the same status again changes nothing."""
    fake.add_job("ft-1")
    before = get(api, "/fine-tunes/ft-1")["updated_at"]
    fake.set_status("ft-1", "completed")
    entry, record = listed(api, "ft-1"), get(api, "/fine-tunes/ft-1")
    assert (entry["status"], entry["updated_at"]) == (record["status"], record["updated_at"])
    assert record["status"] == "completed"
    assert datetime.fromisoformat(record["updated_at"]) > datetime.fromisoformat(before)
    fake.set_status("ft-1", "completed")
    assert get(api, "/fine-tunes/ft-1")["updated_at"] == record["updated_at"]


def test_set_record_changes_fields_and_bumps_updated_at(
    fake: FakeTogether, api: httpx.Client
) -> None:
    """set_record changes the named fields, in the listing too, and moves updated_at later;
    with updated_at= it sets that time instead."""
    fake.add_job("ft-1")
    before = get(api, "/fine-tunes/ft-1")
    fake.set_record("ft-1", token_count=5_000_000, epochs_completed=2)
    after = get(api, "/fine-tunes/ft-1")
    assert (after["token_count"], after["epochs_completed"]) == (5_000_000, 2)
    assert listed(api, "ft-1")["token_count"] == 5_000_000
    assert after["updated_at"] > before["updated_at"]
    fake.set_record("ft-1", status="error", updated_at=START)
    assert (listed(api, "ft-1")["status"], listed(api, "ft-1")["updated_at"]) == (
        "error",
        "2026-12-01T12:00:00.000Z",
    )


def test_metrics_are_filtered_by_global_step(fake: FakeTogether, api: httpx.Client) -> None:
    """global_step_from and global_step_to bound train/global_step inclusively, each on its
    own or together; without them every snapshot comes back, in order."""
    fake.add_job("ft-1", metrics=30)
    every = get(api, "/fine-tunes/ft-1/metrics")["metrics"]
    assert every == fake.jobs["ft-1"].metrics
    assert steps(every) == sorted(steps(every))
    middle = get(api, "/fine-tunes/ft-1/metrics", global_step_from=10, global_step_to=20)
    assert [s for s in every if 10 <= s["train/global_step"] <= 20] == middle["metrics"]
    assert len(middle["metrics"]) == 11 + 2  # a train snapshot per step, evals at 10 and 20
    tail = get(api, "/fine-tunes/ft-1/metrics", global_step_from=25)["metrics"]
    head = get(api, "/fine-tunes/ft-1/metrics", global_step_to=5)["metrics"]
    assert (min(steps(tail)), max(steps(head))) == (25, 5)


@pytest.mark.parametrize("value", ["ten", "1.5", "", "1e3"])
def test_a_step_bound_that_is_no_integer_is_a_400(
    fake: FakeTogether, api: httpx.Client, value: str
) -> None:
    """A global_step bound that isn't an integer is refused with a 400 and an error body
    naming the parameter."""
    fake.add_job("ft-1", metrics=5)
    response = api.get("/fine-tunes/ft-1/metrics", params={"global_step_to": value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "global_step_to"


def test_metrics_endpoint_switched_off_is_a_404(fake: FakeTogether, api: httpx.Client) -> None:
    """With metrics_endpoint False, /metrics answers 404 "Not Found" as a deployment without
    the route would, while the other routes still answer; reset() turns it back on."""
    fake.add_job("ft-1", metrics=5)
    fake.metrics_endpoint = False
    response = api.get("/fine-tunes/ft-1/metrics")
    assert (response.status_code, response.json()["error"]["message"]) == (404, "Not Found")
    assert api.get("/fine-tunes/ft-1/checkpoints").status_code == 200
    fake.reset()
    fake.add_job("ft-1", metrics=5)
    assert len(get(api, "/fine-tunes/ft-1/metrics")["metrics"]) == 5


@pytest.mark.parametrize("route", ["metrics", "checkpoints"])
def test_an_unknown_job_is_a_404(fake: FakeTogether, api: httpx.Client, route: str) -> None:
    """Metrics and checkpoints of a job the fake doesn't know are a 404, as its events are."""
    assert api.get(f"/fine-tunes/ft-nope/{route}").status_code == 404


def test_checkpoints_have_the_api_shape(fake: FakeTogether, api: httpx.Client) -> None:
    """Checkpoints come back as {"data": [FineTuneCheckpoint, ...]}: intermediate LoRA
    adapters CHECKPOINT_EVERY steps apart, then the final model."""
    fake.add_job("ft-1", checkpoints=2)
    fake.add_checkpoints("ft-1", [make_checkpoint("ft-1", 250, final=True)])
    data = get(api, "/fine-tunes/ft-1/checkpoints")["data"]
    required = {"step", "path", "created_at", "checkpoint_type"}
    assert all(required <= set(c) for c in data)
    assert [(c["step"], c["checkpoint"], c["checkpoint_type"]) for c in data] == [
        (100, "adapter", "Intermediate checkpoint (step 100)"),
        (200, "adapter", "Intermediate checkpoint (step 200)"),
        (250, "model", "Final model"),
    ]
    assert data[0]["path"] == "s3://together-ft/ft-1/checkpoint-100"
    assert all(c["object_id"].startswith("ml_") for c in data)


def test_add_metrics_continues_the_same_curve(fake: FakeTogether) -> None:
    """add_metrics(n) appends the next n steps after the last one, as make_metrics at the
    job's learning rate would have made them in one go."""
    fake.add_job("ft-1", learning_rate=3e-5, metrics=10)
    fake.add_metrics("ft-1", 15)
    assert fake.jobs["ft-1"].metrics == make_metrics("ft-1", 1, 25, learning_rate=3e-5)


def test_make_metrics_is_deterministic_falls_and_evaluates() -> None:
    """Two calls agree; the loss falls on average; an eval snapshot follows the train
    snapshot of every eval_every-th step, and no other."""
    first = make_metrics("ft-1", 1, 200, eval_every=25)
    assert first == make_metrics("ft-1", 1, 200, eval_every=25)
    losses = train_losses(first)
    assert len(losses) == 200
    assert statistics.mean(losses[-20:]) < statistics.mean(losses[:20])
    evals = [i for i, s in enumerate(first) if "eval/loss" in s]
    assert [first[i]["train/global_step"] for i in evals] == list(range(25, 201, 25))
    assert all(first[i - 1]["train/global_step"] == first[i]["train/global_step"] for i in evals)
    assert all("train/loss" in first[i - 1] for i in evals)


def test_the_learning_rate_shapes_the_curve() -> None:
    """A higher rate falls faster at first; 3e-5 ends lowest; 3e-4 stalls, noisily, above it."""
    curves = {
        rate: train_losses(make_metrics("ft-1", 1, 1000, learning_rate=rate, eval_every=0))
        for rate in (1e-5, 3e-5, 1e-4, 3e-4)
    }
    early = {rate: statistics.mean(losses[80:120]) for rate, losses in curves.items()}
    assert early[1e-4] < early[3e-5] < early[1e-5]
    late = {rate: statistics.mean(losses[-200:]) for rate, losses in curves.items()}
    assert min(late, key=late.__getitem__) == 3e-5
    assert late[3e-4] > late[3e-5] + 0.2
    assert statistics.stdev(curves[3e-4][-200:]) > 3 * statistics.stdev(curves[3e-5][-200:])


def installed(fake: FakeTogether) -> Demo:
    """The demo, started at START, installed as it stands then."""
    demo = Demo(started=START)
    demo.install(fake, now=START)
    return demo


def test_demo_compares_three_learning_rates_on_one_model(
    fake: FakeTogether, api: httpx.Client
) -> None:
    """Three of the demo's runs share a model and every setting but the learning rate, and
    the end of their curves tells them apart: 3e-5 lowest, 1e-4 stalled above it."""
    demo = installed(fake)
    records = [get(api, f"/fine-tunes/{job_id}") for job_id in LR_RUNS]
    assert len({r["model"] for r in records}) == 1
    assert [r["learning_rate"] for r in records] == [1e-5, 3e-5, 1e-4]
    assert all({k: r[k] for k in SETTINGS} == {k: records[0][k] for k in SETTINGS} for r in records)
    demo.refresh(fake, now=START + timedelta(hours=2))
    late = {
        job_id: statistics.mean(
            train_losses(get(api, f"/fine-tunes/{job_id}/metrics")["metrics"])[-20:]
        )
        for job_id in LR_RUNS
    }
    assert late["ft-lr-3e-5"] < late["ft-lr-1e-4"]
    assert late["ft-lr-3e-5"] < late["ft-lr-1e-5"]


def test_demo_completed_run_has_its_whole_curve_and_a_final_model(
    fake: FakeTogether, api: httpx.Client
) -> None:
    """A completed run's metrics end at its last step, its checkpoints with the final model
    there, which is its record's model_output_path; it trained every epoch."""
    installed(fake)
    events = get(api, "/fine-tunes/ft-done/events")["data"]
    last = events[-1]["step"]
    metrics = get(api, "/fine-tunes/ft-done/metrics")["metrics"]
    checkpoints = get(api, "/fine-tunes/ft-done/checkpoints")["data"]
    record = get(api, "/fine-tunes/ft-done")
    assert max(steps(metrics)) == metrics[-1]["train/global_step"] == last
    assert (checkpoints[-1]["checkpoint_type"], checkpoints[-1]["step"]) == ("Final model", last)
    assert record["model_output_path"] == checkpoints[-1]["path"]
    assert (record["status"], record["epochs_completed"]) == ("completed", record["n_epochs"])


def test_demo_runs_that_stopped_or_never_started(fake: FakeTogether, api: httpx.Client) -> None:
    """A failed run's metrics and checkpoints stop by the step it failed at, without a final
    model; a queued run has neither, and no started_at."""
    installed(fake)
    failed = get(api, "/fine-tunes/ft-fail/events")["data"][-1]
    assert failed["type"] == "job_error"
    assert max(steps(get(api, "/fine-tunes/ft-fail/metrics")["metrics"])) <= failed["step"]
    checkpoints = get(api, "/fine-tunes/ft-fail/checkpoints")["data"]
    assert checkpoints
    assert all(c["step"] <= failed["step"] and c["checkpoint"] == "adapter" for c in checkpoints)
    assert get(api, "/fine-tunes/ft-queued/metrics")["metrics"] == []
    assert get(api, "/fine-tunes/ft-queued/checkpoints")["data"] == []
    assert "started_at" not in get(api, "/fine-tunes/ft-queued")


def test_demo_running_run_gains_metrics_as_the_clock_advances(
    fake: FakeTogether, api: httpx.Client
) -> None:
    """Two minutes later by the demo's clock, a running run has new snapshots after its old
    last step, new checkpoints, more tokens and a later updated_at, the listing agreeing."""
    demo = installed(fake)
    path = "/fine-tunes/ft-lr-3e-5"
    before = get(api, path)
    old_metrics = get(api, f"{path}/metrics")["metrics"]
    old_checkpoints = get(api, f"{path}/checkpoints")["data"]
    demo.refresh(fake, now=START + timedelta(minutes=2))
    after = get(api, path)
    newer = get(api, f"{path}/metrics", global_step_from=max(steps(old_metrics)) + 1)["metrics"]
    assert newer
    assert get(api, f"{path}/metrics")["metrics"] == old_metrics + newer
    assert len(get(api, f"{path}/checkpoints")["data"]) > len(old_checkpoints)
    assert after["token_count"] > before["token_count"]
    assert after["total_price"] > before["total_price"]
    assert after["updated_at"] > before["updated_at"]
    assert listed(api, "ft-lr-3e-5")["updated_at"] == after["updated_at"]
    assert after["status"] == "running"
