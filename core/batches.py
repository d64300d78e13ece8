"""Batches: an input file validated into a job, and the output files rendered when it ends.

A batch is a job underneath: it shares the workers, the batching, the database and the owner
checks. Its status follows the job's; once the job has ended, a finalizer of the API
(``webapi.finalizer``) takes it (``begin_finalize``), writes its output and error files a part at
a time and ends it (``end_finalize``). Reading a batch never writes.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, bindparam, or_, select, update
from sqlalchemy.orm import Session

from core import files as file_service
from core import jobs as job_service
from core import webhooks
from core.errors import ConflictError, NotFoundError
from core.ids import new_id
from core.jobs import Limits
from core.registry import ModelSpec
from core.schemas import JobCreate, WebhookCreate, window_seconds
from core.tables import Batch, File, Job, utcnow

# How a job's end maps to the batch's end.
_ENDING = {"completed": "completed", "failed": "completed", "cancelled": "cancelled", "expired": "expired"}

def _webhook_columns(webhook: WebhookCreate | None) -> dict[str, Any]:
    if webhook is None:
        return {}
    return {"webhook": webhooks.initial_state(webhook.url), "webhook_secret": webhook.secret or webhooks.new_secret()}


def create_failed_batch(*, session: Session, owner: str, input_file_id: str, endpoint: str,
                        completion_window: str, metadata: dict[str, str] | None,
                        errors: list[dict[str, Any]], webhook: WebhookCreate | None = None) -> tuple[Batch, str | None]:
    """A batch whose input file did not validate: it ends at once, with the reasons (and its
    webhook, if it named one, is told ``batch.failed``). Returns it and its webhook's key, which
    the answer to its creation shows once (the batch itself no longer holds it: its event does)."""
    now = utcnow()
    batch = Batch(id=new_id("batch"), owner=owner, input_file_id=input_file_id, endpoint=endpoint,
                  completion_window=completion_window, status="failed", errors=errors, batch_metadata=metadata,
                  created_at=now, failed_at=now, expires_at=now + timedelta(seconds=window_seconds(completion_window)),
                  **_webhook_columns(webhook))
    session.add(batch)
    secret = batch.webhook_secret
    webhooks.enqueue_batch_event(session, batch, now)
    session.flush()
    return batch, secret


def create_batch(*, session: Session, owner: str, input_file_id: str, endpoint: str, completion_window: str,
                 metadata: dict[str, str] | None, spec: JobCreate, model: ModelSpec, limits: Limits,
                 counter: Any = None, dispatching: bool = False,
                 webhook: WebhookCreate | None = None,
                 prepared: job_service.NewJob | None = None) -> tuple[Batch, Job, list[str]]:
    """The job for a validated input file and the batch around it, in the caller's transaction
    (``prepared``: the job as ``core.jobs.prepare_job`` already made it from ``spec``)."""
    if prepared is None:
        prepared = job_service.prepare_job(spec=spec, model=model, limits=limits, owner=owner, counter=counter,
                                           dispatching=dispatching)
    job_service.insert_jobs(session.connection(), [prepared])
    job, request_ids = Job(**prepared.values), prepared.request_ids
    now = utcnow()
    batch = Batch(id=new_id("batch"), owner=owner, job_id=job.id, input_file_id=input_file_id, endpoint=endpoint,
                  completion_window=completion_window, model=model.name, status="in_progress",
                  batch_metadata=metadata, created_at=now, in_progress_at=now,
                  expires_at=job.expires_at or now, **_webhook_columns(webhook))
    session.add(batch)
    session.flush()
    return batch, job, request_ids


def get_batch(*, session: Session, batch_id: str, owner: str | None, lock: bool = False) -> Batch:
    """The batch, or ``NotFoundError`` (also when it belongs to another owner)."""
    batch = session.get(Batch, batch_id, with_for_update=lock)
    if batch is None or (owner is not None and batch.owner != owner):
        raise NotFoundError(f"no batch {batch_id!r}")
    return batch


# What a batch read shows: the batch's columns (by their attribute names) and its job's counts and
# usage (``job_*``, None when it has no job or the job was deleted), in one query.
_b, _j = Batch.__table__.c, Job.__table__.c
BATCH_FIELDS = (*(c.label("batch_metadata") if c.name == "metadata" else c for c in _b
                  if c.name != "webhook_secret"),
                _j.total.label("job_total"), _j.succeeded.label("job_succeeded"), _j.failed.label("job_failed"),
                _j.prompt_tokens.label("job_prompt_tokens"), _j.completion_tokens.label("job_completion_tokens"))
_WITH_JOB = select(*BATCH_FIELDS).select_from(Batch.__table__.outerjoin(Job.__table__, _j.id == _b.job_id))
_JOB_COUNTS = ("total", "succeeded", "failed", "prompt_tokens", "completion_tokens")


def batch_fields(batch: Batch, job: Job | None, secret: str | None = None) -> dict[str, Any]:
    """A just-created batch's values under ``BATCH_FIELDS``' names (with its webhook's secret,
    which only the answer to its creation shows: ``secret`` when the batch already gave it to
    its event)."""
    values = {a.key: getattr(batch, a.key) for a in Batch.__mapper__.column_attrs}
    if secret is not None:
        values["webhook_secret"] = secret
    values.update({f"job_{name}": None if job is None else getattr(job, name) for name in _JOB_COUNTS})
    return values


def batch_row(conn: Connection, *, batch_id: str, owner: str | None) -> Row[Any]:
    """The batch as ``BATCH_FIELDS``, or ``NotFoundError`` (also when it belongs to another owner)."""
    row = conn.execute(_WITH_JOB.where(_b.id == bindparam("id")), {"id": batch_id}).first()
    if row is None or (owner is not None and row.owner != owner):
        raise NotFoundError(f"no batch {batch_id!r}")
    return row


def list_batches(*, session: Session | Connection, owner: str | None, after: str | None = None,
                 limit: int = 20) -> tuple[list[Row[Any]], bool]:
    """The owner's batches as ``BATCH_FIELDS``, newest first; and whether more follow."""
    query = _WITH_JOB
    if owner is not None:
        query = query.where(_b.owner == owner)
    if after is not None:
        query = query.where(_b.id < after)
    rows = session.execute(query.order_by(_b.id.desc()).limit(limit + 1)).all()
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


