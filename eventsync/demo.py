"""The offline demo: fine-tuning runs as they really go, served by the fake API.

Runs that completed, failed with an error, were cancelled, wait in the queue, and still train
while you watch: their events are a function of the clock, relative to when the demo started,
so a running job gains events as time passes and `--since 2d` finds recent ones. Three runs
differ only in their learning rate, to compare them. One job's events fail a few times first,
as a flaky upstream would, so the failure queries have something to show.

    python -m eventsync.testing --demo
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
MISTRAL = "mistralai/Mistral-7B-Instruct-v0.2"
QWEN = "Qwen/Qwen2.5-7B-Instruct"


@dataclass(frozen=True)
class Run:
    """One fine-tuning job's plan: when it was created, how long it queues, how many steps
    it trains at what pace, and how it ends (or not yet)."""

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

    def _at(self, step: int) -> datetime:
        return self.created + self.queued + timedelta(minutes=1) + step * self.step_time

    def _last_step(self) -> int:
        return self.stop_step if self.stop_step is not None else self.total_steps

    def status(self, now: datetime) -> str:
        """The job's status at `now`, as the listing shows it."""
        if self.ending == "pending" or now < self.created + self.queued:
            return "pending"
        finished = self._at(self._last_step()) + timedelta(minutes=1)
        if self.ending == "running" or now < finished:
            return "running"
        return self.ending

    def events(self, now: datetime) -> list[dict[str, Any]]:
        """Every event the API would list at `now`, in order."""
        return [event for at, event in self._timeline() if at <= now]

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
                path = f"s3://together-ft/{self.job_id}/checkpoints/step-{step}"
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
            model = f"s3://together-ft/{self.job_id}/model"
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
            "param_count": 8_030_261_248,
            "token_count": 4096 * step,
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
        ),
        *(
            Run(
                f"ft-lr-{name}",
                LLAMA,
                started - timedelta(minutes=4),
                learning_rate=lr,
                generation="2026-08",
                queued=timedelta(seconds=30),
                total_steps=1200,
                ending="running",
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
    _stop: threading.Event = field(default_factory=threading.Event)

    def install(self, fake: Any, now: datetime | None = None) -> None:
        """Add every run to `fake` as it stands at `now`, and make the flaky job flaky."""
        for run in runs(self.started):
            fake.add_job(run.job_id, generation=run.generation, model=run.model)
        self.refresh(fake, now)
        fake.inject(
            "status",
            match="/ft-flaky/events",
            times=FLAKY_FAILURES,
            status=503,
            headers={"Retry-After": "0"},
            message="upstream connect error or disconnect/reset before headers",
        )

    def refresh(self, fake: Any, now: datetime | None = None) -> None:
        """Bring every run's events and status to `now`."""
        now = now or datetime.now(UTC)
        for run in runs(self.started):
            events = run.events(now)
            if len(events) != len(fake.jobs[run.job_id].events):
                fake.set_events(run.job_id, events)
            fake.set_status(run.job_id, run.status(now))

    def keep_current(self, fake: Any, every: float = 1.0) -> None:
        """Refresh `fake` every `every` seconds in a daemon thread."""

        def loop() -> None:
            while not self._stop.wait(every):
                self.refresh(fake)

        threading.Thread(target=loop, name="demo", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
