"""Plausible Together API payloads, the fake API's and the demo's: events of both
generations, job records, training metrics and checkpoints. Deterministic: the same arguments
give the same payload. Pure: no I/O.

eventsync.testing re-exports them; see its docstring for how they are served.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta
from typing import Any

GENERATIONS = ("2026-04", "2026-08")
LIFECYCLE = [
    ("job_pending", "Fine tune request created"),
    ("job_start", "Job started"),
    ("model_downloading", "Downloading model"),
    ("model_download_complete", "Model downloaded"),
    ("training_start", "Training started"),
]
EPOCH = datetime(2026, 11, 1, tzinfo=UTC)


def make_event(
    job_id: str,
    index: int,
    *,
    generation: str = "2026-04",
    type: str | None = None,
    message: str | None = None,
    total_steps: int = 1000,
    **extra: Any,
) -> dict[str, Any]:
    """The `index`-th event of a plausible job timeline, in the chosen generation's shape."""
    if type is None:
        type = LIFECYCLE[index][0] if index < len(LIFECYCLE) else "checkpoint_save"
    if message is None:
        message = LIFECYCLE[index][1] if index < len(LIFECYCLE) else f"Step {index} done"
    step = max(0, index - len(LIFECYCLE) + 1)
    created = EPOCH + timedelta(seconds=index * 7)
    event: dict[str, Any] = {
        "object": "fine-tune-event",
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "level": "info",
        "message": message,
        "type": type,
        "param_count": 8_030_261_248,
        "token_count": 1000 * step,
        "total_steps": total_steps,
        "wandb_url": "",
        "step": step,
        "checkpoint_path": f"s3://ckpt/{job_id}/step-{step}" if type == "checkpoint_save" else "",
        "model_path": "",
    }
    if generation == "2026-04":
        event["training_offset"] = 0
        event["hash"] = hashlib.sha1(f"{job_id}/{index}".encode()).hexdigest()  # noqa: S324
    else:
        event["tokenized_dataset_path"] = ""
        event["early_stopping_best_step"] = None
        event["early_stopping_best_metric_value"] = None
    event.update(extra)
    return event


DEFAULT_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
PARAM_COUNTS = {
    DEFAULT_MODEL: 8_030_261_248,
    "mistralai/Mistral-7B-Instruct-v0.2": 7_241_732_096,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
}
# The fields of a listing's entry (FinetuneResponseTruncated); the full record has more.
LISTED_FIELDS = (
    "id",
    "status",
    "created_at",
    "updated_at",
    "started_at",
    "user_id",
    "model",
    "model_output_name",
    "suffix",
    "n_epochs",
    "n_evals",
    "n_checkpoints",
    "batch_size",
    "learning_rate",
    "lr_scheduler",
    "warmup_ratio",
    "max_grad_norm",
    "weight_decay",
    "training_type",
    "training_method",
    "training_file",
    "validation_file",
    "total_price",
    "token_count",
    "wandb_project_name",
)
OWNER = "demo-user"  # the namespace of output models and registry objects
WARMUP_RATIO = 0.05
CHECKPOINT_EVERY = 100  # steps between the checkpoints add_checkpoints(job_id, n) makes
NOT_STARTED = frozenset({"pending", "queued"})


def stamp(at: datetime) -> str:
    """A timestamp as the API writes it: UTC, milliseconds, Z."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def price(token_count: int) -> int:
    """What training on `token_count` tokens costs, in the API's integer total_price."""
    return token_count * 18 // 10_000


