"""A small, known history of three jobs for the cookbook and the read commands.

- ft-done  (llama-8b):  queued 60 s, trained 600 s, two checkpoints, completed.
- ft-run   (llama-8b):  queued 30 s, training, at step 25 of 100; the 2026-08 generation
                        with UPPERCASE types, as the service really sends them.
- ft-fail  (mistral-7b): queued 120 s, then a job_error "CUDA out of memory".

Their records, metrics and checkpoints (see `records()`): ft-done trained at 1e-5 and its
loss fell to 1.1 (eval 1.3); ft-run trains at 1e-4 and its eval loss was best at step 5 and
has risen since; ft-fail has none.
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


def _at(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def records() -> dict[str, dict[str, Any]]:
    """job id -> the record, metrics and checkpoints the fake serves for it."""
    return {
        "ft-done": {
            "record": {
                "learning_rate": 1e-5,
                "n_epochs": 3,
                "created_at": _at(0),
                "started_at": _at(1),
                "updated_at": _at(13),
                "total_price": 1200,
                "token_count": 400_000,
            },
            "metrics": [
                {"train/loss": 2.0, "train/global_step": 10},
                {"train/loss": 1.5, "train/global_step": 20},
                {"eval/loss": 1.6, "train/global_step": 20},
                {"train/loss": 1.2, "train/global_step": 30},
                {"train/loss": 1.1, "train/global_step": 40},
                {"eval/loss": 1.3, "train/global_step": 40},
            ],
            "checkpoints": [
                {
                    "step": 20,
                    "path": "s3://ckpt/ft-done/step-20",
                    "created_at": _at(5),
                    "checkpoint_type": "Intermediate checkpoint (step 20)",
                },
                {
                    "step": 40,
                    "path": "s3://ckpt/ft-done/final",
                    "created_at": _at(13),
                    "checkpoint_type": "Final model",
                },
            ],
        },
        "ft-run": {
            "record": {
                "learning_rate": 1e-4,
                "n_epochs": 1,
                "created_at": _at(60),
                "started_at": _at(60.5),
                "updated_at": _at(70),
                "total_price": 400,
                "token_count": 100_000,
            },
            "metrics": [
                {"train/loss": 2.4, "train/global_step": 5},
                {"eval/loss": 2.0, "train/global_step": 5},
                {"train/loss": 2.3, "train/global_step": 15},
                {"eval/loss": 2.1, "train/global_step": 15},
                {"train/loss": 2.35, "train/global_step": 25},
                {"eval/loss": 2.2, "train/global_step": 25},
            ],
            "checkpoints": [
                {
                    "step": 25,
                    "path": "s3://ckpt/ft-run/step-25",
                    "created_at": _at(70),
                    "checkpoint_type": "Intermediate checkpoint (step 25)",
                },
            ],
        },
        "ft-fail": {
            "record": {
                "learning_rate": 3e-5,
                "n_epochs": 2,
                "created_at": _at(24 * 60),
                "started_at": _at(24 * 60 + 2),
                "updated_at": _at(24 * 60 + 3),
                "total_price": 0,
                "token_count": 0,
            },
            "metrics": [],
            "checkpoints": [],
        },
    }


def load(fake: FakeTogether) -> None:
    extra = records()
    for job_id, (status, model, events) in history().items():
        fake.add_job(
            job_id,
            events=events,
            status=status,
            model=model,
            record=extra[job_id]["record"],
            metrics=extra[job_id]["metrics"],
            checkpoints=extra[job_id]["checkpoints"],
        )
