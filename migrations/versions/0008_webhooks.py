"""Webhooks: a job or a batch may name a URL that is told, once, when it ends.

- ``jobs.webhook`` / ``batches.webhook``: JSON, ``{"url", "status", "attempts", ...}``, what the
  client reads of the delivery; ``webhook_secret``: the HMAC key the events are signed with (it must
  be kept as it is to sign, so it is stored, and shown to the client only in the create response).
- ``webhook_events``: the outbox. A row is written in the transaction that ends its job (or
  batch) and holds everything a delivery needs (URL, secret, the exact body); deliverers take
  due rows by pushing ``next_attempt_at`` forward (a lease), so a deliverer that dies mid-way
  leaves the row due again.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.tables import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "batches"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("webhook", sa.JSON(none_as_null=True), nullable=True))
            batch.add_column(sa.Column("webhook_secret", sa.String(128), nullable=True))
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("subject_id", sa.String(40), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_webhook_events_status_next", "webhook_events", ["status", "next_attempt_at"])
    op.create_index("ix_webhook_events_subject_id", "webhook_events", ["subject_id"])


def downgrade() -> None:
    op.drop_index("ix_webhook_events_subject_id", table_name="webhook_events")
    op.drop_index("ix_webhook_events_status_next", table_name="webhook_events")
    op.drop_table("webhook_events")
    for table in ("batches", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("webhook_secret")
            batch.drop_column("webhook")
