"""The native API's JSON for jobs and results, built straight from their rows.

``core.schemas.JobRead`` and ``ResultRead`` are the documented shapes (OpenAPI, the web page,
the CLI); these functions write the same JSON without building pydantic models, which cost more
than the read itself on a poll. A test compares the two on every field, for jobs and results in
every state. The rare nested parts (a webhook's state, log probabilities, scores, samples) still
go through their pydantic models, so their JSON is exactly the documented one.

A row is anything with the ``Job`` (or ``JobRequest``) attribute names: a Core row of
``core.jobs.JOB_FIELDS`` / ``RESULT_FIELDS``, an ORM object, or a just-prepared job's values.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from core.jobs import estimated_completion
from core.schemas import Choice, Logprobs, Score, WebhookRead


def iso(value: datetime | None) -> str | None:
    """A UTC time as pydantic writes it in JSON (``...Z``)."""
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def window(seconds: int) -> str:
    """A completion window in its largest whole unit (``86400`` -> ``1d``)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def job_view(job: Any, *, created: bool = False, now: datetime | None = None) -> dict[str, Any]:
    """A job as ``JobRead`` (``created``: the answer to its submission, the only one that shows
    its webhook's secret; ``now``: the time its estimated end is computed at)."""
    webhook = None
    if job.webhook is not None:
        webhook = WebhookRead.model_validate(
            {**job.webhook, "secret": job.webhook_secret if created else None}).model_dump(mode="json")
    done = job.succeeded + job.failed
    return {
        "id": job.id, "object": "job", "model": job.model, "kind": job.kind or "generate", "status": job.status,
        "counts": {"total": job.total, "queued": job.queued, "running": job.running, "succeeded": job.succeeded,
                   "failed": job.failed, "cancelled": job.cancelled, "expired": job.expired},
        "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                  "total_tokens": job.prompt_tokens + job.completion_tokens},
        "params": job.params, "system": job.system, "priority": job.priority, "metadata": job.job_metadata,
        "owner": job.owner, "completion_window": window(job.completion_window_s),
        "created_at": iso(job.created_at), "started_at": iso(job.started_at), "completed_at": iso(job.completed_at),
        "expires_at": iso(job.expires_at), "cancel_requested_at": iso(job.cancel_requested_at),
        "estimated_completion_at": iso(estimated_completion(status=job.status, started_at=job.started_at, done=done,
                                                            left=job.queued + job.running, now=now)),
        "webhook": webhook,
    }


def result_view(row: Any) -> dict[str, Any]:
    """One request and its result, as ``ResultRead``."""
    detail = row.detail or {}
    logprobs, choices, scores = detail.get("logprobs"), detail.get("choices"), detail.get("scores")
    return {
        "id": row.id, "object": "job.result", "index": row.idx, "custom_id": row.custom_id, "status": row.status,
        "prompt": row.prompt, "messages": row.messages, "prompt_ids": row.prompt_ids, "text": row.text,
        "finish_reason": row.finish_reason, "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "logprobs": None if logprobs is None else Logprobs.model_validate(logprobs).model_dump(mode="json"),
        "choices": None if choices is None else [Choice.model_validate(c).model_dump(mode="json") for c in choices],
        "continuations": row.continuations,
        "scores": None if scores is None else [Score.model_validate(s).model_dump(mode="json") for s in scores],
        "error": {"code": row.error_code, "message": row.error_message or ""} if row.error_code else None,
        "created_at": iso(row.created_at), "completed_at": iso(row.completed_at),
    }
