"""SQLAlchemy models. ``migrations/`` is the schema's source of truth; these must match it
(a test compares them with Alembic's autogenerate on SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """Now, in UTC, timezone-aware."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


# A job in these statuses may still change (requests to run, or running requests to end).
ACTIVE_JOB_STATUSES = ("queued", "running", "cancelling")


class Job(Base):
    """A submitted job; its counters move in the same transactions as its requests."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16), default="generate")
    status: Mapped[str] = mapped_column(String(20))
    # Named job_metadata in Python: "metadata" is taken by SQLAlchemy's declarative base.
    job_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    # What it counts against the caps: its requests' weights (core.jobs.request_weight: samples
    # and tokens), at least one a request.
    units: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    completion_window_s: Mapped[int] = mapped_column(Integer, default=86400)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelled: Mapped[int] = mapped_column(Integer, default=0)
    expired: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    system: Mapped[str | None] = mapped_column(Text)
    total: Mapped[int] = mapped_column(Integer)
    queued: Mapped[int] = mapped_column(Integer)
    running: Mapped[int] = mapped_column(Integer, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A webhook told when the job ends: what the client reads of it (core.webhooks), and its key.
    webhook: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    webhook_secret: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_owner_id", "owner", "id"),
        Index("ix_jobs_owner_status", "owner", "status"),
        Index("ix_jobs_model_status", "model", "status"),
        Index("ix_jobs_model_id", "model", "id"),
        Index("ix_jobs_expires_at", "expires_at"),
        Index("ux_jobs_owner_idempotency_key", "owner", "idempotency_key", unique=True),
    )


class JobRequest(Base):
    """One prompt of a job and, once run, its result."""

    __tablename__ = "job_requests"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    idx: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str | None] = mapped_column(String(128))
    prompt: Mapped[str | None] = mapped_column(Text)
    messages: Mapped[list[dict[str, str]] | None] = mapped_column(JSON(none_as_null=True))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    prompt_ids: Mapped[list[int] | None] = mapped_column(JSON(none_as_null=True))
    continuations: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    status: Mapped[str] = mapped_column(String(20))
    text: Mapped[str | None] = mapped_column(Text)
    # Besides the text: {"logprobs": ...} (log probabilities asked for) or {"scores": [...]} (scoring).
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    finish_reason: Mapped[str | None] = mapped_column(String(20))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_id: Mapped[str | None] = mapped_column(String(40))
    run_size: Mapped[int | None] = mapped_column(Integer)  # requests in the run that last claimed it
    # While running: the worker holding it renews this; past it, the request may be claimed again.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ux_job_requests_job_idx", "job_id", "idx", unique=True),
        Index("ix_job_requests_status", "status"),
        Index("ix_job_requests_run_id", "run_id"),
    )


class ApiKey(Base):
    """An API key: only a salted hash of its secret is kept."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))
    salt: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[str] = mapped_column(String(64))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class File(Base):
    """An uploaded batch input, or a batch's rendered output or error file."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_files_owner_id", "owner", "id"),)


class FilePart(Base):
    """Part ``seq`` of a file's content (up to 4 MiB), apart from its row so that listing files
    reads no content."""

    __tablename__ = "file_parts"

    file_id: Mapped[str] = mapped_column(String(40), ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    content: Mapped[bytes] = mapped_column(LargeBinary)


class Batch(Base):
    """An OpenAI-style batch: an input file validated into a job, and the files it produces."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    job_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="SET NULL"))
    input_file_id: Mapped[str] = mapped_column(String(40))
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    batch_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    webhook: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    webhook_secret: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (Index("ix_batches_owner_id", "owner", "id"), Index("ix_batches_job_id", "job_id"),
                      Index("ix_batches_status", "status"))


class WebhookEvent(Base):
    """The outbox: one event about a job or batch that ended, until its webhook took it (or gave up).

    Written in the transaction that ends its subject; self-contained (URL, key and the exact body),
    so a delivery reads nothing else. ``next_attempt_at`` is also the lease of the deliverer
    sending it: taking a row pushes it past the send's timeout."""

    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the webhook-id header
    owner: Mapped[str] = mapped_column(String(128))
    subject_id: Mapped[str] = mapped_column(String(40))  # job_… or batch_…
    type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str | None] = mapped_column(String(128))  # dropped once the event is delivered or failed
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_webhook_events_status_next", "status", "next_attempt_at"),
                      Index("ix_webhook_events_subject_id", "subject_id"),
                      Index("ix_webhook_events_owner_status", "owner", "status"))
