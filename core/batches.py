"""Batches: an input file validated into a job, and the output files rendered when it ends.

A batch is a job underneath: it shares the workers, the batching, the database and the owner
checks. Its status follows the job's; when the job has ended, ``finalize`` (called by whoever
reads the batch first) renders the output and error files once, under a row lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import files as file_service
from core import jobs as job_service
from core.errors import ConflictError, NotFoundError
from core.ids import new_id
from core.jobs import Limits
from core.registry import ModelSpec
from core.schemas import JobCreate, window_seconds
from core.tables import Batch, Job, JobRequest, utcnow

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
# How a job's end maps to the batch's end.
_ENDING = {"completed": "completed", "failed": "completed", "cancelled": "cancelled", "expired": "expired"}

Renderer = Callable[[Batch, Iterator[JobRequest]], tuple[bytes, bytes]]


def create_failed_batch(*, session: Session, owner: str, input_file_id: str, endpoint: str,
                        completion_window: str, metadata: dict[str, str] | None,
                        errors: list[dict[str, Any]]) -> Batch:
    """A batch whose input file did not validate: it ends at once, with the reasons."""
    now = utcnow()
    batch = Batch(id=new_id("batch"), owner=owner, input_file_id=input_file_id, endpoint=endpoint,
                  completion_window=completion_window, status="failed", errors=errors, batch_metadata=metadata,
                  created_at=now, failed_at=now, expires_at=now + timedelta(seconds=window_seconds(completion_window)))
    session.add(batch)
    session.flush()
    return batch


def create_batch(*, session: Session, owner: str, input_file_id: str, endpoint: str, completion_window: str,
                 metadata: dict[str, str] | None, spec: JobCreate, model: ModelSpec, limits: Limits,
                 counter: Any = None, dispatching: bool = False) -> tuple[Batch, Job, list[str]]:
    """The job for a validated input file and the batch around it, in the caller's transaction."""
    job, request_ids = job_service.create_job(session=session, spec=spec, model=model, limits=limits,
                                              owner=owner, counter=counter, dispatching=dispatching)
    now = utcnow()
    batch = Batch(id=new_id("batch"), owner=owner, job_id=job.id, input_file_id=input_file_id, endpoint=endpoint,
                  completion_window=completion_window, model=model.name, status="in_progress",
                  batch_metadata=metadata, created_at=now, in_progress_at=now,
                  expires_at=job.expires_at or now)
    session.add(batch)
    session.flush()
    return batch, job, request_ids


def get_batch(*, session: Session, batch_id: str, owner: str | None, lock: bool = False) -> Batch:
    """The batch, or ``NotFoundError`` (also when it belongs to another owner)."""
    batch = session.get(Batch, batch_id, with_for_update=lock)
    if batch is None or (owner is not None and batch.owner != owner):
        raise NotFoundError(f"no batch {batch_id!r}")
    return batch


def list_batches(*, session: Session, owner: str | None, after: str | None = None,
                 limit: int = 20) -> tuple[list[Batch], bool]:
    """The owner's batches, newest first; and whether more follow."""
    query = select(Batch)
    if owner is not None:
        query = query.where(Batch.owner == owner)
    if after is not None:
        query = query.where(Batch.id < after)
    rows = list(session.scalars(query.order_by(Batch.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel_batch(*, session: Session, batch_id: str, owner: str | None) -> Batch:
    """Cancel the batch's job; the batch is ``cancelling`` until the job has ended."""
    batch = get_batch(session=session, batch_id=batch_id, owner=owner, lock=True)
    if batch.status in ("cancelling", "cancelled"):
        return batch
    if batch.status not in ("validating", "in_progress"):
        raise ConflictError(f"batch {batch_id} has already ended ({batch.status})")
    if batch.job_id is not None:
        job_service.cancel_job(session=session, job_id=batch.job_id, owner=None)
    batch.status, batch.cancelling_at = "cancelling", utcnow()
    session.flush()
    return batch


def requests_of(session: Session, job_id: str, chunk: int = 1000) -> Iterator[JobRequest]:
    """A job's requests in order, read a chunk at a time."""
    after = -1
    while True:
        rows = job_service.results_after(session=session, job_id=job_id, after_idx=after, limit=chunk)
        if not rows:
            return
        yield from rows
        after = rows[-1].idx


def finalize(*, session: Session, batch_id: str, render: Renderer, now: datetime | None = None) -> Batch:
    """If the batch's job has ended, write its output and error files and end the batch.

    Takes the batch's row lock, so of several readers arriving together one renders the files and
    the others find the batch ended. ``render(batch, requests)`` returns (output, errors) JSONL.
    """
    now = now or utcnow()
    batch = get_batch(session=session, batch_id=batch_id, owner=None, lock=True)
    if batch.status not in ("in_progress", "cancelling", "finalizing"):
        return batch
    job = session.get(Job, batch.job_id) if batch.job_id else None
    if job is None:
        batch.status, batch.failed_at = "failed", now
        batch.errors = [{"code": "job_deleted", "line": None, "param": None,
                         "message": "the job that ran this batch was deleted before its results were collected"}]
        return batch
    if job.status not in _ENDING:
        return batch
    batch.finalizing_at = batch.finalizing_at or now
    output, errors = render(batch, requests_of(session, job.id))
    if output:
        batch.output_file_id = file_service.create_file(session=session, owner=batch.owner, purpose="batch_output",
                                                        filename=f"{batch.id}_output.jsonl", content=output).id
    if errors:
        batch.error_file_id = file_service.create_file(session=session, owner=batch.owner, purpose="batch_output",
                                                       filename=f"{batch.id}_error.jsonl", content=errors).id
    batch.status = _ENDING[job.status]
    stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[batch.status]
    setattr(batch, stamp, now)
    session.flush()
    return batch
