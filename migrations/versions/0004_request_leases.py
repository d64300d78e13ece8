"""Leases on running requests: a request whose worker vanished can be claimed again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.tables import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_requests") as batch:
        batch.add_column(sa.Column("lease_until", UTCDateTime(), nullable=True))
    op.create_index("ix_job_requests_run_id", "job_requests", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_job_requests_run_id", "job_requests")
    with op.batch_alter_table("job_requests") as batch:
        batch.drop_column("lease_until")
