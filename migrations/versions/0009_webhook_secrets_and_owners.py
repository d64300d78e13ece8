"""Webhook events hold their secret only while they may still be sent, and are counted per owner.

- ``webhook_events.secret`` becomes nullable: an event that was delivered or failed drops its key
  (the subject's ``webhook_secret`` is dropped when its event is written), so the keys at rest
  are those of events still pending.
- ``ix_webhook_events_owner_status``: deliverers take due events fairly per owner and the outbox
  caps an owner's pending events; both count by owner and status.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch:
        batch.alter_column("secret", existing_type=sa.String(128), nullable=True)
    op.create_index("ix_webhook_events_owner_status", "webhook_events", ["owner", "status"])
    # What ended before this revision: finished events and ended subjects forget their keys now.
    op.execute("UPDATE webhook_events SET secret = NULL WHERE status <> 'pending'")
    ended = "('completed', 'failed', 'cancelled', 'expired')"
    op.execute(f"UPDATE jobs SET webhook_secret = NULL WHERE status IN {ended}")
    op.execute(f"UPDATE batches SET webhook_secret = NULL WHERE status IN {ended}")


def downgrade() -> None:
    op.drop_index("ix_webhook_events_owner_status", table_name="webhook_events")
    op.execute("UPDATE webhook_events SET secret = '' WHERE secret IS NULL")
    with op.batch_alter_table("webhook_events") as batch:
        batch.alter_column("secret", existing_type=sa.String(128), nullable=False)
