"""A small, known history of three jobs for the cookbook and the read commands.

- ft-done  (llama-8b):  queued 60 s, trained 600 s, two checkpoints, completed.
- ft-run   (llama-8b):  queued 30 s, training, at step 25 of 100; the 2026-08 generation
                        with UPPERCASE types, as the service really sends them.
- ft-fail  (mistral-7b): queued 120 s, then a job_error "CUDA out of memory".
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from eventsync.testing import FakeTogether

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def _event(
    job: str, minute: float, type: str, message: str, *, new: bool = False, **extra: Any
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "object": "fine-tune-event",
        "created_at": (T0 + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z"),
        "level": extra.pop("level", "info"),
        "message": message,
        "type": type.upper() if new else type,
        **extra,
    }
    if not new:
        event["hash"] = f"{job}-{minute}-{type}"
    return event


def history() -> dict[str, tuple[str, str, list[dict[str, Any]]]]:
    """job id -> (listing status, model, events)."""
    done = [
        _event("ft-done", 0, "job_pending", "Fine tune request created"),
        _event("ft-done", 1, "job_start", "Job started"),
        _event("ft-done", 2, "training_start", "Training started", total_steps=40),
        _event(
            "ft-done",
            5,
            "checkpoint_save",
            "Saved checkpoint",
            step=20,
            total_steps=40,
            checkpoint_path="s3://ckpt/ft-done/step-20",
        ),
        _event(
            "ft-done",
            9,
            "checkpoint_save",
            "Saved checkpoint",
            step=40,
            total_steps=40,
            checkpoint_path="s3://ckpt/ft-done/step-40",
        ),
        _event("ft-done", 12, "training_complete", "Training completed", step=40, total_steps=40),
        _event("ft-done", 13, "job_complete", "Job finished"),
    ]
    run = [
        _event("ft-run", 60, "job_pending", "Fine tune request created", new=True),
        _event("ft-run", 60.5, "job_start", "Job started", new=True),
        _event("ft-run", 61, "training_start", "Training started", new=True, total_steps=100),
        _event(
            "ft-run",
            70,
            "checkpoint_save",
            "Saved checkpoint",
            new=True,
            step=25,
            total_steps=100,
            checkpoint_path="s3://ckpt/ft-run/step-25",
        ),
    ]
    fail = [
        _event("ft-fail", 24 * 60, "job_pending", "Fine tune request created"),
        _event("ft-fail", 24 * 60 + 2, "job_start", "Job started"),
        _event("ft-fail", 24 * 60 + 3, "job_error", "CUDA out of memory", level="error"),
    ]
    return {
        "ft-done": ("completed", "llama-8b", done),
        "ft-run": ("running", "llama-8b", run),
        "ft-fail": ("error", "mistral-7b", fail),
    }


def load(fake: FakeTogether) -> None:
    for job_id, (status, model, events) in history().items():
        fake.add_job(job_id, events=events, status=status, model=model)
