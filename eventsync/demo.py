"""The offline demo: fine-tuning runs as they really go, served by the fake API.

Runs that completed, failed with an error, were cancelled, wait in the queue, and still train
while you watch. Each one's events, record, training metrics and checkpoints are a function
of the clock, relative to when the demo started: a running job gains events, loss snapshots
and checkpoints as time passes (its token_count and total_price grow), and `--since 2d` finds
recent ones. Three runs on one model differ only in their learning rate, to compare them:
1e-5 learns slowly, 3e-5 reaches the lowest loss, and 1e-4 falls fastest, then stalls,
noisily, while its eval loss creeps back up. One job's events fail a few times first, as a
flaky upstream would, so the failure queries have something to show.

    python -m eventsync.testing
"""

from __future__ import annotations

import hashlib
import threading
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from eventsync.payloads import (
    NOT_STARTED,
    PARAM_COUNTS,
    make_checkpoint,
    make_metrics,
    make_record,
)
from eventsync.testing import FakeTogether

LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
MISTRAL = "mistralai/Mistral-7B-Instruct-v0.2"
QWEN = "Qwen/Qwen2.5-7B-Instruct"
TOKENS_PER_STEP = 4096
SNAPSHOTS = 200  # train snapshots in a whole run's metrics, about: one every few steps

Timed = list[tuple[datetime, dict[str, Any]]]  # in time order


def _until(timed: Timed, now: datetime) -> list[dict[str, Any]]:
    return [item for _, item in timed[: bisect_right(timed, now, key=lambda pair: pair[0])]]


