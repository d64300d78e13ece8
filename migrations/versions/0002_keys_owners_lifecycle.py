"""API keys; job owners, metadata, priority, idempotency, expiry, cancellation.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("salt", sa.String(32), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
    )
    with op.batch_alter_table("jobs") as batch:
        # Jobs from before owners existed belong to "local" (the only user a laptop had).
        batch.add_column(sa.Column("owner", sa.String(128), nullable=False, server_default="local"))
        batch.add_column(sa.Column("metadata", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="5"))
        batch.add_column(sa.Column("idempotency_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("request_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("completion_window_s", sa.Integer(), nullable=False, server_default="86400"))
        batch.add_column(sa.Column("expires_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("cancelled", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("expired", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("cancel_requested_at", UTCDateTime(), nullable=True))
    op.create_index("ix_jobs_owner_id", "jobs", ["owner", "id"])
    op.create_index("ix_jobs_owner_status", "jobs", ["owner", "status"])
    op.create_index("ix_jobs_model_status", "jobs", ["model", "status"])
    op.create_index("ix_jobs_expires_at", "jobs", ["expires_at"])
    op.create_index("ux_jobs_owner_idempotency_key", "jobs", ["owner", "idempotency_key"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_jobs_owner_idempotency_key", "jobs")
    op.drop_index("ix_jobs_expires_at", "jobs")
    op.drop_index("ix_jobs_model_status", "jobs")
    op.drop_index("ix_jobs_owner_status", "jobs")
    op.drop_index("ix_jobs_owner_id", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in ("cancel_requested_at", "expired", "cancelled", "expires_at", "completion_window_s",
                       "request_hash", "idempotency_key", "priority", "metadata", "owner"):
            batch.drop_column(column)
    op.drop_table("api_keys")