def _hex(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def make_record(
    job_id: str,
    *,
    model: str = DEFAULT_MODEL,
    status: str = "running",
    dataset: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A plausible job record's fields beyond id, status, model and updated_at
    (FinetuneResponse's), with `fields` merged over them. Datetimes become timestamps, and
    total_price follows token_count unless it is given. Records of one `dataset` (default:
    the job's own) share their training and validation files."""
    digest = _hex(dataset or job_id, "dataset")
    tokens = fields.get("token_count", 4096 * 600)
    record: dict[str, Any] = {
        "created_at": stamp(EPOCH),
        "started_at": stamp(EPOCH + timedelta(seconds=7)),
        "user_id": f"user_{_hex(OWNER)[:24]}",
        "model_output_name": f"{OWNER}/{model.rsplit('/', 1)[-1]}-{job_id}",
        "suffix": "",
        "n_epochs": 3,
        "n_evals": 10,
        "n_checkpoints": 10,
        "batch_size": 16,
        "learning_rate": 1e-5,
        "lr_scheduler": {
            "lr_scheduler_type": "cosine",
            "lr_scheduler_args": {"min_lr_ratio": 0.0, "num_cycles": 0.5},
        },
        "warmup_ratio": WARMUP_RATIO,
        "max_grad_norm": 1.0,
        "weight_decay": 0.0,
        "training_type": {
            "type": "Lora",
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.05,
            "lora_trainable_modules": "all-linear",
        },
        "training_method": {"method": "sft", "train_on_inputs": "auto"},
        "training_file": f"file-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:28]}",
        "validation_file": f"file-{digest[28:36]}-{digest[36:40]}-{digest[40:44]}-{digest[44:56]}",
        "total_price": price(tokens) if isinstance(tokens, int) else 0,
        "token_count": tokens,
        "wandb_project_name": "fine-tuning",
        "wandb_name": job_id,
        "wandb_url": f"https://wandb.ai/{OWNER}/fine-tuning/runs/{job_id}",
        "param_count": PARAM_COUNTS.get(model, 8_030_261_248),
        "epochs_completed": 0,
        "eval_steps": 0,
        "queue_depth": 0,
        "packing": True,
        "max_seq_length": 8192,
        "random_seed": 42,
        "trainingfile_numlines": 12_000 + int(digest[56:60], 16) % 4000,
        "trainingfile_size": 48_000_000 + int(digest[60:], 16) * 1000,
        "model_output_path": "",
        "from_checkpoint": "",
        "progress": {"estimate_available": False, "seconds_remaining": 0},
        "early_stopped": False,
    }
    if status in NOT_STARTED:
        del record["started_at"]
    record.update({k: stamp(v) if isinstance(v, datetime) else v for k, v in fields.items()})
    return record


# The loss curve: from INITIAL_LOSS toward a floor, as fast as the area under the learning
# rate schedule grows; PACE e-folds over a whole run at 1e-5.
INITIAL_LOSS = 2.3
PACE = 2.0
BEST_RATE = 3e-5  # above it, the floor rises and the noise grows
UNSTABLE_RATE = 3e-4  # from it on, the loss spikes


def _scheduled_rate(step: int, peak: float, total: int) -> float:
    """Linear warmup, then a half cosine to zero at `total`."""
    warmup = max(1, round(WARMUP_RATIO * total))
    if step < warmup:
        return peak * step / warmup
    done = min(step, total) - warmup
    return peak * 0.5 * (1 + math.cos(math.pi * done / max(1, total - warmup)))


def _rate_area(step: int, peak: float, total: int) -> float:
    """The schedule's integral from step 0 to `step`, in closed form."""
    warmup = max(1, round(WARMUP_RATIO * total))
    if step <= warmup:
        return peak * step * step / (2 * warmup)
    length = max(1, total - warmup)
    done = min(step, total) - warmup
    cosine = 0.5 * (done + length / math.pi * math.sin(math.pi * done / length))
    return peak * (warmup / 2 + cosine)


def _draws(job_id: str, step: int, salt: str) -> tuple[float, float, float]:
    """A standard normal and two uniforms in [0, 1), the same for the same arguments."""
    digest = hashlib.sha256(f"{job_id}/{step}/{salt}".encode()).digest()
    u1, u2, u3, u4 = (int.from_bytes(digest[i : i + 8], "big") / 2**64 for i in (0, 8, 16, 24))
    normal = math.sqrt(-2 * math.log(1 - u1)) * math.cos(2 * math.pi * u2)
    return normal, u3, u4


def make_metrics(
    job_id: str,
    start_step: int,
    count: int,
    *,
    learning_rate: float = 1e-5,
    eval_every: int = 10,
    total_steps: int = 1000,
) -> list[dict[str, Any]]:
    """Metrics snapshots for steps `start_step` .. `start_step + count - 1` of a plausible
    run: one train snapshot per step, and after every `eval_every`-th (0: never) an eval
    snapshot of the same step. The same arguments give the same numbers."""
    excess = max(0.0, math.log10(learning_rate / BEST_RATE))
    floor = 0.85 + 0.45 * excess
    spread = 0.025 * max(1.0, learning_rate / BEST_RATE) ** 0.8
    scale = 1e-5 * total_steps / 2  # the schedule's area over a whole run at 1e-5
    snapshots: list[dict[str, Any]] = []
    for step in range(start_step, start_step + count):
        left = math.exp(-PACE * _rate_area(step, learning_rate, total_steps) / scale)
        smooth = floor + (INITIAL_LOSS - floor) * left
        noise, grad_draw, spike = _draws(job_id, step, "train")
        loss = smooth + spread * noise
        if learning_rate >= UNSTABLE_RATE and spike < 0.05:
            loss += 0.2 + 0.6 * grad_draw
        grad_norm = (0.25 + 1.5 * left) * (0.8 + 0.4 * grad_draw)
        snapshots.append(
            {
                "train/loss": round(max(0.05, loss), 4),
                "train/learning_rate": float(
                    f"{_scheduled_rate(step, learning_rate, total_steps):.6g}"
                ),
                "train/grad_norm": round(grad_norm * max(1.0, learning_rate / BEST_RATE) ** 0.5, 4),
                "train/global_step": step,
            }
        )
        if eval_every and step % eval_every == 0:
            overfit = 0.25 * excess * (min(step, total_steps) / total_steps) ** 2
            noise = _draws(job_id, step, "eval")[0]
            eval_loss = smooth + 0.04 + overfit + 0.3 * spread * noise
            snapshots.append({"eval/loss": round(eval_loss, 4), "train/global_step": step})
    return snapshots


def make_checkpoint(
    job_id: str,
    step: int,
    *,
    final: bool = False,
    lora: bool = True,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """A FineTuneCheckpoint: an intermediate one at `step` (a LoRA adapter, or the model for
    full training), or the final model. `created_at` defaults to when make_event's
    timeline reaches the step."""
    if created_at is None:
        created_at = EPOCH + timedelta(seconds=7 * (step + len(LIFECYCLE) - 1))
    kind = "final" if final else f"step-{step}"
    digest = _hex(job_id, kind)
    return {
        "step": step,
        "created_at": stamp(created_at),
        "path": f"s3://together-ft/{job_id}/" + ("model" if final else f"checkpoint-{step}"),
        "checkpoint_type": "Final model" if final else f"Intermediate checkpoint (step {step})",
        "checkpoint": "adapter" if lora and not final else "model",
        "object_id": f"ml_{digest[:24]}",
        "object_name": f"{OWNER}/{job_id}" + ("" if final else f"-step-{step}"),
        "object_revision_id": f"rv_{digest[24:48]}",
    }
