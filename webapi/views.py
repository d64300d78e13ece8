"""The native API's JSON for jobs and results, built straight from their rows.

``core.schemas.JobRead`` and ``ResultRead`` are the documented shapes (OpenAPI, the web page,
the CLI); these functions write the same JSON without building pydantic models, which cost more
than the read itself on a poll. A test compares the two on every field, for jobs and results in
every state. The rare nested parts (a webhook's state, log probabilities, scores, samples) still
go through their pydantic models, so their JSON is exactly the documented one.

A row is a Core row of ``core.jobs.JOB_FIELDS`` / ``RESULT_FIELDS`` (read by name through its
mapping), or an object with the ``Job`` attribute names (a just-prepared job's values).
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


def fields(row: Any) -> Any:
    """A row's values by name: a Core row's mapping (reading a Core row by attribute costs five
    times more, and a view reads thirty), a dict of them, or an object's attributes."""
    if isinstance(row, dict):
        return row
    return row._mapping if hasattr(row, "_mapping") else vars(row)


def job_view(job: Any, *, created: bool = False, now: datetime | None = None) -> dict[str, Any]:
    """A job as ``JobRead`` (``created``: the answer to its submission, the only one that shows
    its webhook's secret; ``now``: the time its estimated end is computed at)."""
    j = fields(job)
    webhook = None
    if j["webhook"] is not None:
        webhook = WebhookRead.model_validate(
            {**j["webhook"], "secret": j["webhook_secret"] if created else None}).model_dump(mode="json")
    status, started_at, queued, running = j["status"], j["started_at"], j["queued"], j["running"]
    succeeded, failed = j["succeeded"], j["failed"]
    prompt_tokens, completion_tokens = j["prompt_tokens"], j["completion_tokens"]
    return {
        "id": j["id"], "object": "job", "model": j["model"], "kind": j["kind"] or "generate", "status": status,
        "counts": {"total": j["total"], "queued": queued, "running": running, "succeeded": succeeded,
                   "failed": failed, "cancelled": j["cancelled"], "expired": j["expired"]},
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "params": j["params"], "system": j["system"], "priority": j["priority"], "metadata": j["job_metadata"],
        "owner": j["owner"], "completion_window": window(j["completion_window_s"]),
        "created_at": iso(j["created_at"]), "started_at": iso(started_at), "completed_at": iso(j["completed_at"]),
        "expires_at": iso(j["expires_at"]), "cancel_requested_at": iso(j["cancel_requested_at"]),
        "estimated_completion_at": None if status != "running" else iso(estimated_completion(
            status=status, started_at=started_at, done=succeeded + failed, left=queued + running, now=now)),
        "webhook": webhook,
    }


def result_view(row: Any) -> dict[str, Any]:
    """One request and its result, as ``ResultRead``."""
    r = fields(row)
    detail = r["detail"] or {}
    logprobs, choices, scores = detail.get("logprobs"), detail.get("choices"), detail.get("scores")
    error_code = r["error_code"]
    return {
        "id": r["id"], "object": "job.result", "index": r["idx"], "custom_id": r["custom_id"], "status": r["status"],
        "prompt": r["prompt"], "messages": r["messages"], "prompt_ids": r["prompt_ids"], "text": r["text"],
        "finish_reason": r["finish_reason"], "prompt_tokens": r["prompt_tokens"],
        "completion_tokens": r["completion_tokens"],
        "logprobs": None if logprobs is None else Logprobs.model_validate(logprobs).model_dump(mode="json"),
        "choices": None if choices is None else [Choice.model_validate(c).model_dump(mode="json") for c in choices],
        "continuations": r["continuations"],
        "scores": None if scores is None else [Score.model_validate(s).model_dump(mode="json") for s in scores],
        "error": {"code": error_code, "message": r["error_message"] or ""} if error_code else None,
        "created_at": iso(r["created_at"]), "completed_at": iso(r["completed_at"]),
    }