# --- finalizing: the output and error files, rendered once the job has ended -----------------

# A finalizer that has not touched its batch for this long is taken to have died: another one
# starts over (deleting what the first had written).
FINALIZE_STALE_S = 300.0


def due(*, session: Session, now: datetime | None = None, limit: int = 20) -> list[str]:
    """Batches to finalize: in progress or cancelling with their job ended (or deleted), and
    those whose finalizer died."""
    now = now or utcnow()
    ended = select(Job.id).where(Job.id == Batch.job_id, Job.status.in_(tuple(_ENDING)))
    stale = now - timedelta(seconds=FINALIZE_STALE_S)
    query = (select(Batch.id)
             .where(or_(Batch.status.in_(("in_progress", "cancelling")) & (ended.exists() | Batch.job_id.is_(None)),
                        (Batch.status == "finalizing") & (Batch.finalizing_at < stale)))
             .order_by(Batch.id).limit(limit))
    return list(session.scalars(query))


def begin_finalize(*, session: Session, batch_id: str, now: datetime | None = None) -> Batch | None:
    """Take the batch for finalizing (status ``finalizing``), or None if it is not due or another
    finalizer has it. A batch whose job was deleted fails here; files a dead finalizer left
    half-written are deleted."""
    now = now or utcnow()
    stale = now - timedelta(seconds=FINALIZE_STALE_S)
    taken = session.execute(
        update(Batch).where(Batch.id == batch_id,
                            or_(Batch.status.in_(("in_progress", "cancelling")),
                                (Batch.status == "finalizing") & (Batch.finalizing_at < stale)))
        .values(status="finalizing", finalizing_at=now)).rowcount
    if not taken:
        return None
    batch = get_batch(session=session, batch_id=batch_id, owner=None)
    job = session.get(Job, batch.job_id) if batch.job_id else None
    if job is None:
        batch.status, batch.failed_at = "failed", now
        batch.errors = [{"code": "job_deleted", "line": None, "param": None,
                         "message": "the job that ran this batch was deleted before its results were collected"}]
        webhooks.enqueue_batch_event(session, batch, now)
        session.flush()
        return None
    if job.status not in _ENDING:  # cannot happen through ``due``; put it back
        batch.status = "cancelling" if batch.cancelling_at else "in_progress"
        return None
    for name in output_names(batch_id):  # what a dead finalizer wrote: start over
        for file_id in session.scalars(select(File.id).where(File.owner == batch.owner, File.purpose == "batch_output",
                                                            File.filename == name)):
            file_service.delete_file(session=session, file_id=file_id, owner=None)
    return batch


def output_names(batch_id: str) -> tuple[str, str]:
    """The names of a batch's output and error files."""
    return f"{batch_id}_output.jsonl", f"{batch_id}_error.jsonl"


def touch(*, session: Session, batch_id: str, now: datetime | None = None) -> None:
    """The finalizer is alive and working on the batch."""
    session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "finalizing")
                    .values(finalizing_at=now or utcnow()))


def end_finalize(*, session: Session, batch_id: str, output_file_id: str | None, error_file_id: str | None,
                 now: datetime | None = None) -> Batch:
    """The files are written: the batch ends as its job did."""
    now = now or utcnow()
    batch = get_batch(session=session, batch_id=batch_id, owner=None, lock=True)
    job = session.get(Job, batch.job_id) if batch.job_id else None
    batch.output_file_id, batch.error_file_id = output_file_id, error_file_id
    batch.status = _ENDING[job.status] if job is not None else "failed"
    stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at",
             "failed": "failed_at"}[batch.status]
    setattr(batch, stamp, now)
    webhooks.enqueue_batch_event(session, batch, now)  # the batch's end and its event: one transaction
    session.flush()
    return batch