@dataclass(frozen=True)
class Run:
    """One fine-tuning job's plan: when it was created, how long it queues, how many steps
    it trains at what pace and with which settings, and how it ends (or not yet). What the
    API shows of it at a time is computed once, then read by bisection."""

    job_id: str
    model: str
    created: datetime
    learning_rate: float = 1e-5
    generation: str = "2026-04"
    queued: timedelta = timedelta(minutes=2)
    total_steps: int = 600
    step_time: timedelta = timedelta(seconds=3)
    n_epochs: int = 3
    checkpoint_every: int = 20
    ending: str = "completed"  # completed, error, cancelled, running (never ends), pending
    stop_step: int | None = None  # the step an error or a cancellation happens at
    error: str = "CUDA out of memory. Tried to allocate 2.00 GiB"
    batch_size: int | str = 16
    lora: bool = True
    dataset: str | None = None  # runs of one dataset share their training files

    def _at(self, step: int) -> datetime:
        return self.created + self.queued + timedelta(minutes=1) + step * self.step_time

    def _last_step(self) -> int:
        return self.stop_step if self.stop_step is not None else self.total_steps

    def _finished(self) -> datetime:
        return self._at(self._last_step()) + timedelta(minutes=1)

    @property
    def _log_every(self) -> int:
        return max(1, self.total_steps // SNAPSHOTS)

    def status(self, now: datetime) -> str:
        """The job's status at `now`, as the listing shows it."""
        if self.ending == "pending" or now < self.created + self.queued:
            return "pending"
        if self.ending == "running" or now < self._finished():
            return "running"
        return self.ending

    def step(self, now: datetime) -> int:
        """The last step trained by `now`."""
        if self.ending == "pending" or now < self._at(0):
            return 0
        return min(self._last_step(), int((now - self._at(0)) / self.step_time))

    def events(self, now: datetime) -> list[dict[str, Any]]:
        """Every event the API would list at `now`, in order."""
        return _until(self._events, now)

    def metrics(self, now: datetime) -> list[dict[str, Any]]:
        """The metrics snapshots logged by `now`: every few steps, an eval every tenth."""
        return _until(self._metrics, now)

    def checkpoints(self, now: datetime) -> list[dict[str, Any]]:
        """The checkpoints saved by `now`, and the final model once it is uploaded."""
        return _until(self._checkpoints, now)

    def updated_at(self, now: datetime) -> datetime:
        """When the job last changed, as of `now`."""
        changed = bisect_right(self._changes, now)
        return self._changes[changed - 1] if changed else self.created

    def record(self, now: datetime) -> dict[str, Any]:
        """The record's fields beyond id, status, model and updated_at as of `now`: the
        settings, and what has been trained so far (as of the last change)."""
        at = self.updated_at(now)
        status = self.status(at)
        step = self.step(at)
        per_epoch = max(1, self.total_steps // self.n_epochs)
        eval_steps = 10 * self._log_every
        running = status == "running" and step < self._last_step()
        fields: dict[str, Any] = {
            "created_at": self.created,
            "suffix": self.job_id.removeprefix("ft-"),
            "n_epochs": self.n_epochs,
            "n_checkpoints": self.total_steps // self.checkpoint_every,
            "n_evals": self.total_steps // eval_steps,
            "eval_steps": eval_steps,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "token_count": TOKENS_PER_STEP * step,
            "epochs_completed": min(self.n_epochs, step // per_epoch),
            "progress": {
                "estimate_available": running,
                "seconds_remaining": int((self._finished() - at).total_seconds()) if running else 0,
            },
        }
        if not self.lora:
            fields["training_type"] = {"type": "Full"}
        if status not in NOT_STARTED:
            fields["started_at"] = self.created + self.queued
        if status == "completed":
            final = self._checkpoints[-1][1]
            fields["model_output_path"] = final["path"]
            for name in ("object_id", "object_name", "object_revision_id"):
                fields[f"model_{name}"] = final[name]
        return make_record(
            self.job_id, model=self.model, status=status, dataset=self.dataset, **fields
        )

    @cached_property
    def _events(self) -> Timed:
        return sorted(self._timeline(), key=lambda pair: pair[0])

    @cached_property
    def _metrics(self) -> Timed:
        if self.ending == "pending":
            return []
        every = self._log_every
        snapshots = make_metrics(
            self.job_id,
            1,
            self._last_step(),
            learning_rate=self.learning_rate,
            eval_every=10 * every,
            total_steps=self.total_steps,
        )
        return [
            (self._at(s["train/global_step"]), s)
            for s in snapshots
            if s["train/global_step"] % every == 0 or s["train/global_step"] == self.total_steps
        ]

    @cached_property
    def _checkpoints(self) -> Timed:
        if self.ending == "pending":
            return []
        saved = [
            (self._at(step), self._checkpoint(step, self._at(step)))
            for step in range(self.checkpoint_every, self._last_step() + 1, self.checkpoint_every)
            if step < self.total_steps
        ]
        if self.ending == "completed":
            uploaded = self._at(self.total_steps) + timedelta(seconds=40)  # model_upload_complete
            saved.append((uploaded, self._checkpoint(self.total_steps, uploaded, final=True)))
        return saved

    def _checkpoint(self, step: int, at: datetime, *, final: bool = False) -> dict[str, Any]:
        return make_checkpoint(self.job_id, step, final=final, lora=self.lora, created_at=at)

    @cached_property
    def _changes(self) -> list[datetime]:
        """Every moment the record changes: an event, a snapshot, a checkpoint, the end."""
        times = {
            at for timed in (self._events, self._metrics, self._checkpoints) for at, _ in timed
        }
        if self.ending in ("completed", "error", "cancelled"):
            times.add(self._finished())
        return sorted(times)

    def _timeline(self) -> Iterator[tuple[datetime, dict[str, Any]]]:
        start = self.created + self.queued
        yield self.created, self._event(self.created, "job_pending", "Fine tune request created")
        if self.ending == "pending":
            return
        yield start, self._event(start, "job_start", "Job started")
        for offset, (kind, message) in enumerate(
            [
                ("model_downloading", f"Downloading model {self.model}"),
                ("model_download_complete", "Model downloaded"),
                ("training_data_downloading", "Downloading training data"),
                ("training_data_download_complete", "Training data downloaded"),
            ]
        ):
            at = start + timedelta(seconds=10 * (offset + 1))
            yield at, self._event(at, kind, message)
        at = self._at(0)
        yield at, self._event(at, "training_start", "Training started", step=0)
        per_epoch = max(1, self.total_steps // self.n_epochs)
        last = self._last_step()
        for step in range(1, last + 1):
            at = self._at(step)
            if step % self.checkpoint_every == 0 and step < self.total_steps:
                path = make_checkpoint(self.job_id, step)["path"]
                yield (
                    at,
                    self._event(
                        at,
                        "checkpoint_save",
                        f"Checkpoint saved at step {step}",
                        step=step,
                        checkpoint_path=path,
                    ),
                )
            if step % per_epoch == 0:
                epoch = step // per_epoch
                yield at, self._event(at, "epoch_complete", f"Epoch {epoch} completed", step=step)
        yield from self._ending(last)

    def _ending(self, last: int) -> Iterator[tuple[datetime, dict[str, Any]]]:
        at = self._at(last)
        if self.ending == "error":
            yield at, self._event(at, "job_error", self.error, step=last, level="error")
        elif self.ending == "cancelled":
            yield at, self._event(at, "cancel_requested", "Cancel requested by user", step=last)
            stop = at + timedelta(seconds=20)
            yield stop, self._event(stop, "job_stopped", "Job stopped", step=last)
        elif self.ending == "completed":
            model = make_checkpoint(self.job_id, last, final=True)["path"]
            lines = [
                ("training_complete", "Training completed"),
                ("model_compressing", "Compressing model"),
                ("model_compression_complete", "Model compressed"),
                ("model_uploading", "Uploading model"),
                ("model_upload_complete", "Model uploaded"),
                ("job_complete", "Job finished"),
            ]
            for offset, (kind, message) in enumerate(lines):
                when = at + timedelta(seconds=10 * offset)
                extra = {"model_path": model} if kind == "job_complete" else {}
                yield when, self._event(when, kind, message, step=last, **extra)

    def _event(
        self, at: datetime, kind: str, message: str, *, step: int = 0, **extra: Any
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "object": "fine-tune-event",
            "created_at": at.isoformat().replace("+00:00", "Z"),
            "level": extra.pop("level", "info"),
            "message": message,
            "type": kind,
            "param_count": PARAM_COUNTS.get(self.model, PARAM_COUNTS[LLAMA]),
            "token_count": TOKENS_PER_STEP * step,
            "total_steps": self.total_steps,
            "wandb_url": "",
            "step": step,
            "checkpoint_path": extra.pop("checkpoint_path", ""),
            "model_path": extra.pop("model_path", ""),
        }
        if self.generation == "2026-04":
            event["training_offset"] = 0
            seed = f"{self.job_id}/{kind}/{step}/{at.isoformat()}"
            event["hash"] = hashlib.sha256(seed.encode()).hexdigest()[:32]
        else:
            event["type"] = kind.upper()  # the newer service sends UPPERCASE types
            event["tokenized_dataset_path"] = ""
            event["early_stopping_best_step"] = None
            event["early_stopping_best_metric_value"] = None
        return event


def runs(started: datetime) -> list[Run]:
    """The demo's jobs, relative to when it started."""
    day = timedelta(days=1)
    return [
        Run("ft-done", LLAMA, started - 2 * day, total_steps=120, step_time=timedelta(seconds=5)),
        Run(
            "ft-fail",
            MISTRAL,
            started - day,
            queued=timedelta(minutes=7),
            ending="error",
            stop_step=35,
        ),
        Run(
            "ft-cancel",
            QWEN,
            started - timedelta(hours=20),
            generation="2026-08",
            ending="cancelled",
            stop_step=50,
            batch_size="max",
            lora=False,
        ),
        # A quarter of the way through at the start, so the curves already differ, and
        # training for another hour.
        *(
            Run(
                f"ft-lr-{name}",
                LLAMA,
                started - timedelta(minutes=20),
                learning_rate=lr,
                generation="2026-08",
                queued=timedelta(seconds=30),
                total_steps=1600,
                ending="running",
                dataset="support-chats",
            )
            for name, lr in (("1e-5", 1e-5), ("3e-5", 3e-5), ("1e-4", 1e-4))
        ),
        Run("ft-queued", QWEN, started - timedelta(minutes=1), ending="pending"),
        Run("ft-flaky", MISTRAL, started - timedelta(hours=5), total_steps=60),
    ]


# The requests for the flaky job's events that fail, as a flaky upstream would: as many as
# eventsync tries by default (EVENTSYNC_RETRY_ATTEMPTS), so its first sync fails.
FLAKY_FAILURES = 5


@dataclass
class Demo:
    """The demo's runs on a fake API, kept current by a thread until `stop()`."""

    started: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))
    runs: list[Run] = field(init=False)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.runs = runs(self.started)

    def install(self, fake: FakeTogether, now: datetime | None = None) -> None:
        """Add every run to `fake` as it stands at `now`, and make the flaky job flaky."""
        now = now or datetime.now(UTC)
        for run in self.runs:
            fake.add_job(
                run.job_id,
                generation=run.generation,
                model=run.model,
                status=run.status(now),
                record={**run.record(now), "updated_at": run.updated_at(now)},
            )
        self.refresh(fake, now)
        fake.inject(
            "status",
            match="/ft-flaky/events",
            times=FLAKY_FAILURES,
            status=503,
            headers={"Retry-After": "0"},
            message="upstream connect error or disconnect/reset before headers",
        )

    def refresh(self, fake: FakeTogether, now: datetime | None = None) -> None:
        """Bring every run's events, metrics, checkpoints, record and status to `now` (which
        only moves forward). Only what changed is set, so a tick costs little."""
        now = now or datetime.now(UTC)
        for run in self.runs:
            job = fake.jobs[run.job_id]
            events = run.events(now)
            if len(events) != len(job.events):
                fake.set_events(run.job_id, events)
            metrics = run.metrics(now)
            if len(metrics) != len(job.metrics):
                fake.set_metrics(run.job_id, metrics)
            checkpoints = run.checkpoints(now)
            if len(checkpoints) != len(job.checkpoints):
                fake.set_checkpoints(run.job_id, checkpoints)
            updated_at = run.updated_at(now)
            if updated_at != job.updated_at:
                fields = run.record(now)
                fake.set_record(run.job_id, status=run.status(now), updated_at=updated_at, **fields)

    def keep_current(self, fake: FakeTogether, every: float = 1.0) -> None:
        """Refresh `fake` every `every` seconds in a daemon thread."""

        def loop() -> None:
            while not self._stop.wait(every):
                self.refresh(fake)

        threading.Thread(target=loop, name="demo", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
